"""KVSlimmer (arXiv 2603.00907): Hessian-weighted key merge of the cheapest adjacent pairs."""

from __future__ import annotations

import torch

from kvslimmer_vllm.core.merge import MergeResult, slot_scores
from kvslimmer_vllm.core.rope import RotarySpec
from kvslimmer_vllm.kernels import (
    keep_set, merge_pairs, merge_rounds, paged_merge_round, paged_slot_scores, select_pairs,
    select_pairs_rows, value_spread,
)
from kvslimmer_vllm.methods.base import MergeMethod, PagedSlots, SlotData, register


def _kernels() -> dict:
    """The device's kernels for a round's pair choice, value spread and pair merge (looked
    up when called, so a benchmark may swap one)."""
    return dict(selector=select_pairs, row_selector=select_pairs_rows, spread=value_spread,
                pair_merge=merge_pairs)


@register
class KVSlimmer(MergeMethod):
    name = "kvslimmer"
    key_weights = "hessian"
    #: Whether some slots are kept out of every pair (``_protect`` gives them).
    protects = False

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
            key_weights=self.key_weights, score_reduce=self.score_reduce, **_kernels(),
        )

    #: In place on CPU: no gathered copy of the request, sub-rounds one after another.
    has_paged_round = True

    def run_paged_round(
        self, slots: PagedSlots, *, k: int, round_index: int, rotary: RotarySpec | None,
        recent: int | None = None, pool: int = 1, max_fraction: float = 0.5,
    ) -> None:
        cfg = self.config
        recent = cfg.recent if recent is None else recent
        protect = None
        if self.protects:
            scores = paged_slot_scores(slots.slots, slots.layers, slots.mass, sink=cfg.sink,
                                       recent=recent, pool=pool)
            protect = self._protect(scores, k, len(slots.slots), recent)
        paged_merge_round(
            slots.kvs, slots.slots, slots.layers, slots.counts, slots.positions, slots.hess,
            slots.mass, sink=cfg.sink, recent=recent, k=k, round_idx=round_index,
            gamma=cfg.gamma, eps=cfg.eps, rotary=rotary if cfg.rope_aware else None,
            key_weights=self.key_weights, pool=pool, max_fraction=max_fraction,
            protect=protect, score_reduce=self.score_reduce,
        )


@register
class SnapMerge(KVSlimmer):
    """Merge-on-select hybrid of SnapKV and KVSlimmer.

    The slots SnapKV would keep (the highest pooled observation mass) stay exact; the
    others -- what SnapKV would drop -- are merged with KVSlimmer's Hessian-weighted keys
    into as few slots as the budget needs, pairs never touching a kept slot, instead of
    being dropped. The keep set is the largest for which the rest can still free the
    round's ``k`` slots (:func:`~kvslimmer_vllm.core.merge.keep_set`). Prompt-end by
    default."""

    name = "snapmerge"
    protects = True

    def _protect(self, scores: torch.Tensor, k: int, n: int, recent: int) -> torch.Tensor:
        """``[L, n]`` bool: the slots SnapKV would keep by the region's ``[L, M]`` scores
        (:func:`~kvslimmer_vllm.core.merge.slot_scores` of this rank, summed over ranks
        here); :meth:`KVSlimmer.run_paged_round` runs each layer's sub-rounds around them."""
        if self.score_reduce is not None:
            scores = self.score_reduce(scores)
        sink = self.config.sink
        protect = torch.zeros(scores.shape[0], n, dtype=torch.bool, device=scores.device)
        protect[:, sink:n - recent] = keep_set(scores, k)
        return protect

    def run_round(
        self, slots: SlotData, *, k: int, round_index: int, rotary: RotarySpec | None,
        recent: int | None = None, pool: int = 1, max_fraction: float = 0.5,
    ) -> MergeResult:
        cfg = self.config
        recent = cfg.recent if recent is None else recent
        single = slots.mass.dim() == 2
        mass = slots.mass.unsqueeze(0) if single else slots.mass
        protect = self._protect(slot_scores(mass, sink=cfg.sink, recent=recent, pool=pool),
                                k, mass.shape[1], recent)
        return merge_rounds(
            slots.keys, slots.values, slots.counts, slots.positions, slots.hess, slots.mass,
            sink=cfg.sink, recent=recent, k=k, max_fraction=max_fraction,
            protect=protect.squeeze(0) if single else protect,
            pool=pool, round_idx=round_index, gamma=cfg.gamma, eps=cfg.eps,
            rotary=rotary if cfg.rope_aware else None, key_weights=self.key_weights,
            score_reduce=self.score_reduce, **_kernels(),
        )
