"""What the scheduler tells the workers each step (plain data, pickled with the
``SchedulerOutput`` it rides on as the attribute ``kv_merge``)."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Attribute of ``SchedulerOutput`` that carries the :class:`StepPlan`.
PLAN_ATTR = "kv_merge"


@dataclass(frozen=True)
class MergeRound:
    """Free ``num_merge`` of one request's slots with ``method`` (merging disjoint pairs,
    or dropping slots), then compact them.

    ``block_ids`` are the request's KV blocks *before* the round; the scheduler has
    already returned the blocks past ``ceil((num_slots - num_merge) / block_size)`` to
    the pool, so the worker must compact before this step's forward pass writes KV.
    """

    req_id: str
    block_ids: tuple[int, ...]
    num_slots: int
    num_merge: int
    round_index: int
    method: str
    #: Newest slots the round leaves alone (None: the config's ``recent``), pooling width
    #: of the scores, and the largest share of the mergeable slots one pairwise sub-round
    #: merges (the scheduler's MergeBook decides all three).
    recent: int | None = None
    pool: int = 1
    max_fraction: float = 0.5

    @property
    def num_slots_after(self) -> int:
        return self.num_slots - self.num_merge


@dataclass(frozen=True)
class ObserveFrom:
    """Start observing a request anew: zero the observation mass of its first
    ``num_slots`` slots (in ``block_ids``) before this step's forward, so its next round
    is scored by this step's queries and later ones only (prompt-end observation)."""

    req_id: str
    block_ids: tuple[int, ...]
    num_slots: int


@dataclass
class StepPlan:
    """Merge rounds to run before this step's forward, observation windows that start
    in it, for every scheduled request that has merged, how many tokens it has merged
    away (logical minus physical length), and the scheduled requests whose queries this
    step no round will read the observation mass of (attention skips it for them)."""

    rounds: list[MergeRound] = field(default_factory=list)
    num_merged: dict[str, int] = field(default_factory=dict)
    observe: list[ObserveFrom] = field(default_factory=list)
    unobserved: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.rounds or self.num_merged or self.observe or self.unobserved)
