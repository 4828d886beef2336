"""The serving benchmark's small preset against the session's two running servers
(``--base-url`` / ``--merge-url``): both complete every request and the report, CSV and
plots are written. Starting its own servers is the same code path after start-up
(``Server`` vs ``RemoteServer``); the servers' start-up itself is covered by
tests/engine/test_cli.py and the session fixtures."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = [sys.executable, str(ROOT / "benchmarks" / "serve_bench.py")]


def test_small_preset_completes_every_request(model_dir, base_server, merge_server, tmp_path):
    """Catches: requests left incomplete or failing (the API key or the served model name
    not passed, vllm_xargs refused), the preset's budget not sent to the merging server
    (nothing merged), the merge share not read from /metrics, an observe mode not sent
    per request (both modes are driven on the one merging server), the ``off`` arm merging
    anyway, or a missing report or plot."""
    before = merge_server.metrics()["vllm:kv_merge_tokens_merged_total"]
    out = tmp_path / "bench"
    proc = subprocess.run(
        [*BENCH, "--preset", "small", "--model", model_dir, "--out", str(out),
         "--base-url", base_server.url, "--merge-url", merge_server.url,
         "--api-key", merge_server.api_key, "--budget", "256",
         "--observe", "off,progressive,prompt-end"],
        capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "serve_bench.csv")))
    variants = ("kv-merge/progressive", "kv-merge/prompt-end")
    assert {r["server"] for r in rows} == {"unmodified", "kv-merge/off", *variants}
    off_rows = [r for r in rows if r["server"] == "kv-merge/off"]
    assert len(off_rows) == 2 and all(float(r["merge_share"]) == 0 for r in off_rows)
    for row in rows:
        assert int(row["completed"]) == int(row["requests"]) > 0
        assert float(row["out_tok_per_s"]) > 0
        assert float(row["preemptions"]) >= 0  # read from vLLM's counter
    for variant in variants:
        merge_rows = [r for r in rows if r["server"] == variant]
        assert len(merge_rows) == 2  # the small preset's two concurrency levels
        assert all(0 <= float(r["merge_share"]) < 1 for r in merge_rows)
        # The small preset's prompts (600-900 tokens) exceed the budget.
        assert any(float(r["merge_share"]) > 0 for r in merge_rows)
    assert merge_server.metrics()["vllm:kv_merge_tokens_merged_total"] > before
    report = (out / "serve_bench.md").read_text()
    assert "kv-merge / unmodified" in report
    assert f"server at {merge_server.url}" in report
    for mode in ("progressive", "prompt-end"):
        assert json.dumps({"kv_merge_budget": 256, "kv_merge_observe": mode}) in report
        assert f"| kv-merge/{mode} | 4 |" in report  # ratio row at concurrency 4
        # The decode check: kv-merge at L, unmodified at B and at L, both ratios measured.
        row = next(line for line in report.splitlines()
                   if line.startswith(f"| kv-merge/{mode} | 900 | 256 |"))
        cells = [float(c) for c in row.strip("|").split("|")[4:]]
        assert len(cells) == 5 and all(c > 0 for c in cells), row
    assert json.dumps({"kv_merge": "off"}) in report and "| kv-merge/off | 4 |" in report
    assert "| kv-merge/off | 900 |" not in report  # no decode check for the off arm
    assert "48 KV blocks" in report
    for name in ("throughput.png", "kv_usage.png"):
        assert (out / name).stat().st_size > 1000


def test_servers_that_cannot_be_compared_are_refused(model_dir, base_server, merge_server,
                                                     tmp_path):
    """Catches: a benchmark run against two unmodified servers (or a merging server given
    as the baseline) reporting ratios that compare nothing, or one whose every merging
    request the server refuses (a budget above the server's) running to the end without
    saying why."""
    for base, merge, flag, message, extra in [
        (base_server, base_server, "--merge-url", "does not merge KV", []),
        (merge_server, merge_server, "--base-url", "merges KV", []),
        (base_server, merge_server, "--merge-url", "vllm_xargs.kv_merge_budget",
         ["--budget", "300"]),
    ]:
        proc = subprocess.run(
            [*BENCH, "--preset", "small", "--model", model_dir, "--out", str(tmp_path),
             "--base-url", base.url, "--merge-url", merge.url, "--api-key",
             merge_server.api_key, *extra],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode != 0
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"serve_bench: error: {flag}") and message in last, last
    alone = subprocess.run([*BENCH, "--base-url", base_server.url], capture_output=True,
                           text=True, timeout=300)
    assert alone.returncode == 2 and "--base-url and --merge-url go together" in alone.stderr
    for observe in ("progressive,streaming", "prompt-end,prompt-end", ","):
        bad = subprocess.run([*BENCH, "--observe", observe], capture_output=True, text=True,
                             timeout=300)
        assert bad.returncode == 2 and "--observe must list distinct modes" in bad.stderr


def test_presets_size_the_cache_and_budget_as_documented():
    """The prefill-heavy mix of issue #16 (74 blocks, budget 625, 12 clients, 2,000-3,000
    prompt and 64-128 output tokens) and the default preset's documented 100 blocks and
    budget 750; catches a preset edit that silently changes what the README compares."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def plan(name):
        p = serve_bench.PRESETS[name]
        return serve_bench.cache_plan(p["prompt_tokens"], p["output_tokens"],
                                      p["budget_ratio"], p["cache_requests"])

    heavy = serve_bench.PRESETS["prefill-heavy"]
    assert plan("prefill-heavy") == (625, 4096, 74)
    assert (heavy["concurrency"], heavy["requests_per_level"], heavy["interval"]) == (
        (12,), 12, 128)
    assert plan("default") == (750, 8192, 100)


def test_ttft_preset_and_repeated_levels():
    """The ttft preset: one 3,000-token prompt and one output token per level, four levels,
    the off arm beside both observe modes, no decode check; and the ratio table of repeated
    levels compares medians (catches a table that keeps only the last repeat)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import serve_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    p = serve_bench.PRESETS["ttft"]
    assert (p["prompt_tokens"], p["output_tokens"], p["concurrency"]) == (
        (3000, 3000), (1, 1), (1, 1, 1, 1))
    assert p["observe"] == ("off", "progressive", "prompt-end") and not p["decode_check"]
    assert serve_bench.merge_xargs(None, "off") == {"kv_merge": "off"}
    rows = [{"server": "unmodified", "concurrency": 1, "ttft_p50": t, "note": "x"}
            for t in (9.0, 1.0, 5.0, 7.0)]
    merged = serve_bench._by_level(rows)[("unmodified", 1)]
    assert merged["ttft_p50"] == 6.0 and merged["note"] == "x"
