"""The interface every KV compression method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Callable
from typing import ClassVar

import torch

from kvslimmer_vllm.core.config import KVMergeConfig
from kvslimmer_vllm.core.merge import MergeResult
from kvslimmer_vllm.core.rope import RotarySpec
from kvslimmer_vllm.kernels import paged_round_backend_name


@dataclass
class SlotData:
    """One request's slots, slot-major (see :mod:`kvslimmer_vllm.core`): of one layer as
    below, or of ``L`` layers with a leading ``L`` on every tensor (the engine's case)."""

    keys: torch.Tensor  # [N, Hkv, D] post-RoPE
    values: torch.Tensor  # [N, Hkv, D]
    counts: torch.Tensor  # [N]
    positions: torch.Tensor  # [N] int64
    hess: torch.Tensor  # [N, Hkv], NaN = none yet
    mass: torch.Tensor  # [N, Hkv] observation mass since the last round


@dataclass
class PagedSlots:
    """One request's slots where they live (the engine's layout): ``L`` layer caches
    ``kvs`` (``[S, Hkv, 2D]`` each), the request's ``[N]`` slot ids ``slots``, and the
    slots' state: rows ``layers`` (``[L]`` int64) of ``counts`` / ``positions``
    ``[Ltot, S]`` and ``hess`` / ``mass`` ``[Ltot, S, Hkv]``."""

    kvs: list[torch.Tensor]
    slots: torch.Tensor
    layers: torch.Tensor
    counts: torch.Tensor
    positions: torch.Tensor
    hess: torch.Tensor
    mass: torch.Tensor


class MergeMethod(ABC):
    """Frees ``k`` slots of one request per round, in each layer independently.

    The engine passes all layers that share a RoPE at once (``[L, N, ...]`` slot data);
    the ``core`` functions take such a leading layer dimension, so a method that calls
    them needs nothing more. The inputs' keys and values may live in a reused buffer:
    a method must not keep them past the round."""

    name: ClassVar[str]

    def __init__(self, config: KVMergeConfig) -> None:
        self.config = config
        #: Set by the engine under tensor parallelism: sums a rank's selection scores
        #: (sums over its KV heads) over all ranks, so every rank selects the same slots.
        self.score_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    @abstractmethod
    def run_round(
        self, slots: SlotData, *, k: int, round_index: int, rotary: RotarySpec | None,
        recent: int | None = None, pool: int = 1, max_fraction: float = 0.5,
    ) -> MergeResult:
        """Return the request's ``N - k`` slots after the round (``[L, N - k, ...]`` for
        ``L`` layers).

        ``recent`` newest slots are left alone (None: the config's); scores use the mass
        max-pooled over ``pool`` slots; a pairwise method frees at most ``max_fraction``
        of the mergeable slots per sub-round (the engine's policy decides all three per
        round)."""

    #: Whether :meth:`run_paged_round` is implemented (on caches the in-place kernels take).
    has_paged_round: ClassVar[bool] = False

    def round_path(self, kv: torch.Tensor) -> str:
        """How this method's rounds run on caches like ``kv``: ``"in place"``
        (:meth:`run_paged_round`: the method has one and the caches have the kernels, C++
        on CPU), ``"staged"`` (:meth:`run_paged_round` too, the moved rows staged in one
        copy: eviction on CUDA), or ``"gathered"`` (the engine gathers the slots and calls
        :meth:`run_round`). Decides the memory the worker reserves for rounds
        (``engine.memory.ROW_COPIES``)."""
        if self.has_paged_round and paged_round_backend_name(kv) == "cpp":
            return "in place"
        return "gathered"

    def run_paged_round(
        self, slots: PagedSlots, *, k: int, round_index: int, rotary: RotarySpec | None,
        recent: int | None = None, pool: int = 1, max_fraction: float = 0.5,
    ) -> None:
        """Run the round in place where the slots live (called only when
        :meth:`round_path` is not ``"gathered"`` for the caches). The result must be what
        :meth:`run_round` followed by the engine's write-back would leave."""
        raise NotImplementedError(f"{self.name} has no in-place round")


_REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    _REGISTRY[cls.name] = cls
    return cls


def get_method(config: KVMergeConfig) -> MergeMethod:
    try:
        return _REGISTRY[config.method](config)
    except KeyError:
        raise ValueError(
            f"no KV merge method '{config.method}' (known: {sorted(_REGISTRY)})"
        ) from None
