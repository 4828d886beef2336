// torch.ops.kvslimmer.write_tokens: a step's new tokens written into their slots of one layer's
// slot-major cache, and those slots' state reset; the same contract as
// kvslimmer_vllm.core.paged.write_tokens:
//
//     for t with slots[t] >= 0:  kv[slots[t]] = (key[t] | value[t]);  counts[slots[t]] = 1,
//                                slot_positions[slots[t]] = positions[t], hess = NaN, mass = 0
//
// The reference concatenates key and value, selects the written tokens with a boolean index
// and scatters five times (cache and four state tensors). Here each token is one task: its
// head rows are copied straight from the (strided) key and value views and its state is set
// in the same pass, with no temporary. Padding tokens (negative slot ids) are skipped, so the
// caller need not look at the slot mapping on the host. Every check runs before the first
// write. Any cache dtype: rows are copied as bytes, so key and value must have the cache's.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "../ops.h"

namespace kvslimmer {

void write_tokens(const at::Tensor& kv, const at::Tensor& key, const at::Tensor& value,
                  const at::Tensor& slots, const at::Tensor& positions,
                  const std::optional<at::Tensor>& counts,
                  const std::optional<at::Tensor>& slot_positions,
                  const std::optional<at::Tensor>& hess, const std::optional<at::Tensor>& mass) {
  TORCH_CHECK_VALUE(kv.dim() == 3 && kv.size(2) % 2 == 0 && kv.stride(2) == 1,
                    "kv must be [S, Hkv, 2D] with a contiguous last dimension; got ",
                    kv.sizes(), " strides ", kv.strides());
  TORCH_CHECK_VALUE(kv.device().is_cpu(), "write_tokens runs on CPU tensors");
  const int64_t num_slots = kv.size(0), heads = kv.size(1), dim = kv.size(2) / 2;
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.scalar_type() == at::kLong,
                    "slots must be int64 [T]; got ", slots.scalar_type(), " ", slots.sizes());
  const int64_t tokens = slots.size(0);
  TORCH_CHECK_VALUE(positions.dim() == 1 && positions.size(0) == tokens &&
                        positions.scalar_type() == at::kLong,
                    "positions must be int64 [", tokens, "]; got ", positions.scalar_type(), " ",
                    positions.sizes());
  for (const at::Tensor* t : {&key, &value}) {
    TORCH_CHECK_VALUE(t->dim() == 3 && t->size(0) == tokens && t->size(1) == heads &&
                          t->size(2) == dim,
                      "key and value must be [", tokens, ", ", heads, ", ", dim, "]; got ",
                      t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == kv.scalar_type(), "key and value must have the "
                      "cache's dtype ", kv.scalar_type(), "; got ", t->scalar_type());
  }
  const int given = counts.has_value() + slot_positions.has_value() + hess.has_value() +
                    mass.has_value();
  TORCH_CHECK_VALUE(given == 0 || given == 4,
                    "counts, slot_positions, hess and mass go together: all or none");
  const bool with_state = given == 4;
  if (with_state) {
    TORCH_CHECK_VALUE(counts->dim() == 1 && counts->size(0) == num_slots &&
                          counts->scalar_type() == at::kFloat,
                      "counts must be float32 [", num_slots, "]; got ", counts->scalar_type(),
                      " ", counts->sizes());
    TORCH_CHECK_VALUE(slot_positions->dim() == 1 && slot_positions->size(0) == num_slots &&
                          slot_positions->scalar_type() == at::kLong,
                      "slot_positions must be int64 [", num_slots, "]; got ",
                      slot_positions->scalar_type(), " ", slot_positions->sizes());
    for (const at::Tensor* t : {&*hess, &*mass}) {
      TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == num_slots && t->size(1) == heads &&
                            t->scalar_type() == at::kFloat,
                        "hess and mass must be float32 [", num_slots, ", ", heads, "]; got ",
                        t->scalar_type(), " ", t->sizes());
    }
  }

  const at::Tensor ids = slots.contiguous(), pos = positions.contiguous();
  const at::Tensor k = key.stride(2) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(2) == 1 ? value : value.contiguous();
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK_VALUE(ip[t] < num_slots, "slot id ", ip[t], " of token ", t,
                      " outside the cache's ", num_slots, " slots");
  }

  const int64_t item = kv.element_size(), half = dim * item;
  char* base = static_cast<char*>(kv.data_ptr());
  const int64_t row_stride = kv.stride(0) * item, head_stride = kv.stride(1) * item;
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  float* cp = with_state ? counts->data_ptr<float>() : nullptr;
  int64_t* sp = with_state ? slot_positions->data_ptr<int64_t>() : nullptr;
  float* hp = with_state ? hess->data_ptr<float>() : nullptr;
  float* mp = with_state ? mass->data_ptr<float>() : nullptr;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // A token's copy is Hkv x 2D elements: small, so a chunk of tokens per task.
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = ip[t];
      if (s < 0) continue;  // padding token
      char* row = base + s * row_stride;
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(row + h * head_stride, kp + (t * k.stride(0) + h * k.stride(1)) * item, half);
        std::memcpy(row + h * head_stride + half,
                    vp + (t * v.stride(0) + h * v.stride(1)) * item, half);
      }
      if (!with_state) continue;
      cp[s * counts->stride(0)] = 1.f;
      sp[s * slot_positions->stride(0)] = pp[t];
      for (int64_t h = 0; h < heads; ++h) {
        hp[s * hess->stride(0) + h * hess->stride(1)] = nan;
        mp[s * mass->stride(0) + h * mass->stride(1)] = 0.f;
      }
    }
  });
}

}  // namespace kvslimmer
