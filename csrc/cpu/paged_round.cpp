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
// slot_scores: SnapKV's per-slot scores of the region (the pooled mass summed over heads, as
// the pair scores use them), read through the slot ids: SnapMerge's keep set is chosen from
// them (keep_set, select_pairs.cpp) before protected_round runs around it.
//
// protected_steps / protected_merged: the host's bookkeeping of protected sub-rounds run in
// lock step from Python (kvslimmer_vllm.kernels.lockstep.ProtectedSchedule): each layer's
// next step, sized as protected_round sizes it, and its mask compacted after its pairs merged.
//
// With `held` ([L]) layer l holds only the first held[l] of the N slots (layers in lock step
// whose earlier sub-rounds freed different numbers: SnapMerge under tensor parallelism);
// round_stats' outputs are then sized for the widest region, zero past a layer's own, and
// round_apply's left rows may end in -1 padding.
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
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "round_math.h"
#include "select.h"
#include "spread.h"

namespace kvslimmer {
namespace {

// The score of a pair touching a protected slot (core.merge.PROTECTED_SCORE).
constexpr double kProtectedScore = 1e200;

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

// One layer of a request as the round kernels see it: the cache rows of its slot ids and
// the slot state of its layer row (indexed by slot id).
template <typename T>
struct LayerRows {
  T* base;
  int64_t row_stride, head_stride;
  float* counts;
  int64_t* positions;
  float* hess;
  float* mass;
};

// A round's inputs as pointers: the request's slot ids, its layers' state rows, and the
// state tensors (counts and positions null for round_stats, which reads neither).
struct State {
  const int64_t* ids;
  const int64_t* rows;
  float* counts;
  int64_t* positions;
  float* hess;
  float* mass;
  int64_t S, H;

  State(const at::Tensor& slots, const at::Tensor& layer_rows, const at::Tensor* counts_t,
        const at::Tensor* positions_t, const at::Tensor& hess_t, const at::Tensor& mass_t)
      : ids(slots.data_ptr<int64_t>()),
        rows(layer_rows.data_ptr<int64_t>()),
        counts(counts_t ? counts_t->data_ptr<float>() : nullptr),
        positions(positions_t ? positions_t->data_ptr<int64_t>() : nullptr),
        hess(hess_t.data_ptr<float>()),
        mass(mass_t.data_ptr<float>()),
        S(mass_t.size(1)),
        H(mass_t.size(2)) {}

  // The positions of layer l's state row (indexed by slot id).
  const int64_t* positions_of(int64_t l) const { return positions + rows[l] * S; }

