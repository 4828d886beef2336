// torch.ops.kvslimmer.paged_attention on CPU: paged attention with a per-slot count bias, over
// the slot-major cache of one layer, with optional observation-mass accumulation.
//
// Contract (kvslimmer_vllm.core.merged_attention, per request, scattered to slots):
//   logit_j = scale * q . k_j + log(c_j),  P_j = softmax_j(logit_j) over the visible slots,
//   out = sum_j P_j v_j,  mass[slot_j, h] += sum_{rows, g} P_j / G.
// Row i of a request with T rows and L slots sees its first L - T + i + 1 slots.
//
// How it is computed
// ------------------
// Work items are (request, KV head, chunk of query positions). An item's rows are the G query
// heads of its KV head times its positions, so every key and value row loaded from the cache is
// used by all G heads (the GQA saving) and by every position of the chunk (prefill). An item walks
// the request's blocks through the block table, never gathering the request:
//   1. S = (scale q) K^T for every row and every slot up to the chunk's last visible slot, into a
//      per-thread buffer (register tiles of 3 rows x 4 slots, lanes over the head dimension);
//   2. per row: m = max S over its visible slots, e_j = c_j exp(S_j - m) (the count enters as a
//      factor, which is exp(log c_j) without a logarithm per slot), l = sum e_j; hidden slots get
//      e = 0; with mass, the item's mass partial gets e_j / (l G);
//   3. O = E V (register tiles of 3 rows x 32 lanes of the head dimension), out = O / l.
// Softmax is exact (not online), so the normalised probabilities needed for the mass come for
// free; the price is the S buffer, rows x visible slots floats per thread. Query chunks are sized
// to keep it around 384 KiB (at least 16 rows per item for key reuse).
//
// Parallelism and determinism: items run under OpenMP with dynamic scheduling, largest first.
// When a batch has fewer items than twice the threads (a decode step of one or two requests), long
// items are also split along their slots, flash-decoding style: each part keeps its row maxima,
// sums, unnormalised outputs and weights, and a second parallel pass joins the parts exactly.
// An item writes only its own output rows, mass partial or split record, so nothing is shared.
// The partials are added into `mass` afterwards, one thread per KV head, in a fixed item order, so
// the result does not depend on thread scheduling (requests may even share slots). How the work
// is cut depends on the thread count, so results with different thread counts agree to rounding.
//
// Build: with AVX2 + FMA (+ F16C) the micro-kernels use intrinsics; otherwise, and for head
// dimensions that are not a multiple of 8, the same loops run in plain C++.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KVS_HAVE_AVX2 1
#else
#define KVS_HAVE_AVX2 0
#endif

#include "../ops.h"

namespace kvslimmer {
namespace {

constexpr int kRowTile = 3;     // query rows per register tile
constexpr int kSlotTile = 4;    // slots per QK register tile
constexpr int kSubSlots = 32;   // slots per cache-resident sub-tile of a block
constexpr int64_t kScoreBufFloats = 96 * 1024;  // target S buffer per item (384 KiB)
constexpr int64_t kMinItemRows = 16;            // rows per prefill item, for key reuse
constexpr double kMinParallelCost = 8192;       // row x slot pairs below which one thread runs
constexpr int64_t kSplitMinSlots = 256;         // slots per part when an item is split
constexpr int64_t kSplitMaxRows = 64;           // only items with few rows are split

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ----------------------------------------------------------------------------------------------
// Scalar micro-kernels (portable path and head dims that are not a multiple of 8).

template <typename T>
inline float as_float(T x) {
  return static_cast<float>(x);
}

struct Scalar {
  // s[r * lds + c] = q_r . k_c for r < R, c < N.
  template <int R, int N, typename KT>
  static void qk(const float* q, int64_t D, const KT* k, int64_t ks, float* s, int64_t lds) {
    for (int c = 0; c < N; ++c) {
      const KT* kc = k + c * ks;
      for (int r = 0; r < R; ++r) {
        const float* qr = q + r * D;
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += qr[d] * as_float(kc[d]);
        s[r * lds + c] = acc;
      }
    }
  }
  // o[r * D + d] += sum_{j < n} p[r * lds + j] v_j[d] for d < width.
  template <int R, typename VT>
  static void pv(const float* p, int64_t lds, const VT* v, int64_t vs, int64_t n, float* o,
                 int64_t D, int64_t width) {
    for (int r = 0; r < R; ++r) {
      float* orow = o + r * D;
      for (int64_t j = 0; j < n; ++j) {
        const float pj = p[r * lds + j];
        const VT* vj = v + j * vs;
        for (int64_t d = 0; d < width; ++d) orow[d] += pj * as_float(vj[d]);
      }
    }
  }
  static float max(const float* x, int64_t n) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
    return m;
  }
  // x[i] = exp(x[i] - m) (* c[i] when c), returns the sum.
  static float exp_sum(float* x, const float* c, int64_t n, float m) {
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      float e = std::exp(x[i] - m);
      if (c) e *= c[i];
      x[i] = e;
      sum += e;
    }
    return sum;
  }
  // y[i] += a * x[i]
  static void axpy(float* y, const float* x, int64_t n, float a) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
  }
};

