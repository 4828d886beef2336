"""The merge-round benchmark runs its six paths (the engine's, gathered layer batches,
gathered per layer, reference value spread, protected sub-rounds one layer after another,
the engine's with a score reduction), checks they leave the same cache, and writes its
table. It runs SnapMerge, so the in-place C++ round, the lock step of the gathered rounds and
the layer-by-layer reference must all agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_merge_round_benchmark_writes_a_row_per_case(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "merge_round.py"), "--repeats", "1", "--method", "snapmerge",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in (tmp_path / "merge_round.md").read_text()
            .splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [(int(r[0]), int(r[1]), r[2].strip()) for r in rows] == [
        (1006, 256, "progressive"), (1124, 374, "progressive"), (3104, 1024, "progressive"),
        (879, 129, "prompt-end"), (3000, 2250, "prompt-end")]
    for row in rows:
        # engine, gathered, per layer, reference-stats, one-by-one and reduced times, and
        # the ratios
        assert len(row) == 15 and all(float(row[i]) > 0 for i in range(3, 14))
        # Dispatched torch ops: the lock step's round needs fewer than one layer at a time.
        gathered, one_by_one = (int(c) for c in row[14].split(" / "))
        assert 0 < gathered < one_by_one, row