  // Layer l of the round: its cache kv and its state row.
  template <typename T>
  LayerRows<T> layer(const at::Tensor& kv, int64_t l) const {
    const int64_t row = rows[l];
    return {kv.data_ptr<T>(), kv.stride(0), kv.stride(1),
            counts == nullptr ? nullptr : counts + row * S,
            positions == nullptr ? nullptr : positions + row * S,
            hess + row * S * H, mass + row * S * H};
  }
};

// round_stats' scratch for one task, sized for a region of at most M slots.
template <typename T>
struct StatsScratch {
  std::vector<const T*> value_rows;
  std::vector<double> mean;
  std::vector<T> block, o, spread;
  StatsScratch(int64_t M, int64_t D) : value_rows(M), mean(D), block(D), o(D), spread(M) {}
};

// alpha and the smoothed Hessian proxy of head hd over the M region slots `ids` (a and hl:
// that head's column of [M, H] outputs).
template <typename T>
void head_stats(const LayerRows<T>& ly, const int64_t* ids, int64_t M, int64_t H, int64_t D,
                int64_t hd, int64_t round_idx, T* a, T* hl, StatsScratch<T>& s) {
  const T uniform = static_cast<T>(1.0 / static_cast<double>(M));
  const T keep_old = static_cast<T>(static_cast<double>(round_idx - 1) / round_idx);
  const T rounds = static_cast<T>(round_idx);
  const float* mass_h = ly.mass + hd;
  const float* hess_h = ly.hess + hd;
  T total = 0;
  for (int64_t m = 0; m < M; ++m) total += static_cast<T>(mass_h[ids[m] * H]);
  for (int64_t m = 0; m < M; ++m) {
    a[m * H] = total > 0 ? static_cast<T>(mass_h[ids[m] * H]) / total : uniform;
  }
  const T* value = ly.base + hd * ly.head_stride + D;
  for (int64_t m = 0; m < M; ++m) s.value_rows[m] = value + ids[m] * ly.row_stride;
  spread_rows<T>(s.value_rows.data(), a, s.spread.data(), M, D, H, 1, s.mean.data(),
                 s.block.data(), s.o.data());
  for (int64_t m = 0; m < M; ++m) {
    const T w = a[m * H];
    const T fresh = w * (T(1) - T(2) * w) * s.spread[m];
    const T old = static_cast<T>(hess_h[ids[m] * H]);
    hl[m * H] = std::isfinite(old) ? fresh / rounds + old * keep_old : fresh;
  }
}

// SnapKV's score of each of the M region slots `ids` from the layer's mass `mass` ([S, H]):
// the mass max-pooled over `pool` slots (the window cut at the region's ends), summed over
// heads in float64 (core.merge.slot_scores).
void pooled_slot_scores(const float* mass, const int64_t* ids, int64_t M, int64_t H,
                        int64_t pool, double* out) {
  const int64_t reach = pool / 2;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t lo = std::max<int64_t>(0, m - reach), hi = std::min(M - 1, m + reach);
    double sum = 0;
    for (int64_t hd = 0; hd < H; ++hd) {
      float peak = mass[ids[lo] * H + hd];
      for (int64_t j = lo + 1; j <= hi; ++j) peak = std::max(peak, mass[ids[j] * H + hd]);
      sum += static_cast<double>(peak);
    }
    out[m] = sum;
  }
}

// The M - 1 pair scores of the region slots `ids` from the layer's mass `mass` ([S, H]).
void pair_scores(const float* mass, const int64_t* ids, int64_t M, int64_t H, int64_t pool,
                 double gamma, double* out, std::vector<double>& per_slot) {
  pooled_slot_scores(mass, ids, M, H, pool, per_slot.data());
  for (int64_t i = 0; i + 1 < M; ++i) {
    out[i] = (per_slot[i] + per_slot[i + 1]) * std::exp(-static_cast<double>(i + 1) / gamma);
  }
}

// The rotation and key-weight constants round_apply's layers share.
template <typename T>
struct ApplyParams {
  const T* table;  // nullptr: no rotation
  int64_t rotary_dim;
  bool is_neox, hessian_weights, carry_mass;
  T guard;
};

// round_apply on one layer: merges the k pairs `lefts` (region-local) of the N slots `ids`
// (region [sink, sink + M)) with alpha / h ([M, H]) and compacts the slots; the caller
// resets the mass unless p.carry_mass. merged, cos, sin: scratch of H 2D and rotary_dim / 2.
template <typename T>
void apply_layer(const LayerRows<T>& ly, const int64_t* ids, int64_t N, int64_t sink,
                 int64_t M, int64_t H, int64_t D, const int64_t* lefts, int64_t k,
                 const T* al, const T* hl, const ApplyParams<T>& p, T* merged, T* cos,
                 T* sin) {
  T* base = ly.base;
  const int64_t row_stride = ly.row_stride, head_stride = ly.head_stride;
  const bool dense = head_stride == 2 * D;
  float* cnt = ly.counts;
  int64_t* pos = ly.positions;
  float* hs = ly.hess;
  float* ms = ly.mass;
  const int64_t half = p.rotary_dim / 2;
  const bool rotate = p.table != nullptr;
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
  int64_t out = sink, q = 0;
  for (int64_t i = sink; i < N; ++out) {
    const bool in_region = i < sink + M;
    if (q < k && i == sink + lefts[q]) {  // a merged pair (i, i + 1) -> out
      const int64_t m = i - sink, si = ids[i], sj = ids[i + 1];
      const T c_i = static_cast<T>(cnt[si]), c_j = static_cast<T>(cnt[sj]);
      const int64_t p_j = pos[sj];
      if (rotate) shift_angles<T>(p.table, p_j - pos[si], half, cos, sin);
      const T* row_i = base + si * row_stride;
      const T* row_j = base + sj * row_stride;
      for (int64_t hd = 0; hd < H; ++hd) {
        const T a_i = al[m * H + hd], a_j = al[(m + 1) * H + hd];
        const T h_i = hl[m * H + hd], h_j = hl[(m + 1) * H + hd];
        T a = c_i / (c_i + c_j);
        if (p.hessian_weights) {
          const T guard = p.guard;
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
        T* o = merged + hd * 2 * D;
        merge_key<T>(kvi, kvj, o, a, rotate ? cos : nullptr, rotate ? sin : nullptr, D,
                     p.rotary_dim, p.is_neox);
        merge_value<T>(kvi + D, kvj + D, o + D, c_i, c_j, D);
        hs[ids[out] * H + hd] = static_cast<float>(a * a * h_i + b * b * h_j);
      }
      T* dst = base + ids[out] * row_stride;
      for (int64_t hd = 0; hd < H; ++hd) {
        std::memcpy(dst + hd * head_stride, merged + hd * 2 * D, 2 * D * sizeof(T));
      }
      cnt[ids[out]] = static_cast<float>(c_i + c_j);
      pos[ids[out]] = p_j;
      for (int64_t hd = 0; p.carry_mass && hd < H; ++hd) {
        ms[ids[out] * H + hd] = ms[si * H + hd] + ms[sj * H + hd];
      }
      i += 2;
      ++q;
      continue;
    }
    const int64_t from = ids[i], to = ids[out];
    if (out != i) {
      copy_row(out, i);
      cnt[to] = cnt[from];
      pos[to] = pos[from];
      if (p.carry_mass) std::copy_n(ms + from * H, H, ms + to * H);
    }
    for (int64_t hd = 0; hd < H; ++hd) {
      hs[to * H + hd] = in_region ? static_cast<float>(hl[(i - sink) * H + hd])
                                  : hs[from * H + hd];
    }
    ++i;
  }
}

// The checks round_apply and protected_round share: the rotation table, made contiguous.
at::Tensor checked_table(const std::optional<at::Tensor>& cos_sin, int64_t rotary_dim,
                         int64_t D, at::ScalarType dtype) {
  if (!cos_sin.has_value()) return at::Tensor();
  TORCH_CHECK_VALUE(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= D,
                    "rotary_dim must be even and in (0, ", D, "], got ", rotary_dim);
  TORCH_CHECK_VALUE(cos_sin->dim() == 2 && cos_sin->size(1) == rotary_dim &&
                        cos_sin->scalar_type() == dtype && cos_sin->is_cpu(),
                    "cos_sin must be a CPU [P, ", rotary_dim, "] table in the caches' dtype; "
                    "got ", cos_sin->scalar_type(), " ", cos_sin->sizes());
  return cos_sin->contiguous();
}

void check_stats_args(int64_t round_idx, double gamma, int64_t pool) {
  TORCH_CHECK_VALUE(round_idx >= 1, "round_idx must be >= 1, got ", round_idx);
  TORCH_CHECK_VALUE(gamma > 0, "gamma must be > 0, got ", gamma);
  TORCH_CHECK_VALUE(pool >= 1 && pool % 2 == 1, "pool width must be an odd integer >= 1, got ",
                    pool);
}

// Unprotected slots of region mask `guarded` (M entries) minus their runs: the most slots
// merging can free without touching a protected slot (core.merge.mergeable_without).
int64_t mergeable_without(const bool* guarded, int64_t M) {
  int64_t free = 0, runs = 0;
  for (int64_t m = 0; m < M; ++m) {
    if (guarded[m]) continue;
    ++free;
    if (m == 0 || guarded[m - 1]) ++runs;
  }
  return free - runs;
}

// The most disjoint pairs of adjacent unprotected slots (core.merge.disjoint_free_pairs).
int64_t disjoint_free_pairs(const bool* guarded, int64_t M) {
  int64_t pairs = 0, run = 0;
  for (int64_t m = 0; m <= M; ++m) {
    if (m < M && !guarded[m]) {
      ++run;
    } else {
      pairs += run / 2;
      run = 0;
    }
  }
  return pairs;
}

// Each layer's slot count: all N, or with `held` ([L] int64) layer l's first held[l] slots
// (layers in lock step whose earlier sub-rounds freed different numbers), each leaving a
// region of at least 2 slots.
std::vector<int64_t> held_slots(const std::optional<at::Tensor>& held, const Round& r,
                                int64_t recent) {
  std::vector<int64_t> n_of(r.layers, r.n);
  if (!held.has_value()) return n_of;
  TORCH_CHECK_VALUE(held->dim() == 1 && held->numel() == r.layers &&
                        held->scalar_type() == at::kLong && held->is_cpu(),
                    "held must be CPU int64 [L] with L = ", r.layers, "; got ",
                    held->scalar_type(), " ", held->sizes());
  const at::Tensor counts = held->contiguous();
  const int64_t* p = counts.data_ptr<int64_t>();
  for (int64_t l = 0; l < r.layers; ++l) {
    TORCH_CHECK_VALUE(p[l] - r.sink - recent >= 2 && p[l] <= r.n, "held[", l, "]=", p[l],
                      " must leave a mergeable region of at least 2 slots and be at most N = ",
                      r.n);
    n_of[l] = p[l];
  }
  return n_of;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> round_stats(
    const std::vector<at::Tensor>& kvs, const at::Tensor& slots, const at::Tensor& layer_rows,
    const at::Tensor& hess, const at::Tensor& mass, int64_t sink, int64_t recent,
    int64_t round_idx, double gamma, int64_t pool, const std::optional<at::Tensor>& held) {
  check_state_dtypes(nullptr, nullptr, hess, mass);
  const Round r = check_round(kvs, slots, layer_rows, {&hess, &mass}, sink, recent);
  check_stats_args(round_idx, gamma, pool);
  const std::vector<int64_t> n_of = held_slots(held, r, recent);
  const int64_t L = r.layers, H = r.heads, D = r.dim, S = r.num_slots;
  // Outputs sized for the widest region (every layer's when `held` is not given); a
  // narrower layer's tail stays 0.
  const int64_t M = *std::max_element(n_of.begin(), n_of.end()) - sink - recent;
  const auto options = kvs[0].options();
  const bool ragged = held.has_value();
  at::Tensor alpha = ragged ? at::zeros({L, M, H}, options) : at::empty({L, M, H}, options);
  at::Tensor h = ragged ? at::zeros({L, M, H}, options) : at::empty({L, M, H}, options);
  at::Tensor scores = ragged ? at::zeros({L, M - 1}, options.dtype(at::kDouble))
                             : at::empty({L, M - 1}, options.dtype(at::kDouble));
  const State state(slots, layer_rows, nullptr, nullptr, hess, mass);
  const int64_t* ids = state.ids + sink;  // the region's slot ids

  AT_DISPATCH_FLOATING_TYPES(kvs[0].scalar_type(), "round_stats", [&] {
    using T = scalar_t;
    T* alpha_p = alpha.data_ptr<T>();
    T* h_p = h.data_ptr<T>();
    at::parallel_for(0, L * H, 1, [&](int64_t begin, int64_t end) {
      StatsScratch<T> scratch(M, D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t l = task / H, hd = task % H;
        const auto ly = state.layer<T>(kvs[l], l);
        head_stats<T>(ly, ids, n_of[l] - sink - recent, H, D, hd, round_idx,
                      alpha_p + l * M * H + hd, h_p + l * M * H + hd, scratch);
      }
    });
  });

  double* score_p = scores.data_ptr<double>();
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> per_slot(M);
    for (int64_t l = begin; l < end; ++l) {
      pair_scores(state.mass + state.rows[l] * S * H, ids, n_of[l] - sink - recent, H, pool,
                  gamma, score_p + l * (M - 1), per_slot);
    }
  });
  return {alpha, h, scores};
}

at::Tensor slot_scores(const at::Tensor& slots, const at::Tensor& layer_rows,
                       const at::Tensor& mass, int64_t sink, int64_t recent, int64_t pool) {
  TORCH_CHECK_VALUE(mass.scalar_type() == at::kFloat && mass.dim() == 3 && mass.is_cpu() &&
                        mass.is_contiguous(),
                    "mass must be contiguous CPU float32 [layers, S, H]; got ",
                    mass.scalar_type(), " ", mass.sizes());
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_cpu() &&
                        slots.is_contiguous(),
                    "slots must be contiguous CPU int64 [N]; got ", slots.scalar_type(), " ",
                    slots.sizes());
  TORCH_CHECK_VALUE(layer_rows.dim() == 1 && layer_rows.scalar_type() == at::kLong &&
                        layer_rows.is_cpu() && layer_rows.is_contiguous(),
                    "layers must be contiguous CPU int64 [L]; got ", layer_rows.scalar_type(),
                    " ", layer_rows.sizes());
  TORCH_CHECK_VALUE(pool >= 1 && pool % 2 == 1, "pool width must be an odd integer >= 1, got ",
                    pool);
  const int64_t N = slots.numel(), L = layer_rows.numel(), S = mass.size(1), H = mass.size(2);
  TORCH_CHECK_VALUE(sink >= 0 && recent >= 0 && N - sink - recent >= 0,
                    "the region [sink, N - recent) = [", sink, ", ", N - recent,
                    ") must not be negative (N = ", N, ")");
  const int64_t M = N - sink - recent;
  const int64_t* ids = slots.data_ptr<int64_t>();
  for (int64_t j = 0; j < N; ++j) {
    TORCH_CHECK_VALUE(ids[j] >= 0 && ids[j] < S, "slot id ", ids[j], " outside the state's ",
                      S, " slots");
  }
  const int64_t* rows = layer_rows.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK_VALUE(rows[l] >= 0 && rows[l] < mass.size(0), "layer ", rows[l],
                      " outside the state's ", mass.size(0), " layers");
  }
  at::Tensor scores = at::empty({L, M}, mass.options().dtype(at::kDouble));
  double* out = scores.data_ptr<double>();
  const float* mass_p = mass.data_ptr<float>();
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      pooled_slot_scores(mass_p + rows[l] * S * H, ids + sink, M, H, pool, out + l * M);
    }
  });
  return scores;
}

