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
// to keep it around 384 KiB (at least 16 rows per item for key reuse; on AVX-512 at least 32,
// in whole vectors of 16 rows).
//
// Parallelism and determinism: items run under OpenMP with dynamic scheduling, largest first;
// the short items of one (request, positions), one per KV head, run as one task on one thread.
// When a batch has fewer items than twice the threads (a decode step of one or two requests), long
// items are also split along their slots, flash-decoding style: each part keeps its row maxima,
// sums, unnormalised outputs and weights, and a second parallel pass joins the parts exactly.
// An item writes only its own output rows, mass partial or split record, so nothing is shared.
// The partials are added into `mass` afterwards, one thread per KV head, in a fixed item order, so
// the result does not depend on thread scheduling (requests may even share slots). How the work
// is cut depends on the thread count, so results with different thread counts agree to rounding.
//
// Instruction sets: the portable loops (any CPU, any head dimension), AVX2 + FMA + F16C micro-
// kernels (attention_avx2.inc, head dim % 8) and AVX-512 ones (attention_avx512.inc, head dim % 16;
// prefill items there run lanes-over-rows, see that file). All are compiled into the same .so for
// baseline x86-64 and chosen per call from the CPU's flags (KVSLIMMER_CPU_ISA overrides).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

// The AVX2 and AVX-512 kernels are compiled a second and third time (isa.h); cpu_isa() picks
// one per call from what the CPU reports.
#include "isa.h"

#include "../ops.h"

namespace kvslimmer {
namespace {

constexpr int kRowTile = 3;     // query rows per register tile
constexpr int kSlotTile = 4;    // slots per QK register tile
constexpr int kSubSlots = 32;   // slots per cache-resident sub-tile of a block
constexpr int kPrefetchSlots = 8;   // how many slots ahead the narrow kernels prefetch
constexpr int64_t kScoreBufFloats = 96 * 1024;  // target S buffer per item (384 KiB)
constexpr int64_t kMinItemRows = 16;            // rows per prefill item, for key reuse
constexpr int64_t kWideMinRows = 32;            // AVX-512: items this tall run lanes-over-rows
constexpr double kMinParallelCost = 8192;       // row x slot pairs below which one thread runs
constexpr int64_t kSplitMinSlots = 256;         // slots per part when an item is split
constexpr int64_t kSplitMaxRows = 64;           // only items with few rows are split

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Asks for the cache lines of one slot's head row (`bytes` long) ahead of its use: a head's
// rows lie a slot stride apart, a pattern the hardware prefetchers follow poorly.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

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
  int64_t mass_offset;        // its mass partial (slots [begin, end)) in the partial buffer;
                              // -1: the item adds no mass (none wanted, or not observed)
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

// ----------------------------------------------------------------------------------------------
// The item runners, one namespace per instruction set.

namespace portable_isa {
#include "attention_item.inc"
template <typename T>
void run(const Problem<T>& P, const Item& item, float* partials, float* records) {
  run_item<Scalar>(P, item, partials, records);
}
}  // namespace portable_isa

#if KVS_X86_DISPATCH
KVS_BEGIN_AVX2
namespace avx2_isa {
#include "attention_avx2.inc"
#include "attention_item.inc"
template <typename T>
void run(const Problem<T>& P, const Item& item, float* partials, float* records) {
  run_item<Avx2>(P, item, partials, records);
}
}  // namespace avx2_isa
KVS_END_TARGET

KVS_BEGIN_AVX512
namespace avx512_isa {
#include "attention_avx512.inc"
#include "attention_item.inc"
template <typename T>
void run(const Problem<T>& P, const Item& item, float* partials, float* records) {
  if (!item.split() && item.rows(P.G) >= kWideMinRows) {
    run_item_wide(P, item, partials);
  } else {
    run_item<Avx512>(P, item, partials, records);
  }
}
}  // namespace avx512_isa
KVS_END_TARGET
#endif  // KVS_X86_DISPATCH

// ----------------------------------------------------------------------------------------------
// Which instruction set runs: the best the CPU has, unless KVSLIMMER_CPU_ISA or cpu_isa() asks
// for another one.

enum class Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"portable", "avx2", "avx512"};
constexpr const char* kIsaEnv = "KVSLIMMER_CPU_ISA";

bool cpu_has(Isa isa) {
  if (isa == Isa::kPortable) return true;
#if KVS_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (isa == Isa::kAvx2) return avx2;
  return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

std::string supported_isa_list() {
  std::string out;
  for (const std::string& name : cpu_isas()) out += (out.empty() ? "" : ", ") + name;
  return out;
}

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (cpu_has(isa)) return isa;
  return Isa::kPortable;
}

// "auto" -> the best this CPU has; a named ISA must be one this CPU runs.
Isa parse_isa(const std::string& name, const char* source) {
  if (name.empty() || name == "auto") return best_isa();
  for (int i = 0; i < 3; ++i) {
    if (name != kIsaNames[i]) continue;
    const Isa isa = static_cast<Isa>(i);
    TORCH_CHECK(cpu_has(isa), source, "=", name, ": this CPU cannot run it (supported here: ",
                supported_isa_list(), ")");
    return isa;
  }
  TORCH_CHECK(false, source, " must be one of auto, avx512, avx2, portable; got '", name, "'");
}

std::atomic<int> g_isa{-1};  // -1: not chosen yet

Isa chosen_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    const char* env = std::getenv(kIsaEnv);
    isa = static_cast<int>(parse_isa(env ? env : "auto", kIsaEnv));
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return static_cast<Isa>(isa);
}

