"""One merge round of one request over all layers: in place vs gathered, layer batches
vs one layer at a time.

What it measures
----------------
Wall time of ``kvslimmer_vllm.engine.slots.apply_round`` for one request of ``N`` slots
freeing ``k``, over every layer of the model:

* ``engine``: the engine's path. On CPU every method's round (one round, or a prompt-end
  step's sub-rounds) runs where the slots live (``MergeMethod.round_path``: the C++
  round_stats / round_apply ops for pairwise methods, compact_rows for eviction); on CUDA
  eviction compacts in place from a staged copy of the rows it moves, and merge rounds
  gather the slots into a scratch buffer, run the method on all layers that share
  a RoPE at once (in batches bounded by ``footprint_per_slot``), and move the surviving
  rows and write the merged slots back;
* ``gathered``: that gathered path for every round (the in-place kernel off);
* ``per layer``: the gathered path with the batch size forced to one layer (the state's
  ``max_batch_elements`` lowered), i.e. ``L`` separate rounds;
* ``reference stats``: the gathered path with the Hessian statistics' value spread
  computed by the torch reference (``core.stats.value_spread``) instead of the kernel
  (``kernels.value_spread``: the C++ op on CPU; on CUDA both are the reference);
* ``one by one``: the gathered path with a protected method's sub-rounds run one layer
  after another (``core.merge.merge_rounds``, the round kernels still used) instead of
  every layer in lock step (``kernels.lockstep``, what a gathered round runs); for
  methods without protected slots the same as ``gathered``;
* ``reduced``: the engine's path with a score reduction set, as under tensor parallelism
  (here the identity, one rank's sum): the reduction runs between each sub-round's
  statistics and its choice, so ``snapmerge`` runs its layers' sub-rounds from Python one
  layer at a time instead of in one C++ call.

The ``ops`` column counts the torch operations each gathered arm dispatches, views left out
(on a GPU nearly all of the rest are kernel launches, microseconds each whatever their
size).

All start from identical random caches (block ids shuffled) and must leave the same
caches behind (checked before timing). Calls are interleaved and the table reports
medians. Shapes: SmolLM2-135M (30 layers, Hkv 3, D 64) on CPU, Llama-3.1-8B (32 layers,
Hkv 8, D 128) on CUDA; block size 128; float32 on CPU, bfloat16 on CUDA.

Run: ``python benchmarks/merge_round.py`` (under a minute on CPU); the table goes to stdout
and to ``results/merge_round/merge_round.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvslimmer_vllm.core.config import KVMergeConfig
from kvslimmer_vllm.core.rope import RotarySpec, build_cos_sin_cache, default_inv_freq
from kvslimmer_vllm.engine.plan import MergeRound
from kvslimmer_vllm.core.paged import slot_ids
from kvslimmer_vllm.engine.memory import batch_limit, footprint_per_slot
from kvslimmer_vllm.engine.slots import LayerCache, SlotState, apply_round
from kvslimmer_vllm.methods import get_method

BLOCK = 128
SHAPES = {"cpu": dict(layers=30, kv_heads=3, head_dim=64, dtype=torch.float32),
          "cuda": dict(layers=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)}
# (slots held, slots freed, observe): budget 750 with interval 128 / 187, and the default
# budget of an 8K-context model (2,048 + 32 sink, interval 512); sink 32 and 128 recent
# slots (progressive: one pairwise round). Prompt-end: a decode round of budget 750 +
# interval 128 and the step of a 3,000-token prompt to 750 (window 32, pool 7, sub-rounds
# of at most a quarter of the mergeable slots).
CASES = [(1006, 256, "progressive"), (1124, 374, "progressive"), (3104, 1024, "progressive"),
         (879, 129, "prompt-end"), (3000, 2250, "prompt-end")]


def _cache(n_blocks: int, shape: dict, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    num_slots = n_blocks * BLOCK
    state = SlotState(shape["layers"], num_slots, shape["kv_heads"], device)
    state.max_batch_elements = batch_limit(device)  # the engine's cap on this device
    state.counts.copy_(torch.randint(1, 4, state.counts.shape, generator=gen).float())
    state.positions.copy_(torch.cumsum(state.counts.long(), dim=1) - 1)
    state.hess.copy_(torch.rand(state.hess.shape, generator=gen))
    state.mass.copy_(torch.rand(state.mass.shape, generator=gen) ** 4)
    kvs = [torch.randn(num_slots, shape["kv_heads"], 2 * shape["head_dim"], generator=gen)
           .to(device, shape["dtype"]) for _ in range(shape["layers"])]
    return state, kvs


def _copy(state: SlotState, kvs):
    clone = SlotState(state.counts.shape[0], state.num_slots, state.hess.shape[2],
                      state.counts.device)
    clone.max_batch_elements = state.max_batch_elements
    for name in ("counts", "positions", "hess", "mass"):
        getattr(clone, name).copy_(getattr(state, name))
    clone._scratch = state._scratch  # the engine reuses one warm scratch across rounds
    return clone, [kv.clone() for kv in kvs]


@contextlib.contextmanager
def _gathered(method):
    """The method's in-place round switched off: every round gathers."""
    method.round_path = lambda kv: "gathered"
    try:
        yield
    finally:
        del method.round_path


