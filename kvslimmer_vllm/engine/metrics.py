"""KV-merge metrics on vLLM's ``/metrics``.

Merge rounds are planned in the EngineCore process and carried out in the worker
processes, while ``/metrics`` is served by the API-server process. The processes share
one small memory-mapped file of float64 slots (its path travels in
``additional_config``); each slot has exactly one writing process, so no locking is
needed. A Prometheus collector in the API-server process reads the file at scrape time.
With data parallelism the file holds one block of slots per engine (DP rank), and every
metric carries vLLM's ``engine`` label.
"""

from __future__ import annotations

import atexit
import mmap
import os
import tempfile
from bisect import bisect_left
from dataclasses import dataclass, field

from kvslimmer_vllm.engine.settings import METRICS_KEY

#: Upper bounds of the per-request physical/logical KV ratio histogram.
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: Upper bounds (seconds) of the merge-time-per-step histogram.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Layout:
    """Slot offsets in the shared file."""

    ROUNDS, TOKENS_MERGED, BLOCKS_FREED, PHYSICAL, LOGICAL, UPDATED = range(6)
    RATIO_COUNT, RATIO_SUM = 6, 7
    RATIO_BUCKETS_AT = 8  # cumulative counts, one per bound of RATIO_BUCKETS
    LAT_COUNT = RATIO_BUCKETS_AT + len(RATIO_BUCKETS)
    LAT_SUM = LAT_COUNT + 1
    LAT_BUCKETS_AT = LAT_SUM + 1
    EXECUTE_SECONDS = LAT_BUCKETS_AT + len(LATENCY_BUCKETS)
    SIZE = EXECUTE_SECONDS + 1