// ----------------------------------------------------------------------------------------------
// AVX2 + FMA micro-kernels.

#if KVS_HAVE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const c10::Half* p) {
#ifdef __F16C__
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  alignas(32) float tmp[8];
  for (int i = 0; i < 8; ++i) tmp[i] = static_cast<float>(p[i]);
  return _mm256_load_ps(tmp);
#endif
}

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// exp(x) for x <= 0 (logit minus row max): Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2,
// then the classic degree-7 minimax polynomial of expf for e^r (about 1 ulp), scaled by 2^n.
// Below -87.3 the result is flushed to 0 (e^-87.3 is the smallest normal float).
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(0.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

struct Avx2 {
  // 3 x 4 tile: accumulators hold lanes of the head dimension; four hadds fold the four slots
  // of a row into one 4-float store.
  template <int R, int N, typename KT>
  static void qk(const float* q, int64_t D, const KT* k, int64_t ks, float* s, int64_t lds) {
    __m256 acc[R][kSlotTile];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < kSlotTile; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      __m256 qv[R];
      for (int r = 0; r < R; ++r) qv[r] = _mm256_loadu_ps(q + r * D + d);
      for (int c = 0; c < N; ++c) {
        const __m256 kc = load8(k + c * ks + d);
        for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(qv[r], kc, acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 t0 = _mm256_hadd_ps(acc[r][0], acc[r][1]);
      const __m256 t1 = _mm256_hadd_ps(acc[r][2], acc[r][3]);
      const __m256 t2 = _mm256_hadd_ps(t0, t1);
      const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps(t2, 1));
      if (N == kSlotTile) {
        _mm_storeu_ps(s + r * lds, sums);
      } else {
        alignas(16) float tmp[4];
        _mm_store_ps(tmp, sums);
        for (int c = 0; c < N; ++c) s[r * lds + c] = tmp[c];
      }
    }
  }

  // R rows x NC chunks of 8 lanes; each value row is loaded once for the R rows.
  template <int R, int NC, typename VT>
  static void pv_tile(const float* p, int64_t lds, const VT* v, int64_t vs, int64_t n, float* o,
                      int64_t D) {
    __m256 acc[R][NC];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm256_loadu_ps(o + r * D + c * 8);
    for (int64_t j = 0; j < n; ++j) {
      __m256 pj[R];
      for (int r = 0; r < R; ++r) pj[r] = _mm256_broadcast_ss(p + r * lds + j);
      const VT* vj = v + j * vs;
      for (int c = 0; c < NC; ++c) {
        const __m256 vc = load8(vj + c * 8);
        for (int r = 0; r < R; ++r) acc[r][c] = _mm256_fmadd_ps(pj[r], vc, acc[r][c]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < NC; ++c) _mm256_storeu_ps(o + r * D + c * 8, acc[r][c]);
  }

  template <int R, typename VT>
  static void pv(const float* p, int64_t lds, const VT* v, int64_t vs, int64_t n, float* o,
                 int64_t D, int64_t width) {
    int64_t d = 0;
    for (; d + 32 <= width; d += 32) pv_tile<R, 4>(p, lds, v + d, vs, n, o + d, D);
    switch ((width - d) / 8) {
      case 3: pv_tile<R, 3>(p, lds, v + d, vs, n, o + d, D); break;
      case 2: pv_tile<R, 2>(p, lds, v + d, vs, n, o + d, D); break;
      case 1: pv_tile<R, 1>(p, lds, v + d, vs, n, o + d, D); break;
      default: break;
    }
  }

  static float max(const float* x, int64_t n) {
    __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    float out = hmax(m);
    for (; i < n; ++i) out = std::max(out, x[i]);
    return out;
  }

  static float exp_sum(float* x, const float* c, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
      if (c) e = _mm256_mul_ps(e, _mm256_loadu_ps(c + i));
      _mm256_storeu_ps(x + i, e);
      sum = _mm256_add_ps(sum, e);
    }
    if (i < n) {  // tail through an 8-float staging buffer (padding -inf -> 0)
      alignas(32) float tmp[8];
      alignas(32) float cnt[8];
      const int64_t rest = n - i;
      for (int j = 0; j < 8; ++j) {
        tmp[j] = j < rest ? x[i + j] : -std::numeric_limits<float>::infinity();
        cnt[j] = (c && j < rest) ? c[i + j] : 1.f;
      }
      __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_load_ps(tmp), mv));
      e = _mm256_mul_ps(e, _mm256_load_ps(cnt));
      _mm256_store_ps(tmp, e);
      for (int64_t j = 0; j < rest; ++j) x[i + j] = tmp[j];
      sum = _mm256_add_ps(sum, e);
    }
    return hsum(sum);
  }

  static void axpy(float* y, const float* x, int64_t n, float a) {
    const __m256 av = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] += a * x[i];
  }
};
#endif  // KVS_HAVE_AVX2

