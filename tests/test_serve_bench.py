"""The serving benchmark's small preset: both servers complete every request and the
report, CSV and plots are written."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_small_preset_completes_every_request(model_dir, tmp_path):
    """Catches: the benchmark's servers failing to start or serve (either flag set),
    requests left incomplete, the merge share not read from /metrics, or a missing
    report or plot."""
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--preset", "small",
         "--model", model_dir, "--out", str(out)],
        capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "serve_bench.csv")))
    assert {r["server"] for r in rows} == {"unmodified", "kv-merge"}
    for row in rows:
        assert int(row["completed"]) == int(row["requests"]) > 0
        assert float(row["out_tok_per_s"]) > 0
    merge_rows = [r for r in rows if r["server"] == "kv-merge"]
    assert all(0 <= float(r["merge_share"]) < 1 for r in merge_rows)
    report = (out / "serve_bench.md").read_text()
    assert "kv-merge / unmodified" in report and "--kv-merge kvslimmer" in report
    for name in ("throughput.png", "kv_usage.png"):
        assert (out / name).stat().st_size > 1000
