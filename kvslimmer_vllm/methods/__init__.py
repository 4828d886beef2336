"""KV compression methods, one small class each, registered by name.

A method decides *what* a round combines: given one request's slots of one layer it
returns the compacted slots (:class:`~kvslimmer_vllm.core.merge.MergeResult`). How pages
move, which blocks are freed and when rounds run is the engine's business.

Adding a method: subclass :class:`MergeMethod`, set ``name``, implement ``run_round``,
decorate with :func:`register`, import the module here, and add the name to
``kvslimmer_vllm.core.config.METHODS``.
"""

from kvslimmer_vllm.methods.base import MergeMethod, SlotData, get_method, register
from kvslimmer_vllm.methods.kvslimmer import KVSlimmer

__all__ = ["KVSlimmer", "MergeMethod", "SlotData", "get_method", "register"]
