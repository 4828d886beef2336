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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvslimmer_vllm.core.paged import slot_ids
from kvslimmer_vllm.core.rope import RotarySpec
from kvslimmer_vllm.engine.plan import MergeRound
from kvslimmer_vllm.methods.base import MergeMethod, SlotData


#: Attribute set on each vLLM attention layer: ``(SlotState, layer index)``.
SLOT_BINDING = "kv_merge_slots"
#: Attribute set on one attention layer while tracing: a list its calls are appended to.
TRACE_ATTR = "kv_merge_trace"
#: Attribute set on each attention layer: the worker's StepProfile, or None.
PROFILE_ATTR = "kv_merge_profile"


class SlotState:
    """Side state of every slot of every attention layer (see module docstring)."""

    def __init__(
        self, num_layers: int, num_slots: int, num_kv_heads: int, device: torch.device
    ) -> None:
        self.num_slots = num_slots
        self.counts = torch.ones(num_layers, num_slots, dtype=torch.float32, device=device)
        self.positions = torch.zeros(num_layers, num_slots, dtype=torch.int64, device=device)
        self.hess = torch.full(
            (num_layers, num_slots, num_kv_heads), float("nan"), device=device
        )
        self.mass = torch.zeros(num_layers, num_slots, num_kv_heads, device=device)

        self._scratch: torch.Tensor | None = None

    def scratch(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A reused buffer of ``shape`` for gathering a request's slots: rounds run one
        after another, and reusing warm memory beats allocating it every round."""
        numel = math.prod(shape)
        buf = self._scratch
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
            buf = self._scratch = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.counts, self.positions, self.hess, self.mass))

    def on_write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """New tokens' KV was written to ``slots``: they stand for one token each."""
        self.counts[layer].index_fill_(0, slots, 1.0)
        self.positions[layer].index_copy_(0, slots, positions)
        self.hess[layer].index_fill_(0, slots, float("nan"))
        self.mass[layer].index_fill_(0, slots, 0.0)


@dataclass(frozen=True)
class LayerCache:
    """One attention layer: its index in :class:`SlotState`, its slot-major KV view
    ``[num_slots, Hkv, 2 * D]`` and its RoPE (None without one)."""

    index: int
    kv: torch.Tensor
    rotary: RotarySpec | None


#: Most KV elements (slots x layers x heads x 2D) one batched round gathers at once;
#: longer requests run their layers in several batches (256 MiB of float32).
MAX_BATCH_ELEMENTS = 1 << 26


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

    Layers that share a RoPE run as one layer-batched round (each layer still gets its
    own pairs), in batches of at most :data:`MAX_BATCH_ELEMENTS` gathered elements.
    """
    if not layers:
        return
    device = layers[0].kv.device
    src = slot_ids(plan.block_ids, plan.num_slots, block_size, device)
    dst = src[: plan.num_slots_after]
    per_layer = plan.num_slots * layers[0].kv[0].numel()
    batch = max(1, MAX_BATCH_ELEMENTS // max(per_layer, 1))
    for group in _rotary_groups(layers):
        for first in range(0, len(group), batch):
            part = group[first:first + batch]
            result = method.run_round(
                gather(part, state, src),
                k=plan.num_merge,
                round_index=plan.round_index,
                rotary=part[0].rotary,
                recent=plan.recent,
                pool=plan.pool,
                max_fraction=plan.max_fraction,
            )
            _write_back(part, state, result, src, dst)


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


def _write_back(layers: list[LayerCache], state: SlotState, result, src, dst) -> None:
    """Store a layer-batched round's result in the request's slots ``dst``: move the
    surviving rows inside each layer's cache (from ``first_changed`` on; every row moves
    to a lower slot, and each layer reads all its rows before writing any), then write
    the merged slots."""
    index = torch.tensor([layer.index for layer in layers], device=dst.device)
    start = result.first_changed
    changed = dst[start:]
    merged = torch.cat((result.merged_keys, result.merged_values), dim=-1)
    for row, layer in enumerate(layers):
        moved = layer.kv.index_select(0, src[result.source[row, start:]])
        layer.kv.index_copy_(0, changed, moved)
        layer.kv.index_copy_(0, dst[result.merged_slots[row]], merged[row])
    rows = index[:, None]
    state.counts[rows, dst] = result.counts
    state.positions[rows, dst] = result.positions
    state.hess[rows, dst] = result.hess
    state.mass[rows, src] = 0.0


def gather(layers: LayerCache | list[LayerCache], state: SlotState,
           slots: torch.Tensor) -> SlotData:
    """A request's slots of one layer (``[N, ...]`` tensors) or of several layers
    (``[L, N, ...]``), gathered into plain tensors. Several layers' keys and values live in
    the state's scratch buffer, valid until the next gather."""
    if isinstance(layers, LayerCache):  # a copy: the scratch buffer is reused
        data = gather([layers], state, slots)
        return SlotData(**{name: t.squeeze(0).clone() for name, t in vars(data).items()})
    kv = state.scratch((len(layers), len(slots), *layers[0].kv.shape[1:]), layers[0].kv)
    for row, layer in enumerate(layers):
        torch.index_select(layer.kv, 0, slots, out=kv[row])
    head_dim = kv.shape[-1] // 2
    index = torch.tensor([layer.index for layer in layers], device=slots.device)
    rows = index[:, None]
    return SlotData(
        keys=kv[..., :head_dim],
        values=kv[..., head_dim:],
        counts=state.counts[rows, slots],
        positions=state.positions[rows, slots],
        hess=state.hess[rows, slots],
        mass=state.mass[rows, slots],
    )
