"""Pair scoring and exact non-overlapping pair selection (spec section 3).

Pair ``i`` is the adjacent slot pair ``(i, i + 1)`` of the mergeable region. Two pairs overlap
exactly when their left indices are adjacent, so choosing ``k`` non-overlapping pairs of minimal
total score is choosing ``k`` pairwise non-adjacent elements of the score sequence with minimal sum.
"""

from __future__ import annotations

import heapq
import math

import torch

__all__ = ["pair_scores", "pool_mass", "select_pairs", "select_pairs_rows"]


def pool_mass(mass: torch.Tensor, width: int) -> torch.Tensor:
    """Max-pool observation mass over ``width`` neighbouring slots (SnapKV's clustering).

    A slot scores as the largest mass within ``width // 2`` slots on either side, per KV
    head, so the neighbours of a strongly attended token (the other digits of a number, the
    rest of a name) are kept or merged together with it. The window is cut at the ends of
    the given slots (no padding mass).

    Args:
        mass: ``[M, Hkv]`` (or ``[L, M, Hkv]``) observation mass of the scored slots.
        width: odd window width >= 1; 1 returns ``mass`` itself.

    Returns:
        Pooled mass, same shape and dtype.
    """
    if width < 1 or width % 2 == 0:
        raise ValueError(f"pool width must be an odd integer >= 1, got {width}")
    if width == 1 or mass.shape[-2] == 0:
        return mass
    rows = mass.movedim(-2, -1)  # [..., Hkv, M]
    flat = rows.reshape(-1, 1, rows.shape[-1])
    pooled = torch.nn.functional.max_pool1d(
        flat, kernel_size=width, stride=1, padding=width // 2
    )
    return pooled.view(rows.shape).movedim(-1, -2)


