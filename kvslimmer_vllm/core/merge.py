"""One merge round for one request and one layer (spec section 4), and two ablations.

Slot-major layout over the request's ``N`` physical slots, ``Hkv`` KV heads, head dim ``D``:
keys/values ``[N, Hkv, D]``, counts ``[N]``, positions ``[N]`` int64, hess ``[N, Hkv]`` (NaN = no
smoothed Hessian yet), mass ``[N, Hkv]`` (observation mass since the last round). Slots
``[0, sink)`` and ``[N - recent, N)`` are never touched; the mergeable region is
``M = [sink, N - recent)``.

A round merges ``k`` non-overlapping adjacent pairs ``(i, i + 1)`` of ``M`` (the same pairs for
every KV head) and compacts the cache: the merged slot takes the left slot's place, everything after
it shifts left, and the result has ``N - k`` slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .rope import RotarySpec
from .select import pair_scores, select_pairs
from .stats import cross_hessian, hessian_stats, normalize_mass, recover_d, smooth_hessian

__all__ = ["MergeResult", "evict_lowest", "evict_oldest", "merge_round", "merge_weights"]


@dataclass
class MergeResult:
    """The compacted state of one request and layer after a round (``N - k`` slots).

    Attributes:
        keys: ``[N - k, Hkv, D]`` post-RoPE keys, input dtype.
        values: ``[N - k, Hkv, D]`` values (means), input dtype.
        counts: ``[N - k]`` token counts, input dtype; their sum is preserved by merging.
        positions: ``[N - k]`` int64 logical positions, non-decreasing if the input was.
        hess: ``[N - k, Hkv]`` smoothed Hessian proxy to carry into the next round, input dtype.
        pairs: ``[k]`` int64, sorted indices into the input's ``N`` slots: the left slots of the
            merged pairs, or the dropped slots for :func:`evict_lowest`.
        first_changed: smallest output index whose key, value, count or position may differ from
            the input's (``N - k`` when ``k == 0``); slots before it need no rewrite. ``hess``
            changes over the whole mergeable region regardless.
        key_fallback: ``[k, Hkv]`` bool, pairs and heads whose Hessian key weights were rejected
            by the guard of :func:`merge_weights`; ``None`` when no Hessian weights were used.
    """

    keys: torch.Tensor
    values: torch.Tensor
    counts: torch.Tensor
    positions: torch.Tensor
    hess: torch.Tensor
    pairs: torch.Tensor
    first_changed: int
    key_fallback: torch.Tensor | None = None


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
        h_i, h_j: ``[P, Hkv]`` diagonal Hessian proxies of the left and right slots.
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
    count_a = (c_i / (c_i + c_j))[:, None].expand_as(a)
    a = torch.where(ok, a, count_a)
    return a, 1 - a, ~ok


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
) -> slice:
    """Validate one round's inputs; return the mergeable region ``[sink, N - recent)``.

    The region must hold ``slots_per_freed * k`` slots (2 for merging pairs, 1 for eviction).
    """
    if keys.dim() != 3 or values.shape != keys.shape:
        raise ValueError(
            "keys and values must both be [N, Hkv, D], "
            f"got {tuple(keys.shape)} and {tuple(values.shape)}"
        )
    n, num_heads, _ = keys.shape
    for name, tensor, shape in (
        ("counts", counts, (n,)),
        ("positions", positions, (n,)),
        ("hess", hess, (n, num_heads)),
        ("mass", mass, (n, num_heads)),
    ):
        if tensor.shape != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
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
            same contract and the same result may be passed).
        score_reduce: applied to the pair scores before selection. Under tensor parallelism
            each rank holds some KV heads; scores are sums over heads, so summing every
            rank's scores (an all-reduce) gives all ranks the single-rank pairs, and each
            rank then merges its own heads exactly as one rank holding all heads would.

    Returns:
        :class:`MergeResult` with ``N - k`` slots in the input dtypes. Computation is float32
        (float64 for float64 keys).

    Raises:
        ValueError: on inconsistent shapes, negative arguments, ``2k > N - sink - recent``, an
            unknown ``key_weights`` or ``round_idx < 1``.
    """
    if key_weights not in ("hessian", "count"):
        raise ValueError(f"key_weights must be 'hessian' or 'count', got {key_weights!r}")
    region = _mergeable_region(keys, values, counts, positions, hess, mass, sink, recent, k, 2)
    dtype = torch.promote_types(keys.dtype, torch.float32)

    alpha = normalize_mass(mass[region].to(dtype))
    h_new, _ = hessian_stats(alpha, values[region])
    h = smooth_hessian(h_new, hess[region], round_idx)
    scores = pair_scores(mass[region], gamma)
    if score_reduce is not None:
        scores = score_reduce(scores)
    local = selector(scores, k).to(keys.device)
    left, right = sink + local, sink + local + 1

    c_i, c_j = counts[left].to(dtype), counts[right].to(dtype)
    h_i, h_j = h[local], h[local + 1]
    if key_weights == "hessian":
        h_ij = cross_hessian(alpha, recover_d(h, alpha, eps))[local]
        a, b, key_fallback = merge_weights(h_i, h_j, h_ij, c_i, c_j, eps)
    else:
        a = (c_i / (c_i + c_j))[:, None].expand_as(h_i)
        b, key_fallback = 1 - a, None

    k_i, k_j = keys[left].to(dtype), keys[right].to(dtype)
    if rotary is not None:
        k_i, k_j = rotary.unrotate(k_i, positions[left]), rotary.unrotate(k_j, positions[right])
    merged_keys = a[..., None] * k_i + b[..., None] * k_j
    if rotary is not None:
        merged_keys = rotary.rotate(merged_keys, positions[right])
    merged_values = (
        c_i[:, None, None] * values[left].to(dtype) + c_j[:, None, None] * values[right].to(dtype)
    ) / (c_i + c_j)[:, None, None]

    new_hess = hess.clone()
    new_hess[region] = h.to(hess.dtype)
    new_hess[left] = (a * a * h_i + b * b * h_j).to(hess.dtype)
    new_counts = counts.clone()
    new_counts[left] = (c_i + c_j).to(counts.dtype)
    new_positions = positions.clone()
    new_positions[left] = positions[right]

    keep = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
    keep[right] = False
    slots = left - torch.arange(k, device=keys.device)  # merged slots' indices after compaction
    out_keys, out_values = keys[keep], values[keep]
    out_keys[slots] = merged_keys.to(keys.dtype)
    out_values[slots] = merged_values.to(values.dtype)
    return MergeResult(
        keys=out_keys,
        values=out_values,
        counts=new_counts[keep],
        positions=new_positions[keep],
        hess=new_hess[keep],
        pairs=left,
        first_changed=int(left[0]) if k else keys.shape[0],
        key_fallback=key_fallback,
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
) -> MergeResult:
    """Baseline (H2O/SnapKV style): drop the ``k`` slots of ``[sink, N - recent)`` with the
    lowest observation mass, summed over KV heads.

    Requires ``k <= N - sink - recent``. Ties drop the lower index first. Surviving slots keep
    everything, including ``hess``; ``pairs`` holds the dropped slots' input indices; counts of
    dropped slots are lost. Arguments as in :func:`merge_round` (``score_reduce`` sums the
    per-slot scores of all tensor-parallel ranks).
    """
    region = _mergeable_region(keys, values, counts, positions, hess, mass, sink, recent, k, 1)
    score = mass[region].to(torch.float64).sum(dim=1)
    if score_reduce is not None:
        score = score_reduce(score)
    order = torch.sort(score, stable=True).indices[:k]
    return _drop(keys, values, counts, positions, hess, sink + order.sort().values.to(keys.device))


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
    """Baseline (StreamingLLM): drop the ``k`` oldest slots after the sink, ``[sink, sink + k)``,
    so a request keeps its sink slots and its most recent ones. ``mass`` is not used.

    Requires ``k <= N - sink - recent``. Arguments and result as in :func:`evict_lowest`.
    """
    _mergeable_region(keys, values, counts, positions, hess, mass, sink, recent, k, 1)
    return _drop(keys, values, counts, positions, hess,
                 torch.arange(sink, sink + k, device=keys.device))


def _drop(keys, values, counts, positions, hess, dropped: torch.Tensor) -> MergeResult:
    """The slots not in ``dropped`` (sorted input indices), unchanged."""
    keep = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
    keep[dropped] = False
    return MergeResult(
        keys=keys[keep],
        values=values[keep],
        counts=counts[keep],
        positions=positions[keep],
        hess=hess[keep],
        pairs=dropped,
        first_changed=int(dropped[0]) if dropped.numel() else keys.shape[0],
    )
