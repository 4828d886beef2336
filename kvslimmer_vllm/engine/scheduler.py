"""Scheduler side of paged KV merging (runs in vLLM's EngineCore process).

vLLM counts a request's KV slots as ``num_computed_tokens``. With merging the request
holds fewer *physical* slots than it has *logical* tokens; :class:`MergeBook` keeps the
difference per request. The KV cache manager is switched to
:class:`MergingKVCacheManager`, which

* plans a merge round when a request about to be scheduled holds more than
  ``budget + interval`` slots, and hands the blocks past the post-round length back to
  the block pool at once (the worker compacts the request before this step's forward
  pass writes any KV, so a block reused by another request in the same step is only
  written after the data was moved out of it);
* sizes allocations and the admission check by physical slots;
* forgets a request's merge state when its blocks are freed (finish, abort,
  preemption). A preempted request is recomputed from scratch; it keeps the logical
  lengths its rounds ran at, and its recompute runs its rounds at exactly those lengths
  (prefill chunks end there), so it reaches the same merged cache and greedy output as
  without preemption.

:class:`KVMergeScheduler` caps prefill chunks so a request never holds more than
``budget + interval + prefill_chunk`` slots, and attaches the step's
:class:`~kvslimmer_vllm.engine.plan.StepPlan` to the ``SchedulerOutput``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from kvslimmer_vllm.core.config import KVMergeConfig
from kvslimmer_vllm.engine import metrics
from kvslimmer_vllm.engine.plan import PLAN_ATTR, MergeRound, ObserveFrom, StepPlan
from kvslimmer_vllm.engine.profiling import make_profile
from kvslimmer_vllm.engine.requests import (
    RequestSettings,
    RequestSettingsError,
    request_settings,
)
from kvslimmer_vllm.engine.settings import merge_config_from_vllm

logger = logging.getLogger("vllm.kvslimmer.scheduler")


@dataclass
class RequestMergeState:
    num_merged: int = 0  # logical tokens minus physical slots
    rounds: int = 0


class MergeBook:
    """Per-request merge bookkeeping and the rounds planned during one step."""

    def __init__(self, config: KVMergeConfig, block_size: int) -> None:
        self.config = config
        self.block_size = block_size
        self.states: dict[str, RequestMergeState] = {}
        self.settings: dict[str, RequestSettings] = {}
        # Kept across preemptions: the logical lengths at which each request's rounds
        # ran, and the longest length it had computed when preempted.
        self.round_points: dict[str, list[int]] = {}
        self.replay_until: dict[str, int] = {}
        self.pending: list[MergeRound] = []
        self.pending_observe: list[ObserveFrom] = []
        self.totals = metrics.Totals()

    def settings_of(self, request: Request) -> RequestSettings:
        """The request's own settings (``vllm_xargs``), validated by the API server."""
        settings = self.settings.get(request.request_id)
        if settings is None:
            params = getattr(request, "sampling_params", None)
            try:
                settings = request_settings(getattr(params, "extra_args", None), self.config)
            except RequestSettingsError as exc:  # only reachable bypassing the frontend
                logger.warning("kv-merge: request %s: %s; using the server's settings",
                               request.request_id, exc)
                settings = request_settings(None, self.config)
            self.settings[request.request_id] = settings
        return settings

    def num_merged(self, req_id: str) -> int:
        state = self.states.get(req_id)
        return state.num_merged if state else 0

    def physical(self, request: Request) -> int:
        return request.num_computed_tokens - self.num_merged(request.request_id)

    def _replay_point(self, request: Request, ahead: int = 0) -> int | None:
        """While a recomputed request replays its earlier rounds: the logical length of
        its next round (``ahead`` rounds further); None once past them."""
        points = self.round_points.get(request.request_id)
        if not points:
            return None
        state = self.states.get(request.request_id)
        index = (state.rounds if state else 0) + ahead
        return points[index] if index < len(points) else None

    # ------------------------------------------------------------------ policy
    # When a round is due, what it observes and how far it compresses, for both observe
    # modes. Progressive: a round whenever a request holds more than budget + interval
    # slots, prefill chunks capped so it never holds more than budget + interval + chunk.
    # Prompt-end: the prompt is prefilled without rounds (or with progressive rounds under
    # the prefill budget), its last `window` tokens as a chunk of their own whose queries
    # alone are observed (the mass is reset as it starts); at the prompt's end one step
    # brings the request to its budget, leaving the window alone; decoding then runs the
    # usual rounds.

    def _prompt_end(self, request: Request) -> int:
        """Where a prompt-end request's step runs: after its prompt, or before the
        continuation it asked to be computed after the step (``kv_merge_continuation``)."""
        return max(0, request.num_prompt_tokens - self.settings_of(request).continuation)

    def _in_prompt(self, request: Request) -> bool:
        return request.num_computed_tokens < self._prompt_end(request)

    def _target(self, request: Request) -> int | None:
        """Slots a round due now brings the request to; None when no round is due."""
        settings = self.settings_of(request)
        if not settings.enabled:
            return None
        n = self.physical(request)
        point = self._replay_point(request)
        if point is not None:
            due = request.num_computed_tokens == point
        elif request.num_computed_tokens < self.replay_until.get(request.request_id, 0):
            return None  # no round ran there before the preemption
        elif not settings.prompt_end:
            due = n > settings.budget + self.config.interval
        elif self._in_prompt(request):
            target = self.config.prefill_target
            return target if target is not None and n > target + self.config.interval else None
        elif request.num_computed_tokens == self._prompt_end(request):
            due = n > settings.budget  # the prompt-end step
        else:
            due = n > settings.budget + self.config.interval
        if not due:
            return None
        if settings.prompt_end and self._in_prompt(request):
            return self.config.prefill_target  # a replayed prefill round
        return settings.budget

    def round_due(self, request: Request) -> bool:
        return self._target(request) is not None

    def observe_starts(self, request: Request) -> bool:
        """Whether the chunk scheduled now opens a prompt-end request's window."""
        settings = self.settings_of(request)
        start = self._prompt_end(request) - self.config.window
        return settings.prompt_end and start > 0 and request.num_computed_tokens == start

    def observes(self, request: Request) -> bool:
        """Whether the queries just scheduled for the request (``num_computed_tokens``
        already counts them) add to its observation mass: not when it does not merge,
        nor for a prompt-end prompt's chunks before its window (the mass is reset where
        the window starts, and no round reads it before, unless prefill rounds under a
        prefill budget do)."""
        settings = self.settings_of(request)
        if not settings.enabled:
            return False
        if not settings.prompt_end or self.config.prefill_target is not None:
            return True
        return request.num_computed_tokens > self._prompt_end(request) - self.config.window

    def peak_slots(self, request: Request) -> int:
        """Most slots the request will hold: budget + interval + prefill chunk, and with
        prompt-end observation the whole prompt (or the prefill budget) before its step."""
        settings = self.settings_of(request)
        if not settings.enabled:
            return request.num_tokens
        cfg = self.config
        peak = settings.budget + cfg.interval + cfg.prefill_chunk
        if settings.prompt_end:
            peak = max(peak, cfg.prefill_budget or self._prompt_end(request))
        return min(request.num_tokens, peak)

    def max_chunk(self, request: Request) -> int:
        """Largest chunk that keeps the request within its peak (counting the round that
        is due before the chunk is appended); a prompt-end prompt stops where its window
        starts, so the window's queries are observed alone."""
        settings = self.settings_of(request)
        if not settings.enabled:
            return 1 << 62
        cfg = self.config
        target = self._target(request)
        slots = target if target is not None else self.physical(request)
        computed = request.num_computed_tokens
        if settings.prompt_end and self._in_prompt(request):
            cap = (cfg.prefill_budget - slots) if cfg.prefill_budget else 1 << 62
            end = self._prompt_end(request)
            window = end - cfg.window
            stop = window if computed < window else end
            cap = min(cap, stop - computed)
        else:
            cap = settings.budget + cfg.interval + cfg.prefill_chunk - slots
        # A recomputed request stops its chunks where its rounds ran, and where it was
        # preempted, so that its rounds run at the same lengths as before.
        point = self._replay_point(request, ahead=1 if target is not None else 0)
        if point is None:
            point = self.replay_until.get(request.request_id)
        if point is not None and point > computed:
            cap = min(cap, point - computed)
        return cap

    def plan_round(self, request: Request, block_ids: list[int]) -> MergeRound | None:
        cfg = self.config
        target = self._target(request)
        if target is None:
            return None
        n = self.physical(request)
        settings = self.settings_of(request)
        prompt_end = settings.prompt_end and not self._in_prompt(request)
        recent = cfg.window if prompt_end else cfg.recent
        k = n - target
        mergeable = n - cfg.sink - recent
        if k >= mergeable:
            # The chunk caps make this impossible; never crash the server over it.
            logger.warning(
                "kv-merge: request %s holds %d slots, more than a round can free "
                "(%d mergeable); freeing %d instead of %d",
                request.request_id, n, mergeable, mergeable - 1, k,
            )
            k = mergeable - 1
        if k <= 0:
            return None
        observe = "prompt-end" if prompt_end else "progressive"
        state = self.states.setdefault(request.request_id, RequestMergeState())
        points = self.round_points.setdefault(request.request_id, [])
        if state.rounds == len(points):  # a new round, not a replayed one
            points.append(request.num_computed_tokens)
        state.rounds += 1
        state.num_merged += k
        plan = MergeRound(
            req_id=request.request_id,
            block_ids=tuple(block_ids),
            num_slots=n,
            num_merge=k,
            round_index=state.rounds,
            method=settings.method,
            recent=recent,
            pool=cfg.pool_of(observe),
            max_fraction=cfg.merge_fraction_of(observe),
        )
        self.pending.append(plan)
        return plan

    def plan_observe(self, request: Request, block_ids: list[int]) -> None:
        """The request's window starts in this step: its mass is reset first."""
        self.pending_observe.append(
            ObserveFrom(request.request_id, tuple(block_ids), self.physical(request))
        )

    def summary(self, request: Request) -> dict | None:
        """What merging did to a request (None before it computed anything)."""
        tokens = request.num_computed_tokens
        if tokens <= 0:
            return None
        state = self.states.get(request.request_id, RequestMergeState())
        settings = self.settings.get(request.request_id)
        return {
            "method": settings.method if settings and settings.enabled else "none",
            "observe": settings.observe if settings and settings.enabled else None,
            "merged_tokens": state.num_merged,
            "rounds": state.rounds,
            "kv_slots": tokens - state.num_merged,
            "tokens": tokens,
            "kv_ratio": round((tokens - state.num_merged) / tokens, 4),
            "preemptions": getattr(request, "num_preemptions", 0),
        }

    def forget(self, request: Request) -> None:
        """The request's blocks are being freed: finished, aborted or preempted."""
        rid = request.request_id
        finished = request.is_finished()
        if finished:
            self.settings.pop(rid, None)
            self.round_points.pop(rid, None)
            self.replay_until.pop(rid, None)
        elif request.num_computed_tokens > 0:  # preempted
            self.replay_until[rid] = max(self.replay_until.get(rid, 0),
                                         request.num_computed_tokens)
        state = self.states.pop(rid, None)
        if state is None or request.num_computed_tokens <= 0:
            return
        if finished:
            ratio = 1.0 - state.num_merged / request.num_computed_tokens
            self.totals.record_finished_request(ratio)
            logger.info(
                "kv-merge: request %s finished with %d of %d tokens merged away "
                "(physical/logical KV %.3f, %d rounds)",
                request.request_id, state.num_merged, request.num_computed_tokens,
                ratio, state.rounds,
            )

    def take_plan(self, scheduled: dict[str, int], dropped: set[str],
                  requests: dict[str, Request]) -> StepPlan:
        """The step's plan, once vLLM has scheduled it (``requests``: every request by
        id, their ``num_computed_tokens`` counting this step's tokens)."""
        rounds = [r for r in self.pending if r.req_id not in dropped]
        observe = [o for o in self.pending_observe
                   if o.req_id in scheduled and o.req_id not in dropped]
        self.pending, self.pending_observe = [], []
        num_merged = {
            rid: self.states[rid].num_merged
            for rid in scheduled
            if rid in self.states and self.states[rid].num_merged
        }
        unobserved = frozenset(
            rid for rid in scheduled
            if rid not in dropped and rid in requests and not self.observes(requests[rid])
        )
        return StepPlan(rounds=rounds, num_merged=num_merged, observe=observe,
                        unobserved=unobserved)


