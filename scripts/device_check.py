"""Device check for a bare CUDA machine: the core and kernel tests, then two benchmarks.

Run it through ``scripts/device_check.sh``. It needs only torch, triton, pytest, hypothesis,
pyyaml and numpy: no vLLM, no pydantic, no model weights, no network, no installed package
(the repository root is on ``PYTHONPATH``) and no compiled C++ op.

1. ``pytest tests/core tests/kernels -p no:cacheprovider`` in a child process; tests that
   need vLLM, pydantic or the C++ op skip themselves.
2. Paged attention: the Triton kernel with the ``log(count)`` bias (alone, and with the
   observation mass) against PyTorch SDPA over the same keys and values, gathered from
   the paged cache beforehand (not timed), with the bias and the causal limit as a float
   mask and the query heads of a KV head stacked as rows (no per-head K/V copy). Decode
   (one row per request) and a prefill chunk, 4K to 32K slots: median times, ratios,
   the largest output difference, and the mass total (every row spreads a mass of 1 per
   KV head).
3. Merge round as the engine runs it on a paged cache (gather every layer's slots,
   :func:`kvslimmer_vllm.core.merge.merge_rounds`, write back in place), 16K slots down
   to 8K and 2K, for one layer and for 32: with PyTorch ops and with the Triton round
   kernels (``triton_kernels/round.py``), side by side, their caches compared; the pair
   selection (on the host) is timed on its own as well. On CUDA each round's peak
   allocation (the allocator's statistics, plus the gathered copy) is checked against
   what the engine reserves for it (:mod:`kvslimmer_vllm.engine.memory`).
4. SnapMerge's gathered round (protected slots, sub-rounds sized per layer), 8K slots to
   2K over 32 layers with the Triton round kernels: every layer in lock step
   (:mod:`kvslimmer_vllm.kernels.lockstep`, what the engine runs) against one layer after
   another (the ``core.merge`` reference): times, host round trips (pair selections), the
   selection's own time, and whether both chose the same slots.
5. An eviction (the lowest-mass slots dropped) of the same request over 32 layers, as
   CUDA caches run it: compacted in place from a staged copy of the rows that move
   (``kernels.paged_drop``, the Triton ``compact_rows`` without a gathered copy) against
   the gathered path (every slot gathered, the survivors written back from that copy):
   times, equal caches, and each path's peak allocation against its reservation.

Without CUDA the same runs on CPU tensors with the Triton kernel under Triton's
interpreter (``TRITON_INTERPRET=1``) at small shapes: a smoke test, not a measurement.

Writes ``device_check.md`` to ``--out``. Exits 1 when a test fails, a check fails or a
round takes more memory than its reservation.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run directly rather than through device_check.sh
    sys.path.insert(0, str(ROOT))

from kvslimmer_vllm import kernels  # noqa: E402 - needs ROOT on sys.path
from kvslimmer_vllm.core.merge import (  # noqa: E402
    DEFAULT_EPS,
    DEFAULT_GAMMA,
    MergeResult,
    lowest_mass_slots,
    merge_rounds,
    slot_scores,
    subround_sizes,
)
from kvslimmer_vllm.core.merge import merge_pairs as merge_pairs_reference  # noqa: E402
from kvslimmer_vllm.core.paged import compact_rows as compact_rows_reference  # noqa: E402
from kvslimmer_vllm.core.paged import gather_rows as gather_rows_reference  # noqa: E402
from kvslimmer_vllm.core.paged import paged_drop, slot_ids  # noqa: E402
from kvslimmer_vllm.core.rope import (  # noqa: E402
    RotarySpec,
    build_cos_sin_cache,
    default_inv_freq,
)
from kvslimmer_vllm.core.stats import value_spread as value_spread_reference  # noqa: E402
from kvslimmer_vllm.engine.memory import footprint_per_slot, round_reserve_bytes  # noqa: E402

TEST_PATHS = ["tests/core", "tests/kernels"]
PYTEST_CHILD = "--pytest-child"
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
# Merge rounds: sink and recent slots as in benchmarks/merge_round.py, Llama-3's RoPE base,
# and the largest share of the mergeable slots one sub-round frees (merge_rounds' default).
SINK, RECENT, ROPE_THETA, MAX_FRACTION = 32, 128, 500000.0, 0.5
CPU_NOTICE = ("CPU smoke mode: no CUDA device, so the Triton kernel runs under Triton's "
              "interpreter (TRITON_INTERPRET=1) on small shapes; the times are not "
              "measurements.")


@dataclasses.dataclass(frozen=True)
class Profile:
    """Shapes, dtype, repetitions and tolerance of one kind of run."""

    q_heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    slots: tuple[int, ...]  # attention: slots per request
    decode_requests: int
    prefill_rows: int
    merge_slots: int
    merge_targets: tuple[int, ...]
    merge_layers: tuple[int, ...]
    attention_repeats: int
    merge_repeats: int
    tolerance: float  # largest accepted |Triton - SDPA| of an output element
    # SnapMerge's protected round: (layers, slots, to slots), timed runs. Its pair choices
    # run on the host, in Python where the C++ op is not loadable (~0.1 s per layer and
    # sub-round at 16K slots), hence its own, smaller case.
    protected_case: tuple[int, int, int] = (4, 1024, 256)
    protected_repeats: int = 1


# 8B-class (Llama-3-8B: 32 query and 8 KV heads of 128) on CUDA.
CUDA_PROFILE = Profile(
    q_heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16,
    slots=(4096, 8192, 16384, 32768), decode_requests=8, prefill_rows=512,
    merge_slots=16384, merge_targets=(8192, 2048), merge_layers=(1, 32),
    attention_repeats=15, merge_repeats=3, tolerance=1e-2, protected_case=(32, 8192, 2048),
)
# Small enough for the interpreter (seconds per call, not minutes).
CPU_PROFILE = Profile(
    q_heads=2, kv_heads=1, head_dim=64, block_size=16, dtype=torch.float32,
    slots=(256, 1024), decode_requests=2, prefill_rows=16,
    merge_slots=1024, merge_targets=(512, 256), merge_layers=(1, 4),
    attention_repeats=1, merge_repeats=1, tolerance=1e-4,
)
MASS_TOLERANCE = 1e-3  # relative error of the total mass
MERGE_MISMATCH_FRACTION = 1e-4  # of cache elements the two round kernel sets may disagree on


def say(message: str) -> None:
    """One progress line on stdout."""
    print(f"[device_check] {message}", flush=True)


# ---------------------------------------------------------------------------- imports


def expose_triton_kernels() -> None:
    """Make ``kvslimmer_vllm.triton_kernels`` importable from a plain checkout.

    setup.py installs the top-level ``triton_kernels/`` folder as that subpackage; without
    an installed package the folder is mapped the same way here (it must not go on
    ``sys.path`` itself: an unrelated ``triton_kernels`` distribution exists)."""
    name = "kvslimmer_vllm.triton_kernels"
    if importlib.util.find_spec(name) is not None:
        return
    folder = ROOT / "triton_kernels"
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    importlib.import_module("kvslimmer_vllm").triton_kernels = module


def load_triton_module(name: str, interpret: bool):
    """``kvslimmer_vllm.triton_kernels.<name>``; built for Triton's interpreter when
    ``interpret`` (``TRITON_INTERPRET`` must be set before Triton builds the kernels)."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    expose_triton_kernels()
    module = importlib.import_module(f"kvslimmer_vllm.triton_kernels.{name}")
    if module.is_interpreted() != interpret:
        raise RuntimeError("TRITON_INTERPRET=1 is set on a CUDA machine: unset it")
    return module


