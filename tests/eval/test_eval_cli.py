"""`kvslimmer-vllm eval --quick` through the real engine: every method, real scores, files."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

from kvslimmer_vllm.core.config import DEFAULT_OBSERVE
from kvslimmer_vllm.eval.spec import EVAL_METHODS
from kvslimmer_vllm.eval.tasks import ALL_TASKS

CLI = str(Path(sys.executable).parent / "kvslimmer-vllm")


def test_quick_eval_writes_real_results(model_dir, tmp_path):
    """Catches: a method or task missing from the sweep, scores out of range, full KV
    failing the easy cells (the engine path broken), or a report file not written."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [CLI, "eval", "--quick", "--model", model_dir, "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    rows = list(csv.DictReader(open(out / "rows.csv")))
    seen = {(r["task"], r["method"]) for r in rows}
    for task in ALL_TASKS:
        for method in ("none", *EVAL_METHODS):
            if task == "agreement" and method == "none":
                continue
            assert ((task, method) in seen) is True, (task, method)
    # Prompt-end variants score the NLL continuation after their step: not full KV's NLL.
    nll = {r["method"]: float(r["score"]) for r in rows if r["task"] == "nll"}
    prompt_end = [m for m in EVAL_METHODS if DEFAULT_OBSERVE[m] == "prompt-end"]
    assert all(nll[m] != nll["none"] for m in prompt_end), nll
    for r in rows:
        score = float(r["score"])
        if r["task"] == "nll":
            assert 0.5 < score < 10 and math.isfinite(score)
        else:
            assert 0.0 <= score <= 1.0
        if r["method"] != "none":
            assert int(r["budget_tokens"]) < int(r["prompt_tokens"])
    full = {r["task"]: float(r["score"]) for r in rows if r["method"] == "none"}
    # The easy cells: a 135M model finds a pass key and a keyed number in 512 tokens.
    assert full["needle"] == 1.0 and full["multikey"] == 1.0
    summary = (out / "summary.md").read_text()
    assert "| kvslimmer | 50% |" in summary and "needle@512" in summary
    assert "## Score by needle depth" in summary
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_flags_fail_with_one_clear_line(model_dir, tmp_path):
    """Catches: an impossible budget accepted, refused with a traceback, or refused only
    after an engine was started for it (a user waits for the engine before the error)."""
    proc = subprocess.run(
        [CLI, "eval", "--budgets", "0.01", "--lengths", "512", "--tasks", "needle",
         "--model", model_dir, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "--budgets: 1% of a" in proc.stderr and "outside what the engine allows" in proc.stderr
    assert "LLM engine" not in proc.stderr and "engine: " not in proc.stderr


def test_help_names_every_method_and_task():
    """Catches: a method or task added to the sweep but missing from ``eval --help``."""
    from kvslimmer_vllm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    # argparse wraps long words anywhere: compare without whitespace
    text = "".join(sub.choices["eval"].format_help().split())
    methods = text.rsplit("--methodsMETHODS", 1)[1].split("--observe", 1)[0]
    tasks = text.rsplit("--tasksTASKS", 1)[1].split("--cases", 1)[0]
    for name in EVAL_METHODS:
        assert name in methods, name
    for name in ALL_TASKS:
        assert name in tasks, name