void round_apply(const std::vector<at::Tensor>& kvs, const at::Tensor& slots,
                 const at::Tensor& layer_rows, const at::Tensor& counts,
                 const at::Tensor& positions, const at::Tensor& hess, const at::Tensor& mass,
                 const at::Tensor& left, const at::Tensor& alpha, const at::Tensor& h,
                 int64_t sink, int64_t recent, double eps, bool hessian_weights,
                 const std::optional<at::Tensor>& cos_sin, int64_t rotary_dim, bool is_neox,
                 bool carry_mass, const std::optional<at::Tensor>& held) {
  check_state_dtypes(&counts, &positions, hess, mass);
  const Round r = check_round(kvs, slots, layer_rows, {&counts, &positions, &hess, &mass},
                              sink, recent);
  const std::vector<int64_t> n_of = held_slots(held, r, recent);
  const int64_t L = r.layers, H = r.heads, D = r.dim, N = r.n;
  const int64_t M = *std::max_element(n_of.begin(), n_of.end()) - sink - recent;
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
  // A row may end in -1 padding (fewer pairs in that layer): k_of[l] pairs.
  std::vector<int64_t> k_of(L, k);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t region = n_of[l] - sink - recent;
    for (int64_t p = 0; p < k; ++p) {
      const int64_t i = lp[l * k + p];
      if (i == -1 && k_of[l] == k) k_of[l] = p;
      if (p >= k_of[l]) {
        TORCH_CHECK_VALUE(i == -1, "left[", l, "] may end in -1 padding only; got ", i,
                          " at ", p);
        continue;
      }
      TORCH_CHECK_VALUE(i >= 0 && i + 1 < region && (p == 0 || i >= lp[l * k + p - 1] + 2),
                        "left[", l, "] must be ascending, disjoint pairs of the ", region,
                        "-slot region; got ", i, " at ", p);
    }
  }
  const at::Tensor table = checked_table(cos_sin, rotary_dim, D, dtype);
  const State state(slots, layer_rows, &counts, &positions, hess, mass);
  const int64_t* ids = state.ids;
  if (table.defined()) {  // every shift must have its row, checked before the first write
    for (int64_t l = 0; l < L; ++l) {
      const int64_t* pos = state.positions_of(l);
      for (int64_t p = 0; p < k_of[l]; ++p) {
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
    const ApplyParams<T> params{table.defined() ? table.data_ptr<T>() : nullptr, rotary_dim,
                                is_neox, hessian_weights, carry_mass, static_cast<T>(eps)};
    at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> merged(H * 2 * D), cos(rotary_dim / 2), sin(rotary_dim / 2);
      for (int64_t l = begin; l < end; ++l) {
        const auto ly = state.layer<T>(kvs[l], l);
        apply_layer<T>(ly, ids, n_of[l], sink, n_of[l] - sink - recent, H, D, lp + l * k,
                       k_of[l], alpha_p + l * M * H, h_p + l * M * H, params, merged.data(),
                       cos.data(), sin.data());
        if (!carry_mass) {
          for (int64_t j = 0; j < N; ++j) std::fill_n(ly.mass + ids[j] * H, H, 0.0f);
        }
      }
    });
  });
}