// ----------------------------------------------------------------------------------------------
// Problem description shared by all items.

struct IndexView {  // a 1-D or 2-D int32 / int64 index tensor on the CPU
  const void* data = nullptr;
  bool is64 = false;
  int64_t stride0 = 0, stride1 = 0;
  explicit IndexView(const at::Tensor& t) : data(t.data_ptr()), is64(t.scalar_type() == at::kLong) {
    stride0 = t.stride(0);
    stride1 = t.dim() > 1 ? t.stride(1) : 0;
  }
  int64_t operator()(int64_t i, int64_t j = 0) const {
    const int64_t off = i * stride0 + j * stride1;
    return is64 ? static_cast<const int64_t*>(data)[off] : static_cast<const int32_t*>(data)[off];
  }
};

template <typename T>
struct Problem {
  const T* query;       // [T, Hq, D]
  int64_t qs0, qs1;     // strides of query (elements)
  const T* kv;          // [S, Hkv, 2D]
  int64_t ks0, ks1;     // strides of kv (elements)
  const float* counts;  // [S] or nullptr
  T* out;               // [T, Hq, D], contiguous
  int64_t Hq, Hkv, G, D, block_size;
  float scale;
  const IndexView* block_table;
  const std::vector<int64_t>* q_start;  // per request
  const std::vector<int64_t>* seq_len;  // per request
};

struct Item {
  int64_t req, head, t0, t1;  // query positions [t0, t1) of the request
  int64_t visible;            // slots seen by the chunk's last row
  int64_t begin, end;         // the item's slots: [0, visible), or a block-aligned part of it
  int64_t mass_offset;        // its mass partial (slots [begin, end)) in the partial buffer
  int64_t record;             // split items: offset of their SplitRecord floats; -1 otherwise
  double cost;
  int64_t rows(int64_t G) const { return (t1 - t0) * G; }
  bool split() const { return record >= 0; }
};

// What a split item leaves for the combine step, as floats at `record`:
// o [rows, D] unnormalised outputs, m [rows] row maxima, l [rows] sums of weights,
// then (with mass) e [rows, end - begin] the weights themselves.
int64_t record_floats(const Item& item, int64_t G, int64_t D, bool mass) {
  const int64_t rows = item.rows(G);
  return rows * (D + 2) + (mass ? rows * (item.end - item.begin) : 0);
}

struct Workspace {  // per-thread scratch, kept between calls (grows, never shrinks)
  std::vector<float> buf;
  std::vector<int64_t> visible;
  float* get(int64_t n) {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
    return buf.data();
  }
};

Workspace& thread_workspace() {
  static thread_local Workspace ws;
  return ws;
}