class MergingKVCacheManager(KVCacheManager):
    """vLLM's KV cache manager, sized by physical slots and able to free a merged tail.

    Installed on an existing manager by :func:`install_merging_manager` (class switch),
    so vLLM builds the manager exactly as it always does.
    """

    book: MergeBook

    # -------------------------------------------------------------- vLLM overrides
    def allocate_slots(self, request: Request, num_new_tokens: int, *args, **kwargs):
        book = self.book
        if book.round_due(request):
            self._run_round(request)
        if kwargs.get("full_sequence_must_fit"):
            # Admission: a merging request never holds more than max_physical_slots.
            kwargs["full_sequence_must_fit"] = False
            if not self._peak_fits(request, kwargs):
                return None
        merged = book.num_merged(request.request_id)
        # Let vLLM size the request by its physical slots.
        request.num_computed_tokens -= merged
        try:
            blocks = super().allocate_slots(request, num_new_tokens, *args, **kwargs)
        finally:
            request.num_computed_tokens += merged
        if blocks is not None and book.observe_starts(request):
            book.plan_observe(request, [b.block_id for b in self._blocks(request.request_id)])
        return blocks

    def free(self, request: Request) -> None:
        self.book.forget(request)
        super().free(request)

    def pop_blocks_for_free(self, request: Request):
        self.book.forget(request)
        return super().pop_blocks_for_free(request)

    # ------------------------------------------------------------------ internals
    def _blocks(self, request_id: str) -> list:
        return self.coordinator.single_type_managers[0].req_to_blocks[request_id]

    def _run_round(self, request: Request) -> None:
        blocks = self._blocks(request.request_id)
        plan = self.book.plan_round(request, [b.block_id for b in blocks])
        if plan is None:
            return
        keep = cdiv(plan.num_slots_after, self.book.block_size)
        tail = blocks[keep:]
        del blocks[keep:]
        if tail:
            self.block_pool.free_blocks(reversed(tail))
        self.book.totals.record_round(plan.num_merge, len(tail))
        logger.debug(
            "kv-merge: request %s round %d merges %d of %d slots, frees %d blocks",
            request.request_id, plan.round_index, plan.num_merge, plan.num_slots,
            len(tail),
        )

    def _peak_fits(self, request: Request, kwargs: dict) -> bool:
        peak = self.book.peak_slots(request)
        held = len(self.coordinator.single_type_managers[0].req_to_blocks.get(
            request.request_id, ()))
        need = cdiv(peak, self.book.block_size) - held
        watermark = 0
        if kwargs.get("has_scheduled_reqs", True) and request.status in (
            RequestStatus.WAITING, RequestStatus.PREEMPTED,
        ):
            watermark = self.watermark_blocks
        free = self.block_pool.get_num_free_blocks() - kwargs.get("reserved_blocks", 0)
        return need + watermark <= free


