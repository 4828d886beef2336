"""CPU paged attention: the C++ op against vLLM's own CPU kernel and the PyTorch reference path.

What it measures
----------------
Wall time of one attention call over one layer's paged KV cache, for three implementations fed the
same queries, keys, values and block table (block ids shuffled, as a long-running engine has them):

* ``ours``: ``torch.ops.kvslimmer.paged_attention`` (csrc/cpu/paged_attention.cpp, the
  instruction set it picks for this CPU, or ``--isa``) on the
  slot-major cache ``[S, Hkv, 2D]`` with per-slot counts (all ones, so the result must equal plain
  attention), without and with in-place mass accumulation;
* ``vLLM``: vLLM's CPU attention kernel, ``vllm._custom_ops.cpu_attention_with_kv_cache`` with its
  scheduler metadata (``cpu_attn_get_scheduler_metadata``) and its own cache layout filled by
  ``cpu_attn_reshape_and_cache``, with the kernel ISA vLLM itself picks for these shapes on this
  CPU (``_get_attn_isa`` in ``vllm/v1/attention/backends/cpu_attn.py``; ``vec`` for float32),
  at the same physical length;
* ``reference``: the PyTorch path of ``kvslimmer_vllm/engine/attention.py``: per request,
  ``index_select`` of its slots and counts, ``core.merged_attention`` (with ``return_mass`` on the
  mass rows), output rows written back and mass ``index_add_``-ed to the slots.

Cases: decode (8 requests x 1 query at 512 / 2048 / 4096 slots) and a prefill chunk (1 request x
256 queries whose last row sees 2048 slots), SmolLM2-135M shapes (Hq 9, Hkv 3, D 64), float32,
block size 128. Calls are interleaved (every repeat times each implementation once, in rotating
order) and the table reports medians, so slow phases of a shared machine hit all columns alike.
Before timing, each case checks ours against vLLM and against the reference.

Run: ``python benchmarks/cpu_attention.py`` (about 1-2 minutes); progress goes to stderr, the
table to stdout and to ``results/cpu_attention/cpu_attention.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.1  # ours at most 1.1x vLLM's time
#: CPU flags that decide which kernels run (ours and vLLM's), named in the report.
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
         "amx_tile", "amx_bf16")

CASES = {  # name: (requests, queries per request, slots per request)
    "decode 8x1 @512": (8, 1, 512),
    "decode 8x1 @2048": (8, 1, 2048),
    "decode 8x1 @4096": (8, 1, 4096),
    "prefill 1x256 @2048": (1, 256, 2048),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in FLAGS if flag in present]
    except OSError:
        pass
    return []


def vllm_isa(block_size: int, head_size: int) -> str:
    """The CPU attention ISA vLLM picks for float32 at these shapes on this machine."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    return _get_attn_isa(torch.float32, block_size, head_size)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


