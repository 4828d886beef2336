// Launcher of the CUDA slot-compaction kernel (csrc/cuda/compact.cu). Plain C ABI, no torch.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of the cache rows.
enum KvslimmerDtype { KVSLIMMER_FLOAT32 = 0, KVSLIMMER_FLOAT16 = 1, KVSLIMMER_BFLOAT16 = 2 };

// Moves one request's surviving slots to the front of the request, in a slot-major paged cache
// `cache` of rows of `row_elems` elements (a row is one slot: Hkv * 2D key/value elements).
// Row src[i] goes to row dst[i], i < n. `src` and `dst` are device arrays of flat slot ids;
// dst lists the first n slots of the request and src the survivors, both in the request's logical
// order, so dst[i] is at or before src[i]. `scratch` is device memory for n rows. Work is queued
// on `stream`; returns cudaSuccess or the first launch error (cudaErrorInvalidValue for bad
// arguments).
int kvslimmer_compact_slots(void* cache, void* scratch, const int64_t* src, const int64_t* dst,
                            int64_t n, int64_t row_elems, int dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
