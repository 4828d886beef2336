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
    """
    if not layers:
        return
    device = layers[0].kv.device
    src = slot_ids(plan.block_ids, plan.num_slots, block_size, device)
    dst = src[: plan.num_slots_after]
    for layer in layers:
        result = method.run_round(
            gather(layer, state, src),
            k=plan.num_merge,
            round_index=plan.round_index,
            rotary=layer.rotary,
        )
        i = layer.index
        start = result.first_changed
        changed = dst[start:]
        layer.kv.index_copy_(
            0, changed, torch.cat((result.keys[start:], result.values[start:]), dim=-1)
        )
        state.counts[i].index_copy_(0, dst, result.counts)
        state.positions[i].index_copy_(0, dst, result.positions)
        state.hess[i].index_copy_(0, dst, result.hess)
        state.mass[i].index_fill_(0, src, 0.0)


def gather(layer: LayerCache, state: SlotState, slots: torch.Tensor) -> SlotData:
    """A request's slots of one layer, gathered into plain tensors."""
    kv = layer.kv.index_select(0, slots)
    head_dim = kv.shape[-1] // 2
    i = layer.index
    return SlotData(
        keys=kv[..., :head_dim],
        values=kv[..., head_dim:],
        counts=state.counts[i].index_select(0, slots),
        positions=state.positions[i].index_select(0, slots),
        hess=state.hess[i].index_select(0, slots),
        mass=state.mass[i].index_select(0, slots),
    )
