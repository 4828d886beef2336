// torch.ops.kvslimmer.value_spread: the value spread of a merge round's Hessian statistics,
// the same contract as kvslimmer_vllm.core.stats.value_spread:
//
//     o[l, h, :] = sum_m alpha[l, m, h] * values[l, m, h, :]
//     d[l, m, h] = sum_e |values[l, m, h, e] - o[l, h, e]|
//
// The reference materialises values - o and its absolute value ([L, M, H, D] twice); here
// each (layer, head) is one task that reads its rows twice (once for o, once for d) and
// writes only d. Rows may be strided (a view of the gathered [L, M, H, 2D] keys/values); the
// head dimension must be contiguous. float32 and float64, computed in the input's dtype
// (value_spread_task.inc), in the AVX-512 / AVX2 / portable copy cpu_isa() names.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "isa.h"
#include "spread.h"

#include "../ops.h"

namespace kvslimmer {
namespace {

namespace portable_isa {
#include "value_spread_task.inc"
}  // namespace portable_isa

#if KVS_X86_DISPATCH
KVS_BEGIN_AVX2
namespace avx2_isa {
#include "value_spread_task.inc"
}  // namespace avx2_isa
KVS_END_TARGET

KVS_BEGIN_AVX512
namespace avx512_isa {
#include "value_spread_task.inc"
}  // namespace avx512_isa
KVS_END_TARGET
#endif  // KVS_X86_DISPATCH

// The copy of spread_task for the instruction set the CPU attention runs (cpu_isa()).
template <typename T>
auto spread_task_for_cpu() {
#if KVS_X86_DISPATCH
  const std::string isa = cpu_isa(std::nullopt);
  if (isa == "avx512") return &avx512_isa::spread_task<T>;
  if (isa == "avx2") return &avx2_isa::spread_task<T>;
#endif
  return &portable_isa::spread_task<T>;
}

}  // namespace

template <typename T>
void spread_rows(const T* const* values, const T* alpha, T* out, int64_t rows, int64_t dim,
                 int64_t a_row_stride, int64_t o_row_stride, double* mean, T* block, T* o) {
  spread_task_for_cpu<T>()(values, alpha, out, rows, dim, a_row_stride, o_row_stride, mean,
                           block, o);
}
template void spread_rows<float>(const float* const*, const float*, float*, int64_t, int64_t,
                                 int64_t, int64_t, double*, float*, float*);
template void spread_rows<double>(const double* const*, const double*, double*, int64_t,
                                  int64_t, int64_t, int64_t, double*, double*, double*);

at::Tensor value_spread(const at::Tensor& values, const at::Tensor& alpha) {
  TORCH_CHECK_VALUE(values.dim() == 4 && alpha.dim() == 3,
                    "value_spread takes values [L, M, H, D] and alpha [L, M, H]; got ",
                    values.sizes(), " and ", alpha.sizes());
  TORCH_CHECK_VALUE(values.size(0) == alpha.size(0) && values.size(1) == alpha.size(1) &&
                        values.size(2) == alpha.size(2),
                    "values ", values.sizes(), " and alpha ", alpha.sizes(),
                    " disagree on [L, M, H]");
  TORCH_CHECK_VALUE(values.scalar_type() == alpha.scalar_type() &&
                        (values.scalar_type() == at::kFloat ||
                         values.scalar_type() == at::kDouble),
                    "value_spread takes float32 or float64 values and alpha of the same "
                    "dtype; got ", values.scalar_type(), " and ", alpha.scalar_type());
  TORCH_CHECK_VALUE(values.device().is_cpu() && alpha.device().is_cpu(),
                    "value_spread runs on CPU tensors");
  const at::Tensor v = values.stride(3) == 1 ? values : values.contiguous();
  const at::Tensor a = alpha.contiguous();
  const int64_t layers = v.size(0), rows = v.size(1), heads = v.size(2), dim = v.size(3);
  at::Tensor out = at::empty({layers, rows, heads}, a.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "value_spread", [&] {
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
    at::parallel_for(0, layers * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> mean(dim);
      std::vector<scalar_t> block(dim), o(dim);
      std::vector<const scalar_t*> row(rows);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t l = task / heads, h = task % heads;
        for (int64_t m = 0; m < rows; ++m) row[m] = vp + l * vs0 + m * vs1 + h * vs2;
        spread_rows<scalar_t>(row.data(), ap + l * rows * heads + h, op + l * rows * heads + h,
                              rows, dim, heads, heads, mean.data(), block.data(), o.data());
      }
    });
  });
  return out;
}

}  // namespace kvslimmer