template <int R, typename K, typename KT>
inline void qk_rows(const float* q, int64_t D, const KT* k, int64_t ks, int64_t n, float* s,
                    int64_t lds) {
  int64_t j = 0;
  for (; j + kSlotTile <= n; j += kSlotTile)
    K::template qk<R, kSlotTile>(q, D, k + j * ks, ks, s + j, lds);
  switch (n - j) {
    case 3: K::template qk<R, 3>(q, D, k + j * ks, ks, s + j, lds); break;
    case 2: K::template qk<R, 2>(q, D, k + j * ks, ks, s + j, lds); break;
    case 1: K::template qk<R, 1>(q, D, k + j * ks, ks, s + j, lds); break;
    default: break;
  }
}

// One work item: rows (position t, head g) of KV head `item.head` of request `item.req`, over
// the slots [item.begin, item.end). A whole item writes its output rows and mass partial; a split
// item leaves a record for combine_split().
template <typename K, typename T>
void run_item(const Problem<T>& P, const Item& item, float* partials, float* records) {
  const int64_t D = P.D, G = P.G, bs = P.block_size;
  const int64_t L = (*P.seq_len)[item.req];
  const int64_t num_q = (*P.q_start)[item.req + 1] - (*P.q_start)[item.req];
  const int64_t q0 = (*P.q_start)[item.req];
  const int64_t rows = item.rows(G);
  const int64_t begin = item.begin, n = item.end - item.begin;  // slots of this item
  const int64_t lds = round_up(std::max<int64_t>(n, 1), 8) + 8;
  float* mass_partial = partials && !item.split() ? partials + item.mass_offset : nullptr;
  float* record = item.split() ? records + item.record : nullptr;

  Workspace& ws = thread_workspace();
  float* Q = ws.get(rows * (2 * D + lds + 1));  // [rows, D] scaled queries
  float* O = Q + rows * D;                      // [rows, D] unnormalised outputs
  float* S = O + rows * D;                      // [rows, lds] logits, then exp weights
  float* row_inv = S + rows * lds;              // [rows] 1 / sum of weights (0: sees nothing)
  if (static_cast<int64_t>(ws.visible.size()) < rows) ws.visible.resize(rows);
  int64_t* row_visible = ws.visible.data();     // [rows] slots of the item each row sees

  for (int64_t t = item.t0; t < item.t1; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t row = (t - item.t0) * G + g;
      const T* src = P.query + (q0 + t) * P.qs0 + (item.head * G + g) * P.qs1;
      float* dst = Q + row * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = as_float(src[d]) * P.scale;
      row_visible[row] = std::min(n, std::max<int64_t>(0, L - num_q + t + 1 - begin));
    }
  }
  std::fill(O, O + rows * D, 0.f);

  // Blocks of the item: begin is block-aligned, so local slot j is block (begin + j) / bs.
  const int64_t first_block = begin / bs;
  const int64_t num_blocks = (n + bs - 1) / bs;
  auto block_id = [&](int64_t b) { return (*P.block_table)(item.req, first_block + b); };
  auto block_base = [&](int64_t b) { return P.kv + block_id(b) * bs * P.ks0 + item.head * P.ks1; };

  // 1. logits
  for (int64_t b = 0; b < num_blocks; ++b) {
    const T* kb = block_base(b);
    const int64_t n0 = b * bs, nb = std::min(bs, n - n0);
    for (int64_t sub = 0; sub < nb; sub += kSubSlots) {
      const int64_t ns = std::min<int64_t>(kSubSlots, nb - sub);
      const T* k = kb + sub * P.ks0;
      float* s = S + n0 + sub;
      int64_t r = 0;
      for (; r + kRowTile <= rows; r += kRowTile)
        qk_rows<kRowTile, K>(Q + r * D, D, k, P.ks0, ns, s + r * lds, lds);
      if (rows - r == 2) qk_rows<2, K>(Q + r * D, D, k, P.ks0, ns, s + r * lds, lds);
      if (rows - r == 1) qk_rows<1, K>(Q + r * D, D, k, P.ks0, ns, s + r * lds, lds);
    }
  }

  // 2. softmax weights (unnormalised), mass partial
  if (mass_partial) std::fill(mass_partial, mass_partial + n, 0.f);
  for (int64_t row = 0; row < rows; ++row) {
    float* s = S + row * lds;
    const int64_t v = row_visible[row];
    std::fill(s + v, s + n, 0.f);  // hidden slots weigh nothing in step 3
    float m = -std::numeric_limits<float>::infinity(), sum = 0.f;
    if (v > 0) {
      m = K::max(s, v);
      for (int64_t b = 0; b * bs < v; ++b) {
        const int64_t n0 = b * bs, nb = std::min(bs, v - n0);
        const float* c = P.counts ? P.counts + block_id(b) * bs : nullptr;
        sum += K::exp_sum(s + n0, c, nb, m);
      }
    }
    row_inv[row] = v > 0 ? 1.f / sum : 0.f;
    if (record) {
      record[rows * D + row] = m;
      record[rows * (D + 1) + row] = sum;
      if (partials) std::copy(s, s + n, record + rows * (D + 2) + row * n);
    } else if (mass_partial && v > 0) {
      K::axpy(mass_partial, s, v, row_inv[row] / static_cast<float>(G));
    }
  }

  // 3. outputs
  for (int64_t b = 0; b < num_blocks; ++b) {
    const T* vb = block_base(b) + D;
    const int64_t n0 = b * bs, nb = std::min(bs, n - n0);
    for (int64_t sub = 0; sub < nb; sub += kSubSlots) {
      const int64_t ns = std::min<int64_t>(kSubSlots, nb - sub);
      const T* v = vb + sub * P.ks0;
      const float* p = S + n0 + sub;
      int64_t r = 0;
      for (; r + kRowTile <= rows; r += kRowTile)
        K::template pv<kRowTile>(p + r * lds, lds, v, P.ks0, ns, O + r * D, D, D);
      if (rows - r == 2) K::template pv<2>(p + r * lds, lds, v, P.ks0, ns, O + r * D, D, D);
      if (rows - r == 1) K::template pv<1>(p + r * lds, lds, v, P.ks0, ns, O + r * D, D, D);
    }
  }

  if (record) {
    std::copy(O, O + rows * D, record);
    return;
  }
  for (int64_t t = item.t0; t < item.t1; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t row = (t - item.t0) * G + g;
      T* dst = P.out + ((q0 + t) * P.Hq + item.head * G + g) * D;
      const float inv = row_inv[row];
      const float* o = O + row * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(inv == 0.f ? 0.f : o[d] * inv);
    }
  }
}