// The ISA that runs a problem of head dimension D (AVX-512 needs D % 16, AVX2 D % 8).
Isa isa_for(int64_t D) {
  Isa isa = chosen_isa();
  if (isa == Isa::kAvx512 && D % 16 != 0) isa = Isa::kAvx2;
  if (isa == Isa::kAvx2 && D % 8 != 0) isa = Isa::kPortable;
  return isa;
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
  if (item.mass_offset < 0) partials = nullptr;  // the parts of one request: all or none
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
             float* records, int nthreads, Isa isa) {
  // Largest items first; dynamic scheduling balances the rest. The KV heads of one (request,
  // positions, slots) sort next to each other, and short items (decode) run as one task on one
  // thread: a cache row holds every head's key and value side by side, so the rows are then
  // brought into one core's caches once instead of once per head on different cores (measured:
  // decode 8 x 1 @ 512 slots 1.26x -> 0.96x vLLM's time). Tall items, which reuse each row for
  // many queries, stay one task per head (more tasks balance better; a task's rows fit L2).
  std::vector<int64_t> order(items.size());
  for (size_t i = 0; i < items.size(); ++i) order[i] = static_cast<int64_t>(i);
  auto same_rows = [&](const Item& x, const Item& y) {
    return x.req == y.req && x.t0 == y.t0 && x.begin == y.begin && x.rows(P.G) < kWideMinRows;
  };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const Item& x = items[a];
    const Item& y = items[b];
    if (x.cost != y.cost) return x.cost > y.cost;
    if (x.req != y.req) return x.req < y.req;
    if (x.t0 != y.t0) return x.t0 < y.t0;
    return x.begin < y.begin;
  });
  using RunFn = void (*)(const Problem<T>&, const Item&, float*, float*);
  RunFn run = &portable_isa::run<T>;
#if KVS_X86_DISPATCH
  switch (isa) {
    case Isa::kAvx512: run = &avx512_isa::run<T>; break;
    case Isa::kAvx2: run = &avx2_isa::run<T>; break;
    default: break;
  }
#endif
  const int64_t n = static_cast<int64_t>(order.size());
  std::vector<int64_t> task_start;  // tasks: order[task_start[k] .. task_start[k + 1])
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || !same_rows(items[order[i]], items[order[i - 1]])) task_start.push_back(i);
  if (static_cast<int64_t>(task_start.size()) < nthreads) {  // too few tasks: one per item
    task_start.resize(n);
    std::iota(task_start.begin(), task_start.end(), 0);
  }
  task_start.push_back(n);
  const int64_t num_tasks = static_cast<int64_t>(task_start.size()) - 1;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t k = 0; k < num_tasks; ++k)
    for (int64_t i = task_start[k]; i < task_start[k + 1]; ++i)
      run(P, items[order[i]], items[order[i]].mass_offset >= 0 ? partials : nullptr,
          records);
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