def install_merging_manager(manager: KVCacheManager, book: MergeBook) -> None:
    if type(manager) is not KVCacheManager:
        raise RuntimeError(
            f"kv-merge expects vLLM's KVCacheManager, found {type(manager).__name__}; "
            "this vLLM version is not supported"
        )
    if len(manager.coordinator.single_type_managers) != 1:
        raise RuntimeError("kv-merge needs exactly one KV cache group")
    manager.__class__ = MergingKVCacheManager
    manager.book = book


class KVMergeScheduler(Scheduler):
    """vLLM's scheduler with merge rounds, physical block accounting and chunk caps."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.kv_merge_config = merge_config_from_vllm(vllm_config)
        self.merge_book = MergeBook(self.kv_merge_config, self.block_size)
        install_merging_manager(self.kv_cache_manager, self.merge_book)
        self.merge_metrics = metrics.SchedulerMetricsWriter.attach(vllm_config)
        self.merge_profile = make_profile("scheduler")
        cfg = self.kv_merge_config
        logger.info(
            "kv-merge: %s with budget %d, sink %d, recent %d, interval %d, prefill "
            "chunk %d (at most %d KV slots per request)",
            cfg.method, cfg.budget, cfg.sink, cfg.recent, cfg.interval,
            cfg.prefill_chunk, cfg.max_physical_slots,
        )

    def _reserve_prefill_lookahead(
        self, request: Request, num_computed_tokens: int, num_new_tokens: int
    ) -> int:
        num_new_tokens = super()._reserve_prefill_lookahead(
            request, num_computed_tokens, num_new_tokens
        )
        return min(num_new_tokens, self.merge_book.max_chunk(request))

    def schedule(self, *args, **kwargs):
        started = time.perf_counter()
        output = super().schedule(*args, **kwargs)
        dropped = set(output.preempted_req_ids or ()) | set(output.finished_req_ids)
        plan = self.merge_book.take_plan(output.num_scheduled_tokens, dropped, self.requests)
        setattr(output, PLAN_ATTR, plan)
        self._publish_metrics()
        if self.merge_profile is not None:
            self.merge_profile.add("schedule", time.perf_counter() - started)
            self.merge_profile.step_done()
        return output

    def update_from_output(self, *args, **kwargs):
        if self.merge_profile is None:
            return super().update_from_output(*args, **kwargs)
        started = time.perf_counter()
        outputs = super().update_from_output(*args, **kwargs)
        self.merge_profile.add("update_from_output", time.perf_counter() - started)
        return outputs

    def _connector_finished(self, request: Request):
        # vLLM returns these parameters with the request's final output, as the
        # response's "kv_transfer_params" field; kv-merge rejects KV connectors, so the
        # field is otherwise empty. Clients that do not know it ignore it.
        delay_free, params = super()._connector_finished(request)
        summary = self.merge_book.summary(request)
        if summary is not None:
            params = {**(params or {}), "kv_merge": summary}
        return delay_free, params

    def _publish_metrics(self) -> None:
        if self.merge_metrics is None:
            return
        logical = physical = 0
        for request in self.running:
            logical += request.num_computed_tokens
            physical += self.merge_book.physical(request)
        self.merge_metrics.publish(self.merge_book.totals, physical, logical, time.time())