class Case:
    """One batch, laid out for all three implementations."""

    def __init__(self, num_reqs, queries, length, *, hq, hkv, d, block_size, seed):
        from vllm import _custom_ops as ops

        gen = torch.Generator().manual_seed(seed)
        self.hq, self.hkv, self.d, self.block_size = hq, hkv, d, block_size
        self.scale = d ** -0.5
        blocks_per_req = -(-length // block_size)
        num_blocks = num_reqs * blocks_per_req + 7
        self.block_table = torch.randperm(num_blocks, generator=gen)[
            : num_reqs * blocks_per_req].view(num_reqs, blocks_per_req).to(torch.int32)
        self.seq_lens = torch.full((num_reqs,), length, dtype=torch.int32)
        self.qsl = torch.arange(0, num_reqs * queries + 1, queries, dtype=torch.int32)
        self.query = torch.randn(num_reqs * queries, hq, d, generator=gen)

        # Every slot of every request, with its key and value.
        offsets = torch.arange(block_size)
        self.slots = [
            (self.block_table[r].long()[:, None] * block_size + offsets).flatten()[:length]
            for r in range(num_reqs)
        ]
        all_slots = torch.cat(self.slots)
        keys = torch.randn(all_slots.numel(), hkv, d, generator=gen)
        values = torch.randn(all_slots.numel(), hkv, d, generator=gen)

        num_slots = num_blocks * block_size
        self.kv = torch.zeros(num_slots, hkv, 2 * d)
        self.kv.index_copy_(0, all_slots, torch.cat([keys, values], dim=-1))
        self.counts = torch.ones(num_slots)
        self.mass = torch.zeros(num_slots, hkv)

        # vLLM: [num_blocks, Hkv, block_size, 2D] viewed as key and value halves, filled by its
        # own reshape_and_cache in the ISA's layout.
        cache = torch.zeros(num_blocks, hkv, block_size, 2 * d)
        cache = cache.view(num_blocks, hkv, block_size * 2, d)
        self.key_cache, self.value_cache = cache.chunk(2, dim=2)
        self.isa = vllm_isa(block_size, d)
        ops.cpu_attn_reshape_and_cache(keys, values, self.key_cache, self.value_cache,
                                       all_slots, self.isa)
        self.metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=num_reqs, num_heads=hq, num_kv_heads=hkv, head_dim=d,
            seq_lens=self.seq_lens, dtype=torch.float32, query_start_loc=self.qsl,
            causal=True, sliding_window_size=-1, isa=self.isa, enable_kv_split=True,
        )
        self.vllm_out = torch.empty_like(self.query)
        self.ops = ops

    def ours(self, with_mass: bool) -> torch.Tensor:
        return torch.ops.kvslimmer.paged_attention(
            self.query, self.kv, self.counts, self.block_table, self.seq_lens, self.qsl,
            self.scale, self.block_size, self.mass if with_mass else None)

    def vllm(self, with_mass: bool = False) -> torch.Tensor:
        self.ops.cpu_attention_with_kv_cache(
            query=self.query, key_cache=self.key_cache, value_cache=self.value_cache,
            output=self.vllm_out, query_start_loc=self.qsl, seq_lens=self.seq_lens,
            scale=self.scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=self.block_table, softcap=0.0, scheduler_metadata=self.metadata,
            s_aux=None,
        )
        return self.vllm_out

    def reference(self, with_mass: bool) -> torch.Tensor:
        from kvslimmer_vllm.core import merged_attention

        out = torch.empty_like(self.query)
        d = self.d
        qsl = self.qsl.tolist()
        for r, slots in enumerate(self.slots):
            q0, q1 = qsl[r], qsl[r + 1]
            length = slots.numel()
            visible = torch.arange(length - (q1 - q0) + 1, length + 1)
            kv = self.kv.index_select(0, slots)
            counts = self.counts.index_select(0, slots)
            result = merged_attention(self.query[q0:q1], kv[..., :d], kv[..., d:], counts,
                                      scale=self.scale, visible=visible, return_mass=with_mass)
            if with_mass:
                out[q0:q1], mass = result
                self.mass.index_add_(0, slots, mass)
            else:
                out[q0:q1] = result
        return out


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def bench_case(name, spec, args) -> list[dict]:
    num_reqs, queries, length = spec
    case = Case(num_reqs, queries, length, hq=9, hkv=3, d=64, block_size=128, seed=args.seed)
    ours, theirs, ref = case.ours(False), case.vllm(), case.reference(False)
    diff_vllm = (ours - theirs).abs().max().item()
    diff_ref = (ours - ref).abs().max().item()
    case.mass.zero_()
    case.ours(True)
    ours_mass = case.mass.clone()
    case.mass.zero_()
    case.reference(True)
    diff_mass = (ours_mass - case.mass).abs().max().item()
    log(f"{name}: max |ours - vLLM| {diff_vllm:.2e}, |ours - reference| {diff_ref:.2e}, "
        f"mass {diff_mass:.2e}")
    if max(diff_vllm, diff_ref) > 1e-4 or diff_mass > 1e-3:
        raise SystemExit(f"{name}: outputs disagree; not timing a wrong kernel")

    repeats = args.repeats if queries == 1 else max(5, args.repeats // 2)
    rows = []
    for with_mass in (False, True):
        impls = {
            "ours": lambda m=with_mass: case.ours(m),
            "vllm": case.vllm,
            "reference": lambda m=with_mass: case.reference(m),
        }
        times = {key: [] for key in impls}
        keys = list(impls)
        for _ in range(args.warmup):
            for key in keys:
                impls[key]()
        for rep in range(repeats):
            for key in keys[rep % 3:] + keys[:rep % 3]:  # rotate the order every repeat
                start = time.perf_counter()
                impls[key]()
                times[key].append(time.perf_counter() - start)
        row = {
            "case": name, "mass": with_mass,
            **{key: median_ms(value) for key, value in times.items()},
            "check": (diff_vllm, diff_ref, diff_mass),
        }
        row["ours/vllm"] = row["ours"] / row["vllm"]
        row["ours/reference"] = row["ours"] / row["reference"]
        log(f"  mass={with_mass}: ours {row['ours']:.3f} ms, vLLM {row['vllm']:.3f} ms, "
            f"reference {row['reference']:.3f} ms ({repeats} repeats)")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| case | mass | ours ms | vLLM ms | reference ms | ours/vLLM | ours/reference |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {'yes' if row['mass'] else 'no'} | {row['ours']:.3f} "
            f"| {row['vllm']:.3f} | {row['reference']:.3f} | {row['ours/vllm']:.2f} "
            f"| {row['ours/reference']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=40,
                        help="timed calls per implementation for decode (prefill: half)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / OpenMP threads (default: torch's default)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES),
                        metavar="CASE", help=f"subset of: {', '.join(CASES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isa", default="auto", choices=["auto", "avx512", "avx2", "portable"],
                        help="instruction set of our kernel (default: the best this CPU runs)")
    parser.add_argument("--as-avx2", action="store_true",
                        help="compare as on an AVX2-only CPU: vLLM loads its AVX2 build "
                             "(vllm._C_AVX2) and ours runs its avx2 kernels")
    parser.add_argument("--output", type=Path,
                        default=ROOT / "results" / "cpu_attention" / "cpu_attention.md")
    args = parser.parse_args()

    if args.as_avx2:
        # vLLM picks its AVX2 or AVX-512 library from these (vllm/platforms/cpu.py), before
        # any of its ops is imported.
        torch.cpu._is_avx512_supported = lambda: False
        torch.cpu._is_amx_tile_supported = lambda: False
        args.isa = "avx2"
    import kvslimmer_vllm._C  # noqa: F401  registers torch.ops.kvslimmer

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    ours_isa = torch.ops.kvslimmer.cpu_isa(args.isa)
    log(f"{cpu_name()} ({' '.join(cpu_flags())}), {threads} threads, torch {torch.__version__}, "
        f"ours: {ours_isa}, vLLM: {vllm_isa(128, 64)}"
        f"{' (vLLM AVX2 build: --as-avx2)' if args.as_avx2 else ''}")

    load_before = os.getloadavg()
    rows = []
    for name in args.cases:
        rows.extend(bench_case(name, CASES[name], args))
    load_after = os.getloadavg()

    import vllm

    worst = max(row["ours/vllm"] for row in rows)
    worst_plain = max(row["ours/vllm"] for row in rows if not row["mass"])
    command = "python " + " ".join(shlex.quote(a) for a in [
        str(Path(sys.argv[0]).resolve().relative_to(ROOT))
        if Path(sys.argv[0]).resolve().is_relative_to(ROOT) else sys.argv[0], *sys.argv[1:]])
    report = "\n".join([
        "# CPU paged attention: kvslimmer C++ op vs vLLM's CPU kernel vs the PyTorch reference",
        "",
        f"Command: `{command}` (from the repository root)",
        "",
        f"Machine: {cpu_name()}, {threads} threads; flags: {' '.join(cpu_flags()) or 'none'}; "
        f"torch {torch.__version__}, vLLM {vllm.__version__} (`cpu_attention_with_kv_cache`, "
        f"ISA `{vllm_isa(128, 64)}`"
        f"{', its AVX2 build `vllm._C_AVX2` (--as-avx2)' if args.as_avx2 else ''}); "
        f"ours: `{ours_isa}` kernels. "
        "SmolLM2-135M shapes: Hq 9, Hkv 3, D 64, float32, block size 128, shuffled block ids. "
        "Medians of interleaved calls (ms per call, one layer). "
        f"Load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after: on a "
        "shared machine other processes' load slows the two-thread runs of all columns.",
        "",
        table(rows),
        "",
        f"Goal: ours/vLLM <= {GOAL}. Worst ours/vLLM: {worst_plain:.2f} without mass, "
        f"{worst:.2f} over all rows ({'met' if worst <= GOAL else 'NOT met'}).",
        "",
        "`mass = yes`: ours also accumulates the observation mass in place; the reference then "
        "runs `merged_attention(..., return_mass=True)` plus `index_add_` as "
        "`engine/attention.py` does; vLLM computes no mass (same vLLM call in both rows). "
        "`decode 8x1 @L`: 8 requests, one query each, L slots each; `prefill 1x256 @2048`: "
        "one request, 256 query rows, the last of which sees 2048 slots (causal). "
        "Interleaving also means each call finds the KV data mostly evicted from the caches by "
        "the other implementations' calls, as in an engine where every layer reads its own cache.",
        "",
        "Checks before timing (max abs difference of outputs, counts all ones): " + "; ".join(
            f"{row['case']}: vs vLLM {row['check'][0]:.1e}, vs reference {row['check'][1]:.1e}, "
            f"mass {row['check'][2]:.1e}" for row in rows if not row["mass"]),
        "",
    ])
    print(table(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report, encoding="utf-8")
    log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
