"""One merge round for one request and one layer (spec section 4), and two ablations.

Slot-major layout over the request's ``N`` physical slots, ``Hkv`` KV heads, head dim ``D``:
keys/values ``[N, Hkv, D]``, counts ``[N]``, positions ``[N]`` int64, hess ``[N, Hkv]`` (NaN = no
smoothed Hessian yet), mass ``[N, Hkv]`` (observation mass since the last round). Slots
``[0, sink)`` and ``[N - recent, N)`` are never touched; the mergeable region is
``M = [sink, N - recent)``.

A round merges ``k`` non-overlapping adjacent pairs ``(i, i + 1)`` of ``M`` (the same pairs for
every KV head) and compacts the cache: the merged slot takes the left slot's place, everything after
it shifts left, and the result has ``N - k`` slots.

Every function here also takes a leading layer dimension (keys ``[L, N, Hkv, D]``, counts
``[L, N]``, ...): the ``L`` layers of one request, each with its own statistics and its own
choice of pairs, ``k`` slots freed in each. The result equals running the layers one by one
(tested), in a fixed number of tensor operations instead of ``L`` times as many.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from .rope import RotarySpec
from .select import pair_scores, pool_mass, select_pairs
from .stats import (
    cross_hessian, hessian_stats, normalize_mass, recover_d, smooth_hessian, value_spread,
)

__all__ = [
    "ChosenPairs", "DEFAULT_EPS", "DEFAULT_GAMMA", "MergeResult", "drop_slots", "evict_lowest",
    "evict_oldest", "keep_set", "lowest_mass_slots", "merge_chosen", "merge_pairs", "merge_round",
    "merge_rounds", "merge_weights", "oldest_slots", "slot_scores",
]

#: Positional decay of the pair score, ``exp(t / gamma)`` (reference: 4096 / ln 512).
DEFAULT_GAMMA = 4096.0 / math.log(512.0)
#: Guard of the closed-form key weights and of ``d`` recovery (reference: 1e-21).
DEFAULT_EPS = 1e-21


@dataclass
class MergeResult:
    """The compacted state of one request and layer after a round (``N - k`` slots).

    Keys and values are described, not copied: output slot ``j`` holds the input's slot
    ``source[j]``, except the merged slots ``merged_slots``, which hold ``merged_keys`` and
    ``merged_values``. :attr:`keys` and :attr:`values` assemble them on first use; the engine
    instead moves rows inside its paged cache (only ``[first_changed, N - k)`` moves).

    Attributes:
        counts: ``[N - k]`` token counts, input dtype; their sum is preserved by merging.
        positions: ``[N - k]`` int64 logical positions, non-decreasing if the input was.
        hess: ``[N - k, Hkv]`` smoothed Hessian proxy to carry into the next round, input dtype.
        pairs: ``[k]`` int64, sorted indices into the input's ``N`` slots: the left slots of the
            merged pairs, or the dropped slots for :func:`evict_lowest`.
        first_changed: smallest output index whose key, value, count or position may differ from
            the input's (``N - k`` when ``k == 0``); slots before it need no rewrite. ``hess``
            changes over the whole mergeable region regardless. With a layer dimension: the
            smallest over the layers.
        source: ``[N - k]`` int64, the input slot each output slot's key and value come from.
        input_keys, input_values: the round's ``[N, Hkv, D]`` inputs (not copies); None
            when the round read no key or value (an eviction compacted where the slots live).
        merged_slots: ``[k]`` int64 output indices of the merged slots (``[0]`` when slots
            were dropped), with their ``[k, Hkv, D]`` ``merged_keys`` (post-RoPE) and
            ``merged_values``, input dtype.
        key_fallback: ``[k, Hkv]`` bool, pairs and heads whose Hessian key weights were rejected
            by the guard of :func:`merge_weights`; ``None`` when no Hessian weights were used.

    With a layer dimension every tensor has a leading ``L`` (``pairs`` is ``[L, k]``).
    """

    counts: torch.Tensor
    positions: torch.Tensor
    hess: torch.Tensor
    pairs: torch.Tensor
    first_changed: int
    source: torch.Tensor
    input_keys: torch.Tensor | None
    input_values: torch.Tensor | None
    merged_slots: torch.Tensor
    merged_keys: torch.Tensor
    merged_values: torch.Tensor
    key_fallback: torch.Tensor | None = None

    @functools.cached_property
    def keys(self) -> torch.Tensor:
        """``[N - k, Hkv, D]`` post-RoPE keys after the round, input dtype."""
        return self._assemble(self.input_keys, self.merged_keys)

    @functools.cached_property
    def values(self) -> torch.Tensor:
        """``[N - k, Hkv, D]`` values (means) after the round, input dtype."""
        return self._assemble(self.input_values, self.merged_values)

    def _assemble(self, inputs: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
        if self.source.dim() == 1:
            out = inputs[self.source]
            out[self.merged_slots] = merged
            return out
        out = _take(inputs, self.source)
        out[torch.arange(out.shape[0], device=out.device)[:, None], self.merged_slots] = merged
        return out


def merge_weights(
    h_i: torch.Tensor,
    h_j: torch.Tensor,
    h_ij: torch.Tensor,
    c_i: torch.Tensor,
    c_j: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form key weights ``(a, b)`` of KVSlimmer, ``k_e = a k_i + b k_j``.

    ``A = h_i - h_ij``, ``B = h_j - h_ij``, ``a = A / (A + B)``, ``b = 1 - a``. When ``A, B > 0``,
    ``k_e`` minimises ``h_i |k - k_i|^2 + h_j |k - k_j|^2 - 2 h_ij (k - k_i).(k - k_j)``.

    Guard (a deliberate deviation from the reference code, which has none and can extrapolate far
    outside the pair): where ``A + B <= eps``, ``a`` is outside ``[0, 1]``, or anything is not
    finite, fall back to the count-weighted mean ``a = c_i / (c_i + c_j)``.

    Args:
        h_i, h_j: ``[P, Hkv]`` diagonal Hessian proxies of the left and right slots (any
            leading dimensions, shared by all arguments).
        h_ij: ``[P, Hkv]`` cross-term magnitude of the pair.
        c_i, c_j: ``[P]`` token counts of the left and right slots.
        eps: threshold on ``A + B``.

    Returns:
        ``(a, b, fallback)``: ``[P, Hkv]`` float weights with ``a + b = 1`` (float32, or float64 for
        float64 input) and the ``[P, Hkv]`` bool mask of guarded entries.
    """
    dtype = torch.promote_types(h_i.dtype, torch.float32)
    h_i, h_j, h_ij = h_i.to(dtype), h_j.to(dtype), h_ij.to(dtype)
    big_a = h_i - h_ij
    total = big_a + (h_j - h_ij)
    a = big_a / total
    ok = (total > eps) & (a >= 0) & (a <= 1)
    c_i, c_j = c_i.to(dtype), c_j.to(dtype)
    count_a = (c_i / (c_i + c_j))[..., None].expand_as(a)
    a = torch.where(ok, a, count_a)
    return a, 1 - a, ~ok