void protected_round(const std::vector<at::Tensor>& kvs, const at::Tensor& slots,
                     const at::Tensor& layer_rows, const at::Tensor& counts,
                     const at::Tensor& positions, const at::Tensor& hess,
                     const at::Tensor& mass, const at::Tensor& protect, int64_t k,
                     double max_fraction, int64_t sink, int64_t recent, int64_t round_idx,
                     double gamma, double eps, int64_t pool, bool hessian_weights,
                     const std::optional<at::Tensor>& cos_sin, int64_t rotary_dim,
                     bool is_neox) {
  check_state_dtypes(&counts, &positions, hess, mass);
  const Round r = check_round(kvs, slots, layer_rows, {&counts, &positions, &hess, &mass},
                              sink, recent);
  check_stats_args(round_idx, gamma, pool);
  const int64_t L = r.layers, M = r.region, H = r.heads, D = r.dim, N = r.n;
  TORCH_CHECK_VALUE(max_fraction > 0 && max_fraction <= 0.5,
                    "max_fraction must be in (0, 0.5], got ", max_fraction);
  TORCH_CHECK_VALUE(protect.dim() == 2 && protect.size(0) == L && protect.size(1) == N &&
                        protect.scalar_type() == at::kBool && protect.is_cpu() &&
                        protect.is_contiguous(),
                    "protect must be contiguous CPU bool [L, N] = [", L, ", ", N, "]; got ",
                    protect.scalar_type(), " ", protect.sizes());
  const bool* guard_p = protect.data_ptr<bool>();
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK_VALUE(k >= 0 && k <= mergeable_without(guard_p + l * N + sink, M),
                      "cannot free k=", k, " slots without merging a protected slot");
  }
  const auto dtype = kvs[0].scalar_type();
  const at::Tensor table = checked_table(cos_sin, rotary_dim, D, dtype);
  const State state(slots, layer_rows, &counts, &positions, hess, mass);
  const int64_t* ids = state.ids;
  if (table.defined()) {  // any two of a layer's slots may become neighbours
    for (int64_t l = 0; l < L; ++l) {
      const int64_t* pos = state.positions_of(l);
      int64_t lo = pos[ids[0]], hi = lo;
      for (int64_t j = 1; j < N; ++j) {
        lo = std::min(lo, pos[ids[j]]);
        hi = std::max(hi, pos[ids[j]]);
      }
      TORCH_CHECK_VALUE(hi - lo < table.size(0), "positions span ", hi - lo + 1,
                        " but cos_sin has only ", table.size(0), " rows");
    }
  }

  AT_DISPATCH_FLOATING_TYPES(dtype, "protected_round", [&] {
    using T = scalar_t;
    const ApplyParams<T> params{table.defined() ? table.data_ptr<T>() : nullptr, rotary_dim,
                                is_neox, hessian_weights, /*carry_mass=*/true,
                                static_cast<T>(eps)};
    // Layers are independent tasks: each runs its own sub-rounds, sized by its own mask.
    at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
      StatsScratch<T> scratch(M, D);
      std::vector<T> alpha(M * H), h(M * H), merged(H * 2 * D), cos(rotary_dim / 2),
          sin(rotary_dim / 2);
      std::vector<double> scores, per_slot(M);
      std::vector<int64_t> lefts;
      std::unique_ptr<bool[]> guard(new bool[N]);
      for (int64_t l = begin; l < end; ++l) {
        const auto ly = state.layer<T>(kvs[l], l);
        std::copy_n(guard_p + l * N, N, guard.get());
        int64_t held = N, freed = 0;
        do {  // one sub-round (one of 0 pairs when k is 0: the statistics still update)
          const int64_t m_now = held - sink - recent;
          const bool* region = guard.get() + sink;
          const int64_t step =
              k == 0 ? 0
                     : std::min({k - freed,
                                 std::max<int64_t>(1, static_cast<int64_t>(max_fraction * m_now)),
                                 disjoint_free_pairs(region, m_now)});
          TORCH_CHECK(k == 0 || step > 0, "protected_round: no free pair left in layer ", l);
          for (int64_t hd = 0; hd < H; ++hd) {
            head_stats<T>(ly, ids + sink, m_now, H, D, hd, round_idx, alpha.data() + hd,
                          h.data() + hd, scratch);
          }
          scores.resize(m_now - 1);  // select_row consumes them
          pair_scores(ly.mass, ids + sink, m_now, H, pool, gamma, scores.data(), per_slot);
          for (int64_t i = 0; i + 1 < m_now; ++i) {
            if (region[i] || region[i + 1]) scores[i] = kProtectedScore;
          }
          lefts.resize(step);
          select_row(scores, step, lefts.data());
          apply_layer<T>(ly, ids, held, sink, m_now, H, D, lefts.data(), step, alpha.data(),
                         h.data(), params, merged.data(), cos.data(), sin.data());
          // The pairs' right slots are gone; a merged slot keeps its left slot's mask.
          int64_t out = 0;
          for (int64_t i = 0, q = 0; i < held; ++i) {
            if (q < step && i == sink + 1 + lefts[q]) {
              ++q;
              continue;
            }
            guard[out++] = guard[i];
          }
          held -= step;
          freed += step;
        } while (freed < k);
        for (int64_t j = 0; j < N; ++j) std::fill_n(ly.mass + ids[j] * H, H, 0.0f);
      }
    });
  });
}

