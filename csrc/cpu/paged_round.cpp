// torch.ops.kvslimmer.round_stats and round_apply: one pairwise merge round of one request
// over L layers, read from the paged caches through the request's slot ids and written back
// into them in place -- the CPU kernel of kvslimmer_vllm.kernels.paged_merge_round, whose
// reference is kvslimmer_vllm.core.paged.paged_merge_round (gather the slots, run
// core.merge.merge_round, compact, store the slots' state). Between the two ops the caller
// reduces the scores (tensor parallelism) and selects the pairs.
//
// round_stats: over the mergeable region M = [sink, N - recent) of each layer l,
//     alpha[l, m, h] = mass / sum_m mass (uniform 1 / M for a head without mass)
//     h[l, m, h]     = alpha (1 - 2 alpha) ||v_m - sum_j alpha_j v_j||_1, smoothed with the
//                      carried hess for round round_idx
//     scores[l, i]   = (A_i + A_{i+1}) exp(-(i + 1) / gamma), A the mass max-pooled over
//                      `pool` slots and summed over heads (float64)
// round_apply: for the chosen pairs (left[l] region-local, ascending, disjoint), the
// closed-form key weights (or count weights), the merged keys (the left key rotated to its
// neighbour's position) and values, then one walk up the request's slots that moves each
// surviving row to its output slot and writes each merged row there, with its count,
// position and Hessian proxy; the observation mass of all N slots is reset (or, with
// carry_mass, between the sub-rounds of one step, carried: a merged slot's is the sum of its
// pair's, as core.merge.carry_mass gives). Rows only move
// to lower slots and a merged row is computed before its slot is written, so no copy of the
// request is needed. Layers are independent tasks.
//
// Unlike the gathered path (engine/slots.py), nothing here copies the request's rows out:
// the value spread reads them where they are, the pair merge reads its four rows per pair.
// Caches float32 or float64 (computed in that dtype, like the reference); the state tensors
// in the engine's dtypes (counts, hess, mass float32, positions int64), contiguous.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "round_math.h"
#include "spread.h"