# ---------------------------------------------------------------------------- tests


def pytest_child(summary_path: str, pytest_args: list[str]) -> int:
    """Body of the test child process: pytest in-process, the outcome counts to a file."""
    expose_triton_kernels()
    import pytest

    class Summary:
        def pytest_terminal_summary(self, terminalreporter):
            stats = terminalreporter.stats
            counts = {key: len(stats[key]) for key in OUTCOMES if stats.get(key)}
            Path(summary_path).write_text(json.dumps(counts), encoding="utf-8")

    return int(pytest.main(pytest_args, plugins=[Summary()]))


def run_tests(timeout_s: float) -> dict:
    """Run the test child; returns its command, outcome counts, seconds and verdict."""
    pytest_args = [*TEST_PATHS, "-p", "no:cacheprovider"]
    # Not a plain `python3 -m pytest`: the child maps kvslimmer_vllm.triton_kernels first.
    command = f"pytest {' '.join(pytest_args)} (run by device_check.py)"
    say(f"tests: {command} (stopped after {timeout_s:.0f} s)")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        try:
            code = subprocess.run(
                [sys.executable, __file__, PYTEST_CHILD, str(summary), *pytest_args],
                cwd=ROOT, timeout=timeout_s, check=False).returncode
        except subprocess.TimeoutExpired:
            code = None
        counts = json.loads(summary.read_text()) if summary.exists() else {}
    seconds = time.perf_counter() - started
    ok = code == 0 and counts.get("passed", 0) > 0
    verdict = "timed out" if code is None else ("PASS" if ok else f"FAIL (pytest exit {code})")
    say(f"tests: {format_counts(counts)} in {seconds:.0f} s: {verdict}")
    return dict(command=command, counts=counts, seconds=seconds, ok=ok, verdict=verdict)


def format_counts(counts: dict) -> str:
    """``12 passed, 3 skipped`` (``no result`` when pytest reported nothing)."""
    return ", ".join(f"{counts[k]} {k}" for k in OUTCOMES if k in counts) or "no result"


# ---------------------------------------------------------------------------- timing


def median_ms_host(calls: dict, repeats: int, sync) -> dict:
    """Median wall time (ms) of each call over ``repeats`` runs, the calls interleaved;
    ``sync`` waits for the device. The caller's checks have run every call once (the
    warm-up)."""
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            sync()
            started = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def median_ms(calls: dict, repeats: int, cuda: bool) -> dict:
    """Median time (ms) per call: CUDA events over calibrated back-to-back calls
    (``benchmarks/gpu_attention.py``'s ``bench``) on CUDA, wall time on CPU."""
    if cuda:
        from benchmarks.gpu_attention import bench

        return bench(calls, repeats)
    return median_ms_host(calls, repeats, sync=lambda: None)


