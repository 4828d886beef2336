"""One prompt-end compression step against the prefill it follows, in one engine.

What it measures
----------------
A ``--kv-merge kvslimmer --kv-merge-observe prompt-end`` engine (the default model,
float32, eager, in this process) is given one long prompt twice:

* with ``vllm_xargs kv_merge: off``: the prefill alone (``--max-tokens`` decode steps);
* with merging on: the same prefill, then, before the first decode step, the one
  compression step that brings the request from the prompt's length to the budget
  (successive sub-rounds over every layer: ``engine.slots.apply_round``, timed inside
  the worker).

It prints the step's seconds, the merge-off request's seconds, and their ratio (issue
target: the step in at most 10% of that request's prefill time, 16,384 slots to 2,048
over 30 layers). SmolLM2 was trained on 8,192 positions: longer prompts run with
``VLLM_ALLOW_LONG_MAX_MODEL_LEN=1`` (timing only; the answers do not matter here).

Run: ``python benchmarks/compress_step.py`` (16,384 tokens: several minutes on 2 CPU
cores); ``--tokens 4096`` for a quick run. The table also goes to
``results/compress_step/compress_step.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(f"[compress_step] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384, help="prompt length")
    parser.add_argument("--budget", type=int, default=2048, help="slots after the step")
    parser.add_argument("--max-tokens", type=int, default=2,
                        help="decode steps per request (the step runs before the first)")
    parser.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "compress_step")
    args = parser.parse_args(argv)
    if args.budget >= args.tokens:
        parser.error("--budget must be below --tokens")

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the worker in-process
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvslimmer_vllm.engine import worker as worker_module
    from kvslimmer_vllm.engine.plugin import engine_kwargs
    from kvslimmer_vllm.eval.text import documentation_tokens
    from kvslimmer_vllm.models import fetch_model

    steps: list[float] = []
    apply_round = worker_module.apply_round

    def timed_round(*a, **k):
        started = time.perf_counter()
        apply_round(*a, **k)
        steps.append(time.perf_counter() - started)

    worker_module.apply_round = timed_round

    model = args.model or str(fetch_model())
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = documentation_tokens(tokenizer, args.tokens, seed=1)
    block = 128
    max_len = -(-(args.tokens + args.max_tokens + 64) // block) * block
    cpu = not torch.cuda.is_available()
    llm = LLM(model=model, dtype="float32" if cpu else "auto", enforce_eager=True,
              max_model_len=max_len, block_size=block, seed=0,
              num_gpu_blocks_override=max_len // block + 2,
              gpu_memory_utilization=0.3 if cpu else 0.9,
              **engine_kwargs(budget=args.budget, observe="prompt-end"))

    def run(**xargs) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                min_tokens=args.max_tokens, ignore_eos=True,
                                extra_args=xargs or None)
        started = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        seconds = time.perf_counter() - started
        merged = (out[0].kv_transfer_params or {}).get("kv_merge") or {}
        log(f"{xargs or 'merging'}: {seconds:.1f} s, {merged}")
        return seconds

    log(f"{args.tokens}-token prompt, budget {args.budget}, model {model}")
    run(kv_merge="off")  # warm-up of the long shapes
    plain = run(kv_merge="off")
    steps.clear()
    merging = run()
    step = sum(steps)
    rows = [
        ("prefill + decode, merging off", f"{plain:.2f}"),
        ("prefill + compression step + decode, merging on", f"{merging:.2f}"),
        (f"compression step ({len(steps)} call(s) of apply_round)", f"{step:.2f}"),
        ("step / merging-off request", f"{step / plain:.3f}"),
    ]
    table = "\n".join(["| | seconds |", "|---|---:|"] + [f"| {a} | {b} |" for a, b in rows])
    report = "\n".join([
        "# One prompt-end compression step vs the prefill it follows",
        "",
        f"Command: `python benchmarks/compress_step.py {' '.join(sys.argv[1:])}`".rstrip()
        + " (from the repository root)",
        "",
        f"Model {Path(model).name}, {'float32' if cpu else 'auto dtype'}, eager; "
        f"{args.tokens}-token prompt to {args.budget} slots, {args.max_tokens} decode "
        f"steps; machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        table,
        "",
    ])
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compress_step.md").write_text(report, encoding="utf-8")
    log(f"wrote {args.out / 'compress_step.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
