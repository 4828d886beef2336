// The value-spread task of one (layer, head) shared by the CPU round ops (value_spread.cpp,
// paged_round.cpp), in the copy for the instruction set cpu_isa() names: writes
// out[m * o_row_stride] = ||values[m] - o||_1 with o = sum_m alpha[m * a_row_stride] values[m],
// over `rows` rows of `dim` elements (values[m]: row m's head). The caller passes the scratch
// (mean in double, block and o in T, each dim long).
#pragma once

#include <cstdint>

namespace kvslimmer {

template <typename T>
void spread_rows(const T* const* values, const T* alpha, T* out, int64_t rows, int64_t dim,
                 int64_t a_row_stride, int64_t o_row_stride, double* mean, T* block, T* o);

}  // namespace kvslimmer
