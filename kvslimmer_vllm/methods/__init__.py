"""KV compression methods, one small class each, registered by name.

A method decides *what* a round keeps: given one request's slots (of one layer, or of
several layers stacked, each decided on its own) and the number ``k`` of slots to free,
it returns the request's ``N - k`` slots
(:class:`~kvslimmer_vllm.core.merge.MergeResult`). When rounds run, how pages move and
which blocks go back to the pool is the engine's business, shared by every method.

=============  ===========================================================================
``kvslimmer``  Hessian-weighted key merge of the cheapest adjacent pairs (the paper)
``average``    the same pairs, count-weighted means of keys and values (ablation)
``evict``      drop the least-attended slots since the last round (H2O/SnapKV style)
``streaming``  keep the sink and the most recent slots (StreamingLLM)
``snapkv``     drop the slots the question attends least, pooled (SnapKV; prompt-end)
``snapmerge``  keep what SnapKV keeps, merge (KVSlimmer) what it would drop (prompt-end)
=============  ===========================================================================

Adding a method: subclass :class:`MergeMethod` in a new module of this package, set
``name``, implement ``run_round`` on plain tensors (put the math in
:mod:`kvslimmer_vllm.core`, accepting an optional leading layer dimension), decorate the
class with :func:`register`, import the module below and add the name to
``kvslimmer_vllm.core.config.METHODS``. ``--kv-merge NAME`` and
the per-request ``kv_merge_method`` then accept it.
"""

from kvslimmer_vllm.methods.average import Average
from kvslimmer_vllm.methods.base import MergeMethod, SlotData, get_method, register
from kvslimmer_vllm.methods.evict import Evict, SnapKV, Streaming
from kvslimmer_vllm.methods.kvslimmer import KVSlimmer, SnapMerge

__all__ = [
    "Average", "Evict", "KVSlimmer", "MergeMethod", "SlotData", "SnapKV", "SnapMerge",
    "Streaming",
    "get_method", "register",
]
