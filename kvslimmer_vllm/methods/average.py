"""Ablation of KVSlimmer: the same pairs, merged with count weights instead of Hessian ones."""

from __future__ import annotations

from kvslimmer_vllm.methods.base import register
from kvslimmer_vllm.methods.kvslimmer import KVSlimmer


@register
class Average(KVSlimmer):
    """Key and value of a merged pair are the count-weighted means of the pair's."""

    name = "average"
    key_weights = "count"