@contextlib.contextmanager
def _reference_spread():
    """The methods' value spread swapped for the torch reference."""
    from kvslimmer_vllm.core.stats import value_spread
    from kvslimmer_vllm.methods import kvslimmer as module

    saved, module.value_spread = module.value_spread, value_spread
    try:
        yield
    finally:
        module.value_spread = saved


@contextlib.contextmanager
def _one_by_one():
    """Protected sub-rounds one layer after another (the lock step off)."""
    from kvslimmer_vllm.core.merge import merge_rounds
    from kvslimmer_vllm.methods import kvslimmer as module

    def layer_by_layer(*args, row_selector=None, **kwargs):
        return merge_rounds(*args, **kwargs)

    saved, module.merge_rounds = module.merge_rounds, layer_by_layer
    try:
        yield
    finally:
        module.merge_rounds = saved


@contextlib.contextmanager
def _reduced(method):
    """A score reduction set, as the engine sets one under tensor parallelism."""
    method.score_reduce = lambda scores: scores + 0.0
    try:
        yield
    finally:
        method.score_reduce = None


class _OpCounter(TorchDispatchMode):
    """Counts the torch operations dispatched while it is active, views left out."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += not func.is_view
        return func(*args, **(kwargs or {}))


def _run(state, kvs, rotary, plan, method, arm: str, device) -> float:
    layers = [LayerCache(i, kv, rotary) for i, kv in enumerate(kvs)]
    saved = state.max_batch_elements
    if arm == "per layer":
        heads, row = kvs[0].shape[1:]
        state.max_batch_elements = plan.num_slots * footprint_per_slot(
            heads, row // 2, kvs[0].dtype, "gathered")
    contexts = contextlib.ExitStack()
    if arm == "reduced":
        contexts.enter_context(_reduced(method))
    elif arm != "engine":
        contexts.enter_context(_gathered(method))
    if arm == "reference stats":
        contexts.enter_context(_reference_spread())
    if arm == "one by one":
        contexts.enter_context(_one_by_one())
    try:
        with contexts:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            apply_round(plan, layers, state, method, BLOCK)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - started
    finally:
        state.max_batch_elements = saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--method", default="kvslimmer")
    parser.add_argument("--out", type=Path, default=Path("results/merge_round"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[device.type]
    method = get_method(KVMergeConfig(method=args.method, budget=750, interval=128,
                                      recent=128).resolve(32768))
    inv_freq = default_inv_freq(shape["head_dim"], 500000.0)
    rotary = RotarySpec(shape["head_dim"], True,
                        cos_sin_cache=build_cos_sin_cache(inv_freq, 1 << 17).to(device))
    arms = ("engine", "gathered", "per layer", "reference stats", "one by one", "reduced")
    rows = []
    for num_slots, num_merge, observe in CASES:
        n_blocks = math.ceil(num_slots / BLOCK)
        state, kvs = _cache(2 * n_blocks, shape, device, seed=num_slots)
        order = torch.randperm(2 * n_blocks, generator=torch.Generator().manual_seed(1))
        prompt_end = observe == "prompt-end"
        plan = MergeRound("bench", tuple(order[:n_blocks].tolist()), num_slots, num_merge,
                          round_index=1 if prompt_end else 2, method=args.method,
                          recent=32 if prompt_end else 128, pool=7 if prompt_end else 1,
                          max_fraction=0.25 if prompt_end else 0.5)
        # Every arm must leave the same cache behind, but in the slots the round freed
        # (stale in any case: the in-place arm leaves its sub-rounds' rows there).
        valid = torch.ones(kvs[0].shape[0], dtype=torch.bool)
        valid[slot_ids(plan.block_ids, num_slots, BLOCK)[plan.num_slots_after:]] = False
        outcomes, ops = [], {}
        for arm in arms:
            s, k = _copy(state, kvs)
            with _OpCounter() as counter:
                _run(s, k, rotary, plan, method, arm, device)
            ops[arm] = counter.ops
            outcomes.append((s, k))
        s1, k1 = outcomes[0]
        # Timed runs gather into a warm buffer, as the engine does (the in-place arm has none).
        state._scratch = next((s._scratch for s, _ in outcomes if s._scratch is not None), None)
        for s2, k2 in outcomes[1:]:
            for a, b in zip(k1, k2):
                torch.testing.assert_close(a[valid].float(), b[valid].float(), atol=1e-2,
                                           rtol=1e-2)
            torch.testing.assert_close(s1.hess[:, valid], s2.hess[:, valid], equal_nan=True,
                                       atol=1e-6, rtol=1e-4)
            assert torch.equal(s1.counts[:, valid], s2.counts[:, valid])
            assert torch.equal(s1.positions[:, valid], s2.positions[:, valid])
            assert torch.equal(s1.mass, s2.mass)
        times = {arm: [] for arm in arms}
        for repeat in range(args.repeats):
            for arm in (arms if repeat % 2 == 0 else arms[::-1]):
                s, k = _copy(state, kvs)
                times[arm].append(_run(s, k, rotary, plan, method, arm, device))
        engine, batched, single, reference, serial, reduced = (
            statistics.median(times[a]) * 1e3 for a in arms)
        rows.append((num_slots, num_merge, observe, engine, batched, single, reference,
                     serial, reduced, ops["gathered"], ops["one by one"]))
        print(f"[merge_round] N={num_slots} k={num_merge} {observe}: engine {engine:.1f} ms, "
              f"gathered {batched:.1f} ms, per layer {single:.1f} ms, reference stats "
              f"{reference:.1f} ms, one by one {serial:.1f} ms, reduced {reduced:.1f} ms; "
              f"ops gathered {ops['gathered']}, one by one {ops['one by one']}",
              file=sys.stderr, flush=True)
    lines = [
        f"# One merge round over {shape['layers']} layers ({args.method}, {device.type})", "",
        "| slots N | freed k | observe | engine (ms) | gathered (ms) | gathered / engine "
        "| per layer (ms) | per layer / gathered | reference stats (ms) "
        "| reference stats / gathered | one by one (ms) | one by one / gathered "
        "| reduced (ms) | reduced / engine | ops gathered / one by one |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {n} | {k} | {o} | {e:.1f} | {b:.1f} | {b / e:.2f} | {p:.1f} | {p / b:.2f} | "
          f"{r:.1f} | {r / b:.2f} | {q:.1f} | {q / b:.2f} | {t:.1f} | {t / e:.2f} "
          f"| {og} / {oq} |"
          for n, k, o, e, b, p, r, q, t, og, oq in rows), "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- shapes: Hkv {shape['kv_heads']}, D {shape['head_dim']}, {shape['dtype']}, "
        f"block {BLOCK}; medians of {args.repeats} interleaved repeats; progressive: one "
        "round (sink 32, recent 128); prompt-end: window 32, pool 7, sub-rounds of at most "
        "25% of the mergeable slots",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
    ]
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_round.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
