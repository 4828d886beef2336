// Per-pair arithmetic shared by the CPU round ops (merge_pairs.cpp, paged_round.cpp): the
// angles of a RoPE shift and one head's merged key. Computed in T (float32 or float64), in
// the order kvslimmer_vllm.core.merge.merge_pairs computes it.
#pragma once

#include <cmath>
#include <cstdint>

namespace kvslimmer {

// cos / sin of a shift by `delta` positions from row |delta| of a vLLM-layout cos_sin table
// ([P, rotary_dim]: cos half, then sin half), divided by their norm and mirrored for a
// negative delta, as RotarySpec.shift_cos_sin does; `half` = rotary_dim / 2 entries each.
template <typename T>
inline void shift_angles(const T* table, int64_t delta, int64_t half, T* cos, T* sin) {
  const T* row = table + (delta < 0 ? -delta : delta) * 2 * half;
  const T sign = delta < 0 ? T(-1) : T(1);
  for (int64_t e = 0; e < half; ++e) {
    const T c = row[e], s = row[half + e];
    const T norm = std::sqrt(c * c + s * s);
    cos[e] = c / norm;
    sin[e] = s * sign / norm;
  }
}

// One head's merged key a Rot k_i + (1 - a) k_j (Rot: cos / sin over the first rotary_dim
// dims, NeoX or GPT-J pairing; none when cos is null). The pairing branch is outside the
// loops so they vectorise.
template <typename T>
inline void merge_key(const T* ki, const T* kj, T* out, T a, const T* cos, const T* sin,
                      int64_t dim, int64_t rotary_dim, bool is_neox) {
  const T b = T(1) - a;
  const int64_t half = rotary_dim / 2;
  int64_t first_plain = 0;
  if (cos != nullptr && is_neox) {
    for (int64_t e = 0; e < half; ++e) {
      const T x1 = ki[e], x2 = ki[e + half];
      out[e] = a * (x1 * cos[e] - x2 * sin[e]) + b * kj[e];
      out[e + half] = a * (x2 * cos[e] + x1 * sin[e]) + b * kj[e + half];
    }
    first_plain = rotary_dim;
  } else if (cos != nullptr) {
    for (int64_t e = 0; e < half; ++e) {
      const T x1 = ki[2 * e], x2 = ki[2 * e + 1];
      out[2 * e] = a * (x1 * cos[e] - x2 * sin[e]) + b * kj[2 * e];
      out[2 * e + 1] = a * (x2 * cos[e] + x1 * sin[e]) + b * kj[2 * e + 1];
    }
    first_plain = rotary_dim;
  }
  for (int64_t e = first_plain; e < dim; ++e) out[e] = a * ki[e] + b * kj[e];
}

// One head's merged value (c_i v_i + c_j v_j) / (c_i + c_j).
template <typename T>
inline void merge_value(const T* vi, const T* vj, T* out, T c_i, T c_j, int64_t dim) {
  const T total = c_i + c_j;
  for (int64_t e = 0; e < dim; ++e) out[e] = (c_i * vi[e] + c_j * vj[e]) / total;
}

}  // namespace kvslimmer
