"""Protected sub-rounds of every layer at once, each layer at its own size (SnapMerge's
gathered round: CUDA caches, and CPU caches the in-place C++ round does not take).

The contract is :func:`kvslimmer_vllm.core.merge.merge_rounds` with ``protect``: each layer
frees ``k`` slots in sub-rounds sized by its own protect mask
(:func:`~kvslimmer_vllm.core.merge.protected_step`), so after a sub-round the layers may hold
different numbers of slots. The reference runs the layers one after another; each
sub-round of each layer is a dozen tensor operations and a host round trip (the pair choice
runs on the host), ``L x`` sub-rounds of them per step. Here sub-round ``s`` of every layer
runs as one layer-batched step over padded tensors:

* the layers' slots sit at the front of ``[L, W]`` buffers (``W``: the most slots a layer
  holds, plus a spare last column that padded writes land in); a layer's mergeable region
  is ``[sink, held - recent)``, its tail masked out of the statistics;
* the device computes every layer's statistics and pair scores, which go to the host in
  one transfer; the host, which keeps each layer's protect mask and slot origins, sizes
  each layer's step, chooses its pairs (:func:`~kvslimmer_vllm.core.select.select_pairs_rows`)
  and the order that compacts it, and sends them back in one transfer;
* the device merges the chosen pairs, compacts every layer with one gather per buffer and
  writes the merged slots (a finished layer's step is 0: nothing of it changes).

Per sub-round: one device-to-host and one host-to-device transfer, whatever ``L``. Every
layer's result is the reference's: the same pairs (scores are elementwise in the mass, so
they match bit for bit) and the same arithmetic, but for the order of the sums over a region
(alpha's normalisation, the value mean), which differ in the last bits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvslimmer_vllm.core import merge as _merge
from kvslimmer_vllm.core.merge import MergeResult
from kvslimmer_vllm.core.rope import RotarySpec
from kvslimmer_vllm.core.select import pair_scores, pool_mass, select_pairs_rows
from kvslimmer_vllm.core.stats import hessian_stats, smooth_hessian, value_spread

__all__ = ["ProtectedSchedule", "protected_rounds"]


def protected_rounds(
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor,
    positions: torch.Tensor,
    hess: torch.Tensor,
    mass: torch.Tensor,
    protect: torch.Tensor,
    *,
    sink: int,
    recent: int,
    k: int,
    round_idx: int,
    gamma: float,
    eps: float,
    rotary: RotarySpec | None,
    max_fraction: float = 0.5,
    key_weights: str = "hessian",
    row_selector: Callable = select_pairs_rows,
    score_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    pool: int = 1,
    spread: Callable = value_spread,
    pair_merge: Callable = _merge.merge_pairs,
    schedule_ops=None,
) -> MergeResult:
    """:func:`kvslimmer_vllm.core.merge.merge_rounds` with ``protect``, every layer's
    sub-rounds in lock step (see the module docstring); the arguments are that function's,
    with ``row_selector`` (the contract of
    :func:`~kvslimmer_vllm.core.select.select_pairs_rows`) choosing the pairs and
    ``schedule_ops`` (see :class:`ProtectedSchedule`) keeping the host's books."""
    if key_weights not in ("hessian", "count"):
        raise ValueError(f"key_weights must be 'hessian' or 'count', got {key_weights!r}")
    single, (keys, values, counts, positions, hess, mass) = _merge._batched(
        keys, values, counts, positions, hess, mass)
    protect = protect.unsqueeze(0) if single else protect
    num_layers, n = keys.shape[:2]
    if protect.shape != (num_layers, n):
        raise ValueError(f"protect must be [{num_layers}, {n}] (one flag per slot), got "
                         f"{tuple(protect.shape)}")
    if n - sink - recent < 0 or sink < 0 or recent < 0:
        raise ValueError(f"sink={sink} and recent={recent} must be >= 0 and leave a "
                         f"mergeable region of the N={n} slots")
    masks = protect.to("cpu", torch.bool)  # one transfer: the host owns the masks
    _merge.check_protected(masks[:, sink:n - recent], k, max_fraction)
    if k == 0:
        return _merge._unbatched(_merge.merge_round(
            keys, values, counts, positions, hess, mass, sink=sink, recent=recent, k=0,
            round_idx=round_idx, gamma=gamma, eps=eps, rotary=rotary,
            key_weights=key_weights, pool=pool, protect=protect, spread=spread,
            pair_merge=pair_merge), single)
    lock = _Lockstep(keys, values, counts, positions, hess, mass, masks, sink, recent, k,
                     schedule_ops)
    while lock.schedule.remaining.any():
        steps = lock.schedule.steps(max_fraction)
        scores = lock.scores(gamma, pool, score_reduce)
        local, order = lock.choose(scores, steps, row_selector)
        lock.merge(local, order, steps, round_idx, eps, rotary, key_weights, spread,
                   pair_merge)
    return _merge._unbatched(lock.result(keys, values, k), single)