namespace kvslimmer {
namespace {

// The shapes every op checks: L caches [S, H, 2D] of one float dtype, slots [N] in [0, S),
// layers [L] rows of the state, the state [Ltot, S(, H)].
struct Round {
  int64_t layers, num_slots, heads, dim, n, sink, region;
};

Round check_round(const std::vector<at::Tensor>& kvs, const at::Tensor& slots,
                  const at::Tensor& layer_rows, const std::vector<const at::Tensor*>& state,
                  int64_t sink, int64_t recent) {
  TORCH_CHECK_VALUE(!kvs.empty(), "a round needs at least one layer's cache");
  const at::Tensor& first = kvs[0];
  TORCH_CHECK_VALUE(first.dim() == 3 && first.size(2) % 2 == 0,
                    "each cache must be [S, H, 2D]; got ", first.sizes());
  TORCH_CHECK_VALUE(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble,
                    "the round ops take float32 or float64 caches; got ", first.scalar_type());
  for (const at::Tensor& kv : kvs) {
    TORCH_CHECK_VALUE(kv.sizes() == first.sizes() && kv.scalar_type() == first.scalar_type(),
                      "every cache must have the first's shape ", first.sizes(), " and dtype ",
                      first.scalar_type(), "; got ", kv.sizes(), " ", kv.scalar_type());
    TORCH_CHECK_VALUE(kv.device().is_cpu() && kv.stride(2) == 1,
                      "each cache must be a CPU tensor with a contiguous last dimension");
  }
  Round r{static_cast<int64_t>(kvs.size()), first.size(0), first.size(1), first.size(2) / 2,
          slots.numel(), sink, 0};
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_cpu() &&
                        slots.is_contiguous(),
                    "slots must be contiguous CPU int64 [N]; got ", slots.scalar_type(), " ",
                    slots.sizes());
  TORCH_CHECK_VALUE(layer_rows.dim() == 1 && layer_rows.numel() == r.layers &&
                        layer_rows.scalar_type() == at::kLong && layer_rows.is_cpu() &&
                        layer_rows.is_contiguous(),
                    "layers must be contiguous CPU int64 [L] with L = ", r.layers,
                    " caches; got ", layer_rows.scalar_type(), " ", layer_rows.sizes());
  TORCH_CHECK_VALUE(sink >= 0 && recent >= 0 && r.n - sink - recent >= 2,
                    "the mergeable region [sink, N - recent) = [", sink, ", ", r.n - recent,
                    ") must hold at least 2 slots (N = ", r.n, ")");
  r.region = r.n - sink - recent;
  const int64_t total_layers = state[0]->size(0);
  for (const at::Tensor* t : state) {
    const bool per_head = t->dim() == 3;
    TORCH_CHECK_VALUE(t->is_cpu() && t->is_contiguous() && t->size(0) == total_layers &&
                          t->size(1) == r.num_slots && (!per_head || t->size(2) == r.heads),
                      "the slot state must be contiguous CPU tensors [layers, ", r.num_slots,
                      "(, ", r.heads, ")]; got ", t->sizes());
  }
  const int64_t* ids = slots.data_ptr<int64_t>();
  for (int64_t j = 0; j < r.n; ++j) {
    TORCH_CHECK_VALUE(ids[j] >= 0 && ids[j] < r.num_slots, "slot id ", ids[j],
                      " outside the cache's ", r.num_slots, " slots");
  }
  const int64_t* rows = layer_rows.data_ptr<int64_t>();
  for (int64_t l = 0; l < r.layers; ++l) {
    TORCH_CHECK_VALUE(rows[l] >= 0 && rows[l] < total_layers, "layer ", rows[l],
                      " outside the state's ", total_layers, " layers");
  }
  return r;
}

void check_state_dtypes(const at::Tensor* counts, const at::Tensor* positions,
                        const at::Tensor& hess, const at::Tensor& mass) {
  TORCH_CHECK_VALUE(hess.scalar_type() == at::kFloat && mass.scalar_type() == at::kFloat,
                    "hess and mass must be float32; got ", hess.scalar_type(), " and ",
                    mass.scalar_type());
  TORCH_CHECK_VALUE(hess.dim() == 3 && mass.dim() == 3, "hess and mass must be [layers, S, H]");
  if (counts != nullptr) {
    TORCH_CHECK_VALUE(counts->scalar_type() == at::kFloat && counts->dim() == 2,
                      "counts must be float32 [layers, S]; got ", counts->scalar_type(), " ",
                      counts->sizes());
    TORCH_CHECK_VALUE(positions->scalar_type() == at::kLong && positions->dim() == 2,
                      "positions must be int64 [layers, S]; got ", positions->scalar_type(),
                      " ", positions->sizes());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> round_stats(
    const std::vector<at::Tensor>& kvs, const at::Tensor& slots, const at::Tensor& layer_rows,
    const at::Tensor& hess, const at::Tensor& mass, int64_t sink, int64_t recent,
    int64_t round_idx, double gamma, int64_t pool) {
  check_state_dtypes(nullptr, nullptr, hess, mass);
  const Round r = check_round(kvs, slots, layer_rows, {&hess, &mass}, sink, recent);
  TORCH_CHECK_VALUE(round_idx >= 1, "round_idx must be >= 1, got ", round_idx);
  TORCH_CHECK_VALUE(gamma > 0, "gamma must be > 0, got ", gamma);
  TORCH_CHECK_VALUE(pool >= 1 && pool % 2 == 1, "pool width must be an odd integer >= 1, got ",
                    pool);
  const int64_t L = r.layers, M = r.region, H = r.heads, D = r.dim, S = r.num_slots;
  const auto options = kvs[0].options();
  at::Tensor alpha = at::empty({L, M, H}, options), h = at::empty({L, M, H}, options);
  at::Tensor scores = at::empty({L, M - 1}, options.dtype(at::kDouble));
  const int64_t* ids = slots.data_ptr<int64_t>() + sink;  // the region's slot ids
  const int64_t* rows = layer_rows.data_ptr<int64_t>();
  const float* mass_p = mass.data_ptr<float>();
  const float* hess_p = hess.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES(kvs[0].scalar_type(), "round_stats", [&] {
    using T = scalar_t;
    T* alpha_p = alpha.data_ptr<T>();
    T* h_p = h.data_ptr<T>();
    const T uniform = static_cast<T>(1.0 / static_cast<double>(M));
    const T keep_old = static_cast<T>(static_cast<double>(round_idx - 1) / round_idx);
    const T rounds = static_cast<T>(round_idx);
    at::parallel_for(0, L * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<const T*> value_rows(M);
      std::vector<double> mean(D);
      std::vector<T> block(D), o(D), spread(M);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t l = task / H, hd = task % H;
        const float* mass_l = mass_p + rows[l] * S * H + hd;
        const float* hess_l = hess_p + rows[l] * S * H + hd;
        T* a = alpha_p + l * M * H + hd;
        T total = 0;
        for (int64_t m = 0; m < M; ++m) total += static_cast<T>(mass_l[ids[m] * H]);
        for (int64_t m = 0; m < M; ++m) {
          a[m * H] = total > 0 ? static_cast<T>(mass_l[ids[m] * H]) / total : uniform;
        }
        const at::Tensor& kv = kvs[l];
        const T* base = kv.data_ptr<T>() + hd * kv.stride(1) + D;  // the head's value
        for (int64_t m = 0; m < M; ++m) value_rows[m] = base + ids[m] * kv.stride(0);
        spread_rows<T>(value_rows.data(), a, spread.data(), M, D, H, 1, mean.data(),
                       block.data(), o.data());
        T* hl = h_p + l * M * H + hd;
        for (int64_t m = 0; m < M; ++m) {
          const T w = a[m * H];
          const T fresh = w * (T(1) - T(2) * w) * spread[m];
          const T old = static_cast<T>(hess_l[ids[m] * H]);
          hl[m * H] = std::isfinite(old) ? fresh / rounds + old * keep_old : fresh;
        }
      }
    });
  });

  double* score_p = scores.data_ptr<double>();
  const int64_t reach = pool / 2;
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> per_slot(M);
    for (int64_t l = begin; l < end; ++l) {
      const float* mass_l = mass_p + rows[l] * S * H;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t lo = std::max<int64_t>(0, m - reach), hi = std::min(M - 1, m + reach);
        double sum = 0;
        for (int64_t hd = 0; hd < H; ++hd) {
          float peak = mass_l[ids[lo] * H + hd];
          for (int64_t j = lo + 1; j <= hi; ++j) peak = std::max(peak, mass_l[ids[j] * H + hd]);
          sum += static_cast<double>(peak);
        }
        per_slot[m] = sum;
      }
      for (int64_t i = 0; i + 1 < M; ++i) {
        score_p[l * (M - 1) + i] =
            (per_slot[i] + per_slot[i + 1]) * std::exp(-static_cast<double>(i + 1) / gamma);
      }
    }
  });
  return {alpha, h, scores};
}

