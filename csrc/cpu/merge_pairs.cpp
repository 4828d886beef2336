// torch.ops.kvslimmer.merge_pairs: the merged slots of a round's adjacent pairs, the same
// contract as kvslimmer_vllm.core.merge.merge_pairs:
//
//     key[l, p, h]   = a[l, p, h] Rot(delta) keys[l, i, h] + (1 - a[l, p, h]) keys[l, i + 1, h]
//     value[l, p, h] = (c_i values[l, i, h] + c_j values[l, i + 1, h]) / (c_i + c_j)
//
// with i = left[l, p]. Rot rotates the first rotary_dim dims of the left key by delta[l, p]
// positions (neox or GPT-J pairing), with the angles of row |delta| of cos_sin ([P, rotary_dim]:
// cos half, then sin half, vLLM's cos_sin_cache layout) divided by their norm and mirrored for
// a negative delta, as RotarySpec.shift_cos_sin does; without cos_sin the keys are merged as
// stored. The reference takes each pair's rows with four
// index_selects over strided views, rotates with a dozen elementwise passes and weights
// with half a dozen more; here each pair is one task that reads its four rows once and
// writes its two. Computed in the input's dtype (float32 or float64), like the reference.
// The results are two views of one [L, k, H, 2D] tensor (each head's key, then its value:
// the cache's row layout), so writing them back needs no concatenation.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../ops.h"
#include "round_math.h"

namespace kvslimmer {
namespace {

struct Strides {
  int64_t layer, slot, head;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> merge_pairs(
    const at::Tensor& keys, const at::Tensor& values, const at::Tensor& left,
    const at::Tensor& a, const at::Tensor& c_left, const at::Tensor& c_right,
    const std::optional<at::Tensor>& cos_sin, const std::optional<at::Tensor>& delta,
    int64_t rotary_dim, bool is_neox) {
  TORCH_CHECK_VALUE(keys.dim() == 4 && values.sizes() == keys.sizes(),
                    "merge_pairs takes keys and values [L, N, H, D] of one shape; got ",
                    keys.sizes(), " and ", values.sizes());
  const int64_t layers = keys.size(0), slots = keys.size(1), heads = keys.size(2),
                dim = keys.size(3);
  TORCH_CHECK_VALUE(left.dim() == 2 && left.size(0) == layers &&
                        left.scalar_type() == at::kLong,
                    "left must be int64 [L, k] with L = ", layers, "; got ", left.scalar_type(),
                    " ", left.sizes());
  const int64_t pairs = left.size(1);
  TORCH_CHECK_VALUE(a.sizes() == at::IntArrayRef({layers, pairs, heads}),
                    "a must have shape [", layers, ", ", pairs, ", ", heads, "], got ",
                    a.sizes());
  TORCH_CHECK_VALUE(c_left.sizes() == left.sizes() && c_right.sizes() == left.sizes(),
                    "c_left and c_right must have left's shape ", left.sizes(), ", got ",
                    c_left.sizes(), " and ", c_right.sizes());
  const auto dtype = keys.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble,
                    "merge_pairs takes float32 or float64 keys; got ", dtype);
  for (const at::Tensor* t : {&values, &a, &c_left, &c_right}) {
    TORCH_CHECK_VALUE(t->scalar_type() == dtype,
                      "values, a, c_left and c_right must have the keys' dtype ", dtype,
                      "; got ", t->scalar_type());
  }
  TORCH_CHECK_VALUE(cos_sin.has_value() == delta.has_value(),
                    "give both cos_sin and delta, or neither");
  const bool rotate = cos_sin.has_value();
  if (rotate) {
    TORCH_CHECK_VALUE(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= dim,
                      "rotary_dim must be even and in (0, ", dim, "], got ", rotary_dim);
    TORCH_CHECK_VALUE(cos_sin->dim() == 2 && cos_sin->size(1) == rotary_dim,
                      "cos_sin must be [P, ", rotary_dim, "], got ", cos_sin->sizes());
    TORCH_CHECK_VALUE(cos_sin->scalar_type() == dtype, "cos_sin must have the keys' dtype ",
                      dtype, "; got ", cos_sin->scalar_type());
    TORCH_CHECK_VALUE(delta->sizes() == left.sizes() && delta->scalar_type() == at::kLong,
                      "delta must be int64 of left's shape ", left.sizes(), "; got ",
                      delta->scalar_type(), " ", delta->sizes());
    TORCH_CHECK_VALUE(cos_sin->device().is_cpu() && delta->device().is_cpu(),
                      "merge_pairs runs on CPU tensors");
  }
  for (const at::Tensor* t : {&keys, &values, &left, &a, &c_left, &c_right}) {
    TORCH_CHECK_VALUE(t->device().is_cpu(), "merge_pairs runs on CPU tensors");
  }
  const at::Tensor k = keys.stride(3) == 1 ? keys : keys.contiguous();
  const at::Tensor v = values.stride(3) == 1 ? values : values.contiguous();
  const at::Tensor idx = left.contiguous(), wa = a.contiguous(), ci = c_left.contiguous(),
                   cj = c_right.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t n = 0; n < layers * pairs; ++n) {
    TORCH_CHECK_VALUE(ip[n] >= 0 && ip[n] + 1 < slots, "left slot ", ip[n],
                      " has no right neighbour among N = ", slots, " slots");
  }
  // Keys and values side by side in one [L, k, H, 2D] buffer, the cache's row layout.
  const at::Tensor out = at::empty({layers, pairs, heads, 2 * dim}, keys.options());
  at::Tensor out_keys = out.narrow(3, 0, dim), out_values = out.narrow(3, dim, dim);
  if (layers * pairs == 0) return {out_keys, out_values};
  const at::Tensor table = rotate ? cos_sin->contiguous() : at::Tensor();
  const at::Tensor shift = rotate ? delta->contiguous() : at::Tensor();
  if (rotate) {
    const int64_t* dp = shift.data_ptr<int64_t>();
    for (int64_t n = 0; n < layers * pairs; ++n) {
      TORCH_CHECK_VALUE(dp[n] > -table.size(0) && dp[n] < table.size(0), "delta ", dp[n],
                        " is outside the ", table.size(0), " rows of cos_sin");
    }
  }

