"""Engine-free math of KVSlimmer on plain tensors (imports only torch).

One request and one layer at a time, slot-major: keys/values ``[N, Hkv, D]``, counts ``[N]``,
positions ``[N]`` int64, hess and mass ``[N, Hkv]``. This is the reference contract that the
engine adapter and any GPU/C++ kernel are tested against.
"""

from .attention import merged_attention
from .merge import MergeResult, evict_lowest, evict_oldest, merge_pairs, merge_round, merge_weights
from .paged import paged_attention, slot_ids
from .rope import (
    RotarySpec,
    apply_rotary,
    build_cos_sin_cache,
    default_inv_freq,
    invert_rotary,
    linear_scaled_inv_freq,
    rope_cos_sin,
)
from .select import pair_scores, select_pairs, select_pairs_rows
from .stats import (
    cross_hessian, hessian_stats, normalize_mass, recover_d, smooth_hessian, value_spread,
)

__all__ = [
    "MergeResult",
    "RotarySpec",
    "apply_rotary",
    "build_cos_sin_cache",
    "cross_hessian",
    "default_inv_freq",
    "evict_lowest",
    "evict_oldest",
    "hessian_stats",
    "value_spread",
    "invert_rotary",
    "linear_scaled_inv_freq",
    "merge_pairs",
    "merge_round",
    "merge_weights",
    "merged_attention",
    "normalize_mass",
    "paged_attention",
    "pair_scores",
    "recover_d",
    "rope_cos_sin",
    "select_pairs",
    "select_pairs_rows",
    "slot_ids",
    "smooth_hessian",
]
