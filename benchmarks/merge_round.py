"""One merge round of one request over all layers: layer batches vs one layer at a time.

What it measures
----------------
Wall time of ``kvslimmer_vllm.engine.slots.apply_round`` (gather the request's slots from
its blocks, run the method, move the surviving rows and write the merged slots back) for
one request of ``N`` slots freeing ``k``, over every layer of the model:

* ``batched``: the engine's path, all layers that share a RoPE in one layer-batched round;
* ``per layer``: the same function with the batch size forced to one layer
  (the state's ``max_batch_elements`` lowered), i.e. ``L`` separate rounds.

Both start from identical random caches (block ids shuffled) and must leave identical
caches behind (checked before timing). Calls are interleaved and the table reports
medians. Shapes: SmolLM2-135M (30 layers, Hkv 3, D 64) on CPU, Llama-3.1-8B (32 layers,
Hkv 8, D 128) on CUDA; block size 128; float32 on CPU, bfloat16 on CUDA.

Run: ``python benchmarks/merge_round.py`` (under a minute on CPU); the table goes to stdout
and to ``results/merge_round/merge_round.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kvslimmer_vllm.core.config import KVMergeConfig
from kvslimmer_vllm.core.rope import RotarySpec, build_cos_sin_cache, default_inv_freq
from kvslimmer_vllm.engine.plan import MergeRound
from kvslimmer_vllm.engine.slots import LayerCache, SlotState, apply_round
from kvslimmer_vllm.methods import get_method

BLOCK = 128
SHAPES = {"cpu": dict(layers=30, kv_heads=3, head_dim=64, dtype=torch.float32),
          "cuda": dict(layers=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)}
# (slots held, slots freed): budget 750 with interval 128 / 187, and the default budget
# of an 8K-context model (2,048 + 32 sink, interval 512); sink 32 and 128 recent slots.
CASES = [(1006, 256), (1124, 374), (3104, 1024)]


def _cache(n_blocks: int, shape: dict, device: torch.device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    num_slots = n_blocks * BLOCK
    state = SlotState(shape["layers"], num_slots, shape["kv_heads"], device)
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
    for name in ("counts", "positions", "hess", "mass"):
        getattr(clone, name).copy_(getattr(state, name))
    return clone, [kv.clone() for kv in kvs]


def _run(state, kvs, rotary, plan, method, per_layer: bool, device) -> float:
    layers = [LayerCache(i, kv, rotary) for i, kv in enumerate(kvs)]
    saved = state.max_batch_elements
    if per_layer:
        state.max_batch_elements = kvs[0][0].numel() * plan.num_slots
    try:
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
    rows = []
    for num_slots, num_merge in CASES:
        n_blocks = math.ceil(num_slots / BLOCK)
        state, kvs = _cache(2 * n_blocks, shape, device, seed=num_slots)
        order = torch.randperm(2 * n_blocks, generator=torch.Generator().manual_seed(1))
        plan = MergeRound("bench", tuple(order[:n_blocks].tolist()), num_slots, num_merge,
                          round_index=2, method=args.method)
        # Both paths must leave the same cache behind.
        outcomes = []
        for per_layer in (False, True):
            s, k = _copy(state, kvs)
            _run(s, k, rotary, plan, method, per_layer, device)
            outcomes.append((s, k))
        (s1, k1), (s2, k2) = outcomes
        for a, b in zip(k1, k2):
            torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(s1.hess, s2.hess, equal_nan=True)
        assert torch.equal(s1.counts, s2.counts) and torch.equal(s1.positions, s2.positions)
        times = {False: [], True: []}
        for repeat in range(args.repeats):
            for per_layer in ((False, True) if repeat % 2 == 0 else (True, False)):
                s, k = _copy(state, kvs)
                times[per_layer].append(_run(s, k, rotary, plan, method, per_layer, device))
        batched, single = (statistics.median(times[p]) * 1e3 for p in (False, True))
        rows.append((num_slots, num_merge, batched, single))
        print(f"[merge_round] N={num_slots} k={num_merge}: batched {batched:.1f} ms, "
              f"per layer {single:.1f} ms", file=sys.stderr, flush=True)
    lines = [
        f"# One merge round over {shape['layers']} layers ({args.method}, {device.type})", "",
        "| slots N | freed k | batched (ms) | per layer (ms) | per layer / batched |",
        "|---|---|---|---|---|",
        *(f"| {n} | {k} | {b:.1f} | {p:.1f} | {p / b:.2f} |" for n, k, b, p in rows), "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- shapes: Hkv {shape['kv_heads']}, D {shape['head_dim']}, {shape['dtype']}, "
        f"block {BLOCK}; medians of {args.repeats} interleaved repeats",
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