// Joins the split items [first, first + count) of one (request, head, positions): rescales each
// part to the common row maximum (flash-decoding), normalises, writes the output rows, and turns
// each part's stored weights into its mass partial with the now known row sums.
template <typename T>
void combine_split(const Problem<T>& P, const Item* parts, int64_t count, float* partials,
                   const float* records) {
  const Item& item = parts[0];
  const int64_t D = P.D, G = P.G, rows = item.rows(G);
  const int64_t q0 = (*P.q_start)[item.req];
  std::vector<float> out(D), scale(count);
  for (int64_t s = 0; s < count; ++s) {
    if (partials)
      std::fill_n(partials + parts[s].mass_offset, parts[s].end - parts[s].begin, 0.f);
  }
  for (int64_t row = 0; row < rows; ++row) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < count; ++s) {
      const float* rec = records + parts[s].record;
      if (rec[rows * (D + 1) + row] > 0.f) m = std::max(m, rec[rows * D + row]);
    }
    float total = 0.f;
    for (int64_t s = 0; s < count; ++s) {
      const float* rec = records + parts[s].record;
      const float sum = rec[rows * (D + 1) + row];
      scale[s] = sum > 0.f ? std::exp(rec[rows * D + row] - m) : 0.f;
      total += sum * scale[s];
    }
    std::fill(out.begin(), out.end(), 0.f);
    if (total > 0.f) {
      for (int64_t s = 0; s < count; ++s) {
        if (scale[s] == 0.f) continue;
        const float* o = records + parts[s].record + row * D;
        const float w = scale[s] / total;
        for (int64_t d = 0; d < D; ++d) out[d] += w * o[d];
        if (partials) {
          const int64_t n = parts[s].end - parts[s].begin;
          const float* e = records + parts[s].record + rows * (D + 2) + row * n;
          float* dst = partials + parts[s].mass_offset;
          const float coef = w / static_cast<float>(G);
          for (int64_t j = 0; j < n; ++j) dst[j] += coef * e[j];
        }
      }
    }
    const int64_t t = item.t0 + row / G, g = row % G;
    T* dst = P.out + ((q0 + t) * P.Hq + item.head * G + g) * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(out[d]);
  }
}

