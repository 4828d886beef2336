"""KVSlimmer (arXiv 2603.00907): Hessian-weighted key merge of the cheapest adjacent pairs."""

from __future__ import annotations

from kvslimmer_vllm.core.merge import MergeResult, merge_rounds
from kvslimmer_vllm.core.rope import RotarySpec
from kvslimmer_vllm.kernels import select_pairs
from kvslimmer_vllm.methods.base import MergeMethod, SlotData, register


@register
class KVSlimmer(MergeMethod):
    name = "kvslimmer"
    key_weights = "hessian"

    def run_round(
        self, slots: SlotData, *, k: int, round_index: int, rotary: RotarySpec | None,
        recent: int | None = None, pool: int = 1, max_fraction: float = 0.5,
    ) -> MergeResult:
        cfg = self.config
        return merge_rounds(
            slots.keys, slots.values, slots.counts, slots.positions, slots.hess, slots.mass,
            sink=cfg.sink, recent=cfg.recent if recent is None else recent, k=k,
            max_fraction=max_fraction, pool=pool, round_idx=round_index,
            gamma=cfg.gamma, eps=cfg.eps, rotary=rotary if cfg.rope_aware else None,
            key_weights=self.key_weights, selector=select_pairs,
            score_reduce=self.score_reduce,
        )