def pair_scores(mass: torch.Tensor, gamma: float) -> torch.Tensor:
    """Score every adjacent pair of the mergeable region; lower scores are merged first.

    Args:
        mass: ``[M, Hkv]`` un-normalised observation mass ``A`` of the region's slots (or
            ``[L, M, Hkv]``, scored per batch entry).
        gamma: position decay constant (KVSlimmer uses ``4096 / ln(512)``).

    Returns:
        ``[M - 1]`` (``[L, M - 1]``) float64 scores; entry ``i`` (pair ``(i, i + 1)``, ``t = i + 1``) is
        ``sum_h (A_{i,h} + A_{i+1,h}) / exp(t / gamma)``. The decay makes pairs later in the region
        cheaper. Computed in float64 (as ``* exp(-t / gamma)``) so long regions do not overflow.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    per_slot = mass.to(torch.float64).sum(dim=-1)
    t = torch.arange(1, mass.shape[-2], dtype=torch.float64, device=mass.device)
    return (per_slot[..., :-1] + per_slot[..., 1:]) * torch.exp(-t / gamma)


def select_pairs(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Choose exactly ``k`` non-overlapping adjacent pairs with the smallest total score.

    Exact greedy with regret ("undo") nodes on a doubly linked list, ``O(M log M)``: repeatedly
    take the cheapest live node ``x``; if it has live neighbours ``l`` and ``r``, replace the three
    by one node of value ``l + r - x``, whose later choice means "drop ``x``, take ``l`` and
    ``r``" instead. A node at either end of the list cannot be undone and is settled together with
    its only neighbour. Each node covers an odd-length run of original elements; an unchosen
    node's run has its inner alternate elements (second, fourth, ...) selected, a chosen one its
    outer alternate elements (first, third, ...). Equal values are taken lower node index first
    (a replacement node keeps the index of the node it undoes), so results are deterministic.

    Args:
        scores: ``[M - 1]`` pair scores (:func:`pair_scores`); score ``i`` belongs to pair
            ``(i, i + 1)``. Must be finite. ``[L, M - 1]``: one independent choice per row
            (layer).
        k: number of pairs, ``0 <= 2k <= M``.

    Returns:
        ``[k]`` (``[L, k]``) int64 left indices ``i``, sorted ascending, on ``scores``'
        device.

    Raises:
        ValueError: if ``k < 0``, ``2k > M`` or a score is not finite.
    """
    if scores.dim() == 2:
        if scores.shape[0] == 0:
            select_pairs(scores.new_zeros(scores.shape[1]), k)  # the same argument checks
            return torch.zeros(0, k, dtype=torch.int64, device=scores.device)
        return torch.stack([select_pairs(row, k) for row in scores])
    values = scores.detach().to("cpu", torch.float64).tolist()
    num_slots = len(values) + 1
    if k < 0 or 2 * k > num_slots:
        raise ValueError(
            f"cannot choose k={k} non-overlapping pairs among M={num_slots} slots "
            "(need 0 <= 2k <= M)"
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError("pair scores must be finite")

    n = len(values)
    left = list(range(-1, n - 1))  # -1: no live left neighbour
    right = list(range(1, n + 1))  # n: no live right neighbour
    run_lo = list(range(n))
    run_hi = list(range(n))
    alive = [True] * n
    heap = [(v, i) for i, v in enumerate(values)]
    heapq.heapify(heap)
    chosen: list[int] = []

    def unlink(node: int) -> None:
        """Remove ``node`` from the list; its heap entries become stale."""
        alive[node] = False
        if left[node] >= 0:
            right[left[node]] = right[node]
        if right[node] < n:
            left[right[node]] = left[node]

    def settle(node: int, taken: bool) -> None:
        """Finalise ``node``: record its run's outer (taken) or inner alternate elements."""
        first = run_lo[node] if taken else run_lo[node] + 1
        chosen.extend(range(first, run_hi[node] + 1, 2))
        unlink(node)

    for _ in range(k):
        while True:
            value, node = heapq.heappop(heap)
            if alive[node]:
                break
        prev, nxt = left[node], right[node]
        if prev >= 0 and nxt < n:
            values[node] = values[prev] + values[nxt] - value
            run_lo[node], run_hi[node] = run_lo[prev], run_hi[nxt]
            unlink(prev)
            unlink(nxt)
            heapq.heappush(heap, (values[node], node))
        else:
            for neighbour in (prev, nxt):
                if 0 <= neighbour < n:
                    settle(neighbour, taken=False)
            settle(node, taken=True)

    for node in range(n):
        if alive[node]:
            settle(node, taken=False)
    return torch.tensor(sorted(chosen), dtype=torch.int64, device=scores.device)


def select_pairs_rows(scores: torch.Tensor, lengths, ks) -> torch.Tensor:
    """:func:`select_pairs` of each row on its own first ``lengths[r]`` scores with its own
    ``ks[r]`` (layers in lock step whose mergeable regions and steps differ).

    Args:
        scores: ``[L, P]`` pair scores; entries at or past a row's length are ignored.
        lengths: ``[L]`` pair scores in use per row, each in ``[0, P]``.
        ks: ``[L]`` pairs to choose per row (``0 <= 2 ks[r] <= lengths[r] + 1``).

    Returns:
        ``[L, max(ks)]`` int64 on ``scores``' device: row ``r`` holds its ``ks[r]`` left
        indices ascending, then ``-1``.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [L, P] (one row per layer), got shape "
                         f"{tuple(scores.shape)}")
    lengths, ks = torch.as_tensor(lengths).tolist(), torch.as_tensor(ks).tolist()
    if len(lengths) != scores.shape[0] or len(ks) != scores.shape[0]:
        raise ValueError(f"lengths and ks must be [{scores.shape[0]}] (one per row), got "
                         f"{len(lengths)} and {len(ks)}")
    out = torch.full((scores.shape[0], max(ks, default=0)), -1, dtype=torch.int64)
    for row, (n, k) in enumerate(zip(lengths, ks)):
        if not 0 <= n <= scores.shape[1]:
            raise ValueError(f"lengths[{row}]={n} must be in [0, {scores.shape[1]}] (the "
                             "scores' width)")
        if not 0 <= 2 * k <= n + 1:
            raise ValueError(f"ks[{row}]={k}: cannot choose that many non-overlapping pairs "
                             f"among M={n + 1} slots (need 0 <= 2k <= M)")
        out[row, :k] = select_pairs(scores[row, :n], k)
    return out.to(scores.device)
