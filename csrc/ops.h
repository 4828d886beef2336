// Declarations of the kvslimmer operators (registered in bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace kvslimmer {

// torch.ops.kvslimmer.paged_attention on CPU (csrc/cpu/paged_attention.cpp).
at::Tensor paged_attention_cpu(const at::Tensor& query, const at::Tensor& kv,
                               const std::optional<at::Tensor>& counts,
                               const at::Tensor& block_table, const at::Tensor& seq_lens,
                               const at::Tensor& query_start_loc, double scale,
                               int64_t block_size, const std::optional<at::Tensor>& mass,
                               const std::optional<at::Tensor>& observed);

// torch.ops.kvslimmer.cpu_isa: the instruction set the CPU paged attention runs ("avx512",
// "avx2" or "portable"); with an argument, first switches to it ("auto": the best the CPU has).
// The first call reads KVSLIMMER_CPU_ISA. cpu_isas: the ones this CPU can run, best first.
std::string cpu_isa(const std::optional<std::string>& isa);
std::vector<std::string> cpu_isas();

// Shape-only version for the Meta device (fake tensors, torch.compile tracing).
at::Tensor paged_attention_meta(const at::Tensor& query, const at::Tensor& kv,
                                const std::optional<at::Tensor>& counts,
                                const at::Tensor& block_table, const at::Tensor& seq_lens,
                                const at::Tensor& query_start_loc, double scale,
                                int64_t block_size, const std::optional<at::Tensor>& mass,
                                const std::optional<at::Tensor>& observed);

// torch.ops.kvslimmer.select_pairs, any device (csrc/cpu/select_pairs.cpp).
at::Tensor select_pairs(const at::Tensor& scores, int64_t k);

// torch.ops.kvslimmer.select_pairs_rows, any device (csrc/cpu/select_pairs.cpp): row r of the
// [L, max(ks)] result (padded with -1) is select_pairs(scores[r, :lengths[r]], ks[r]).
at::Tensor select_pairs_rows(const at::Tensor& scores, const at::Tensor& lengths,
                             const at::Tensor& ks);

// torch.ops.kvslimmer.keep_set, any device (csrc/cpu/select_pairs.cpp): [L, M] bool, the
// largest set of each row's highest scores whose complement frees k slots by collapsing its
// runs, as kvslimmer_vllm.core.merge.keep_set.
at::Tensor keep_set(const at::Tensor& scores, int64_t k);

// torch.ops.kvslimmer.value_spread on CPU (csrc/cpu/value_spread.cpp): d[l, m, h] =
// ||values[l, m, h] - sum_j alpha[l, j, h] values[l, j, h]||_1.
at::Tensor value_spread(const at::Tensor& values, const at::Tensor& alpha);

// torch.ops.kvslimmer.merge_pairs on CPU (csrc/cpu/merge_pairs.cpp): the merged keys and
// values of the pairs (left, left + 1), as kvslimmer_vllm.core.merge.merge_pairs.
std::tuple<at::Tensor, at::Tensor> merge_pairs(
    const at::Tensor& keys, const at::Tensor& values, const at::Tensor& left,
    const at::Tensor& a, const at::Tensor& c_left, const at::Tensor& c_right,
    const std::optional<at::Tensor>& cos_sin, const std::optional<at::Tensor>& delta,
    int64_t rotary_dim, bool is_neox);

// torch.ops.kvslimmer.compact_rows on CPU (csrc/cpu/compact_rows.cpp): a round's result
// moved and written into each layer's cache in place, as kvslimmer_vllm.core.paged.compact_rows.
void compact_rows(const std::vector<at::Tensor>& kvs, const at::Tensor& slots,
                  const at::Tensor& source, int64_t start, const at::Tensor& merged_slots,
                  const at::Tensor& merged_keys, const at::Tensor& merged_values);