namespace {

void check_schedule(const at::Tensor& masks, const std::vector<const at::Tensor*>& per_layer) {
  TORCH_CHECK_VALUE(masks.dim() == 2 && masks.scalar_type() == at::kBool && masks.is_cpu() &&
                        masks.is_contiguous(),
                    "masks must be contiguous CPU bool [L, N]; got ", masks.scalar_type(), " ",
                    masks.sizes());
  for (const at::Tensor* t : per_layer) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->numel() == masks.size(0) &&
                          t->scalar_type() == at::kLong && t->is_cpu() && t->is_contiguous(),
                      "held and remaining must be contiguous CPU int64 [L] with L = ",
                      masks.size(0), "; got ", t->scalar_type(), " ", t->sizes());
  }
}

}  // namespace

at::Tensor protected_steps(const at::Tensor& masks, const at::Tensor& held,
                           const at::Tensor& remaining, int64_t sink, int64_t recent,
                           double max_fraction) {
  check_schedule(masks, {&held, &remaining});
  TORCH_CHECK_VALUE(max_fraction > 0 && max_fraction <= 0.5,
                    "max_fraction must be in (0, 0.5], got ", max_fraction);
  const int64_t L = masks.size(0), N = masks.size(1);
  const bool* mask_p = masks.data_ptr<bool>();
  const int64_t* held_p = held.data_ptr<int64_t>();
  const int64_t* left_p = remaining.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK_VALUE(sink >= 0 && recent >= 0 && held_p[l] - sink - recent >= 0 &&
                          held_p[l] <= N,
                      "held[", l, "]=", held_p[l], " must hold sink + recent = ", sink + recent,
                      " slots and at most N = ", N);
  }
  at::Tensor steps = at::zeros({L}, held.options());
  int64_t* out = steps.data_ptr<int64_t>();
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      if (left_p[l] <= 0) continue;
      const int64_t m = held_p[l] - sink - recent;
      out[l] = std::min({left_p[l],
                         std::max<int64_t>(1, static_cast<int64_t>(max_fraction * m)),
                         disjoint_free_pairs(mask_p + l * N + sink, m)});
    }
  });
  return steps;
}

