// torch.ops.kvslimmer.select_pairs: choose exactly k pairwise non-adjacent score entries with the
// smallest total (k non-overlapping adjacent slot pairs). Same contract, same result and the same
// tie-breaking as kvslimmer_vllm.core.select.select_pairs:
//
// * the "regret" greedy on a doubly linked list: take the cheapest live node x (ties: lower node
//   index first); when x has live neighbours l and r, the three collapse into node x with value
//   l + r - x (choosing it later means "drop x, take l and r"); a node at either end of the list
//   is final and is settled together with its only neighbour;
// * every node covers an odd run [lo, hi] of original entries; a settled node contributes the
//   run's outer alternate entries (lo, lo + 2, ...) when taken, the inner ones otherwise.
//
// The order in which the reference pops its heap is fixed by the (value, node) tuples alone (a
// live node has exactly one heap entry, stale entries belong to dead nodes), so any binary heap
// ordered by the same key reproduces it. Values are float64 and the replacement value is
// evaluated as (l + r) - x, as in Python.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <queue>
#include <utility>
#include <vector>

#include "../ops.h"
#include "select.h"

namespace kvslimmer {

void select_row(std::vector<double>& value, int64_t k, int64_t* out) {
  const int64_t n = static_cast<int64_t>(value.size());
  std::vector<int64_t> left(n), right(n), run_lo(n), run_hi(n);
  std::vector<char> alive(n, 1);
  for (int64_t i = 0; i < n; ++i) {
    left[i] = i - 1;   // -1: no live left neighbour
    right[i] = i + 1;  // n: no live right neighbour
    run_lo[i] = run_hi[i] = i;
  }
  using Entry = std::pair<double, int64_t>;
  std::vector<Entry> initial;
  initial.reserve(n);
  for (int64_t i = 0; i < n; ++i) initial.emplace_back(value[i], i);
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap(
      std::greater<Entry>(), std::move(initial));

  std::vector<int64_t> chosen;
  chosen.reserve(k);
  auto unlink = [&](int64_t node) {
    alive[node] = 0;
    if (left[node] >= 0) right[left[node]] = right[node];
    if (right[node] < n) left[right[node]] = left[node];
  };
  auto settle = [&](int64_t node, bool taken) {
    for (int64_t i = taken ? run_lo[node] : run_lo[node] + 1; i <= run_hi[node]; i += 2) {
      chosen.push_back(i);
    }
    unlink(node);
  };

  for (int64_t step = 0; step < k; ++step) {
    Entry top;
    do {
      top = heap.top();
      heap.pop();
    } while (!alive[top.second]);
    const int64_t node = top.second;
    const int64_t prev = left[node], next = right[node];
    if (prev >= 0 && next < n) {
      value[node] = value[prev] + value[next] - top.first;
      run_lo[node] = run_lo[prev];
      run_hi[node] = run_hi[next];
      unlink(prev);
      unlink(next);
      heap.emplace(value[node], node);
    } else {
      if (prev >= 0) settle(prev, /*taken=*/false);
      if (next < n) settle(next, /*taken=*/false);
      settle(node, /*taken=*/true);
    }
  }
  for (int64_t node = 0; node < n; ++node) {
    if (alive[node]) settle(node, /*taken=*/false);
  }
  TORCH_CHECK(static_cast<int64_t>(chosen.size()) == k, "select_pairs chose ", chosen.size(),
              " pairs instead of k=", k);
  std::sort(chosen.begin(), chosen.end());
  std::copy(chosen.begin(), chosen.end(), out);
}

at::Tensor select_pairs(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK_VALUE(scores.dim() == 1 || scores.dim() == 2,
                    "scores must be a 1-D tensor (or 2-D: one row per layer), got shape ",
                    scores.sizes());
  const at::Tensor values_t =
      scores.detach().to(at::kCPU, at::kDouble, /*non_blocking=*/false, /*copy=*/false)
          .contiguous();
  const int64_t rows = scores.dim() == 2 ? values_t.size(0) : 1;
  const int64_t n = values_t.size(-1);
  const int64_t num_slots = n + 1;
  // 2k > M written without overflow: k > floor(M / 2).
  TORCH_CHECK_VALUE(k >= 0 && k <= num_slots / 2, "cannot choose k=", k,
                    " non-overlapping pairs among M=", num_slots,
                    " slots (need 0 <= 2k <= M)");
  const double* data = values_t.data_ptr<double>();
  for (int64_t i = 0; i < rows * n; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(data[i]), "pair scores must be finite");
  }
  at::Tensor result = at::empty(scores.dim() == 2 ? std::vector<int64_t>{rows, k}
                                                  : std::vector<int64_t>{k},
                                at::TensorOptions().dtype(at::kLong));
  int64_t* out = result.data_ptr<int64_t>();
  // Rows (layers) are independent: one task each.
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      std::vector<double> value(data + row * n, data + (row + 1) * n);
      select_row(value, k, out + row * k);
    }
  });
  return scores.device().is_cpu() ? result : result.to(scores.device());
}

}  // namespace kvslimmer
