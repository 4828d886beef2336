"""Eviction baselines: drop slots instead of merging them."""

from __future__ import annotations

import torch

from kvslimmer_vllm.core.merge import (
    MergeResult, evict_lowest, evict_oldest, lowest_mass_slots, oldest_slots,
)
from kvslimmer_vllm.core.rope import RotarySpec
from kvslimmer_vllm.kernels import paged_drop, paged_round_backend_name
from kvslimmer_vllm.methods.base import MergeMethod, PagedSlots, SlotData, register


class _Dropping(MergeMethod):
    """An eviction method: its choice reads only the slots' state (:meth:`_choose`), so on
    caches with the in-place kernels a round compacts the survivors where they live,
    without gathering the request (:func:`~kvslimmer_vllm.kernels.paged_drop`)."""

    def _choose(self, slots: PagedSlots, *, k: int, recent: int, pool: int) -> torch.Tensor:
        """``[L, k]`` sorted indices into ``slots.slots`` of the slots to drop."""
        raise NotImplementedError

    has_paged_round = True

    def round_path(self, kv: torch.Tensor) -> str:
        """In place on CPU (the C++ compact_rows moves each survivor once); staged on CUDA
        (the Triton compact_rows copies the rows it moves, then writes them: two launches
        for all layers, no gathered request)."""
        return {"cpp": "in place", "triton": "staged"}.get(paged_round_backend_name(kv),
                                                          "gathered")

    def run_paged_round(
        self, slots: PagedSlots, *, k: int, round_index: int, rotary: RotarySpec | None,
        recent: int | None = None, pool: int = 1, max_fraction: float = 0.5,
    ) -> None:
        recent = self.config.recent if recent is None else recent
        dropped = self._choose(slots, k=k, recent=recent, pool=pool)
        paged_drop(slots.kvs, slots.slots, slots.layers, slots.counts, slots.positions,
                   slots.hess, slots.mass, dropped)


@register
class Evict(_Dropping):
    """H2O/SnapKV style: drop the slots that drew the least attention since the last
    round (the same observation statistics KVSlimmer scores pairs with)."""

    name = "evict"

    def _choose(self, slots, *, k, recent, pool):
        mass = slots.mass[slots.layers[:, None], slots.slots]
        return lowest_mass_slots(mass, sink=self.config.sink, recent=recent, k=k,
                                 score_reduce=self.score_reduce, pool=pool)

    def run_round(
        self, slots: SlotData, *, k: int, round_index: int, rotary: RotarySpec | None,
        recent: int | None = None, pool: int = 1, max_fraction: float = 0.5,
    ) -> MergeResult:
        cfg = self.config
        return evict_lowest(
            slots.keys, slots.values, slots.counts, slots.positions, slots.hess, slots.mass,
            sink=cfg.sink, recent=cfg.recent if recent is None else recent, k=k,
            score_reduce=self.score_reduce, pool=pool,
        )


@register
class SnapKV(Evict):
    """SnapKV (Li et al., 2024): after the prompt, keep the slots the last ``window``
    prompt tokens (the question) attend to most, their attention max-pooled over
    ``pool`` neighbouring slots, and drop the rest. This is :class:`Evict` under
    prompt-end observation, which the config makes its default; every KV head of a layer
    keeps the same slots (scores summed over heads), as the paged layout needs."""

    name = "snapkv"


@register
class Streaming(_Dropping):
    """StreamingLLM: keep the sink slots and the most recent ones, drop the oldest rest."""

    name = "streaming"

    def _choose(self, slots, *, k, recent, pool):
        return oldest_slots(len(slots.layers), len(slots.slots), sink=self.config.sink,
                            recent=recent, k=k, device=slots.slots.device)

    def run_round(
        self, slots: SlotData, *, k: int, round_index: int, rotary: RotarySpec | None,
        recent: int | None = None, pool: int = 1, max_fraction: float = 0.5,
    ) -> MergeResult:
        cfg = self.config
        return evict_oldest(
            slots.keys, slots.values, slots.counts, slots.positions, slots.hess, slots.mass,
            sink=cfg.sink, recent=cfg.recent if recent is None else recent, k=k,
        )
