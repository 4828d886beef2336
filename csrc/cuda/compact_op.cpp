// torch.ops.kvslimmer.compact_slots(kv, src, dst) on CUDA: the torch side of compact.cu.
// Compiled only into CUDA builds of the extension (setup.py defines KVSLIMMER_WITH_CUDA).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "../ops.h"
#include "compact.h"

namespace kvslimmer {

void compact_slots_cuda(const at::Tensor& kv, const at::Tensor& src, const at::Tensor& dst) {
  TORCH_CHECK(kv.is_cuda() && kv.dim() == 3 && kv.is_contiguous(),
              "compact_slots: kv must be a contiguous CUDA tensor [S, Hkv, 2*D]");
  TORCH_CHECK(src.dim() == 1 && dst.dim() == 1 && src.numel() == dst.numel(),
              "compact_slots: src and dst must be 1-D of equal length");
  int dtype;
  switch (kv.scalar_type()) {
    case at::kFloat: dtype = KVSLIMMER_FLOAT32; break;
    case at::kHalf: dtype = KVSLIMMER_FLOAT16; break;
    case at::kBFloat16: dtype = KVSLIMMER_BFLOAT16; break;
    default: TORCH_CHECK(false, "compact_slots: unsupported dtype ", kv.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(kv.device());
  const int64_t n = src.numel();
  if (n == 0) return;
  const at::Tensor src64 = src.to(kv.device(), at::kLong).contiguous();
  const at::Tensor dst64 = dst.to(kv.device(), at::kLong).contiguous();
  const int64_t row_elems = kv.size(1) * kv.size(2);
  const at::Tensor scratch = at::empty({n, row_elems}, kv.options());
  const int err = kvslimmer_compact_slots(kv.data_ptr(), scratch.data_ptr(),
                                          src64.data_ptr<int64_t>(), dst64.data_ptr<int64_t>(),
                                          n, row_elems, dtype,
                                          c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "compact_slots: CUDA error ", err, " (",
              cudaGetErrorString(static_cast<cudaError_t>(err)), ")");
}

}  // namespace kvslimmer