void round_apply(const std::vector<at::Tensor>& kvs, const at::Tensor& slots,
                 const at::Tensor& layer_rows, const at::Tensor& counts,
                 const at::Tensor& positions, const at::Tensor& hess, const at::Tensor& mass,
                 const at::Tensor& left, const at::Tensor& alpha, const at::Tensor& h,
                 int64_t sink, int64_t recent, double eps, bool hessian_weights,
                 const std::optional<at::Tensor>& cos_sin, int64_t rotary_dim, bool is_neox,
                 bool carry_mass) {
  check_state_dtypes(&counts, &positions, hess, mass);
  const Round r = check_round(kvs, slots, layer_rows, {&counts, &positions, &hess, &mass},
                              sink, recent);
  const int64_t L = r.layers, M = r.region, H = r.heads, D = r.dim, S = r.num_slots, N = r.n;
  const auto dtype = kvs[0].scalar_type();
  TORCH_CHECK_VALUE(alpha.sizes() == at::IntArrayRef({L, M, H}) && h.sizes() == alpha.sizes() &&
                        alpha.scalar_type() == dtype && h.scalar_type() == dtype &&
                        alpha.is_contiguous() && h.is_contiguous(),
                    "alpha and h must be contiguous [", L, ", ", M, ", ", H, "] in the caches' "
                    "dtype (round_stats' outputs); got ", alpha.sizes(), " and ", h.sizes());
  TORCH_CHECK_VALUE(left.dim() == 2 && left.size(0) == L && left.scalar_type() == at::kLong &&
                        left.is_cpu(),
                    "left must be CPU int64 [L, k] with L = ", L, "; got ", left.scalar_type(),
                    " ", left.sizes());
  const int64_t k = left.size(1);
  const at::Tensor pairs = left.contiguous();
  const int64_t* lp = pairs.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t p = 0; p < k; ++p) {
      const int64_t i = lp[l * k + p];
      TORCH_CHECK_VALUE(i >= 0 && i + 1 < M && (p == 0 || i >= lp[l * k + p - 1] + 2),
                        "left[", l, "] must be ascending, disjoint pairs of the ", M,
                        "-slot region; got ", i, " at ", p);
    }
  }
  const bool rotate = cos_sin.has_value();
  at::Tensor table;
  if (rotate) {
    TORCH_CHECK_VALUE(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= D,
                      "rotary_dim must be even and in (0, ", D, "], got ", rotary_dim);
    TORCH_CHECK_VALUE(cos_sin->dim() == 2 && cos_sin->size(1) == rotary_dim &&
                          cos_sin->scalar_type() == dtype && cos_sin->is_cpu(),
                      "cos_sin must be a CPU [P, ", rotary_dim, "] table in the caches' dtype; "
                      "got ", cos_sin->scalar_type(), " ", cos_sin->sizes());
    table = cos_sin->contiguous();
  }
  const int64_t* ids = slots.data_ptr<int64_t>();
  const int64_t* rows = layer_rows.data_ptr<int64_t>();
  float* counts_p = counts.data_ptr<float>();
  int64_t* pos_p = positions.data_ptr<int64_t>();
  float* hess_p = hess.data_ptr<float>();
  float* mass_p = mass.data_ptr<float>();
  if (rotate) {  // every shift must have its row, checked before the first write
    for (int64_t l = 0; l < L; ++l) {
      const int64_t* pos = pos_p + rows[l] * S;
      for (int64_t p = 0; p < k; ++p) {
        const int64_t i = sink + lp[l * k + p];
        const int64_t delta = pos[ids[i + 1]] - pos[ids[i]];
        TORCH_CHECK_VALUE(delta > -table.size(0) && delta < table.size(0), "shift ", delta,
                          " is outside the ", table.size(0), " rows of cos_sin");
      }
    }
  }

  AT_DISPATCH_FLOATING_TYPES(dtype, "round_apply", [&] {
    using T = scalar_t;
    const T* alpha_p = alpha.data_ptr<T>();
    const T* h_p = h.data_ptr<T>();
    const T* table_p = rotate ? table.data_ptr<T>() : nullptr;
    const T guard = static_cast<T>(eps);
    const int64_t half = rotary_dim / 2;
    at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> merged(H * 2 * D), cos(half), sin(half);
      for (int64_t l = begin; l < end; ++l) {
        const at::Tensor& kv = kvs[l];
        T* base = kv.data_ptr<T>();
        const int64_t row_stride = kv.stride(0), head_stride = kv.stride(1);
        const bool dense = head_stride == 2 * D;
        float* cnt = counts_p + rows[l] * S;
        int64_t* pos = pos_p + rows[l] * S;
        float* hs = hess_p + rows[l] * S * H;
        float* ms = mass_p + rows[l] * S * H;
        const T* al = alpha_p + l * M * H;
        const T* hl = h_p + l * M * H;
        const int64_t* lefts = lp + l * k;
        auto copy_row = [&](int64_t to, int64_t from) {
          T* dst = base + ids[to] * row_stride;
          const T* src = base + ids[from] * row_stride;
          if (dense) {
            std::memcpy(dst, src, H * 2 * D * sizeof(T));
          } else {
            for (int64_t hd = 0; hd < H; ++hd) {
              std::memcpy(dst + hd * head_stride, src + hd * head_stride, 2 * D * sizeof(T));
            }
          }
        };
        int64_t out = sink, p = 0;
        for (int64_t i = sink; i < N; ++out) {
          const bool in_region = i < sink + M;
          if (p < k && i == sink + lefts[p]) {  // a merged pair (i, i + 1) -> out
            const int64_t m = i - sink, si = ids[i], sj = ids[i + 1];
            const T c_i = static_cast<T>(cnt[si]), c_j = static_cast<T>(cnt[sj]);
            const int64_t p_j = pos[sj];
            if (rotate) shift_angles<T>(table_p, p_j - pos[si], half, cos.data(), sin.data());
            const T* row_i = base + si * row_stride;
            const T* row_j = base + sj * row_stride;
            for (int64_t hd = 0; hd < H; ++hd) {
              const T a_i = al[m * H + hd], a_j = al[(m + 1) * H + hd];
              const T h_i = hl[m * H + hd], h_j = hl[(m + 1) * H + hd];
              T a = c_i / (c_i + c_j);
              if (hessian_weights) {
                auto recover = [guard](T hx, T ax) {
                  const T w = ax * (T(1) - T(2) * ax);
                  const T d = hx / (w + (w < 0 ? -guard : guard));
                  return d < T(0) ? T(0) : d;  // NaN stays NaN, as clamp_min
                };
                const T h_ij = a_i * a_j * (recover(h_i, a_i) + recover(h_j, a_j));
                const T big_a = h_i - h_ij, sum = big_a + (h_j - h_ij);
                const T weight = big_a / sum;
                if (sum > guard && weight >= T(0) && weight <= T(1)) a = weight;
              }
              const T b = T(1) - a;
              const T* kvi = row_i + hd * head_stride;
              const T* kvj = row_j + hd * head_stride;
              T* o = merged.data() + hd * 2 * D;
              merge_key<T>(kvi, kvj, o, a, rotate ? cos.data() : nullptr,
                           rotate ? sin.data() : nullptr, D, rotary_dim, is_neox);
              merge_value<T>(kvi + D, kvj + D, o + D, c_i, c_j, D);
              hs[ids[out] * H + hd] = static_cast<float>(a * a * h_i + b * b * h_j);
            }
            T* dst = base + ids[out] * row_stride;
            for (int64_t hd = 0; hd < H; ++hd) {
              std::memcpy(dst + hd * head_stride, merged.data() + hd * 2 * D, 2 * D * sizeof(T));
            }
            cnt[ids[out]] = static_cast<float>(c_i + c_j);
            pos[ids[out]] = p_j;
            for (int64_t hd = 0; carry_mass && hd < H; ++hd) {
              ms[ids[out] * H + hd] = ms[si * H + hd] + ms[sj * H + hd];
            }
            i += 2;
            ++p;
            continue;
          }
          const int64_t from = ids[i], to = ids[out];
          if (out != i) {
            copy_row(out, i);
            cnt[to] = cnt[from];
            pos[to] = pos[from];
            if (carry_mass) std::copy_n(ms + from * H, H, ms + to * H);
          }
          for (int64_t hd = 0; hd < H; ++hd) {
            hs[to * H + hd] = in_region ? static_cast<float>(hl[(i - sink) * H + hd])
                                        : hs[from * H + hd];
          }
          ++i;
        }
        if (!carry_mass) {
          for (int64_t j = 0; j < N; ++j) std::fill_n(ms + ids[j] * H, H, 0.0f);
        }
      }
    });
  });
}

}  // namespace kvslimmer
