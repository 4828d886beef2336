"""Offline prefill rate on CPU with vLLM's default core split and with every core given to
the engine (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``), side by side, full KV, same prompts.

vLLM's CPU worker keeps one core for the front-end process by default; on a 2-core
machine that halves the engine. ``kvslimmer-vllm eval`` (offline) sets the variable to 0
unless it is already set.

    python benchmarks/cpu_cores.py [--model DIR] [--prompts 12] [--tokens 1000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _one(model: str, prompts: int, tokens: int) -> None:
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=tokens + 64,
              gpu_memory_utilization=0.3, seed=0)
    rng = random.Random(0)
    batch = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000) for _ in range(tokens)])
             for _ in range(prompts)]
    start = time.perf_counter()
    llm.generate(batch, SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)
    print(f"RATE {prompts * tokens / (time.perf_counter() - start):.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None:
        from kvslimmer_vllm.models import fetch_model

        args.model = str(fetch_model())
    if args.child:
        _one(args.model, args.prompts, args.tokens)
        return
    rates = {}
    for label, reserved in (("vLLM default", None), ("VLLM_CPU_NUM_OF_RESERVED_CPU=0", "0")):
        env = dict(os.environ)
        env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
        if reserved is not None:
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserved
        print(f"running: {label} ...", file=sys.stderr, flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--model", args.model, "--prompts",
             str(args.prompts), "--tokens", str(args.tokens)],
            env=env, capture_output=True, text=True, check=True,
        ).stdout
        rates[label] = float(next(l for l in out.splitlines() if l.startswith("RATE")).split()[1])
    base = rates["vLLM default"]
    print(f"| engine cores ({os.cpu_count()} CPUs) | prompt tokens/s | ratio |")
    print("|---|---|---|")
    for label, rate in rates.items():
        print(f"| {label} | {rate:.0f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