def synchronize(device: torch.device) -> None:
    """Wait for ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- attention


def attention_cases(p: Profile) -> list[tuple[str, int, int, int]]:
    """``(name, requests, query rows per request, slots per request)`` of every case."""
    cases = []
    for slots in p.slots:
        cases.append(("decode", p.decode_requests, 1, slots))
        cases.append(("prefill", 1, p.prefill_rows, slots))
    return cases


def build_paged_batch(p: Profile, num_reqs: int, rows: int, slots: int,
                      device: torch.device, seed: int) -> dict:
    """Random queries and a paged cache: every request holds ``slots`` slots in blocks
    scattered over the cache, each slot a random count of 1-4 tokens."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks = -(-slots // p.block_size)
    num_blocks = num_reqs * blocks
    kv = torch.randn(num_blocks * p.block_size, p.kv_heads, 2 * p.head_dim, device=device,
                     dtype=p.dtype, generator=gen)
    table = torch.randperm(num_blocks, device=device, generator=gen)
    return dict(
        query=torch.randn(num_reqs * rows, p.q_heads, p.head_dim, device=device,
                          dtype=p.dtype, generator=gen),
        kv=kv,
        counts=torch.randint(1, 5, (kv.shape[0],), device=device, generator=gen).float(),
        block_table=table.to(torch.int32).view(num_reqs, blocks),
        seq_lens=torch.full((num_reqs,), slots, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(0, num_reqs * rows + 1, rows, dtype=torch.int32,
                                     device=device),
    )


def sdpa_inputs(batch: dict, p: Profile, rows: int, slots: int):
    """The batch as dense SDPA inputs: ``q`` ``[R, Hkv, T*G, D]`` (the ``G`` query heads of
    a KV head stacked as rows, row ``t*G + g``), ``k`` and ``v`` ``[R, Hkv, N, D]`` gathered
    in block-table order, and the float mask ``[R, 1, T*G, N]``: ``log(count)`` where the
    row sees the slot (row ``t`` sees the first ``N - T + t + 1``), ``-inf`` elsewhere."""
    table = batch["block_table"].long()
    num_reqs, group, dim = table.shape[0], p.q_heads // p.kv_heads, p.head_dim
    offsets = torch.arange(p.block_size, device=table.device)
    slot = (table[:, :, None] * p.block_size + offsets).flatten(1)[:, :slots]  # [R, N]
    gathered = batch["kv"][slot].transpose(1, 2)  # [R, Hkv, N, 2D]
    keys, values = gathered[..., :dim].contiguous(), gathered[..., dim:].contiguous()
    q = (batch["query"].view(num_reqs, rows, p.kv_heads, group, dim)
         .permute(0, 2, 1, 3, 4).reshape(num_reqs, p.kv_heads, rows * group, dim))
    limit = slots - rows + 1 + torch.arange(rows, device=table.device)
    seen = torch.arange(slots, device=table.device)[None, :] < limit[:, None]  # [T, N]
    log_counts = batch["counts"][slot].log()[:, None, :]  # [R, 1, N]
    mask = torch.where(seen[None], log_counts, -math.inf).repeat_interleave(group, dim=1)
    return q.contiguous(), keys, values, mask[:, None].to(p.dtype)


def sdpa_output_rows(out: torch.Tensor, p: Profile, rows: int) -> torch.Tensor:
    """SDPA's ``[R, Hkv, T*G, D]`` output back in the kernel's ``[R*T, Hq, D]`` layout."""
    num_reqs, group = out.shape[0], p.q_heads // p.kv_heads
    return (out.view(num_reqs, p.kv_heads, rows, group, p.head_dim)
            .permute(0, 2, 1, 3, 4).reshape(num_reqs * rows, p.q_heads, p.head_dim))


def attention_row(kernel, p: Profile, case: tuple, device: torch.device, seed: int) -> dict:
    """Time one case (Triton, Triton with mass, SDPA) and check Triton against SDPA."""
    name, num_reqs, rows, slots = case
    batch = build_paged_batch(p, num_reqs, rows, slots, device, seed)
    q, keys, values, mask = sdpa_inputs(batch, p, rows, slots)
    scale = p.head_dim ** -0.5
    args = [batch[k] for k in ("query", "kv", "counts", "block_table", "seq_lens",
                               "query_start_loc")]
    out = torch.empty_like(batch["query"])
    mass = torch.zeros(batch["kv"].shape[:2], dtype=torch.float32, device=device)

    def triton(with_mass: bool = False):
        return kernel.paged_attention(*args, scale, p.block_size, mass if with_mass else None,
                                      out=out)

    def sdpa():
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)

    calls = {"triton": triton, "triton+mass": lambda: triton(True), "sdpa": sdpa}
    # Checks first, on fresh outputs: the timed calls keep adding mass.
    expected = sdpa_output_rows(calls["sdpa"](), p, rows).float()
    calls["triton+mass"]()
    synchronize(device)
    max_err = (out.float() - expected).abs().max().item()
    mass_err = (mass.sum(dim=0) / (num_reqs * rows) - 1).abs().max().item()
    times = median_ms(calls, p.attention_repeats, device.type == "cuda")
    ok = max_err <= p.tolerance and mass_err <= MASS_TOLERANCE
    return dict(case=name, requests=num_reqs, rows=rows, slots=slots, times=times,
                max_err=max_err, mass_err=mass_err, ok=ok)



# ---------------------------------------------------------------------------- merge round


class TimedSelector:
    """A pair selector that adds up the seconds spent in it (it runs on the host) and
    counts its calls (host round trips)."""

    def __init__(self, select):
        self.select, self.seconds, self.calls = select, 0.0, 0

    def __call__(self, *args):
        started = time.perf_counter()
        self.calls += 1
        try:
            return self.select(*args)
        finally:
            self.seconds += time.perf_counter() - started


@dataclasses.dataclass(frozen=True)
class RoundKernels:
    """The four steps of an engine round that move or transform cache data."""

    gather: Callable  # (caches, slots, out) -> out
    spread: Callable  # value_spread contract
    pair_merge: Callable  # core.merge.merge_pairs contract
    compact: Callable  # (caches, slots, source, start, merged_slots, keys, values, rows)