class SharedSlots:
    """float64 slots in a memory-mapped file shared by vLLM's processes: one block of
    ``_Layout.SIZE`` slots per engine; ``values`` is engine ``engine``'s block."""

    def __init__(self, path: str, engine: int = 0) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.num_engines = size // (_Layout.SIZE * 8)
        if not 0 <= engine < self.num_engines:
            raise ValueError(f"engine {engine} outside the {self.num_engines} engines of {path}")
        self._all = memoryview(self._map).cast("d")
        self.values = self.engine_values(engine)

    def engine_values(self, engine: int) -> memoryview:
        return self._all[engine * _Layout.SIZE:(engine + 1) * _Layout.SIZE]

    @classmethod
    def create(cls, num_engines: int = 1) -> SharedSlots:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="kvslimmer-metrics-", dir=base)
        os.ftruncate(fd, _Layout.SIZE * 8 * max(1, num_engines))
        os.close(fd)
        atexit.register(_unlink_quietly, path)
        return cls(path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _observe(values, count_at: int, sum_at: int, buckets_at: int, bounds, x: float):
    values[count_at] += 1
    values[sum_at] += x
    for i in range(bisect_left(bounds, x), len(bounds)):
        values[buckets_at + i] += 1


@dataclass
class Totals:
    """Scheduler-side running totals (plain numbers, published every step)."""

    rounds: int = 0
    tokens_merged: int = 0
    blocks_freed: int = 0
    finished_ratios: list[float] = field(default_factory=list)

    def record_round(self, num_merged: int, num_blocks_freed: int) -> None:
        self.rounds += 1
        self.tokens_merged += num_merged
        self.blocks_freed += num_blocks_freed

    def record_finished_request(self, ratio: float) -> None:
        self.finished_ratios.append(ratio)


class _Writer:
    def __init__(self, slots: SharedSlots) -> None:
        self.values = slots.values

    @classmethod
    def attach(cls, vllm_config):
        """A writer on this engine's slots (its data-parallel index) of the file named in
        the config, or None if metrics are off."""
        path = (vllm_config.additional_config or {}).get(METRICS_KEY)
        if not path or not os.path.exists(path):
            return None
        engine = getattr(vllm_config.parallel_config, "data_parallel_index", 0) or 0
        return cls(SharedSlots(path, engine))


class SchedulerMetricsWriter(_Writer):
    """Writes the scheduler's slots (EngineCore process)."""

    def publish(self, totals: Totals, physical: int, logical: int, now: float) -> None:
        v, L = self.values, _Layout
        v[L.ROUNDS] = totals.rounds
        v[L.TOKENS_MERGED] = totals.tokens_merged
        v[L.BLOCKS_FREED] = totals.blocks_freed
        v[L.PHYSICAL] = physical
        v[L.LOGICAL] = logical
        for ratio in totals.finished_ratios:
            _observe(v, L.RATIO_COUNT, L.RATIO_SUM, L.RATIO_BUCKETS_AT, RATIO_BUCKETS, ratio)
        totals.finished_ratios.clear()
        v[L.UPDATED] = now


class WorkerMetricsWriter(_Writer):
    """Writes the worker's slots (rank 0 of the worker processes)."""

    def record_step(self, merge_seconds: float | None, execute_seconds: float) -> None:
        v, L = self.values, _Layout
        if merge_seconds is not None:
            _observe(v, L.LAT_COUNT, L.LAT_SUM, L.LAT_BUCKETS_AT, LATENCY_BUCKETS, merge_seconds)
        v[L.EXECUTE_SECONDS] += execute_seconds


class KVMergeCollector:
    """Prometheus collector reading the shared slots at scrape time (API server)."""

    def __init__(self, slots: SharedSlots, model_name: str) -> None:
        self.slots = slots
        self.model_name = model_name

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        L, labels = _Layout, ["model_name", "engine"]
        engines = [(self.slots.engine_values(e), [self.model_name, str(e)])
                   for e in range(self.slots.num_engines)]

        def counter(name, doc, at):
            m = CounterMetricFamily(name, doc, labels=labels)
            for v, lv in engines:
                m.add_metric(lv, v[at])
            return m

        def gauge(name, doc, value_of):
            m = GaugeMetricFamily(name, doc, labels=labels)
            for v, lv in engines:
                m.add_metric(lv, value_of(v))
            return m

        def histogram(name, doc, bounds, count_at, sum_at, buckets_at):
            m = HistogramMetricFamily(name, doc, labels=labels)
            for v, lv in engines:
                buckets = [(str(b), v[buckets_at + i]) for i, b in enumerate(bounds)]
                buckets.append(("+Inf", v[count_at]))
                m.add_metric(lv, buckets, v[sum_at])
            return m

        yield counter("vllm:kv_merge_rounds", "KV merge rounds carried out.", L.ROUNDS)
        yield counter(
            "vllm:kv_merge_tokens_merged",
            "KV slots removed by merging adjacent pairs.",
            L.TOKENS_MERGED,
        )
        yield counter(
            "vllm:kv_merge_blocks_freed",
            "KV blocks handed back to the block pool by merge rounds.",
            L.BLOCKS_FREED,
        )
        yield gauge(
            "vllm:kv_merge_physical_tokens",
            "KV slots held by running requests.",
            lambda v: v[L.PHYSICAL],
        )
        yield gauge(
            "vllm:kv_merge_logical_tokens",
            "Tokens that running requests have processed.",
            lambda v: v[L.LOGICAL],
        )
        yield gauge(
            "vllm:kv_merge_physical_logical_ratio",
            "KV slots held per processed token, over running requests (1 = no savings).",
            lambda v: v[L.PHYSICAL] / v[L.LOGICAL] if v[L.LOGICAL] else 1.0,
        )
        yield histogram(
            "vllm:kv_merge_request_kv_ratio",
            "Physical/logical KV ratio of each finished request.",
            RATIO_BUCKETS, L.RATIO_COUNT, L.RATIO_SUM, L.RATIO_BUCKETS_AT,
        )
        yield histogram(
            "vllm:kv_merge_step_seconds",
            "Worker time spent applying one step's merge rounds.",
            LATENCY_BUCKETS, L.LAT_COUNT, L.LAT_SUM, L.LAT_BUCKETS_AT,
        )
        yield counter(
            "vllm:kv_merge_model_execute_seconds",
            "Worker time spent in execute_model (merge rounds included).",
            L.EXECUTE_SECONDS,
        )


_collector: KVMergeCollector | None = None


#: How the process that starts the engines hands the metrics file to the API server
#: processes it spawns (``--api-server-count`` > 1).
FILE_ENV = "KVSLIMMER_METRICS_FILE"


def setup_frontend_metrics(additional_config: dict, model_name: str,
                           num_engines: int = 1, *, inherit: bool = False,
                           hand_over: bool = False) -> None:
    """Create the shared slots (one block per engine), or, in an API server process that
    ``vllm serve --api-server-count N`` spawned (``inherit``), open the ones its parent
    created (``hand_over``: put their path where the API servers it spawns find it), and
    expose them on this process's Prometheus registry."""
    global _collector
    from prometheus_client import REGISTRY

    inherited = os.environ.get(FILE_ENV) if inherit else None
    if inherited and os.path.exists(inherited):
        slots = SharedSlots(inherited)
    else:
        slots = SharedSlots.create(num_engines)
        if hand_over:
            os.environ[FILE_ENV] = slots.path
    additional_config[METRICS_KEY] = slots.path
    if _collector is not None:
        REGISTRY.unregister(_collector)
    _collector = KVMergeCollector(slots, model_name)
    REGISTRY.register(_collector)


def include_in_multiprocess_scrapes() -> None:
    """With several API servers, vLLM sets ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics``
    answers from a registry holding only prometheus_client's ``MultiProcessCollector``
    (built per scrape by prometheus-fastapi-instrumentator), never from the process
    registry this module's collector is on: chain the collector's samples after that
    collector's. Without multiprocess mode nothing changes."""
    from prometheus_client import multiprocess

    cls = multiprocess.MultiProcessCollector
    if getattr(cls.collect, "_kv_merge", False):
        return
    original = cls.collect

    def collect(self):
        yield from original(self)
        if _collector is not None:
            yield from _collector.collect()

    collect._kv_merge = True
    cls.collect = collect