// torch.ops.kvslimmer.write_tokens on CPU (csrc/cpu/write_tokens.cpp): a step's new tokens
// written into one layer's cache and their slots' state reset, as
// kvslimmer_vllm.core.paged.write_tokens (negative slot ids: padding, skipped).
void write_tokens(const at::Tensor& kv, const at::Tensor& key, const at::Tensor& value,
                  const at::Tensor& slots, const at::Tensor& positions,
                  const std::optional<at::Tensor>& counts,
                  const std::optional<at::Tensor>& slot_positions,
                  const std::optional<at::Tensor>& hess, const std::optional<at::Tensor>& mass);

// torch.ops.kvslimmer.round_stats / round_apply on CPU (csrc/cpu/paged_round.cpp): one
// pairwise merge round of one request read from and written into the paged caches in place,
// as kvslimmer_vllm.core.paged.paged_merge_round (round_stats gives alpha, the smoothed
// Hessian proxy and the pair scores; the caller selects the pairs; round_apply merges them,
// compacts the slots and stores their state).
std::tuple<at::Tensor, at::Tensor, at::Tensor> round_stats(
    const std::vector<at::Tensor>& kvs, const at::Tensor& slots, const at::Tensor& layer_rows,
    const at::Tensor& hess, const at::Tensor& mass, int64_t sink, int64_t recent,
    int64_t round_idx, double gamma, int64_t pool, const std::optional<at::Tensor>& held);
void round_apply(const std::vector<at::Tensor>& kvs, const at::Tensor& slots,
                 const at::Tensor& layer_rows, const at::Tensor& counts,
                 const at::Tensor& positions, const at::Tensor& hess, const at::Tensor& mass,
                 const at::Tensor& left, const at::Tensor& alpha, const at::Tensor& h,
                 int64_t sink, int64_t recent, double eps, bool hessian_weights,
                 const std::optional<at::Tensor>& cos_sin, int64_t rotary_dim, bool is_neox,
                 bool carry_mass, const std::optional<at::Tensor>& held);
// torch.ops.kvslimmer.slot_scores on CPU (csrc/cpu/paged_round.cpp): [L, M] float64
// SnapKV scores of the region [sink, N - recent) of the request's slots, read from the mass
// state rows `layer_rows` through the slot ids, as kvslimmer_vllm.core.paged.slot_scores.
at::Tensor slot_scores(const at::Tensor& slots, const at::Tensor& layer_rows,
                       const at::Tensor& mass, int64_t sink, int64_t recent, int64_t pool);
// torch.ops.kvslimmer.protected_steps / protected_merged (csrc/cpu/paged_round.cpp): the
// host's bookkeeping of protected sub-rounds in lock step, as
// kvslimmer_vllm.kernels.lockstep.ProtectedSchedule.steps / merged.
at::Tensor protected_steps(const at::Tensor& masks, const at::Tensor& held,
                           const at::Tensor& remaining, int64_t sink, int64_t recent,
                           double max_fraction);
at::Tensor protected_merged(const at::Tensor& masks, const at::Tensor& held,
                            const at::Tensor& remaining, const at::Tensor& rows,
                            const at::Tensor& left, int64_t sink);
// torch.ops.kvslimmer.protected_round on CPU (csrc/cpu/paged_round.cpp): the sub-rounds of
// one step that frees k slots while no pair touches a slot of `protect` ([L, N] bool), each
// layer sized by its own mask and run as one task, as paged_merge_round with protect.
void protected_round(const std::vector<at::Tensor>& kvs, const at::Tensor& slots,
                     const at::Tensor& layer_rows, const at::Tensor& counts,
                     const at::Tensor& positions, const at::Tensor& hess,
                     const at::Tensor& mass, const at::Tensor& protect, int64_t k,
                     double max_fraction, int64_t sink, int64_t recent, int64_t round_idx,
                     double gamma, double eps, int64_t pool, bool hessian_weights,
                     const std::optional<at::Tensor>& cos_sin, int64_t rotary_dim,
                     bool is_neox);

}  // namespace kvslimmer