template <typename T>
void run_all(const Problem<T>& P, const std::vector<Item>& items, float* partials,
             float* records, int nthreads) {
  // Largest items first; dynamic scheduling balances the rest.
  std::vector<int64_t> order(items.size());
  for (size_t i = 0; i < items.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return items[a].cost > items[b].cost; });
  const bool simd = KVS_HAVE_AVX2 && P.D % 8 == 0;
  const int64_t n = static_cast<int64_t>(order.size());
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) {
    const Item& item = items[order[i]];
#if KVS_HAVE_AVX2
    if (simd) {
      run_item<Avx2>(P, item, partials, records);
      continue;
    }
#endif
    (void)simd;
    run_item<Scalar>(P, item, partials, records);
  }
  if (!records) return;
  // The parts of one split item are adjacent in `items`, the first one at begin 0.
  std::vector<std::pair<int64_t, int64_t>> groups;  // (first part, number of parts)
  for (int64_t i = 0; i < n; ++i) {
    if (!items[i].split()) continue;
    if (items[i].begin == 0) {
      groups.emplace_back(i, 1);
    } else {
      ++groups.back().second;
    }
  }
  const int64_t num_groups = static_cast<int64_t>(groups.size());
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t g = 0; g < num_groups; ++g)
    combine_split(P, items.data() + groups[g].first, groups[g].second, partials, records);
}

std::vector<int64_t> to_host_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

}  // namespace

