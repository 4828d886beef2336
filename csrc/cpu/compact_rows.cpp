// torch.ops.kvslimmer.compact_rows: a round's result written into the request's slots of
// each layer's slot-major cache, in place; the same contract as
// kvslimmer_vllm.core.paged.compact_rows:
//
//     for j in [start, n):  kv[slots[j]] = kv[slots[source[l, j]]]     (source[l, j] >= j)
//     for each merged m:    kv[slots[merged_slots[l, m]]] = (merged_keys | merged_values)[l, m]
//
// The reference copies the moved rows out and back (index_select + index_copy_) and
// concatenates the merged keys and values first. Rows only ever move to lower output
// indices, so walking j upwards reads every source row before anything overwrites it: one
// memcpy per row, no temporary. Layers are independent tasks. Any dtype (rows are copied
// as bytes); the merged keys and values may be strided views (their last dimension
// contiguous). Every check runs before the first write.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "../ops.h"

namespace kvslimmer {

void compact_rows(const std::vector<at::Tensor>& kvs, const at::Tensor& slots,
                  const at::Tensor& source, int64_t start, const at::Tensor& merged_slots,
                  const at::Tensor& merged_keys, const at::Tensor& merged_values) {
  const int64_t layers = static_cast<int64_t>(kvs.size());
  TORCH_CHECK_VALUE(layers > 0, "compact_rows needs at least one layer's cache");
  const at::Tensor& first = kvs[0];
  TORCH_CHECK_VALUE(first.dim() == 3 && first.size(2) % 2 == 0,
                    "each cache must be [S, H, 2D]; got ", first.sizes());
  const int64_t num_slots = first.size(0), heads = first.size(1), dim = first.size(2) / 2;
  for (const at::Tensor& kv : kvs) {
    TORCH_CHECK_VALUE(kv.sizes() == first.sizes() && kv.scalar_type() == first.scalar_type(),
                      "every cache must have the first's shape ", first.sizes(), " and dtype ",
                      first.scalar_type(), "; got ", kv.sizes(), " ", kv.scalar_type());
    TORCH_CHECK_VALUE(kv.device().is_cpu(), "compact_rows runs on CPU tensors");
    TORCH_CHECK_VALUE(kv.stride(2) == 1, "each cache's last dimension must be contiguous");
  }
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.scalar_type() == at::kLong,
                    "slots must be int64 [N]; got ", slots.scalar_type(), " ", slots.sizes());
  TORCH_CHECK_VALUE(source.dim() == 2 && source.size(0) == layers &&
                        source.scalar_type() == at::kLong,
                    "source must be int64 [L, n] with L = ", layers, " caches; got ",
                    source.scalar_type(), " ", source.sizes());
  const int64_t total = slots.size(0), n = source.size(1);
  TORCH_CHECK_VALUE(n <= total, "source has ", n, " output slots, more than the N = ", total,
                    " slots");
  TORCH_CHECK_VALUE(start >= 0 && start <= n, "start must be in [0, ", n, "], got ", start);
  TORCH_CHECK_VALUE(merged_slots.dim() == 2 && merged_slots.size(0) == layers &&
                        merged_slots.scalar_type() == at::kLong,
                    "merged_slots must be int64 [L, w]; got ", merged_slots.scalar_type(), " ",
                    merged_slots.sizes());
  const int64_t width = merged_slots.size(1);
  const std::vector<int64_t> merged_shape{layers, width, heads, dim};
  TORCH_CHECK_VALUE(merged_keys.sizes() == at::IntArrayRef(merged_shape) &&
                        merged_values.sizes() == at::IntArrayRef(merged_shape),
                    "merged_keys and merged_values must be [", layers, ", ", width, ", ", heads,
                    ", ", dim, "], got ", merged_keys.sizes(), " and ", merged_values.sizes());
  TORCH_CHECK_VALUE(merged_keys.scalar_type() == first.scalar_type() &&
                        merged_values.scalar_type() == first.scalar_type(),
                    "merged_keys and merged_values must have the caches' dtype ",
                    first.scalar_type());

  const at::Tensor ids = slots.contiguous(), src = source.contiguous(),
                   merged = merged_slots.contiguous();
  const at::Tensor mk = merged_keys.stride(3) == 1 ? merged_keys : merged_keys.contiguous();
  const at::Tensor mv = merged_values.stride(3) == 1 ? merged_values : merged_values.contiguous();
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t* sp = src.data_ptr<int64_t>();
  const int64_t* mp = merged.data_ptr<int64_t>();
  for (int64_t j = 0; j < total; ++j) {
    TORCH_CHECK_VALUE(ip[j] >= 0 && ip[j] < num_slots, "slot id ", ip[j],
                      " outside the cache's ", num_slots, " slots");
  }
  for (int64_t l = 0; l < layers; ++l) {
    for (int64_t j = start; j < n; ++j) {
      const int64_t s = sp[l * n + j];
      TORCH_CHECK_VALUE(s >= j && s < total, "source[", l, ", ", j, "] = ", s,
                        " must be in [", j, ", ", total, "): rows only move to lower slots");
    }
    for (int64_t m = 0; m < width; ++m) {
      TORCH_CHECK_VALUE(mp[l * width + m] >= 0 && mp[l * width + m] < n, "merged_slots[", l,
                        ", ", m, "] = ", mp[l * width + m], " outside the ", n, " output slots");
    }
  }

  const int64_t item = first.element_size();
  const int64_t half_bytes = dim * item;
  at::parallel_for(0, layers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const at::Tensor& kv = kvs[l];
      char* base = static_cast<char*>(kv.data_ptr());
      const int64_t row_stride = kv.stride(0) * item, head_stride = kv.stride(1) * item;
      const bool dense_rows = kv.stride(1) == 2 * dim;
      auto copy_row = [&](char* to, const char* from) {
        if (dense_rows) {
          std::memcpy(to, from, heads * 2 * half_bytes);
        } else {
          for (int64_t h = 0; h < heads; ++h) {
            std::memcpy(to + h * head_stride, from + h * head_stride, 2 * half_bytes);
          }
        }
      };
      for (int64_t j = start; j < n; ++j) {
        const int64_t s = sp[l * n + j];
        if (s != j) copy_row(base + ip[j] * row_stride, base + ip[s] * row_stride);
      }
      const char* keys = static_cast<const char*>(mk.data_ptr()) + l * mk.stride(0) * item;
      const char* vals = static_cast<const char*>(mv.data_ptr()) + l * mv.stride(0) * item;
      for (int64_t m = 0; m < width; ++m) {
        char* row = base + ip[mp[l * width + m]] * row_stride;
        for (int64_t h = 0; h < heads; ++h) {
          std::memcpy(row + h * head_stride,
                      keys + (m * mk.stride(1) + h * mk.stride(2)) * item, half_bytes);
          std::memcpy(row + h * head_stride + half_bytes,
                      vals + (m * mv.stride(1) + h * mv.stride(2)) * item, half_bytes);
        }
      }
    }
  });
}

}  // namespace kvslimmer