class ProtectedSchedule:
    """The host's side of lock-step protected sub-rounds (shared with the in-place C++
    round under tensor parallelism, :func:`kvslimmer_vllm.kernels.paged_merge_round`): each
    layer's slot count, protect mask and slots still to free; it sizes each layer's next
    step, scores protected pairs out and follows the layers' slots as pairs merge.

    Args:
        masks: ``[L, N]`` bool (CPU), the slots no pair may touch.
        sink, recent: slots at either end that never merge.
        k: slots every layer frees in all.
        ops: ``torch.ops.kvslimmer`` for :meth:`steps` and :meth:`merged` in C++ (one pass
            per layer, layers in parallel), or None for the torch ops below (tens of ms per
            sub-round at 32 layers of 16K slots).
    """

    def __init__(self, masks: torch.Tensor, sink: int, recent: int, k: int, ops=None):
        num_layers, n = masks.shape
        self.sink, self.recent, self.ops = sink, recent, ops
        self.masks = masks.to("cpu", torch.bool).clone()  # True past a layer's slots too
        self.held = torch.full((num_layers,), n, dtype=torch.int64)
        self.remaining = torch.full((num_layers,), k, dtype=torch.int64)

    def steps(self, max_fraction: float) -> torch.Tensor:
        """``[L]`` slots each layer frees in its next sub-round (as
        :func:`~kvslimmer_vllm.core.merge.protected_step` on the layer's own mask; 0 once
        it has freed ``k``)."""
        if self.ops is not None:
            return self.ops.protected_steps(self.masks, self.held, self.remaining, self.sink,
                                            self.recent, max_fraction)
        free = _merge.disjoint_free_pairs(self.regions(torch.arange(len(self.held))))
        m = self.held - self.sink - self.recent
        steps = [min(left, max(1, int(max_fraction * size)), pairs) if left else 0
                 for left, size, pairs in zip(self.remaining.tolist(), m.tolist(),
                                              free.tolist())]
        return torch.tensor(steps, dtype=torch.int64)

    def regions(self, rows: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """``[len(rows), width]`` protect masks over those layers' mergeable regions, True
        past each layer's own (no run of free slots reaches past it); ``width`` defaults to
        the widest of those regions."""
        m = self.held[rows] - self.sink - self.recent
        width = int(m.max()) if width is None else width
        region = self.masks[rows, self.sink:self.sink + width].clone()
        region[torch.arange(width) >= m[:, None]] = True
        return region

    def guard(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The ``[len(rows), R - 1]`` pair scores of layers ``rows`` (float64, CPU) with
        every pair touching a protected slot, or past a layer's region, scored out."""
        guarded = self.regions(rows, scores.shape[1] + 1)
        return torch.where(guarded[:, :-1] | guarded[:, 1:], _merge.PROTECTED_SCORE, scores)

    def lengths(self, rows: torch.Tensor) -> torch.Tensor:
        """``[len(rows)]`` pair scores in each of those layers' regions."""
        return (self.held[rows] - self.sink - self.recent - 1).clamp_min(0)

    def merged(self, rows: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """Layers ``rows`` merged the pairs ``local`` (``[len(rows), P]`` region indices,
        -1 padded): their right slots are gone. Returns those layers' ``[len(rows), N]``
        order of their slots before the sub-round, kept ones first (then their tail)."""
        if self.ops is not None:
            return self.ops.protected_merged(self.masks, self.held, self.remaining, rows,
                                             local, self.sink)
        chosen = local >= 0
        steps = chosen.sum(dim=1)
        which = torch.arange(len(rows))[:, None].expand_as(local)[chosen]
        keep = torch.arange(self.masks.shape[1]) < self.held[rows][:, None]
        keep[which, self.sink + 1 + local[chosen]] = False
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        self.held[rows] -= steps
        self.remaining[rows] -= steps
        masks = torch.gather(self.masks[rows], 1, order)
        masks[torch.arange(masks.shape[1]) >= self.held[rows][:, None]] = True
        self.masks[rows] = masks
        return order


class _Lockstep:
    """The state of a lock-step protected round: device buffers ``[L, W, ...]`` (the
    layers' slots at the front, column ``W - 1`` a spare that padded writes land in) and,
    on the host, the :class:`ProtectedSchedule` and the slots' input indices (-1 for a
    merged slot)."""

    def __init__(self, keys, values, counts, positions, hess, mass, masks, sink, recent, k,
                 schedule_ops):
        self.device = keys.device
        self.sink, self.recent = sink, recent
        num_layers, n = keys.shape[:2]
        self.dim = keys.shape[-1]
        self.dtype = torch.promote_types(keys.dtype, torch.float32)
        # Sub-round s reads buffers of turn s and writes the other pair (allocated once:
        # the slots only shrink), so a step holds at most two copies of the rows.
        self.kv = _merge._joined(keys, values)
        self.spare: list[torch.Tensor] = []
        self.turn = -1
        self.counts, self.positions, self.hess, self.mass = counts, positions, hess, mass
        self.schedule = ProtectedSchedule(masks, sink, recent, k, schedule_ops)
        self.held_on_device = torch.full((num_layers,), n, dtype=torch.int64,
                                         device=self.device)
        self.origin = torch.arange(n).expand(num_layers, n).clone()
        self.layer = torch.arange(num_layers, device=self.device)[:, None]
        self.rows = torch.arange(num_layers)

    # -------------------------------------------------------------------- host side

    def choose(self, scores: torch.Tensor, steps: torch.Tensor, row_selector):
        """Each layer's ``steps[l]`` pairs (``[L, max steps]`` region indices, -1 padded)
        from the device's ``[L, R - 1]`` pair scores, its protected pairs scored out, and
        the ``[L, W]`` order that compacts the layers (kept slots first, then a spare
        column); the host state follows (masks and origins compacted)."""
        schedule, rows = self.schedule, self.rows
        scores = scores.to("cpu", torch.float64)  # the sub-round's device-to-host transfer
        local = row_selector(schedule.guard(scores, rows), schedule.lengths(rows), steps).cpu()
        chosen = local >= 0
        which = rows[:, None].expand_as(local)[chosen]
        self.origin[which, self.sink + local[chosen]] = -1
        order = schedule.merged(rows, local)
        width = int(schedule.held.max())
        self.origin = torch.gather(self.origin, 1, order[:, :width])
        return local, order[:, :width + 1]  # + the spare column

    # ------------------------------------------------------------------ device side

    def _valid(self, width: int) -> torch.Tensor:
        """``[L, width]`` bool on the device: region index within each layer's region
        (from the device's own slot counts: no transfer)."""
        m = self.held_on_device - self.sink - self.recent
        return torch.arange(width, device=self.device) < m[:, None]

    def scores(self, gamma: float, pool: int, score_reduce) -> torch.Tensor:
        """Every layer's statistics over its own region (kept for :meth:`merge`) and its
        ``[L, R - 1]`` pair scores (float64, on the device)."""
        width = int(self.schedule.held.max()) - self.sink - self.recent
        self.region = slice(self.sink, self.sink + width)
        valid = self._valid(width)
        self.valid = valid
        mass = torch.where(valid[..., None], self.mass[:, self.region].to(self.dtype), 0.0)
        # alpha as normalize_mass gives it over each layer's region (uniform 1 / m when a
        # head saw nothing), 0 past the region.
        total = mass.sum(dim=-2, keepdim=True)
        m = (self.held_on_device - self.sink - self.recent).clamp_min(1)
        m = m.to(self.dtype)[:, None, None]
        uniform = valid[..., None] / m
        self.alpha = torch.where(total > 0, mass / torch.where(total > 0, total, 1.0), uniform)
        self.values_region = self.kv[:, self.region, :, self.dim:]
        scores = pair_scores(pool_mass(mass, pool), gamma)
        if score_reduce is not None:
            scores = score_reduce(scores)
        return scores

    def merge(self, local, order, steps, round_idx, eps, rotary, key_weights, spread,
              pair_merge):
        """Merge each layer's chosen pairs, write the region's smoothed Hessian proxy of
        the layers that ran, and compact every layer (one gather per buffer)."""
        device, layer = self.device, self.layer
        to_dev = _sender(device)
        packed = to_dev(torch.cat((steps[:, None], local, order), dim=1))
        ran = packed[:, 0] > 0
        self.held_on_device = self.held_on_device - packed[:, 0]
        local_d = packed[:, 1:1 + local.shape[1]]
        order = packed[:, 1 + local.shape[1]:]
        chosen = local_d >= 0
        local_d = local_d.clamp_min(0)
        left, right = self.sink + local_d, self.sink + local_d + 1

        h_new, _ = hessian_stats(self.alpha, self.values_region, spread)
        h = smooth_hessian(h_new, self.hess[:, self.region], round_idx)
        pairs = _merge.merge_chosen(self.kv[..., :self.dim], self.kv[..., self.dim:],
                                    self.counts, self.positions, self.alpha, h, local_d,
                                    sink=self.sink, eps=eps, key_weights=key_weights,
                                    rotary=rotary, pair_merge=pair_merge)
        merged_mass = _merge._take(self.mass, left) + _merge._take(self.mass, right)

        hess = self.hess.clone()
        write = ran[:, None, None] & self.valid[..., None]
        hess[:, self.region] = torch.where(write, h.to(hess.dtype), hess[:, self.region])
        # Compact, then write the merged slots where their left slot lands (the pairs'
        # right slots before it are gone); a padded pair writes the spare column.
        width = order.shape[1]
        dest = torch.where(chosen, left - torch.arange(local_d.shape[1], device=device),
                           width - 1)
        self.kv = self._next_rows(order)
        self.kv[layer, dest] = _merge._joined(pairs.keys, pairs.values).to(self.kv.dtype)
        self.hess = _merge._take(hess, order)
        self.hess[layer, dest] = pairs.hess.to(hess.dtype)
        self.counts = _merge._take(self.counts, order)
        self.counts[layer, dest] = pairs.counts.to(self.counts.dtype)
        self.positions = _merge._take(self.positions, order)
        self.positions[layer, dest] = pairs.positions
        self.mass = _merge._take(self.mass, order)
        self.mass[layer, dest] = merged_mass

    def _next_rows(self, order: torch.Tensor) -> torch.Tensor:
        """The rows compacted by ``order`` into the spare buffer of this turn."""
        if len(self.spare) < 2:  # the first are the largest: the slots only shrink
            self.spare.append(self.kv.new_empty(order.numel() * self.kv[0, 0].numel()))
        self.turn += 1
        return _merge._take(self.kv, order, out=self.spare[self.turn % 2])

    def result(self, keys: torch.Tensor, values: torch.Tensor, k: int) -> MergeResult:
        """The step relative to its input, as the reference composes it."""
        num_layers, n = keys.shape[:2]
        size = n - k
        origin = self.origin[:, :size]
        index = torch.arange(size).expand(num_layers, size)
        merged = origin < 0
        widest = int(merged.sum(dim=1).max())
        order = torch.sort((~merged).to(torch.int8), dim=1, stable=True).indices[:, :widest]
        unchanged = origin == index
        first = (~unchanged).to(torch.int8).argmax(dim=1)
        first_changed = int(torch.where(unchanged.all(dim=1), size, first).min())
        to_dev = _sender(self.device)
        packed = to_dev(torch.cat((torch.where(merged, index, origin), order), dim=1))
        source, order = packed[:, :size], packed[:, size:]
        return MergeResult(
            counts=self.counts[:, :size].contiguous(),
            positions=self.positions[:, :size].contiguous(),
            hess=self.hess[:, :size].contiguous(),
            pairs=source.new_empty(num_layers, 0),
            first_changed=first_changed,
            source=source,
            input_keys=keys,
            input_values=values,
            merged_slots=order,
            merged_keys=_merge._take(self.kv[..., :self.dim], order),
            merged_values=_merge._take(self.kv[..., self.dim:], order),
        )


def _sender(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Host tensor -> ``device`` without waiting for the device (pinned memory on CUDA)."""
    if device.type != "cuda":
        return lambda t: t.to(device)
    return lambda t: t.pin_memory().to(device, non_blocking=True)