  AT_DISPATCH_FLOATING_TYPES(dtype, "merge_pairs", [&] {
    using T = scalar_t;
    const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *ap = wa.data_ptr<T>(),
            *cip = ci.data_ptr<T>(), *cjp = cj.data_ptr<T>();
    const T* table_p = rotate ? table.data_ptr<T>() : nullptr;
    const int64_t* shift_p = rotate ? shift.data_ptr<int64_t>() : nullptr;
    T* outp = out.data_ptr<T>();
    const Strides ks = strides_of(k), vs = strides_of(v);
    const int64_t half = rotary_dim / 2;
    at::parallel_for(0, layers * pairs, 16, [&](int64_t begin, int64_t end) {
      std::vector<T> cos(half), sin(half);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t l = n / pairs, i = ip[n];
        if (rotate) shift_angles<T>(table_p, shift_p[n], half, cos.data(), sin.data());
        const T c1 = cip[n], c2 = cjp[n];
        const T* key_i = kp + l * ks.layer + i * ks.slot;
        const T* val_i = vp + l * vs.layer + i * vs.slot;
        for (int64_t h = 0; h < heads; ++h) {
          const T* ki = key_i + h * ks.head;
          const T* vi = val_i + h * vs.head;
          T* ok = outp + (n * heads + h) * 2 * dim;
          T* ov = ok + dim;
          merge_key<T>(ki, ki + ks.slot, ok, ap[n * heads + h], rotate ? cos.data() : nullptr,
                       rotate ? sin.data() : nullptr, dim, rotary_dim, is_neox);
          merge_value<T>(vi, vi + vs.slot, ov, c1, c2, dim);
        }
      }
    });
  });
  return {out_keys, out_values};
}

}  // namespace kvslimmer
