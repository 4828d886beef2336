// CUDA compaction of one request's slots in a slot-major paged KV cache (see compact.h).
//
// Why two kernels: with dst[i] at or before src[i] in the request's logical order, the row that
// thread block i writes (dst[i]) can be the row another block j < i still has to read
// (src[j] == dst[i] is possible, e.g. src = {1, 2}, dst = {0, 1}). Blocks run in no fixed order,
// so an in-place copy would race. Instead the first kernel gathers every surviving row into
// `scratch` and the second scatters them to their destinations; both go on the same stream, so
// the scatter starts only after the whole gather has finished, and no row is overwritten while it
// may still be read. Rows with src[i] == dst[i] stay where they are: no other block reads or
// writes them (src and dst each hold distinct slots), so both kernels skip them.
//
// Rows are copied bitwise in the widest word (16, 8, 4 or 2 bytes) that divides the row size and
// the alignment of both buffers; the element type only fixes the row size in bytes.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdint.h>

#include "compact.h"

namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = 65535;

template <typename Word>
__global__ void gather_rows(const Word* __restrict__ cache, Word* __restrict__ scratch,
                            const int64_t* __restrict__ src, const int64_t* __restrict__ dst,
                            int64_t n, int64_t row_words) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t from_slot = src[i];
    if (from_slot == dst[i]) continue;
    const Word* from = cache + from_slot * row_words;
    Word* to = scratch + i * row_words;
    for (int64_t w = threadIdx.x; w < row_words; w += blockDim.x) to[w] = from[w];
  }
}

template <typename Word>
__global__ void scatter_rows(Word* __restrict__ cache, const Word* __restrict__ scratch,
                             const int64_t* __restrict__ src, const int64_t* __restrict__ dst,
                             int64_t n, int64_t row_words) {
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t to_slot = dst[i];
    if (src[i] == to_slot) continue;
    const Word* from = scratch + i * row_words;
    Word* to = cache + to_slot * row_words;
    for (int64_t w = threadIdx.x; w < row_words; w += blockDim.x) to[w] = from[w];
  }
}

template <typename Word>
int launch_words(void* cache, void* scratch, const int64_t* src, const int64_t* dst, int64_t n,
                 int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_words = row_bytes / static_cast<int64_t>(sizeof(Word));
  const unsigned blocks = static_cast<unsigned>(n < kMaxBlocks ? n : kMaxBlocks);
  gather_rows<Word><<<blocks, kThreads, 0, stream>>>(static_cast<const Word*>(cache),
                                                     static_cast<Word*>(scratch), src, dst, n,
                                                     row_words);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  scatter_rows<Word><<<blocks, kThreads, 0, stream>>>(static_cast<Word*>(cache),
                                                      static_cast<const Word*>(scratch), src,
                                                      dst, n, row_words);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch(void* cache, void* scratch, const int64_t* src, const int64_t* dst, int64_t n,
           int64_t row_elems, cudaStream_t stream) {
  const int64_t row_bytes = row_elems * static_cast<int64_t>(sizeof(T));
  const uintptr_t align = reinterpret_cast<uintptr_t>(cache) | reinterpret_cast<uintptr_t>(scratch);
  auto fits = [&](int64_t word) {
    return row_bytes % word == 0 && align % static_cast<uintptr_t>(word) == 0;
  };
  if (fits(16)) return launch_words<uint4>(cache, scratch, src, dst, n, row_bytes, stream);
  if (fits(8)) return launch_words<uint2>(cache, scratch, src, dst, n, row_bytes, stream);
  if (fits(4)) return launch_words<uint32_t>(cache, scratch, src, dst, n, row_bytes, stream);
  if (fits(2)) return launch_words<uint16_t>(cache, scratch, src, dst, n, row_bytes, stream);
  return static_cast<int>(cudaErrorMisalignedAddress);
}

}  // namespace

extern "C" int kvslimmer_compact_slots(void* cache, void* scratch, const int64_t* src,
                                       const int64_t* dst, int64_t n, int64_t row_elems,
                                       int dtype, cudaStream_t stream) {
  if (n < 0 || row_elems < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0 || row_elems == 0) return static_cast<int>(cudaSuccess);
  if (!cache || !scratch || !src || !dst) return static_cast<int>(cudaErrorInvalidValue);
  switch (dtype) {
    case KVSLIMMER_FLOAT32:
      return launch<float>(cache, scratch, src, dst, n, row_elems, stream);
    case KVSLIMMER_FLOAT16:
      return launch<__half>(cache, scratch, src, dst, n, row_elems, stream);
    case KVSLIMMER_BFLOAT16:
      return launch<__nv_bfloat16>(cache, scratch, src, dst, n, row_elems, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}