def merge_pairs(
    keys: torch.Tensor,
    values: torch.Tensor,
    left: torch.Tensor,
    a: torch.Tensor,
    c_i: torch.Tensor,
    c_j: torch.Tensor,
    rotary: RotarySpec | None = None,
    delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged slots of the adjacent pairs ``(i, j = i + 1)``, ``i`` in ``left``, of
    every layer (step 4 of :func:`merge_round`).

    Key ``a Rot(p_j - p_i) k_i + (1 - a) k_j`` (``Rot`` the layer's RoPE moving the left
    key to its right neighbour's position; keys merged as stored without ``rotary``),
    value ``(c_i v_i + c_j v_j) / (c_i + c_j)``.

    Args:
        keys, values: ``[L, N, Hkv, D]`` (keys post-RoPE); any strides.
        left: ``[L, k]`` int64 left slots, ``0 <= i < N - 1``.
        a: ``[L, k, Hkv]`` key weight of the left slot, in the computation dtype (float32,
            or float64 for float64 keys).
        c_i, c_j: ``[L, k]`` counts of the left and right slots, in ``a``'s dtype.
        rotary: the layers' RoPE, or None.
        delta: ``[L, k]`` int64 ``p_j - p_i`` (with ``rotary``).

    Returns:
        ``(merged_keys, merged_values)``, ``[L, k, Hkv, D]`` in the keys' and values'
        dtypes, computed in ``a``'s dtype. ``kvslimmer::merge_pairs`` (C++) computes the
        same in one pass over the pairs (:func:`kvslimmer_vllm.kernels.merge_pairs`).
    """
    dtype = a.dtype
    right = left + 1
    k_i, k_j = _take(keys, left).to(dtype), _take(keys, right).to(dtype)
    if rotary is not None:
        # Rot(p_j) (a Rot(p_i)^-1 k_i + b Rot(p_j)^-1 k_j) = a Rot(p_j - p_i) k_i + b k_j:
        # one rotation of the left keys ([L * k, Hkv, D] rows) instead of three
        k_i = rotary.shift(k_i.flatten(0, 1), delta.flatten()).view_as(k_j)
    merged_keys = a[..., None] * k_i + (1 - a)[..., None] * k_j
    w_i, w_j = c_i[..., None, None], c_j[..., None, None]
    merged_values = (
        w_i * _take(values, left).to(dtype) + w_j * _take(values, right).to(dtype)
    ) / (w_i + w_j)
    return merged_keys.to(keys.dtype), merged_values.to(values.dtype)


def _mergeable_region(
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    positions: torch.Tensor,
    hess: torch.Tensor,
    mass: torch.Tensor,
    sink: int,
    recent: int,
    k: int,
    slots_per_freed: int,
    single: bool,
) -> slice:
    """Validate one round's inputs (layer-batched: see :func:`_batched`); return the
    mergeable region ``[sink, N - recent)``.

    The region must hold ``slots_per_freed * k`` slots (2 for merging pairs, 1 for eviction).
    """
    if values.shape != keys.shape:
        raise ValueError(
            "keys and values must both be [N, Hkv, D] (or [L, N, Hkv, D]), "
            f"got {tuple(keys.shape[1:])} and {tuple(values.shape[1:])}"
        )
    layers, n, num_heads, _ = keys.shape  # after _batched
    for name, tensor, shape in (
        ("counts", counts, (n,)),
        ("positions", positions, (n,)),
        ("hess", hess, (n, num_heads)),
        ("mass", mass, (n, num_heads)),
    ):
        if tensor.shape != (layers, *shape):
            # name the shapes as the caller passed them (single-layer: without the L)
            expected, got = list(shape), list(tensor.shape[1:])
            if not single:
                expected, got = [layers, *expected], list(tensor.shape)
            raise ValueError(f"{name} must have shape {expected}, got {got}")
    return _region(n, sink, recent, k, slots_per_freed)


def _region(n: int, sink: int, recent: int, k: int, slots_per_freed: int) -> slice:
    """The mergeable region ``[sink, n - recent)`` of ``n`` slots, checked to hold
    ``slots_per_freed * k`` slots."""
    if sink < 0 or recent < 0 or k < 0:
        raise ValueError(
            f"sink, recent and k must be >= 0, got sink={sink}, recent={recent}, k={k}"
        )
    region = n - sink - recent
    if region < slots_per_freed * k:
        need = f"{slots_per_freed}k = {slots_per_freed * k}" if slots_per_freed > 1 else f"k = {k}"
        raise ValueError(
            f"mergeable region [sink, N - recent) = [{sink}, {n - recent}) has {region} slots, "
            f"fewer than {need} (sink={sink}, recent={recent}, k={k}, N={n})"
        )
    return slice(sink, n - recent)


def _batched(keys: torch.Tensor, *others: torch.Tensor) -> tuple[bool, list[torch.Tensor]]:
    """Give single-layer inputs (keys ``[N, Hkv, D]``) a layer dimension of 1.

    Returns whether the input was single-layer, and the tensors, all with a leading ``L``.
    """
    if keys.dim() not in (3, 4):
        raise ValueError(
            f"keys must be [N, Hkv, D] (or [L, N, Hkv, D]), got {tuple(keys.shape)}"
        )
    single = keys.dim() == 3
    tensors = (keys, *others)
    return single, [t.unsqueeze(0) for t in tensors] if single else list(tensors)


def _unbatched(result: MergeResult, single: bool) -> MergeResult:
    """Drop the layer dimension :func:`_batched` added."""
    if not single:
        return result
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if isinstance(value, torch.Tensor):
            setattr(result, field.name, value.squeeze(0))
    return result


def _kept(num_layers: int, n: int, removed: torch.Tensor) -> torch.Tensor:
    """``[L, N - k]`` sorted input indices that survive when each layer ``l`` loses the
    ``k`` distinct slots ``removed[l]``."""
    keep = torch.ones(num_layers, n, dtype=torch.bool, device=removed.device)
    keep[torch.arange(num_layers, device=removed.device)[:, None], removed] = False
    return keep.nonzero()[:, 1].view(num_layers, n - removed.shape[1])


def _take(tensor: torch.Tensor, index: torch.Tensor,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor[l, index[l]]`` for every layer ``l`` (``tensor`` ``[L, N, ...]``,
    ``index`` ``[L, P]``): one ``index_select`` over the flattened ``L * N`` rows, into
    ``out`` (a contiguous buffer of at least that many elements, not overlapping
    ``tensor``) when given."""
    num_layers, n = tensor.shape[:2]
    offsets = torch.arange(0, num_layers * n, n, device=index.device)[:, None]
    flat_index = (index + offsets).flatten()
    shape = (*index.shape, *tensor.shape[2:])
    if out is None:
        return tensor.flatten(0, 1).index_select(0, flat_index).view(shape)
    rows = out[:math.prod(shape)].view(flat_index.numel(), *tensor.shape[2:])
    torch.index_select(tensor.flatten(0, 1), 0, flat_index, out=rows)
    return rows.view(shape)


def merge_round(
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    positions: torch.Tensor,
    hess: torch.Tensor,
    mass: torch.Tensor,
    *,
    sink: int,
    recent: int,
    k: int,
    round_idx: int,
    gamma: float,
    eps: float,
    rotary: RotarySpec | None,
    key_weights: Literal["hessian", "count"] = "hessian",
    selector: Callable[[torch.Tensor, int], torch.Tensor] = select_pairs,
    score_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    pool: int = 1,
    protect: torch.Tensor | None = None,
    spread: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = value_spread,
    pair_merge: Callable[..., tuple[torch.Tensor, torch.Tensor]] = merge_pairs,
) -> MergeResult:
    """Run one KVSlimmer merge round over the ``N`` slots of one request and one layer.

    Over the mergeable region ``M = [sink, N - recent)``:

    1. ``alpha`` = mass normalised per head; ``h_new`` from alpha and the values
       (:func:`~.stats.hessian_stats`); ``h`` = ``h_new`` smoothed with ``hess`` for ``round_idx``.
    2. ``d`` recovered from the smoothed ``h`` (:func:`~.stats.recover_d`) for the cross term
       ``h_ij = alpha_i alpha_j (d_i + d_j)``.
    3. Exactly ``k`` non-overlapping pairs with the smallest total :func:`~.select.pair_scores`.
    4. Each pair ``(i, j = i + 1)`` becomes one slot: key ``a k_i + b k_j`` in the un-rotated frame
       (each key un-rotated at its own position, the result rotated to ``p_j``; post-RoPE keys are
       merged directly when ``rotary`` is None), value ``(c_i v_i + c_j v_j) / (c_i + c_j)``, count
       ``c_i + c_j``, hess ``a^2 h_i + b^2 h_j``, position ``p_j``.

    Unmerged slots of ``M`` take their smoothed ``h``; sink and recent slots are returned unchanged
    (including ``hess``). The caller resets the observation mass.

    Args:
        keys, values: ``[N, Hkv, D]`` float (keys post-RoPE).
        counts: ``[N]`` float token counts.
        positions: ``[N]`` int64 logical positions (of each slot's latest token).
        hess: ``[N, Hkv]`` float carried Hessian proxy; NaN = new since the last round.
        mass: ``[N, Hkv]`` float observation mass since the last round.
        sink: number of leading slots never merged.
        recent: number of trailing slots never merged.
        k: number of pairs to merge (slots to free); requires ``2k <= N - sink - recent``.
        round_idx: this request's merge round (1, 2, ...), for smoothing.
        gamma: position decay of the pair scores.
        eps: denominator guard of :func:`~.stats.recover_d` and threshold of :func:`merge_weights`.
        rotary: the layer's RoPE, or None to merge keys as stored.
        key_weights: ``"hessian"`` (KVSlimmer) or ``"count"`` (``a = c_i / (c_i + c_j)``, plain
            count-weighted averaging of the same pairs; an ablation).
        selector: implementation of :func:`~.select.select_pairs` (a faster kernel with the
            same contract and the same result may be passed); called once with the
            ``[L, M - 1]`` scores of all layers.
        score_reduce: applied to the pair scores before selection. Under tensor parallelism
            each rank holds some KV heads; scores are sums over heads, so summing every
            rank's scores (an all-reduce) gives all ranks the single-rank pairs, and each
            rank then merges its own heads exactly as one rank holding all heads would.
        pool: pair scores use the region's mass max-pooled over ``pool`` slots
            (:func:`~.select.pool_mass`; 1 = off). The Hessian statistics use the raw mass.
        spread: implementation of :func:`~.stats.value_spread` (a kernel with the same
            contract; ``[L, M, Hkv, D]`` values, ``[L, M, Hkv]`` alpha).
        pair_merge: implementation of :func:`merge_pairs` (step 4; a kernel with the same
            contract).
        protect: ``[N]`` bool, slots no pair may touch (their pairs score
            :data:`PROTECTED_SCORE`, so they are chosen only when nothing else is left;
            :func:`merge_rounds` never lets that happen).

    Returns:
        :class:`MergeResult` with ``N - k`` slots in the input dtypes. Computation is float32
        (float64 for float64 keys).

    Raises:
        ValueError: on inconsistent shapes, negative arguments, ``2k > N - sink - recent``, an
            unknown ``key_weights``, ``round_idx < 1`` or an even ``pool``.
    """
    if key_weights not in ("hessian", "count"):
        raise ValueError(f"key_weights must be 'hessian' or 'count', got {key_weights!r}")
    single, (keys, values, counts, positions, hess, mass) = _batched(
        keys, values, counts, positions, hess, mass
    )
    if protect is not None and single:
        protect = protect.unsqueeze(0)
    region = _mergeable_region(keys, values, counts, positions, hess, mass, sink, recent, k, 2,
                               single)
    dtype = torch.promote_types(keys.dtype, torch.float32)
    device = keys.device
    num_layers, n = keys.shape[:2]

    alpha = normalize_mass(mass[:, region].to(dtype))
    h_new, _ = hessian_stats(alpha, values[:, region], spread)
    h = smooth_hessian(h_new, hess[:, region], round_idx)
    scores = pair_scores(pool_mass(mass[:, region], pool), gamma)
    if score_reduce is not None:
        scores = score_reduce(scores)
    if protect is not None:
        guarded = protect[:, region].to(scores.device)
        scores = torch.where(guarded[:, :-1] | guarded[:, 1:], PROTECTED_SCORE, scores)
    # Selection runs on the host, one row per layer: one transfer for all layers.
    local = selector(scores.cpu(), k).to(device)
    layer = torch.arange(num_layers, device=device)[:, None]
    left, right = sink + local, sink + local + 1
    pairs = merge_chosen(keys, values, counts, positions, alpha, h, local, sink=sink,
                         eps=eps, key_weights=key_weights, rotary=rotary,
                         pair_merge=pair_merge)

    new_hess = hess.clone()
    new_hess[:, region] = h.to(hess.dtype)
    new_hess[layer, left] = pairs.hess.to(hess.dtype)
    new_counts = counts.clone()
    new_counts[layer, left] = pairs.counts.to(counts.dtype)
    new_positions = positions.clone()
    new_positions[layer, left] = pairs.positions

    source = _kept(num_layers, n, right)
    return _unbatched(MergeResult(
        counts=_take(new_counts, source),
        positions=_take(new_positions, source),
        hess=_take(new_hess, source),
        pairs=left,
        first_changed=int(left[:, 0].min()) if k else n,
        source=source,
        input_keys=keys,
        input_values=values,
        merged_slots=left - torch.arange(k, device=device),  # indices after compaction
        merged_keys=pairs.keys,
        merged_values=pairs.values,
        key_fallback=pairs.key_fallback,
    ), single)


class ChosenPairs(NamedTuple):
    """The merged slots of a round's chosen pairs (``[L, k, ...]``, see :func:`merge_chosen`)."""

    keys: torch.Tensor  # [L, k, Hkv, D] merged keys, in the keys' dtype
    values: torch.Tensor  # [L, k, Hkv, D] merged values
    counts: torch.Tensor  # [L, k] c_i + c_j (float32, or float64 for float64 keys)
    positions: torch.Tensor  # [L, k] the right slot's position
    hess: torch.Tensor  # [L, k, Hkv] a^2 h_i + b^2 h_j
    key_fallback: torch.Tensor | None  # [L, k, Hkv] guarded key weights (Hessian weights)


def merge_chosen(keys, values, counts, positions, alpha, h, local, *, sink: int, eps: float,
                 key_weights: str, rotary, pair_merge=merge_pairs) -> ChosenPairs:
    """Steps 2 and 4 of :func:`merge_round` for the chosen pairs: ``local`` (``[L, k]``
    region indices of the left slots; the region starts at ``sink``), the region's
    ``alpha`` and smoothed ``h`` (``[L, M, Hkv]``), the slots' ``keys`` ... ``positions``
    (``[L, N, ...]``): key weights (Hessian or count), merged keys and values
    (``pair_merge``, :func:`merge_pairs`' contract), counts, positions and Hessian proxies
    of the merged slots."""
    dtype = torch.promote_types(keys.dtype, torch.float32)
    left, right = sink + local, sink + local + 1
    c_i, c_j = _take(counts, left).to(dtype), _take(counts, right).to(dtype)
    h_i, h_j = _take(h, local), _take(h, local + 1)
    if key_weights == "hessian":
        h_ij = _take(cross_hessian(alpha, recover_d(h, alpha, eps)), local)
        a, b, key_fallback = merge_weights(h_i, h_j, h_ij, c_i, c_j, eps)
    else:
        a = (c_i / (c_i + c_j))[..., None].expand_as(h_i)
        b, key_fallback = 1 - a, None
    p_j = _take(positions, right)
    merged_keys, merged_values = pair_merge(keys, values, left, a, c_i, c_j, rotary,
                                            p_j - _take(positions, left))
    return ChosenPairs(merged_keys, merged_values, c_i + c_j, p_j, a * a * h_i + b * b * h_j,
                       key_fallback)


def subround_sizes(region: int, k: int, max_fraction: float) -> list[int]:
    """How a step that frees ``k`` slots of a ``region``-slot mergeable region by merging
    pairs splits into sub-rounds: each frees ``max(1, floor(max_fraction * m))`` slots of
    the ``m`` still mergeable, at most ``m // 2`` (the most one round of disjoint pairs
    can free) and at most what is left; ``[k]`` when one round suffices.

    Raises:
        ValueError: if ``k`` slots cannot be freed (``k >= region``, so the region would
            have to vanish) or ``max_fraction`` is outside ``(0, 0.5]``.
    """
    if not 0 < max_fraction <= 0.5:
        raise ValueError(f"max_fraction must be in (0, 0.5], got {max_fraction}")
    if k < 0 or (k > 0 and k >= region):
        raise ValueError(
            f"cannot free k={k} slots of a {region}-slot mergeable region by merging "
            "pairs (need 0 <= k < region)"
        )
    sizes, m = [], region
    while k > 0:
        step = min(k, max(1, int(max_fraction * m)), m // 2)
        sizes.append(step)
        k -= step
        m -= step
    return sizes or [0]


def merge_rounds(
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    positions: torch.Tensor,
    hess: torch.Tensor,
    mass: torch.Tensor,
    *,
    sink: int,
    recent: int,
    k: int,
    max_fraction: float = 0.5,
    protect: torch.Tensor | None = None,
    **round_kwargs,
) -> MergeResult:
    """Free ``k`` slots by merging pairs in successive sub-rounds of :func:`merge_round`.

    One pairwise round frees at most half of the mergeable region, and near that limit it
    has to pair (nearly) every slot whatever the scores say. This runs the sub-rounds of
    :func:`subround_sizes` instead, each over the slots the previous one left: a merged
    slot's observation mass is the sum of its two slots' (so it scores as the tokens it
    stands for), its count, value, key and Hessian are those :func:`merge_round` gives.
    Each sub-round re-measures the Hessian statistics on the current slots and smooths
    them with what the previous sub-round left, at the same ``round_idx``.

    With a single sub-round the result is exactly :func:`merge_round`'s. Otherwise it is
    composed relative to the input: ``source`` maps every unchanged output slot to its
    input slot (merged slots map to themselves, their content is ``merged_keys`` /
    ``merged_values``), ``merged_slots`` lists the merged slots of each layer, padded up to
    the layer with the most by unchanged slots (whose ``merged_keys`` / ``merged_values``
    then equal their input), ``pairs`` is empty and ``key_fallback`` None.

    Args:
        keys ... mass, sink, recent: as in :func:`merge_round`.
        k: slots to free; ``k < N - sink - recent``.
        max_fraction: largest share of the mergeable slots one sub-round frees, in
            ``(0, 0.5]``; 0.5 runs a single round whenever one can free ``k``.
        protect: ``[N]`` (``[L, N]``) bool, slots that are never merged (see
            :func:`merge_within`); a merged slot is unprotected. Each sub-round then frees
            at most as many slots as there are disjoint adjacent pairs of unprotected
            slots, so ``k`` must not exceed :func:`mergeable_without` of the mask.
        round_kwargs: the other keyword arguments of :func:`merge_round` (``round_idx``,
            ``gamma``, ``eps``, ``rotary``, ``key_weights``, ``selector``,
            ``score_reduce``, ``pool``, ``spread``, ``pair_merge``).

    Equal to running :func:`merge_round` on each sub-round's output in turn with the mass
    carried as above (tested).
    """
    single, (keys, values, counts, positions, hess, mass) = _batched(
        keys, values, counts, positions, hess, mass
    )
    num_layers, n = keys.shape[:2]
    if protect is not None:
        protect = protect.unsqueeze(0) if single else protect
        return _unbatched(_merge_protected(
            keys, values, counts, positions, hess, mass, protect, sink=sink, recent=recent,
            k=k, max_fraction=max_fraction, **round_kwargs), single)
    sizes = subround_sizes(n - sink - recent, k, max_fraction)
    run = functools.partial(merge_round, sink=sink, recent=recent, **round_kwargs)
    if len(sizes) == 1:
        return _unbatched(run(keys, values, counts, positions, hess, mass, k=k), single)
    return _unbatched(_compose(run, (keys, values, counts, positions, hess, mass), sizes, k),
                      single)


def _compose(run, state, sizes, k: int, protect: torch.Tensor | None = None) -> MergeResult:
    """Run ``run(*state, k=step)`` for each step (``sizes``: a list, or a callable of the
    current state and protect mask giving the next step, 0 to stop) and describe the
    result relative to the first input (see :func:`merge_rounds`)."""
    keys, values = state[0], state[1]
    num_layers, n, _, dim = keys.shape
    device = keys.device
    layer = torch.arange(num_layers, device=device)[:, None]
    origin = torch.arange(n, device=device).expand(num_layers, n)
    # Each sub-round's keys and values, as views of one [L, N, Hkv, 2D] tensor: a sub-round's
    # output is then one gather of whole rows (not two of strided halves). The outputs
    # alternate between two buffers allocated once: tens of MB allocated afresh for every
    # sub-round cost more in page faults than the copy itself.
    kv = _joined(keys, values)
    buffers: list[torch.Tensor] = []
    steps = iter(sizes) if not callable(sizes) else iter(lambda: sizes(state, protect), 0)
    for turn, step in enumerate(steps):
        if protect is None:
            result = run(*state, k=step)
        else:
            result = run(*state, k=step, protect=protect)
            protect = _take(protect, result.source)
        mass = carry_mass(state[-1], result)
        origin = origin.clone()
        origin[layer, result.pairs] = -1
        origin = _take(origin, result.source)
        if len(buffers) < 2:  # the first outputs are the largest: the slots only shrink
            buffers.append(kv.new_empty(result.source.numel() * kv[0, 0].numel()))
        kv = _take(kv, result.source, out=buffers[turn % 2])
        kv[layer, result.merged_slots] = _joined(result.merged_keys, result.merged_values)
        state = (kv[..., :dim], kv[..., dim:], result.counts, result.positions, result.hess,
                 mass)
    index = torch.arange(n - k, device=device).expand(num_layers, n - k)
    merged = origin < 0
    widest = int(merged.sum(dim=1).max())
    # Merged slots first (in order), then unchanged ones as padding.
    order = torch.sort((~merged).to(torch.int8), dim=1, stable=True).indices[:, :widest]
    unchanged = origin == index
    first = (~unchanged).to(torch.int8).argmax(dim=1)
    first_changed = int(torch.where(unchanged.all(dim=1), n - k, first).min())
    return MergeResult(
        counts=state[2],
        positions=state[3],
        hess=state[4],
        pairs=origin.new_empty(num_layers, 0),
        first_changed=first_changed,
        source=torch.where(merged, index, origin),
        input_keys=keys,
        input_values=values,
        merged_slots=order,
        merged_keys=_take(kv[..., :dim], order),
        merged_values=_take(kv[..., dim:], order),
    )


def _joined(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[..., 2D]``: keys then values along the last dimension; a view when ``values``
    already follows ``keys`` in one buffer (the engine's gathered slots, the merged slots
    of ``kvslimmer::merge_pairs``), else a copy."""
    dim = keys.shape[-1]
    if (keys.shape == values.shape and keys.stride() == values.stride()
            and keys.dtype == values.dtype and keys.stride(-1) == 1
            and keys.stride(-2) == 2 * dim
            and values.data_ptr() == keys.data_ptr() + dim * keys.element_size()
            and keys.untyped_storage().data_ptr() == values.untyped_storage().data_ptr()):
        return keys.as_strided((*keys.shape[:-1], 2 * dim), keys.stride())
    return torch.cat((keys, values.to(keys.dtype)), dim=-1)


def carry_mass(mass: torch.Tensor, result: MergeResult) -> torch.Tensor:
    """Observation mass after a pairwise round: a merged slot's is the sum of its pair's.

    ``mass`` ``[L, N, Hkv]`` before the round, ``result`` its (layer-batched)
    :func:`merge_round` result; returns ``[L, N - k, Hkv]``.
    """
    layer = torch.arange(mass.shape[0], device=mass.device)[:, None]
    summed = mass.clone()
    summed[layer, result.pairs] += mass[layer, result.pairs + 1]
    return _take(summed, result.source)


#: Pair score of a pair that touches a protected slot (finite: selection needs finite scores).
PROTECTED_SCORE = 1e200


def disjoint_free_pairs(protect: torch.Tensor) -> torch.Tensor:
    """``[L]`` most disjoint adjacent pairs of unprotected slots per layer (``protect``
    ``[L, M]`` over the mergeable region): the sum of ``floor(run / 2)`` over its runs of
    unprotected slots."""
    free = (~protect).to(torch.int64)
    # Length of the unprotected run ending at each slot.
    idx = torch.arange(free.shape[1], device=free.device).expand_as(free)
    last_break = torch.where(free == 0, idx, -1).cummax(dim=1).values
    run_len = (idx - last_break) * free
    ends = free.clone()
    ends[:, :-1] &= 1 - free[:, 1:]
    return (run_len * ends // 2).sum(dim=1)


def mergeable_without(protect: torch.Tensor) -> torch.Tensor:
    """``[L]`` most slots merging can free without touching a protected slot (``protect``
    ``[L, M]``): unprotected slots minus their runs (a run collapses to one slot)."""
    free = (~protect).to(torch.int64)
    starts = free.clone()
    starts[:, 1:] &= 1 - free[:, :-1]
    return free.sum(dim=1) - starts.sum(dim=1)


def keep_set(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The slots to keep exact when ``k`` slots are freed by merging only the others:
    ``[L, M]`` bool, True for the highest-scoring slots of each layer such that the rest
    (the lowest, as SnapKV would drop) can free ``k`` slots by collapsing its runs
    (:func:`mergeable_without`) -- the largest such keep set.

    Args:
        scores: ``[L, M]`` per-slot scores of the mergeable region (e.g. pooled mass
            summed over heads); ties keep the later slot.
        k: slots to free, ``0 <= k < M``.
    """
    num_layers, m = scores.shape
    if not 0 <= k < max(m, 1):
        raise ValueError(f"cannot free k={k} of {m} slots by merging runs")
    order = torch.sort(scores.to(torch.float64), dim=1, stable=True).indices
    keep = torch.ones(num_layers, m, dtype=torch.bool, device=scores.device)
    if k == 0:
        return keep
    rows = torch.arange(num_layers, device=scores.device)[:, None]
    # Smallest drop count d with (d - runs) >= k; d - runs never decreases with d.
    lo = torch.full((num_layers,), k, dtype=torch.int64)
    hi = torch.full((num_layers,), m, dtype=torch.int64)
    while bool((lo < hi).any()):
        mid = (lo + hi) // 2
        trial = torch.ones(num_layers, m, dtype=torch.bool, device=scores.device)
        ranks = torch.arange(m, device=scores.device).expand(num_layers, m)
        trial[rows, order] = ranks >= mid[:, None].to(scores.device)
        enough = mergeable_without(trial).cpu() >= k
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid + 1)
    ranks = torch.arange(m, device=scores.device).expand(num_layers, m)
    keep[rows, order] = ranks >= lo[:, None].to(scores.device)
    return keep


def check_protected(region: torch.Tensor, k: int, max_fraction: float) -> None:
    """Raise ValueError unless ``k`` slots can be freed from the mergeable region's
    ``[L, M]`` protect mask ``region`` in sub-rounds of at most ``max_fraction``."""
    if not 0 < max_fraction <= 0.5:
        raise ValueError(f"max_fraction must be in (0, 0.5], got {max_fraction}")
    if k > int(mergeable_without(region).min()):
        raise ValueError(f"cannot free k={k} slots without merging a protected slot")


def protected_step(region: torch.Tensor, remaining: int, max_fraction: float) -> int:
    """Slots the next sub-round frees with protected slots (``region``: the current
    ``[L, M]`` protect mask of the mergeable region): at most ``remaining``, at most
    ``max_fraction`` of the region (at least one), at most the disjoint pairs of free
    slots in every layer."""
    return min(remaining, max(1, int(max_fraction * region.shape[1])),
               int(disjoint_free_pairs(region).min()))


def _merge_protected(keys, values, counts, positions, hess, mass, protect, *, sink, recent,
                     k, max_fraction, **round_kwargs) -> MergeResult:
    """:func:`merge_rounds` with protected slots ([L, N] inputs). How much a sub-round can
    free depends on a layer's own protected slots, so layers run one at a time (each
    result equals the layer run alone) and their results are stacked."""
    num_layers, n = keys.shape[:2]
    if num_layers > 1:
        parts = [
            _merge_protected(*(t[i:i + 1] for t in (keys, values, counts, positions, hess,
                                                    mass, protect)),
                             sink=sink, recent=recent, k=k, max_fraction=max_fraction,
                             **round_kwargs)
            for i in range(num_layers)
        ]
        return _stack(parts, keys, values)
    check_protected(protect[:, sink:n - recent], k, max_fraction)
    left = [k]

    def next_step(state, mask) -> int:
        if left[0] <= 0:
            return 0
        size = state[0].shape[1]
        step = protected_step(mask[:, sink:size - recent], left[0], max_fraction)
        left[0] -= step
        return step

    run = functools.partial(merge_round, sink=sink, recent=recent, **round_kwargs)
    if k == 0:
        return run(keys, values, counts, positions, hess, mass, k=0)
    return _compose(run, (keys, values, counts, positions, hess, mass), next_step, k,
                    protect=protect)


def _stack(parts: list[MergeResult], keys: torch.Tensor, values: torch.Tensor) -> MergeResult:
    """One layer-batched description of single-layer results (``[1, ...]`` each) that
    freed the same number of slots; merged slots are padded per layer by unchanged slots,
    as :func:`merge_rounds` describes."""
    widest = max(p.merged_slots.shape[1] for p in parts)
    slots, merged_keys, merged_values = [], [], []
    for p in parts:
        pad = widest - p.merged_slots.shape[1]
        if pad:
            taken = torch.zeros(p.source.shape[1], dtype=torch.bool, device=p.source.device)
            taken[p.merged_slots[0]] = True
            extra = (~taken).nonzero().flatten()[:pad][None]
            index = torch.cat((p.merged_slots, extra), dim=1)
        else:
            index = p.merged_slots
        slots.append(index)
        merged_keys.append(_take(p.keys, index))
        merged_values.append(_take(p.values, index))
    return MergeResult(
        counts=torch.cat([p.counts for p in parts]),
        positions=torch.cat([p.positions for p in parts]),
        hess=torch.cat([p.hess for p in parts]),
        pairs=torch.cat([p.pairs[:, :0] for p in parts]),
        first_changed=min(p.first_changed for p in parts),
        source=torch.cat([p.source for p in parts]),
        input_keys=keys,
        input_values=values,
        merged_slots=torch.cat(slots),
        merged_keys=torch.cat(merged_keys),
        merged_values=torch.cat(merged_values),
    )


def evict_lowest(
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    positions: torch.Tensor,
    hess: torch.Tensor,
    mass: torch.Tensor,
    *,
    sink: int,
    recent: int,
    k: int,
    score_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    pool: int = 1,
) -> MergeResult:
    """Baseline (H2O/SnapKV style): drop the ``k`` slots of ``[sink, N - recent)`` with the
    lowest observation mass, summed over KV heads (after max-pooling it over ``pool``
    neighbouring slots, SnapKV's rule; 1 = off): :func:`lowest_mass_slots`.

    Requires ``k <= N - sink - recent``. Ties drop the lower index first. Surviving slots keep
    everything, including ``hess``; ``pairs`` holds the dropped slots' input indices; counts of
    dropped slots are lost. Arguments as in :func:`merge_round` (``score_reduce`` sums the
    per-slot scores of all tensor-parallel ranks).
    """
    single, (keys, values, counts, positions, hess, mass) = _batched(
        keys, values, counts, positions, hess, mass
    )
    _mergeable_region(keys, values, counts, positions, hess, mass, sink, recent, k, 1, single)
    dropped = lowest_mass_slots(mass, sink=sink, recent=recent, k=k,
                                score_reduce=score_reduce, pool=pool).to(keys.device)
    return _unbatched(drop_slots(counts, positions, hess, dropped, _no_rows(keys), keys,
                                 values), single)


def evict_oldest(
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    positions: torch.Tensor,
    hess: torch.Tensor,
    mass: torch.Tensor,
    *,
    sink: int,
    recent: int,
    k: int,
) -> MergeResult:
    """Baseline (StreamingLLM): drop the ``k`` oldest slots after the sink, ``[sink, sink + k)``
    (:func:`oldest_slots`), so a request keeps its sink slots and its most recent ones.
    ``mass`` is not used.

    Requires ``k <= N - sink - recent``. Arguments and result as in :func:`evict_lowest`.
    """
    single, (keys, values, counts, positions, hess, mass) = _batched(
        keys, values, counts, positions, hess, mass
    )
    _mergeable_region(keys, values, counts, positions, hess, mass, sink, recent, k, 1, single)
    dropped = oldest_slots(keys.shape[0], keys.shape[1], sink=sink, recent=recent, k=k,
                           device=keys.device)
    return _unbatched(drop_slots(counts, positions, hess, dropped, _no_rows(keys), keys,
                                 values), single)


def lowest_mass_slots(
    mass: torch.Tensor, *, sink: int, recent: int, k: int,
    score_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, pool: int = 1,
) -> torch.Tensor:
    """:func:`evict_lowest`'s choice: ``[L, k]`` sorted indices of the ``k`` slots of
    ``[sink, N - recent)`` with the least ``mass`` (``[L, N, Hkv]``), max-pooled over
    ``pool`` slots and summed over KV heads (then over ranks by ``score_reduce``); ties
    drop the lower index first. Reads nothing but the mass, so the engine chooses without
    gathering the slots' keys and values."""
    _region(mass.shape[1], sink, recent, k, 1)
    score = slot_scores(mass, sink=sink, recent=recent, pool=pool, score_reduce=score_reduce)
    order = torch.sort(score, dim=-1, stable=True).indices[:, :k]
    return sink + order.sort(dim=-1).values


def slot_scores(mass: torch.Tensor, *, sink: int, recent: int, pool: int = 1,
                score_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                ) -> torch.Tensor:
    """SnapKV's score of each slot of ``[sink, N - recent)``: ``mass`` (``[L, N, Hkv]``)
    max-pooled over ``pool`` slots, summed over KV heads, in float64 (then summed over
    tensor-parallel ranks by ``score_reduce``). ``[L, M]``."""
    n = mass.shape[1]
    score = pool_mass(mass[:, sink:n - recent].to(torch.float64), pool).sum(dim=-1)
    return score if score_reduce is None else score_reduce(score)


def oldest_slots(num_layers: int, n: int, *, sink: int, recent: int, k: int,
                 device=None) -> torch.Tensor:
    """:func:`evict_oldest`'s choice for ``num_layers`` layers of ``n`` slots: ``[L, k]``
    indices ``sink .. sink + k - 1``."""
    _region(n, sink, recent, k, 1)
    return torch.arange(sink, sink + k, device=device).expand(num_layers, k)


def drop_slots(counts: torch.Tensor, positions: torch.Tensor, hess: torch.Tensor,
               dropped: torch.Tensor, no_rows: torch.Tensor, keys: torch.Tensor | None = None,
               values: torch.Tensor | None = None) -> MergeResult:
    """The slots not in ``dropped`` (``[L, k]`` sorted input indices of each layer's ``N``
    slots; ``counts`` ``[L, N]``, ...), unchanged: a result with no merged rows
    (``no_rows``, ``[L, 0, Hkv, D]`` in the keys' dtype). ``keys`` / ``values`` are the
    round's inputs when it gathered them (None when the slots are compacted where they
    live, :func:`kvslimmer_vllm.core.paged.paged_drop`)."""
    num_layers, n = counts.shape[:2]
    source = _kept(num_layers, n, dropped)
    return MergeResult(
        counts=_take(counts, source),
        positions=_take(positions, source),
        hess=_take(hess, source),
        pairs=dropped,
        first_changed=int(dropped[:, 0].min()) if dropped.shape[1] else n,
        source=source,
        input_keys=keys,
        input_values=values,
        merged_slots=dropped.new_empty(num_layers, 0),
        merged_keys=no_rows,
        merged_values=no_rows,
    )


def _no_rows(keys: torch.Tensor) -> torch.Tensor:
    """``[L, 0, Hkv, D]``: the merged rows of a round that merged nothing."""
    return keys.new_empty(keys.shape[0], 0, *keys.shape[2:])
