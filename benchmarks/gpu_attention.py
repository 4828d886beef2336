"""GPU attention speed: our Triton paged attention against vLLM's Triton unified attention.

What it measures
----------------
The time of one attention call of one layer over a paged KV cache, for

* ``ours``: :func:`kvslimmer_vllm.triton_kernels.paged_attention.paged_attention` with a
  ``counts`` tensor (all ones, so the ``log(count)`` bias is loaded and added but the result
  equals plain attention), no mass;
* ``ours+mass``: the same call that also accumulates the observation mass (second kernel);
* ``vLLM``: ``vllm.v1.attention.ops.triton_unified_attention.unified_attention``, the kernel
  of vLLM's TRITON_ATTN backend, called as that backend calls it for these batches (2-D
  launch: no softmax-segment buffers; vLLM itself uses the 2-D path when a batch has more
  than ``128 / Hkv`` sequences or any prefill, which covers every case here).

Equal physical length: both read the same cache memory, block table and query. Our layout is
slot-major ``[S, Hkv, 2 * D]`` (key then value per head); vLLM gets the key and value views
``[blocks, block_size, Hkv, D]`` of it, which is how its TRITON_ATTN backend (0.32) itself
splits its ``[..., 2 * head_size]`` cache, so neither kernel gets a friendlier layout. vLLM is
also given per-sequence unit K/V descales, as that backend passes them. The block table is a
random permutation of the blocks (scattered, as in a long-running server). Outputs of ours
(counts all ones) and vLLM are compared: the largest absolute difference is reported.

Cases (Llama-3-8B-like: Hq 32, Hkv 8, D 128, bfloat16, block size 16): decode, 64 requests of
one query row over 2K, 8K and 32K slots; prefill, one request of 2048 query rows whose
sequence ends at 8K slots (a 2048-token chunk on top of 6K cached ones, causal).

Timing: CUDA events around ``inner`` back-to-back calls (``inner`` chosen so a sample takes
about 5 ms), the variants interleaved within each repeat, median over ``--repeats`` repeats,
reported per call. Every kernel is compiled and warmed up before timing.

``--tilings 16/32/4,64/64/8`` also times ours (no mass) under forced tile sizes
(``BLOCK_M/TILE_N/num_warps``) in a second table, to tune ``_launch_config`` on a GPU.

Output: a markdown table printed and written to ``--out``
(default ``results/gpu_attention/gpu_attention.md``). Without a CUDA device the script says
so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
CASES = [
    # name, requests, query rows per request, slots per request
    ("decode 2K", 64, 1, 2048),
    ("decode 8K", 64, 1, 8192),
    ("decode 32K", 64, 1, 32768),
    ("prefill 2048 over 8K", 1, 2048, 8192),
]


def build_case(num_reqs: int, rows: int, length: int, seed: int, device: str = "cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_req = -(-length // BLOCK_SIZE)
    num_blocks = num_reqs * blocks_per_req
    kv = torch.randn(num_blocks * BLOCK_SIZE, KV_HEADS, 2 * HEAD_DIM, device=device,
                     dtype=DTYPE, generator=gen)
    table = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    table = table.view(num_reqs, blocks_per_req).contiguous()
    query = torch.randn(num_reqs * rows, Q_HEADS, HEAD_DIM, device=device, dtype=DTYPE,
                        generator=gen)
    seq_lens = torch.full((num_reqs,), length, dtype=torch.int32, device=device)
    qsl = torch.arange(0, num_reqs * rows + 1, rows, dtype=torch.int32, device=device)
    counts = torch.ones(kv.shape[0], dtype=torch.float32, device=device)
    mass = torch.zeros(kv.shape[0], KV_HEADS, dtype=torch.float32, device=device)
    paged = kv.view(num_blocks, BLOCK_SIZE, KV_HEADS, 2 * HEAD_DIM)
    key_cache, value_cache = paged[..., :HEAD_DIM], paged[..., HEAD_DIM:]
    descale = torch.ones((), dtype=torch.float32, device=device).expand(num_reqs, KV_HEADS)
    return dict(kv=kv, table=table, query=query, seq_lens=seq_lens, qsl=qsl, counts=counts,
                mass=mass, key_cache=key_cache, value_cache=value_cache, descale=descale,
                rows=rows, length=length)


def make_calls(case, ours_fn, vllm_fn):
    scale = HEAD_DIM ** -0.5
    out_ours = torch.empty_like(case["query"])
    out_mass = torch.empty_like(case["query"])
    out_vllm = torch.empty_like(case["query"])

    def ours():
        ours_fn(case["query"], case["kv"], case["counts"], case["table"], case["seq_lens"],
                case["qsl"], scale, BLOCK_SIZE, out=out_ours)

    def ours_mass():
        ours_fn(case["query"], case["kv"], case["counts"], case["table"], case["seq_lens"],
                case["qsl"], scale, BLOCK_SIZE, case["mass"], out=out_mass)

    calls = {"ours": ours, "ours+mass": ours_mass}
    if vllm_fn is not None:
        def vllm():
            vllm_fn(
                q=case["query"], k=case["key_cache"], v=case["value_cache"], out=out_vllm,
                cu_seqlens_q=case["qsl"], max_seqlen_q=case["rows"],
                seqused_k=case["seq_lens"], max_seqlen_k=case["length"],
                softmax_scale=scale, causal=True, window_size=(-1, -1),
                block_table=case["table"], softcap=0.0,
                q_descale=None, k_descale=case["descale"], v_descale=case["descale"],
            )
        calls["vLLM"] = vllm
    return calls, out_ours, out_vllm


def add_tiling_variants(calls: dict, case, module, tilings: list[str]) -> None:
    """Extra ``ours`` variants (no mass) with forced tilings ``BLOCK_M/TILE_N/num_warps``,
    to tune ``_launch_config`` on a GPU; the override is active only inside each call."""
    scale = HEAD_DIM ** -0.5
    group = Q_HEADS // KV_HEADS
    out = torch.empty_like(case["query"])
    for spec in tilings:
        block_m, tile_n, warps = (int(x) for x in spec.split("/"))
        cfg = dict(BLOCK_M=block_m, BLOCK_Q=block_m // group, TILE_N=tile_n, num_warps=warps)

        def call(cfg=cfg):
            saved = module._launch_config
            module._launch_config = lambda *args: cfg
            try:
                module.paged_attention(case["query"], case["kv"], case["counts"],
                                       case["table"], case["seq_lens"], case["qsl"], scale,
                                       BLOCK_SIZE, out=out)
            finally:
                module._launch_config = saved
        calls[f"ours {spec}"] = call


def time_one(fn, inner: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


def bench(calls: dict, repeats: int) -> dict:
    for fn in calls.values():  # compile + warm up
        fn()
        fn()
    torch.cuda.synchronize()
    inner = {}
    for name, fn in calls.items():
        once = time_one(fn, 3)
        inner[name] = max(1, min(200, int(5.0 / max(once, 1e-3))))
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            samples[name].append(time_one(fn, inner[name]))
    return {name: statistics.median(v) for name, v in samples.items()}


def format_table(rows, header: str) -> str:
    """Markdown table of ``(name, requests, rows, slots, {variant: ms}, max_diff)`` rows."""

    def ratio(t, a, b):
        return f"{t[a] / t[b]:.2f}" if a in t and b in t else "n/a"

    def us(t, k):
        return f"{t[k] * 1e3:.1f}" if k in t else "n/a"

    lines = [
        header,
        "",
        f"Hq {Q_HEADS}, Hkv {KV_HEADS}, D {HEAD_DIM}, {str(DTYPE).removeprefix('torch.')}, "
        f"block {BLOCK_SIZE}, scattered blocks, one cache shared by both kernels; ours with "
        "unit counts (bias loaded and added).",
        "",
        "| case | requests x rows | slots/request | ours (us) | ours+mass (us) | vLLM (us) "
        "| ours/vLLM | ours+mass/vLLM | max abs diff vs vLLM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, num_reqs, q_rows, length, t, diff in rows:
        lines.append(
            f"| {name} | {num_reqs} x {q_rows} | {length} | {us(t, 'ours')} | "
            f"{us(t, 'ours+mass')} | {us(t, 'vLLM')} | {ratio(t, 'ours', 'vLLM')} | "
            f"{ratio(t, 'ours+mass', 'vLLM')} | {diff:.2e} |"
        )
    table = "\n".join(lines) + "\n"
    extra = sorted({k for *_, t, _d in rows for k in t if k.startswith("ours ")})
    if extra:
        table += "\nForced tilings of ours (BLOCK_M/TILE_N/num_warps), us per call:\n\n"
        table += "| case | default | " + " | ".join(extra) + " |\n"
        table += "|---|---|" + "---|" * len(extra) + "\n"
        for name, *_, t, _d in rows:
            cells = [f"{t[k] * 1e3:.1f}" if k in t else "n/a" for k in extra]
            table += f"| {name} | {t['ours'] * 1e3:.1f} | " + " | ".join(cells) + " |\n"
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("results/gpu_attention/gpu_attention.md"))
    parser.add_argument("--cases", default="all",
                        help="comma-separated case indexes (0-3) or 'all'")
    parser.add_argument("--tilings", default="",
                        help="extra forced tilings of ours (no mass) to time, comma-separated "
                             "BLOCK_M/TILE_N/num_warps, e.g. 16/32/4,64/64/8 (BLOCK_M >= 4)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("gpu_attention: no CUDA device here; this benchmark needs an NVIDIA GPU. Skipped.")
        return 0

    from kvslimmer_vllm.triton_kernels import paged_attention as attention_module
    from kvslimmer_vllm.triton_kernels.paged_attention import paged_attention

    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except Exception as exc:  # noqa: BLE001 - report and carry on with ours only
        print(f"gpu_attention: cannot import vLLM's unified_attention ({exc!r}); "
              "timing ours only.")
        unified_attention = None

    import triton

    if args.cases == "all":
        selected = range(len(CASES))
    else:
        selected = [int(i) for i in args.cases.split(",")]
    rows = []
    for index in selected:
        name, num_reqs, q_rows, length = CASES[index]
        case = build_case(num_reqs, q_rows, length, seed=index)
        calls, out_ours, out_vllm = make_calls(case, paged_attention, unified_attention)
        tilings = [t for t in args.tilings.split(",") if t]
        add_tiling_variants(calls, case, attention_module, tilings)
        times = bench(calls, args.repeats)
        diff = float("nan")
        if "vLLM" in calls:
            calls["ours"]()
            calls["vLLM"]()
            torch.cuda.synchronize()
            diff = (out_ours.float() - out_vllm.float()).abs().max().item()
        rows.append((name, num_reqs, q_rows, length, times, diff))
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in times.items()),
              flush=True)
        del case, calls, out_ours, out_vllm
        torch.cuda.empty_cache()

    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    try:
        import vllm

        versions += f", vLLM {vllm.__version__}"
    except Exception:  # noqa: BLE001
        pass
    header = (f"GPU attention, {torch.cuda.get_device_name()}, {versions}; "
              f"median of {args.repeats} interleaved repeats, per call.")
    table = format_table(rows, header)
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