std::string cpu_isa(const std::optional<std::string>& isa) {
  if (isa.has_value()) g_isa.store(static_cast<int>(parse_isa(*isa, "cpu_isa")));
  return kIsaNames[static_cast<int>(chosen_isa())];
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (int i = 2; i >= 0; --i)
    if (cpu_has(static_cast<Isa>(i))) out.emplace_back(kIsaNames[i]);
  return out;
}

at::Tensor paged_attention_cpu(const at::Tensor& query_in, const at::Tensor& kv_in,
                               const std::optional<at::Tensor>& counts_in,
                               const at::Tensor& block_table_in, const at::Tensor& seq_lens,
                               const at::Tensor& query_start_loc, double scale,
                               int64_t block_size, const std::optional<at::Tensor>& mass,
                               const std::optional<at::Tensor>& observed_in) {
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
  // Requests whose rows add to the mass (all of them without `observed`).
  std::vector<char> observed(R, mass.has_value() ? 1 : 0);
  if (mass.has_value() && observed_in.has_value()) {
    TORCH_CHECK_VALUE(observed_in->dim() == 1 && observed_in->size(0) == R &&
                          observed_in->scalar_type() == at::kBool,
                      "observed must be bool [", R, "] (one per request), got ",
                      observed_in->scalar_type(), " ", observed_in->sizes());
    const at::Tensor host = observed_in->to(at::kCPU).contiguous();
    const bool* flags = host.data_ptr<bool>();
    for (int64_t r = 0; r < R; ++r) observed[r] = flags[r] ? 1 : 0;
  }

  const std::vector<int64_t> q_start = to_host_vector(query_start_loc);
  const std::vector<int64_t> seq_len = to_host_vector(seq_lens);
  const IndexView block_table(block_table_in);
  const int64_t max_blocks = block_table_in.size(1);
  const int64_t num_cache_blocks = S / block_size;
  const int64_t G = Hq / Hkv;
  const Isa isa = isa_for(D);
  // AVX-512 runs tall items lanes-over-rows: give them whole vectors of rows.
  const bool wide = isa == Isa::kAvx512;
  const int64_t row_unit = wide ? 16 / std::gcd<int64_t>(16, G) : 1;  // positions per 16 rows

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
    const int64_t min_rows = wide ? kWideMinRows : kMinItemRows;
    const int64_t min_pos = round_up((min_rows + G - 1) / G, row_unit);
    int64_t chunks = (nq + std::max(by_memory, min_pos) - 1) / std::max(by_memory, min_pos);
    const int64_t wanted = (want_items + active * Hkv - 1) / (active * Hkv);
    chunks = std::max(chunks, std::min(wanted, (nq + min_pos - 1) / min_pos));
    const int64_t per = std::min(nq, round_up((nq + chunks - 1) / chunks, row_unit));
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
    item.mass_offset = -1;
    if (observed[item.req]) {
      item.mass_offset = mass_floats;
      mass_floats += item.end - item.begin;
    }
    if (item.split()) {
      item.record = record_total;
      record_total += record_floats(item, G, D, item.mass_offset >= 0);
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
  if (mass_floats > 0) {
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
    run_all(P, items, partials, records, nthreads, isa);
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
        if (item.head != h || item.mass_offset < 0) continue;
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
                                const std::optional<at::Tensor>& /*mass*/,
                                const std::optional<at::Tensor>& /*observed*/) {
  TORCH_CHECK(query.dim() == 3, "query must be [T, Hq, D], got ", query.sizes());
  return at::empty_like(query, at::MemoryFormat::Contiguous);
}

}  // namespace kvslimmer
