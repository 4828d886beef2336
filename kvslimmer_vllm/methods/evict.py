"""Eviction baselines: drop slots instead of merging them."""

from __future__ import annotations

from kvslimmer_vllm.core.merge import MergeResult, evict_lowest, evict_oldest
from kvslimmer_vllm.core.rope import RotarySpec
from kvslimmer_vllm.methods.base import MergeMethod, SlotData, register


@register
class Evict(MergeMethod):
    """H2O/SnapKV style: drop the slots that drew the least attention since the last
    round (the same observation statistics KVSlimmer scores pairs with)."""

    name = "evict"

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
class Streaming(MergeMethod):
    """StreamingLLM: keep the sink slots and the most recent ones, drop the oldest rest."""

    name = "streaming"

    def run_round(
        self, slots: SlotData, *, k: int, round_index: int, rotary: RotarySpec | None,
        recent: int | None = None, pool: int = 1, max_fraction: float = 0.5,
    ) -> MergeResult:
        cfg = self.config
        return evict_oldest(
            slots.keys, slots.values, slots.counts, slots.positions, slots.hess, slots.mass,
            sink=cfg.sink, recent=cfg.recent if recent is None else recent, k=k,
        )