at::Tensor paged_attention_cpu(const at::Tensor& query_in, const at::Tensor& kv_in,
                               const std::optional<at::Tensor>& counts_in,
                               const at::Tensor& block_table_in, const at::Tensor& seq_lens,
                               const at::Tensor& query_start_loc, double scale,
                               int64_t block_size, const std::optional<at::Tensor>& mass) {
  TORCH_CHECK(query_in.dim() == 3, "query must be [T, Hq, D], got ", query_in.sizes());
  TORCH_CHECK(kv_in.dim() == 3, "kv must be [S, Hkv, 2*D], got ", kv_in.sizes());
  const auto dtype = query_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "paged_attention supports float32, float16 and bfloat16, got ", dtype);
  TORCH_CHECK(kv_in.scalar_type() == dtype, "kv dtype ", kv_in.scalar_type(),
              " differs from query dtype ", dtype);
  for (const at::Tensor* t : {&query_in, &kv_in, &block_table_in, &seq_lens, &query_start_loc})
    TORCH_CHECK(t->device().is_cpu(), "paged_attention (CPU) got a tensor on ", t->device());
  const int64_t num_tokens = query_in.size(0), Hq = query_in.size(1), D = query_in.size(2);
  const int64_t S = kv_in.size(0), Hkv = kv_in.size(1);
  TORCH_CHECK(kv_in.size(2) == 2 * D, "kv last dim must be 2*D = ", 2 * D, ", got ",
              kv_in.size(2));
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "Hq=", Hq, " is not a multiple of Hkv=", Hkv);
  TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  TORCH_CHECK(block_table_in.dim() == 2, "block_table must be [R, max_blocks]");
  TORCH_CHECK(seq_lens.dim() == 1 && query_start_loc.dim() == 1,
              "seq_lens and query_start_loc must be 1-D");
  for (const at::Tensor* t : {&block_table_in, &seq_lens, &query_start_loc})
    TORCH_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong,
                "index tensors must be int32 or int64, got ", t->scalar_type());
  const int64_t R = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == R + 1, "query_start_loc must have R+1 = ", R + 1,
              " entries, got ", query_start_loc.size(0));
  TORCH_CHECK(block_table_in.size(0) >= R, "block_table has ", block_table_in.size(0),
              " rows for ", R, " requests");

  const at::Tensor query = query_in.stride(2) == 1 ? query_in : query_in.contiguous();
  const at::Tensor kv = kv_in.stride(2) == 1 ? kv_in : kv_in.contiguous();
  at::Tensor counts;
  if (counts_in.has_value()) {
    TORCH_CHECK(counts_in->device().is_cpu(), "counts must be on the CPU");
    TORCH_CHECK(counts_in->dim() == 1 && counts_in->size(0) == S, "counts must have shape [",
                S, "], got ", counts_in->sizes());
    counts = counts_in->to(at::kFloat).contiguous();
  }
  if (mass.has_value()) {
    TORCH_CHECK(mass->device().is_cpu(), "mass must be on the CPU");
    TORCH_CHECK(mass->scalar_type() == at::kFloat, "mass must be float32, got ",
                mass->scalar_type());
    TORCH_CHECK(mass->dim() == 2 && mass->size(0) == S && mass->size(1) == Hkv,
                "mass must have shape [", S, ", ", Hkv, "], got ", mass->sizes());
  }

  const std::vector<int64_t> q_start = to_host_vector(query_start_loc);
  const std::vector<int64_t> seq_len = to_host_vector(seq_lens);
  const IndexView block_table(block_table_in);
  const int64_t max_blocks = block_table_in.size(1);
  const int64_t num_cache_blocks = S / block_size;
  const int64_t G = Hq / Hkv;

  int nthreads = at::in_parallel_region() ? 1 : at::get_num_threads();
  nthreads = std::max(nthreads, 1);

  // Validate every index the kernels will read, then cut the work into items.
  int64_t active = 0;
  bool every_row_covered = q_start[0] == 0 && q_start[R] == num_tokens;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t nq = q_start[r + 1] - q_start[r], L = seq_len[r];
    TORCH_CHECK(nq >= 0 && q_start[r] >= 0 && q_start[r + 1] <= num_tokens,
                "query_start_loc is not a non-decreasing range within [0, ", num_tokens,
                "] at request ", r);
    TORCH_CHECK(L >= 0, "negative seq_len at request ", r);
    if (nq == 0 || L == 0) {
      every_row_covered = every_row_covered && nq == 0;
      continue;
    }
    const int64_t nblk = (L + block_size - 1) / block_size;
    TORCH_CHECK(nblk <= max_blocks, "seq_len ", L, " of request ", r, " needs ", nblk,
                " blocks, block_table has ", max_blocks);
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t id = block_table(r, b);
      TORCH_CHECK(id >= 0 && id < num_cache_blocks, "block id ", id, " of request ", r,
                  " is outside the cache (", num_cache_blocks, " blocks of ", block_size,
                  " slots)");
    }
    ++active;
  }

  std::vector<Item> items;
  const int64_t want_items = 2 * static_cast<int64_t>(nthreads);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t nq = q_start[r + 1] - q_start[r], L = seq_len[r];
    if (nq == 0 || L == 0) continue;
    // Positions per item: keep the S buffer near its target, but give each item enough rows to
    // reuse keys; split further (down to that minimum) while the batch has fewer items than
    // twice the threads.
    const int64_t by_memory = std::max<int64_t>(1, kScoreBufFloats / (G * L));
    const int64_t min_pos = (kMinItemRows + G - 1) / G;
    int64_t chunks = (nq + std::max(by_memory, min_pos) - 1) / std::max(by_memory, min_pos);
    const int64_t wanted = (want_items + active * Hkv - 1) / (active * Hkv);
    chunks = std::max(chunks, std::min(wanted, (nq + min_pos - 1) / min_pos));
    const int64_t per = (nq + chunks - 1) / chunks;
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t t0 = 0; t0 < nq; t0 += per) {
        const int64_t t1 = std::min(nq, t0 + per);
        const int64_t vis = std::min(L, std::max<int64_t>(0, L - nq + t1));
        items.push_back(Item{r, h, t0, t1, vis, 0, vis, 0, -1, 0.0});
      }
    }
  }

  // Still too few items for the threads (small decode batches): split long items along their
  // slots (flash-decoding); combine_split() joins the parts exactly, mass included.
  const int64_t num_whole = static_cast<int64_t>(items.size());
  if (nthreads > 1 && num_whole > 0 && num_whole < want_items) {
    const int64_t parts_wanted = (want_items + num_whole - 1) / num_whole;
    std::vector<Item> split_items;
    for (const Item& item : items) {
      const int64_t parts = std::min(parts_wanted, item.visible / kSplitMinSlots);
      if (parts < 2 || item.rows(G) > kSplitMaxRows) {
        split_items.push_back(item);
        continue;
      }
      const int64_t span = round_up((item.visible + parts - 1) / parts, block_size);
      for (int64_t begin = 0; begin < item.visible; begin += span) {
        Item part = item;
        part.begin = begin;
        part.end = std::min(item.visible, begin + span);
        part.record = 0;  // offsets assigned below
        split_items.push_back(part);
      }
    }
    items.swap(split_items);
  }

  int64_t mass_floats = 0, record_total = 0;
  double total_cost = 0;
  for (Item& item : items) {
    item.cost = double(item.rows(G)) * double(item.end - item.begin + 16);
    total_cost += item.cost;
    if (mass.has_value()) {
      item.mass_offset = mass_floats;
      mass_floats += item.end - item.begin;
    }
    if (item.split()) {
      item.record = record_total;
      record_total += record_floats(item, G, D, mass.has_value());
    }
  }
  if (total_cost < kMinParallelCost) nthreads = 1;  // waking threads would cost more
  nthreads = static_cast<int>(std::min<int64_t>(nthreads, static_cast<int64_t>(items.size())));

  at::Tensor out = every_row_covered ? at::empty({num_tokens, Hq, D}, query.options())
                                     : at::zeros({num_tokens, Hq, D}, query.options());
  if (items.empty()) return out;

  // Caller-thread scratch kept between calls: partial masses and split records.
  static thread_local std::vector<float> partial_storage, record_storage;
  float* partials = nullptr;
  if (mass.has_value()) {
    if (static_cast<int64_t>(partial_storage.size()) < mass_floats)
      partial_storage.resize(mass_floats);
    partials = partial_storage.data();
  }
  float* records = nullptr;
  if (record_total > 0) {
    if (static_cast<int64_t>(record_storage.size()) < record_total)
      record_storage.resize(record_total);
    records = record_storage.data();
  }

  auto launch = [&](auto zero) {
    using scalar_t = decltype(zero);
    Problem<scalar_t> P{};
    P.query = static_cast<const scalar_t*>(query.data_ptr());
    P.qs0 = query.stride(0);
    P.qs1 = query.stride(1);
    P.kv = static_cast<const scalar_t*>(kv.data_ptr());
    P.ks0 = kv.stride(0);
    P.ks1 = kv.stride(1);
    P.counts = counts.defined() ? counts.data_ptr<float>() : nullptr;
    P.out = static_cast<scalar_t*>(out.data_ptr());
    P.Hq = Hq;
    P.Hkv = Hkv;
    P.G = G;
    P.D = D;
    P.block_size = block_size;
    P.scale = static_cast<float>(scale);
    P.block_table = &block_table;
    P.q_start = &q_start;
    P.seq_len = &seq_len;
    run_all(P, items, partials, records, nthreads);
  };
  if (dtype == at::kFloat) {
    launch(float(0));
  } else if (dtype == at::kHalf) {
    launch(c10::Half(0.f));
  } else {
    launch(c10::BFloat16(0.f));
  }

  if (partials) {
    // Race-free, order-fixed reduction: one KV head per thread, items in batch order.
    float* m = mass->data_ptr<float>();
    const int64_t ms0 = mass->stride(0), ms1 = mass->stride(1);
    const int64_t num_items = static_cast<int64_t>(items.size());
    const int reduce_threads =
        mass_floats < 65536 ? 1 : static_cast<int>(std::min<int64_t>(nthreads, Hkv));
#pragma omp parallel for num_threads(reduce_threads) schedule(static, 1)
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t i = 0; i < num_items; ++i) {
        const Item& item = items[i];
        if (item.head != h) continue;
        const float* src = partials + item.mass_offset;  // slots [begin, end) of the request
        for (int64_t j0 = item.begin; j0 < item.end;) {
          const int64_t b = j0 / block_size, j1 = std::min(item.end, (b + 1) * block_size);
          float* dst = m + block_table(item.req, b) * block_size * ms0 + h * ms1;
          for (int64_t j = j0; j < j1; ++j)
            dst[(j - b * block_size) * ms0] += src[j - item.begin];
          j0 = j1;
        }
      }
    }
  }
  return out;
}

at::Tensor paged_attention_meta(const at::Tensor& query, const at::Tensor& /*kv*/,
                                const std::optional<at::Tensor>& /*counts*/,
                                const at::Tensor& /*block_table*/, const at::Tensor& /*seq_lens*/,
                                const at::Tensor& /*query_start_loc*/, double /*scale*/,
                                int64_t /*block_size*/,
                                const std::optional<at::Tensor>& /*mass*/) {
  TORCH_CHECK(query.dim() == 3, "query must be [T, Hq, D], got ", query.sizes());
  return at::empty_like(query, at::MemoryFormat::Contiguous);
}

}  // namespace kvslimmer
