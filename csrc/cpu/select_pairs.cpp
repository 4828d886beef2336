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
//
// torch.ops.kvslimmer.select_pairs_rows: select_pairs on each row's own first lengths[r] scores
// with its own ks[r] (layers in lock step whose regions and steps differ), padded with -1.
//
// torch.ops.kvslimmer.keep_set: SnapMerge's keep set (kvslimmer_vllm.core.merge.keep_set).
// The reference binary-searches the number d of lowest-scoring slots to drop; here one sort
// and one pass per row: dropping the slots in ascending order, each dropped slot adds one to
// what merging can free (free slots minus their runs) for each dropped neighbour, and the
// first d at which that reaches k is the reference's (the count never decreases with d).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

at::Tensor select_pairs_rows(const at::Tensor& scores, const at::Tensor& lengths,
                             const at::Tensor& ks) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must be [L, P] (one row per layer), got shape ",
                    scores.sizes());
  const int64_t rows = scores.size(0), width = scores.size(1);
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == rows && ks.sizes() == lengths.sizes(),
                    "lengths and ks must be [", rows, "] (one per row), got shapes ",
                    lengths.sizes(), " and ", ks.sizes());
  const at::Tensor values_t =
      scores.detach().to(at::kCPU, at::kDouble, /*non_blocking=*/false, /*copy=*/false)
          .contiguous();
  const at::Tensor n_t = lengths.to(at::kCPU, at::kLong).contiguous();
  const at::Tensor k_t = ks.to(at::kCPU, at::kLong).contiguous();
  const int64_t* n_of = n_t.data_ptr<int64_t>();
  const int64_t* k_of = k_t.data_ptr<int64_t>();
  const double* data = values_t.data_ptr<double>();
  int64_t widest = 0;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t n = n_of[row], k = k_of[row];
    TORCH_CHECK_VALUE(n >= 0 && n <= width, "lengths[", row, "]=", n, " must be in [0, ",
                      width, "] (the scores' width)");
    // 2k > M = n + 1 written without overflow: k > floor(M / 2).
    TORCH_CHECK_VALUE(k >= 0 && k <= (n + 1) / 2, "ks[", row, "]=", k,
                      ": cannot choose that many non-overlapping pairs among M=", n + 1,
                      " slots (need 0 <= 2k <= M)");
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_VALUE(std::isfinite(data[row * width + i]), "pair scores must be finite (row ",
                        row, ", pair ", i, ")");
    }
    widest = std::max(widest, k);
  }
  at::Tensor result = at::full({rows, widest}, -1, at::TensorOptions().dtype(at::kLong));
  int64_t* out = result.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (k_of[row] == 0) continue;
      std::vector<double> value(data + row * width, data + row * width + n_of[row]);
      select_row(value, k_of[row], out + row * widest);
    }
  });
  return scores.device().is_cpu() ? result : result.to(scores.device());
}

namespace {

// An integer that orders as the double does (-0.0 and 0.0 alike; every NaN after +inf).
uint64_t order_key(double value) {
  if (std::isnan(value)) return ~uint64_t{0};
  if (value == 0) value = 0;  // -0.0 ties with 0.0, as in torch.sort
  uint64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return (bits >> 63) ? ~bits : bits | (uint64_t{1} << 63);
}

}  // namespace

at::Tensor keep_set(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK_VALUE(scores.dim() == 2, "scores must be [L, M], got shape ", scores.sizes());
  const at::Tensor values_t =
      scores.detach().to(at::kCPU, at::kDouble, /*non_blocking=*/false, /*copy=*/false)
          .contiguous();
  const int64_t rows = values_t.size(0), m = values_t.size(1);
  TORCH_CHECK_VALUE(k >= 0 && k < std::max<int64_t>(m, 1), "cannot free k=", k, " of ", m,
                    " slots by merging runs");
  at::Tensor keep = at::ones({rows, m}, at::TensorOptions().dtype(at::kBool));
  const double* data = values_t.data_ptr<double>();
  bool* out = keep.data_ptr<bool>();
  if (k > 0) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<std::pair<uint64_t, int64_t>> order(m);
      std::vector<char> dropped(m);
      for (int64_t row = begin; row < end; ++row) {
        // Ascending, NaN last, ties by slot (the earlier first, so the later one is kept):
        // torch.sort's stable order, sorted on integer keys that order as the values do.
        for (int64_t i = 0; i < m; ++i) order[i] = {order_key(data[row * m + i]), i};
        std::sort(order.begin(), order.end());
        std::fill(dropped.begin(), dropped.end(), 0);
        int64_t mergeable = 0;
        bool* row_out = out + row * m;
        for (int64_t r = 0; r < m && mergeable < k; ++r) {
          const int64_t i = order[r].second;
          dropped[i] = 1;
          row_out[i] = false;
          mergeable += (i > 0 && dropped[i - 1]) + (i + 1 < m && dropped[i + 1]);
        }
      }
    });
  }
  return scores.device().is_cpu() ? keep : keep.to(scores.device());
}

}  // namespace kvslimmer