at::Tensor protected_merged(const at::Tensor& masks, const at::Tensor& held,
                            const at::Tensor& remaining, const at::Tensor& rows,
                            const at::Tensor& left, int64_t sink) {
  check_schedule(masks, {&held, &remaining});
  const int64_t L = masks.size(0), N = masks.size(1);
  TORCH_CHECK_VALUE(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_cpu() &&
                        rows.is_contiguous(),
                    "rows must be contiguous CPU int64 [R]; got ", rows.scalar_type(), " ",
                    rows.sizes());
  const int64_t R = rows.numel();
  TORCH_CHECK_VALUE(left.dim() == 2 && left.size(0) == R && left.scalar_type() == at::kLong &&
                        left.is_cpu(),
                    "left must be CPU int64 [R, P] with R = ", R, "; got ", left.scalar_type(),
                    " ", left.sizes());
  const at::Tensor pairs = left.contiguous();
  const int64_t P = pairs.size(1);
  const int64_t* row_p = rows.data_ptr<int64_t>();
  const int64_t* lp = pairs.data_ptr<int64_t>();
  int64_t* held_p = held.data_ptr<int64_t>();
  int64_t* left_p = remaining.data_ptr<int64_t>();
  std::vector<int64_t> k_of(R, 0);
  std::vector<char> seen(L, 0);
  for (int64_t r = 0; r < R; ++r) {  // everything checked before anything is written
    const int64_t l = row_p[r];
    TORCH_CHECK_VALUE(l >= 0 && l < L && !seen[l], "rows must be distinct layers in [0, ", L,
                      "); got ", l);
    seen[l] = 1;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t i = lp[r * P + p];
      if (i == -1) continue;  // padding: no pair may follow (k_of[r] == p below)
      TORCH_CHECK_VALUE(k_of[r] == p && i >= 0 && sink + 1 + i < held_p[l] &&
                            (p == 0 || i >= lp[r * P + p - 1] + 2),
                        "left[", r, "] must be ascending, disjoint pairs within layer ", l,
                        "'s ", held_p[l], " slots, then -1 padding; got ", i, " at ", p);
      ++k_of[r];
    }
  }
  at::Tensor order = at::empty({R, N}, held.options());
  int64_t* order_p = order.data_ptr<int64_t>();
  bool* mask_p = masks.data_ptr<bool>();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> gone(N);
    std::vector<bool> before(N);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t l = row_p[r], n = held_p[l], k = k_of[r];
      std::fill(gone.begin(), gone.end(), 0);
      for (int64_t p = 0; p < k; ++p) gone[sink + 1 + lp[r * P + p]] = 1;
      // Kept slots first, in order, then the others in order (a stable sort on "gone").
      int64_t* o = order_p + r * N;
      int64_t out = 0;
      for (int64_t j = 0; j < n; ++j) {
        if (!gone[j]) o[out++] = j;
      }
      for (int64_t j = 0; j < N; ++j) {
        if (j >= n || gone[j]) o[out++] = j;
      }
      bool* mask = mask_p + l * N;
      for (int64_t j = 0; j < N; ++j) before[j] = mask[j];
      for (int64_t j = 0; j < N; ++j) mask[j] = j >= n - k || before[o[j]];
      held_p[l] = n - k;
      left_p[l] -= k;
    }
  });
  return order;
}

}  // namespace kvslimmer
