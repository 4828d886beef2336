"""Per-slot side state of the paged KV cache, and one merge round applied to it.

The KV cache of a layer is viewed slot-major as ``[num_slots, Hkv, 2 * D]`` (key then
value of each KV head), where the flat slot id is ``block_id * block_size + offset``, the
same id vLLM's slot mapping uses. Beside it, for every layer, :class:`SlotState` keeps

* ``counts``    ``[L, S]`` float32: original tokens a slot stands for (1 = unmerged);
* ``positions`` ``[L, S]`` int64: logical position of the slot's latest token;
* ``hess``      ``[L, S, Hkv]`` float32: smoothed Hessian proxy (NaN = none yet);
* ``mass``      ``[L, S, Hkv]`` float32: attention mass observed since the last round.

A slot's state is reset whenever a new token's KV is written into it, so a reused block
never carries a previous request's counts. Nothing here imports vLLM.

The memory this costs is known before anything is allocated (:func:`state_bytes_per_slot`,
and :mod:`kvslimmer_vllm.engine.memory` for rounds): the worker takes it from the KV budget
before vLLM sizes the cache, so KV cache, state and scratch together fit the budget vLLM
would have given the KV cache alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvslimmer_vllm.core.paged import slot_ids, store_round
from kvslimmer_vllm.core.rope import RotarySpec
from kvslimmer_vllm.engine.memory import MAX_BATCH_ELEMENTS, footprint_per_slot, layers_per_batch
from kvslimmer_vllm.engine.plan import MergeRound
from kvslimmer_vllm.kernels import compact_rows, gather_rows, write_tokens
from kvslimmer_vllm.methods.base import MergeMethod, PagedSlots, SlotData


#: Attribute set on each vLLM attention layer: ``(SlotState, layer index)``.
SLOT_BINDING = "kv_merge_slots"
#: Attribute set on one attention layer while tracing: a list its calls are appended to.
TRACE_ATTR = "kv_merge_trace"
#: Attribute set on each attention layer: the worker's StepProfile, or None.
PROFILE_ATTR = "kv_merge_profile"


#: dtypes of :class:`SlotState`'s tensors (per slot and layer: one count, one position;
#: per slot, layer and KV head: one Hessian proxy, one mass).
COUNT_DTYPE, POSITION_DTYPE, HEAD_STATE_DTYPE = torch.float32, torch.int64, torch.float32


def state_bytes_per_slot(num_kv_heads: int) -> int:
    """Bytes :class:`SlotState` keeps for one slot of one layer."""
    return (COUNT_DTYPE.itemsize + POSITION_DTYPE.itemsize
            + 2 * num_kv_heads * HEAD_STATE_DTYPE.itemsize)


class SlotState:
    """Side state of every slot of every attention layer (see module docstring)."""

    def __init__(
        self, num_layers: int, num_slots: int, num_kv_heads: int, device: torch.device
    ) -> None:
        self.num_slots = num_slots
        self.counts = torch.ones(num_layers, num_slots, dtype=COUNT_DTYPE, device=device)
        self.positions = torch.zeros(num_layers, num_slots, dtype=POSITION_DTYPE,
                                     device=device)
        self.hess = torch.full((num_layers, num_slots, num_kv_heads), float("nan"),
                               dtype=HEAD_STATE_DTYPE, device=device)
        self.mass = torch.zeros(num_layers, num_slots, num_kv_heads,
                                dtype=HEAD_STATE_DTYPE, device=device)

        #: This step's ``[num_reqs]`` bool: which requests' queries add to ``mass`` (None:
        #: all of them), and whether any does (:meth:`set_observed`, once per step).
        self.observed: torch.Tensor | None = None
        self.observes_any = True

        self._scratch: torch.Tensor | None = None
        #: Most elements one batched round allocates at its peak (set from the KV budget by
        #: the worker; see footprint_per_slot).
        self.max_batch_elements = MAX_BATCH_ELEMENTS

    def set_observed(self, flags: list[bool] | None) -> None:
        """This step's batch rows whose queries add to ``mass`` (None: all of them),
        decided on the host so that no attention layer has to look at them again."""
        every = flags is None or all(flags)
        self.observed = None if every else torch.tensor(flags, dtype=torch.bool,
                                                        device=self.mass.device)
        self.observes_any = every or any(flags)

    def scratch(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reused buffer of ``shape`` for gathering a request's slots: rounds run one
        after another, and reusing warm memory beats allocating it every round."""
        numel = math.prod(shape)
        buf = self._scratch
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
            # Drop the old buffer first: old and new never exist together, so the
            # buffer stays within the share of round_reserve_bytes() that a gathered
            # round's copy takes (one of GATHERED_FOOTPRINT copies).
            self._scratch = buf = None
            buf = self._scratch = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    @property
    def scratch_nbytes(self) -> int:
        """Bytes the scratch buffer holds now (0 before the first layer-batched round)."""
        buf = self._scratch
        return 0 if buf is None else buf.numel() * buf.element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.counts, self.positions, self.hess, self.mass))

    def write_tokens(self, layer: int, kv: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Write a step's new tokens into ``layer``'s cache ``kv`` at ``slots`` (negative:
        padding, skipped); each written slot stands for one token again (count 1, its
        position, no Hessian, no mass)."""
        write_tokens(kv, key, value, slots, positions, self.counts[layer],
                     self.positions[layer], self.hess[layer], self.mass[layer])


@dataclass(frozen=True)
class LayerCache:
    """One attention layer: its index in :class:`SlotState`, its slot-major KV view
    ``[num_slots, Hkv, 2 * D]`` and its RoPE (None without one)."""

    index: int
    kv: torch.Tensor
    rotary: RotarySpec | None


def apply_round(
    plan: MergeRound,
    layers: list[LayerCache],
    state: SlotState,
    method: MergeMethod,
    block_size: int,
) -> None:
    """Merge and compact one request in place, in every layer.

    Reads the request's ``plan.num_slots`` slots through ``plan.block_ids`` and writes
    the ``plan.num_slots_after`` resulting slots to the front of the same blocks (data is
    only ever moved to lower slot indices, so later sources are read before any write).
    The observation mass of the request's slots is reset: the next round observes anew.

    Layers that share a RoPE run as layer-batched rounds (each layer still gets its own
    pairs), in batches whose footprint (:func:`footprint_per_slot`) stays within
    ``state.max_batch_elements``: where the slots live when the method has a kernel for
    these caches (:meth:`MergeMethod.round_path` in place or staged), else gathered into
    the state's scratch and written back.
    """
    if not layers:
        return
    device = layers[0].kv.device
    src = slot_ids(plan.block_ids, plan.num_slots, block_size, device)
    path = method.round_path(layers[0].kv)
    heads, row = layers[0].kv.shape[1:]
    per_slot = footprint_per_slot(heads, row // 2, layers[0].kv.dtype, path)
    batch = layers_per_batch(plan.num_slots * per_slot, state.max_batch_elements)
    settings = dict(k=plan.num_merge, round_index=plan.round_index, recent=plan.recent,
                    pool=plan.pool, max_fraction=plan.max_fraction)
    for group in _rotary_groups(layers):
        for first in range(0, len(group), batch):
            part = group[first:first + batch]
            if path != "gathered":
                method.run_paged_round(_paged_slots(part, state, src),
                                       rotary=part[0].rotary, **settings)
                continue
            rows = _gather_rows(part, state, src)
            result = method.run_round(_slot_data(rows, part, state, src),
                                      rotary=part[0].rotary, **settings)
            _write_back(part, state, result, src, rows)


def reset_mass(state: SlotState, block_ids, num_slots: int, block_size: int) -> None:
    """Forget the observation mass of a request's first ``num_slots`` slots (every layer):
    its next round is scored only by the queries that come after this."""
    if num_slots > 0:
        slots = slot_ids(block_ids, num_slots, block_size, state.mass.device)
        state.mass[:, slots] = 0.0


def _rotary_groups(layers: list[LayerCache]) -> list[list[LayerCache]]:
    """Layers grouped by their RoPE (most models: one group), in layer order."""
    groups: dict[int, list[LayerCache]] = {}
    for layer in layers:
        groups.setdefault(id(layer.rotary), []).append(layer)
    return list(groups.values())


def _write_back(layers: list[LayerCache], state: SlotState, result, src,
                gathered: torch.Tensor) -> None:
    """Store a layer-batched round's result in the request's slots ``src`` and their
    state (:func:`~kvslimmer_vllm.core.paged.store_round` with
    :func:`~kvslimmer_vllm.kernels.compact_rows`; ``gathered``, the round's copy of the
    slots, is where the CUDA kernel reads the surviving rows)."""
    def compact(*args):
        compact_rows(*args, gathered)

    store_round([layer.kv for layer in layers], src, _layer_index(layers, src.device),
                state.counts, state.positions, state.hess, state.mass, result, compact)


def _layer_index(layers: list[LayerCache], device) -> torch.Tensor:
    return torch.tensor([layer.index for layer in layers], device=device)


def _paged_slots(layers: list[LayerCache], state: SlotState, slots: torch.Tensor) -> PagedSlots:
    return PagedSlots([layer.kv for layer in layers], slots, _layer_index(layers, slots.device),
                      state.counts, state.positions, state.hess, state.mass)


def gather(layers: LayerCache | list[LayerCache], state: SlotState,
           slots: torch.Tensor) -> SlotData:
    """A request's slots of one layer (``[N, ...]`` tensors) or of several layers
    (``[L, N, ...]``), gathered into plain tensors. Several layers' keys and values live in
    the state's scratch buffer, valid until the next gather."""
    if isinstance(layers, LayerCache):  # a copy: the scratch buffer is reused
        data = gather([layers], state, slots)
        return SlotData(**{name: t.squeeze(0).clone() for name, t in vars(data).items()})
    return _slot_data(_gather_rows(layers, state, slots), layers, state, slots)


def _gather_rows(layers: list[LayerCache], state: SlotState,
                 slots: torch.Tensor) -> torch.Tensor:
    """The request's ``[L, N, Hkv, 2D]`` cache rows of ``layers``, in the scratch buffer."""
    kv = state.scratch((len(layers), len(slots), *layers[0].kv.shape[1:]), layers[0].kv)
    return gather_rows([layer.kv for layer in layers], slots, kv)


def _slot_data(kv: torch.Tensor, layers: list[LayerCache], state: SlotState,
               slots: torch.Tensor) -> SlotData:
    """Gathered rows ``kv`` (keys and values as views) with the slots' state."""
    head_dim = kv.shape[-1] // 2
    rows = _layer_index(layers, slots.device)[:, None]
    return SlotData(
        keys=kv[..., :head_dim],
        values=kv[..., head_dim:],
        counts=state.counts[rows, slots],
        positions=state.positions[rows, slots],
        hess=state.hess[rows, slots],
        mass=state.mass[rows, slots],
    )
