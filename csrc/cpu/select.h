// The pair choice of one row, shared by select_pairs (select_pairs.cpp) and the protected
// round (paged_round.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace kvslimmer {

// Writes the k left indices, ascending, of the k non-overlapping adjacent pairs with the
// smallest total score among the row's value.size() pair scores to out (value is consumed).
// Requires 0 <= 2k <= value.size() + 1.
void select_row(std::vector<double>& value, int64_t k, int64_t* out);

}  // namespace kvslimmer