def torch_round_kernels() -> RoundKernels:
    """The PyTorch references, as a round runs on CUDA without the Triton kernels."""
    def compact(caches, slots, source, start, merged_slots, keys, values, rows):
        compact_rows_reference(caches, slots, source, start, merged_slots, keys, values)

    return RoundKernels(gather_rows_reference, value_spread_reference, merge_pairs_reference,
                        compact)


def triton_round_kernels(module) -> RoundKernels:
    """``triton_kernels/round.py`` (the module given: built for CUDA, or interpreted)."""
    def pair_merge(keys, values, left, a, c_i, c_j, rotary=None, delta=None):
        return module.merge_pairs(keys, values, left, a, c_i, c_j,
                                  *kernels.shift_table(rotary, delta, torch.float32))

    return RoundKernels(module.gather_rows, module.value_spread, pair_merge,
                        module.compact_rows)


def merge_state(p: Profile, layers: int, device: torch.device, seed: int) -> tuple:
    """One request's ``p.merge_slots`` slots in ``layers`` separate paged caches (blocks
    scattered over caches twice its size, as the engine holds them) and its slot state:
    ``(caches, slot ids, counts, positions, hess, mass)``, counts of 1-3 tokens."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n = p.merge_slots
    blocks = -(-n // p.block_size)
    order = torch.randperm(2 * blocks, device=device, generator=gen)[:blocks]
    slots = slot_ids(order, n, p.block_size, device)
    caches = [torch.randn(2 * blocks * p.block_size, p.kv_heads, 2 * p.head_dim,
                          device=device, dtype=p.dtype, generator=gen) for _ in range(layers)]
    shape = (layers, n, p.kv_heads)
    counts = torch.randint(1, 4, shape[:2], device=device, generator=gen).float()
    positions = torch.cumsum(counts.long(), dim=1) - 1
    hess = torch.rand(shape, device=device, generator=gen)
    mass = torch.rand(shape, device=device, generator=gen) ** 4
    return caches, slots, counts, positions, hess, mass


def engine_round(state: tuple, k: int, rotary: RotarySpec, selector, kit: RoundKernels,
                 scratch: torch.Tensor) -> MergeResult:
    """One KVSlimmer round freeing ``k`` slots as the engine runs it: gather the slots of
    every layer into ``scratch``, merge (sub-rounds as needed), write the result back into
    the caches (in place)."""
    caches, slots, *tail = state
    rows = kit.gather(caches, slots, scratch)
    dim = rows.shape[-1] // 2
    result = merge_rounds(rows[..., :dim], rows[..., dim:], *tail, sink=SINK, recent=RECENT,
                          k=k, max_fraction=MAX_FRACTION, round_idx=2, gamma=DEFAULT_GAMMA,
                          eps=DEFAULT_EPS, rotary=rotary, selector=selector,
                          spread=kit.spread, pair_merge=kit.pair_merge)
    kit.compact(caches, slots, result.source, result.first_changed, result.merged_slots,
                result.merged_keys, result.merged_values, rows)
    return result


def protected_row(p: Profile, layers: int, n: int, target: int, device: torch.device,
                  seed: int, triton_round) -> dict:
    """SnapMerge's gathered round from ``n`` slots to ``target`` (keep set of
    pooled mass, sub-rounds of at most a quarter of the mergeable slots, as prompt-end
    runs it): all layers in lock step vs one layer after another, on the same gathered
    rows with the Triton kernels; both must choose the same slots."""
    k = n - target
    inv_freq = default_inv_freq(p.head_dim, ROPE_THETA)
    rotary = RotarySpec(p.head_dim, True,
                        cos_sin_cache=build_cos_sin_cache(inv_freq, 1 << 17).to(device))
    kit = triton_round_kernels(triton_round)
    caches, slots, counts, positions, hess, mass = merge_state(
        dataclasses.replace(p, merge_slots=n), layers, device, seed)
    rows = kit.gather(caches, slots, torch.empty(layers, n, p.kv_heads, 2 * p.head_dim,
                                                 device=device, dtype=p.dtype))
    protect = torch.zeros(layers, n, dtype=torch.bool, device=device)
    protect[:, SINK:n - RECENT] = kernels.keep_set(
        slot_scores(mass, sink=SINK, recent=RECENT, pool=7), k)
    dim = p.head_dim
    args = (rows[..., :dim], rows[..., dim:], counts, positions, hess, mass)
    settings = dict(protect=protect, sink=SINK, recent=RECENT, k=k, max_fraction=0.25,
                    round_idx=1, gamma=DEFAULT_GAMMA, eps=DEFAULT_EPS, rotary=rotary, pool=7,
                    spread=kit.spread, pair_merge=kit.pair_merge)
    rows_select = TimedSelector(kernels.select_pairs_rows)
    one_select = TimedSelector(kernels.select_pairs)
    arms = {
        "lock step": lambda: kernels.merge_rounds(*args, row_selector=rows_select,
                                                  **settings),
        "one by one": lambda: merge_rounds(*args, selector=one_select, **settings),
    }
    results = {name: arm() for name, arm in arms.items()}  # the check, and the warm-up
    synchronize(device)
    trips = {"lock step": rows_select.calls, "one by one": one_select.calls}
    a, b = results["lock step"], results["one by one"]
    ok = (torch.equal(a.source, b.source) and torch.equal(a.merged_slots, b.merged_slots)
          and torch.equal(a.counts, b.counts) and torch.equal(a.positions, b.positions)
          and bool(((a.merged_keys.float() - b.merged_keys.float()).abs()
                    <= 10 * p.tolerance).float().mean() >= 1 - MERGE_MISMATCH_FRACTION))
    rows_select.seconds = one_select.seconds = 0.0
    times = median_ms_host(arms, p.protected_repeats, sync=lambda: synchronize(device))
    return dict(layers=layers, slots=n, target=target, trips=trips,
                lock_ms=times["lock step"], serial_ms=times["one by one"],
                lock_select_ms=rows_select.seconds * 1e3 / p.protected_repeats,
                serial_select_ms=one_select.seconds * 1e3 / p.protected_repeats, ok=ok)


def merge_result_ok(state: tuple, result: MergeResult, k: int, tolerance: float,
                    other: tuple) -> bool:
    """``N - k`` slots per layer, token counts preserved, positions still in order, finite
    caches, and the caches within ``10 * tolerance`` of ``other`` (the same round with the
    other kernels) over the request's slots, but for at most
    :data:`MERGE_MISMATCH_FRACTION` of the elements: the kernels round differently, so a
    key weight that lands on the edge of its guard in one may fall back in the other."""
    caches, slots, counts = state[0], state[1], state[2]
    n = counts.shape[1]
    kept = slots[:n - k]
    far = sum(int(((a[kept].float() - b[kept].float()).abs() > 10 * tolerance).sum())
              for a, b in zip(caches, other[0]))
    close = far <= MERGE_MISMATCH_FRACTION * kept.numel() * caches[0][0].numel() * len(caches)
    return (tuple(result.counts.shape) == (counts.shape[0], n - k)
            and torch.equal(result.counts.sum(dim=1), counts.sum(dim=1))
            and bool((result.positions.diff(dim=1) >= 0).all())
            and all(bool(torch.isfinite(c[kept].float()).all()) for c in caches)
            and close)


def merge_row(p: Profile, layers: int, target: int, device: torch.device, seed: int,
              triton_round) -> dict:
    """Time one round of ``layers`` layers from ``p.merge_slots`` slots to ``target``, with
    the PyTorch ops and with the Triton kernels; their caches must agree afterwards."""
    k = p.merge_slots - target
    inv_freq = default_inv_freq(p.head_dim, ROPE_THETA)
    rotary = RotarySpec(p.head_dim, True,
                        cos_sin_cache=build_cos_sin_cache(inv_freq, 1 << 17).to(device))
    kits = {"torch": torch_round_kernels(), "triton": triton_round_kernels(triton_round)}
    states = {name: merge_state(p, layers, device, seed) for name in kits}
    scratch = torch.empty(layers, p.merge_slots, p.kv_heads, 2 * p.head_dim, device=device,
                          dtype=p.dtype)
    selector = TimedSelector(kernels.select_pairs)
    results, peaks = {}, {}
    for name, kit in kits.items():  # the checks, and the warm-up
        peaks[name], results[name] = peak_bytes(
            functools.partial(engine_round, states[name], k, rotary, selector, kit, scratch),
            device)
    synchronize(device)
    ok = all(merge_result_ok(states[name], results[name], k, p.tolerance,
                             states["torch" if name == "triton" else "triton"])
             for name in kits)
    # What the engine reserves for a gathered round of these layers (engine.memory), and
    # what the round took: its allocations at their peak plus the gathered copy.
    reserved = (layers * p.merge_slots * p.dtype.itemsize
                * footprint_per_slot(p.kv_heads, p.head_dim, p.dtype, "gathered"))
    took = {name: None if peak is None else peak + scratch.numel() * scratch.element_size()
            for name, peak in peaks.items()}
    selector.seconds = 0.0
    # Timed rounds run on the already merged caches: same shapes, the slots' data changes.
    times = median_ms_host(
        {name: functools.partial(engine_round, states[name], k, rotary, selector, kit,
                                 scratch) for name, kit in kits.items()},
        p.merge_repeats, sync=lambda: synchronize(device))
    return dict(layers=layers, slots=p.merge_slots, target=target,
                subrounds=len(subround_sizes(p.merge_slots - SINK - RECENT, k, MAX_FRACTION)),
                torch_ms=times["torch"], triton_ms=times["triton"],
                select_ms=selector.seconds * 1e3 / (2 * p.merge_repeats), ok=ok,
                reserved=reserved, torch_bytes=took["torch"], triton_bytes=took["triton"],
                memory_ok=all(t is None or t <= reserved for t in took.values()))


def evict_row(p: Profile, layers: int, n: int, target: int, device: torch.device,
              seed: int, triton_round) -> dict:
    """An eviction of ``n`` slots to ``target`` in every layer (the lowest pooled mass
    dropped, as ``evict`` / ``snapkv`` choose), from the slots' paged state: compacted in
    place from a staged copy of the rows that move, vs gathered (the request's rows copied
    first, the survivors written back from that copy). Both must leave the same caches and
    state; their peak allocations are checked against the engine's reservation for each
    path."""
    k = n - target
    arms = {}
    for path in ("staged", "gathered"):
        caches, slots, counts, positions, hess, mass = merge_state(
            dataclasses.replace(p, merge_slots=n), layers, device, seed)
        paged = [torch.zeros(layers, caches[0].shape[0], *t.shape[2:], dtype=t.dtype,
                             device=device) for t in (counts, positions, hess, mass)]
        for full, part in zip(paged, (counts, positions, hess, mass)):
            full[:, slots] = part
        arms[path] = (caches, slots, torch.arange(layers, device=device), *paged)
    dropped = lowest_mass_slots(arms["staged"][-1][:, arms["staged"][1]], sink=SINK,
                                recent=RECENT, k=k, pool=7)
    scratch = torch.empty(layers, n, p.kv_heads, 2 * p.head_dim, device=device, dtype=p.dtype)

    def staged():
        paged_drop(*arms["staged"], dropped, triton_round.compact_rows)

    def gathered():
        state = arms["gathered"]
        rows = triton_round.gather_rows(state[0], state[1], scratch)
        paged_drop(*state, dropped,
                   lambda *args: triton_round.compact_rows(*args, rows))

    runs = {"staged": staged, "gathered": gathered}
    took = {name: peak_bytes(run, device)[0] for name, run in runs.items()}
    synchronize(device)
    kept = arms["staged"][1][:target]
    a, b = arms["staged"], arms["gathered"]
    ok = (all(torch.equal(x[kept], y[kept]) for x, y in zip(a[0], b[0]))
          and all(torch.equal(x[:, kept].nan_to_num(-1), y[:, kept].nan_to_num(-1))
                  for x, y in zip(a[3:], b[3:])))
    if took["gathered"] is not None:
        took["gathered"] += scratch.numel() * scratch.element_size()
    reserved = {path: round_reserve_bytes(layers, n, p.kv_heads, p.head_dim, p.dtype, path)
                for path in runs}
    times = median_ms_host(runs, p.merge_repeats, sync=lambda: synchronize(device))
    return dict(layers=layers, slots=n, target=target, staged_ms=times["staged"],
                gathered_ms=times["gathered"], ok=ok, bytes=took, reserved=reserved,
                memory_ok=all(t is None or t <= reserved[path] for path, t in took.items()))


def peak_bytes(fn, device: torch.device) -> tuple[int | None, object]:
    """``(bytes, fn())``: the most ``fn`` held allocated at once beyond what was allocated
    before it (CUDA's caching allocator statistics); None off CUDA."""
    if device.type != "cuda":
        return None, fn()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, result


# ---------------------------------------------------------------------------- report


def fmt_ms(ms: float) -> str:
    """Milliseconds with about four significant digits."""
    return f"{ms:.4f}" if ms < 1 else (f"{ms:.3f}" if ms < 100 else f"{ms:.1f}")


def section(title: str, caption: str, columns: list[str],
            cells: list[list[str]]) -> list[str]:
    """A markdown report section: a title, a caption, and a table of ``cells``."""
    return [f"## {title}", "", caption, "", "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns), *("| " + " | ".join(row) + " |" for row in cells)]


def yes_no(flag: bool) -> str:
    return "yes" if flag else "NO"


def dtype_name(p: Profile) -> str:
    return str(p.dtype).removeprefix("torch.")


def attention_table(rows: list[dict], p: Profile) -> list[str]:
    """Markdown section of the attention rows."""
    caption = (
        f"Hq {p.q_heads}, Hkv {p.kv_heads}, D {p.head_dim}, {dtype_name(p)}, block "
        f"{p.block_size}, scattered blocks, counts 1-4. SDPA runs on keys and values gathered "
        "beforehand (not timed), with log(count) and the causal limit as a float mask. Median "
        f"ms per call; max abs err: Triton vs SDPA output (limit {p.tolerance:g}); mass err: "
        f"relative error of the total mass (limit {MASS_TOLERANCE:g}).")
    cells = []
    for r in rows:
        t = r["times"]
        cells.append([
            r["case"], f"{r['requests']} x {r['rows']}", str(r["slots"]),
            fmt_ms(t["triton"]), fmt_ms(t["triton+mass"]), fmt_ms(t["sdpa"]),
            f"{t['triton'] / t['sdpa']:.2f}", f"{t['triton+mass'] / t['sdpa']:.2f}",
            f"{r['max_err']:.2e}", f"{r['mass_err']:.1e}", yes_no(r["ok"])])
    return section(
        "Paged attention: Triton (log-count bias) vs PyTorch SDPA", caption,
        ["case", "requests x rows", "slots/request", "Triton (ms)", "Triton+mass (ms)",
         "SDPA (ms)", "Triton/SDPA", "Triton+mass/SDPA", "max abs err", "mass err", "ok"],
        cells)


def merge_table(rows: list[dict], p: Profile) -> list[str]:
    """Markdown section of the merge-round rows."""
    caption = (
        f"One request's slots in L separate paged caches (scattered blocks), Hkv "
        f"{p.kv_heads}, D {p.head_dim}, {dtype_name(p)}, sink {SINK}, recent {RECENT}, "
        "RoPE-aware (vLLM-layout cos_sin_cache). PyTorch: index_select gathers, "
        "core.stats.value_spread, core.merge.merge_pairs, core.paged.compact_rows. Triton: "
        "triton_kernels/round.py (one-launch gather, value spread, pair merge, write-back "
        "from the gathered copy). Both run the same statistics and the pair selection on "
        f"the host ({selector_name()}). Median ms per round of {p.merge_repeats} run(s); "
        f"ok: the caches of both agree (within {10 * p.tolerance:g} on all but "
        f"{MERGE_MISMATCH_FRACTION:g} of the elements) and the round keeps every token. "
        "Memory: the most a round held allocated at once (CUDA allocator peak, plus the "
        "gathered copy) against what the engine reserves for a gathered round of these "
        "layers (engine.memory.footprint_per_slot); - off CUDA.")
    cells = [[
        str(r["layers"]), str(r["slots"]), str(r["target"]), str(r["subrounds"]),
        fmt_ms(r["torch_ms"]), fmt_ms(r["triton_ms"]), f"{r['triton_ms'] / r['torch_ms']:.2f}",
        fmt_ms(r["select_ms"]), yes_no(r["ok"]),
        f"{fmt_mib(r['torch_bytes'])} / {fmt_mib(r['triton_bytes'])}",
        fmt_mib(r["reserved"]), yes_no(r["memory_ok"])] for r in rows]
    return section(
        "Merge round as the engine runs it: gather, core.merge_rounds, write-back", caption,
        ["layers", "slots", "to slots", "sub-rounds", "PyTorch (ms)", "Triton (ms)",
         "Triton/PyTorch", "of which pair selection (ms)", "ok",
         "peak MiB PyTorch / Triton", "reserved MiB", "within"], cells)


def protected_table(rows: list[dict], p: Profile) -> list[str]:
    """Markdown section of SnapMerge's protected rounds."""
    caption = (
        f"One request's gathered slots (Hkv {p.kv_heads}, D {p.head_dim}, {dtype_name(p)}), "
        "SnapMerge's keep set (pooled mass, pool 7) protected, sub-rounds of at most 25% of "
        "a layer's mergeable slots, each layer sized by its own mask; Triton round kernels "
        "in both. Lock step: kernels.lockstep (one host round trip per sub-round for all "
        "layers); one by one: core.merge.merge_rounds (a round trip per layer and "
        f"sub-round). Round trips = pair selections on the host ({selector_name()}), timed "
        "on their own; the last ratio leaves them out (the same choices, made row by row "
        f"either way). Median ms of {p.protected_repeats} run(s); ok: both chose the same "
        "slots and merged them alike.")
    cells = []
    for r in rows:
        rest = ((r["lock_ms"] - r["lock_select_ms"])
                / max(r["serial_ms"] - r["serial_select_ms"], 1e-9))
        cells.append([
            "snapmerge", str(r["layers"]), str(r["slots"]), str(r["target"]),
            f"{r['trips']['lock step']} / {r['trips']['one by one']}",
            fmt_ms(r["lock_ms"]), fmt_ms(r["serial_ms"]),
            f"{r['lock_ms'] / r['serial_ms']:.2f}",
            f"{fmt_ms(r['lock_select_ms'])} / {fmt_ms(r['serial_select_ms'])}",
            f"{rest:.2f}", yes_no(r["ok"])])
    return section(
        "SnapMerge's gathered round: every layer in lock step vs one after another", caption,
        ["method", "layers", "slots", "to slots", "round trips lock step / one by one",
         "lock step (ms)", "one by one (ms)", "lock step / one by one",
         "of which selection (ms)", "without selection: lock step / one by one", "ok"],
        cells)


def evict_table(rows: list[dict], p: Profile) -> list[str]:
    """Markdown section of the eviction rows."""
    caption = (
        f"One request's slots in L separate paged caches (Hkv {p.kv_heads}, D "
        f"{p.head_dim}, {dtype_name(p)}), the lowest pooled mass dropped in every layer "
        "(core.merge.lowest_mass_slots, pool 7), the survivors' rows and state moved down "
        "(core.paged.paged_drop). Staged: the Triton compact_rows copies the rows that "
        "move, then writes them (the engine's path for evict, snapkv and streaming on "
        "CUDA); gathered: every slot gathered first, the survivors written back from that "
        f"copy. Median ms of {p.merge_repeats} run(s); ok: both leave the same caches and "
        "state. Memory: peak allocation (plus the gathered copy) against "
        "engine.memory's reservation for each path; - off CUDA.")
    cells = [[
        "eviction", str(r["layers"]), str(r["slots"]), str(r["target"]),
        fmt_ms(r["staged_ms"]), fmt_ms(r["gathered_ms"]),
        f"{r['staged_ms'] / r['gathered_ms']:.2f}",
        f"{fmt_mib(r['bytes']['staged'])} / {fmt_mib(r['bytes']['gathered'])}",
        f"{fmt_mib(r['reserved']['staged'])} / {fmt_mib(r['reserved']['gathered'])}",
        yes_no(r["ok"]), yes_no(r["memory_ok"])] for r in rows]
    return section(
        "Eviction as CUDA caches run it: in place from a staged copy vs gathered", caption,
        ["path", "layers", "slots", "to slots", "staged (ms)", "gathered (ms)",
         "staged / gathered", "peak MiB staged / gathered",
         "reserved MiB staged / gathered", "ok", "within"], cells)


def fmt_mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def selector_name() -> str:
    """Which pair selection :func:`kvslimmer_vllm.kernels.select_pairs` runs."""
    cpp = kernels.attention_backend_name(torch.device("cpu")) == "cpp"
    return "the C++ op" if cpp else "the Python reference (C++ op not loadable)"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def header(device: torch.device, tests: dict | None, passed: bool) -> list[str]:
    """Title and run facts of the report."""
    import triton

    command = os.environ.get("DEVICE_CHECK_COMMAND") or " ".join(["python3", *sys.argv])
    lines = [f"# Device check: {device_name(device)}", ""]
    if device.type != "cuda":
        lines += [f"**{CPU_NOTICE}**", ""]
    lines += [
        f"- result: {'PASS' if passed else 'FAIL'}",
        f"- command: `{command}`",
        f"- versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"triton {triton.__version__}",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
    ]
    if tests is None:
        lines.append("- tests: not run (--bench-only)")
    else:
        lines.append(f"- tests: `{tests['command']}`: {format_counts(tests['counts'])} in "
                     f"{tests['seconds']:.0f} s: {tests['verdict']}")
    return lines


#: Each kind of benchmark row and its report section, in report order.
TABLES = {"attention": attention_table, "merge": merge_table, "protected": protected_table,
          "evict": evict_table}


def all_passed(tests: dict | None, results: dict[str, list]) -> bool:
    """Whether the tests (if run) and every benchmark check (agreement, and memory within
    its reservation where measured) passed."""
    rows = [row for kind in results.values() for row in kind]
    return ((tests is None or tests["ok"]) and all(r["ok"] for r in rows)
            and all(r.get("memory_ok", True) for r in rows))


def report(device, p: Profile, tests, results: dict[str, list], notes: list) -> str:
    """The whole markdown report."""
    lines = header(device, tests, all_passed(tests, results))
    lines += [f"- note: {note}" for note in notes]
    for kind, table in TABLES.items():
        if results.get(kind):
            lines += ["", *table(results[kind], p)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def run_benchmarks(p: Profile, device: torch.device, budget_s: float, notes: list):
    """Every attention case, then the merge rounds, SnapMerge's and the eviction, until
    ``budget_s`` seconds have passed (cases not started then are listed in ``notes``):
    ``{kind: rows}`` (:data:`TABLES`' kinds)."""
    kernel = load_triton_module("paged_attention", interpret=device.type != "cuda")
    triton_round = load_triton_module("round", interpret=device.type != "cuda")
    deadline = time.monotonic() + budget_s
    results = {kind: [] for kind in TABLES}
    attention, merges, protected = results["attention"], results["merge"], results["protected"]
    jobs = [("attention", case) for case in attention_cases(p)]
    # The one-layer merge rows, then SnapMerge's lock step and the eviction, then the rest:
    # the budget stops starting jobs, and without the C++ op the wide rows' host selection
    # is slow.
    merge_jobs = [("merge", (layers, target)) for layers in p.merge_layers
                  for target in p.merge_targets]
    jobs += merge_jobs[:len(p.merge_targets)] + [("protected", p.protected_case)]
    jobs += [("evict", (max(p.merge_layers), p.merge_slots, min(p.merge_targets)))]
    jobs += merge_jobs[len(p.merge_targets):]
    for seed, (kind, job) in enumerate(jobs):
        if time.monotonic() > deadline:
            notes.append(f"{kind} {job} not run: time budget of {budget_s:.0f} s spent")
            say(notes[-1])
            continue
        started = time.perf_counter()
        if kind == "attention":
            row = attention_row(kernel, p, job, device, seed)
            attention.append(row)
            say(f"attention {job}: " + ", ".join(
                f"{k} {fmt_ms(v)} ms" for k, v in row["times"].items())
                + f", max abs err {row['max_err']:.2e}, mass err {row['mass_err']:.1e}"
                + ("" if row["ok"] else " DISAGREE"))
        elif kind == "protected":
            row = protected_row(p, *job, device, seed, triton_round)
            protected.append(row)
            say(f"snapmerge round {row['layers']} layers {row['slots']} -> {row['target']}: "
                f"lock step {fmt_ms(row['lock_ms'])} ms ({row['trips']['lock step']} round "
                f"trips), one by one {fmt_ms(row['serial_ms'])} ms "
                f"({row['trips']['one by one']})" + ("" if row["ok"] else " DISAGREE"))
        elif kind == "evict":
            row = evict_row(p, *job, device, seed, triton_round)
            results["evict"].append(row)
            say(f"eviction {row['layers']} layers {row['slots']} -> {row['target']}: staged "
                f"{fmt_ms(row['staged_ms'])} ms, gathered {fmt_ms(row['gathered_ms'])} ms, "
                f"peak MiB {fmt_mib(row['bytes']['staged'])} / "
                f"{fmt_mib(row['bytes']['gathered'])}" + ("" if row["ok"] else " DISAGREE")
                + ("" if row["memory_ok"] else " OVER THE RESERVATION"))
        else:
            row = merge_row(p, *job, device, seed, triton_round)
            merges.append(row)
            say(f"merge round {row['layers']} layer(s) {row['slots']} -> {row['target']}: "
                f"PyTorch {fmt_ms(row['torch_ms'])} ms, Triton {fmt_ms(row['triton_ms'])} ms "
                f"(selection {fmt_ms(row['select_ms'])} ms), peak MiB "
                f"{fmt_mib(row['torch_bytes'])} / {fmt_mib(row['triton_bytes'])} of "
                f"{fmt_mib(row['reserved'])} reserved"
                + ("" if row["ok"] else " CHECK FAILED")
                + ("" if row["memory_ok"] else " OVER THE RESERVATION"))
        say(f"  ({time.perf_counter() - started:.1f} s)")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for device_check.md (default: $OUT or a new temp dir)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--bench-only", action="store_true", help="skip the tests")
    which.add_argument("--tests-only", action="store_true", help="skip the benchmarks")
    parser.add_argument("--tests-timeout-s", type=float, default=300.0,
                        help="stop the tests (a failure) after this many seconds")
    parser.add_argument("--bench-budget-s", type=float, default=120.0,
                        help="start no benchmark case after this many seconds")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Tests, benchmarks, report; 0 when everything passed."""
    args = parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="device_check."))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    profile = CUDA_PROFILE if device.type == "cuda" else CPU_PROFILE
    say(f"device: {device_name(device)}; torch {torch.__version__}")
    if device.type != "cuda":
        say(CPU_NOTICE)
    tests = None if args.bench_only else run_tests(args.tests_timeout_s)
    notes, results = [], {}
    if not args.tests_only:
        results = run_benchmarks(profile, device, args.bench_budget_s, notes)
    text = report(device, profile, tests, results, notes)
    (out / "device_check.md").write_text(text, encoding="utf-8")
    print(text, flush=True)
    say(f"report written to {out / 'device_check.md'}")
    return 0 if all_passed(tests, results) else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == PYTEST_CHILD:
        sys.exit(pytest_child(sys.argv[2], sys.argv[3:]))
    sys.exit(main())
