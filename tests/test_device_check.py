"""scripts/device_check.sh runs its benchmarks on a machine without vLLM, pydantic, the C++
op or an installed package (simulated here), in its CPU smoke mode, and writes its report.

The tests it would run first (tests/core, tests/kernels) are run by the suite itself, so
``--bench-only`` skips them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvslimmer_vllm.core.merge import subround_sizes
from kvslimmer_vllm.engine.memory import footprint_per_slot, round_reserve_bytes

ROOT = Path(__file__).resolve().parent.parent

# sitecustomize.py of the simulated bare machine: what it lacks cannot be imported, and the
# repository is not installed (the editable install's finder is dropped), only on PYTHONPATH.
BARE_MACHINE = '''
import sys

ABSENT = ("vllm", "pydantic", "pydantic_core", "transformers", "kvslimmer_vllm._C")


class _Absent:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if any(name == a or name.startswith(a + ".") for a in ABSENT):
            raise ModuleNotFoundError(f"No module named {name!r} (simulated bare machine)",
                                      name=name)
        return None


sys.meta_path[:] = [_Absent] + [f for f in sys.meta_path
                                if not getattr(f, "__module__", "").startswith("__editable__")]
'''

# CPU profile of scripts/device_check.py.
ATTENTION_CASES = {(case, slots) for case in ("decode", "prefill") for slots in (256, 1024)}
MERGE_CASES = {(layers, 1024, target) for layers in (1, 4) for target in (512, 256)}


def _bare_env(tmp_path: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BARE_MACHINE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, PYTHONPATH=str(site), CUDA_VISIBLE_DEVICES="",
               OUT=str(tmp_path / "out"))
    return env


def _table(markdown: str, keep) -> list[list[str]]:
    """Cells of the markdown table rows whose first cell ``keep`` accepts."""
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in markdown.splitlines()
            if line.startswith("| ")]
    return [r for r in rows if keep(r[0])]


def _number(cell: str) -> float:
    value = float(cell)
    assert math.isfinite(value), cell
    return value


def test_simulated_machine_lacks_pydantic(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import pydantic"], env=_bare_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "simulated bare machine" in proc.stderr


def test_cpu_smoke_mode_writes_every_row(tmp_path):
    env = _bare_env(tmp_path)
    proc = subprocess.run([str(ROOT / "scripts" / "device_check.sh"), "--bench-only"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = Path(env["OUT"])
    markdown = (out / "device_check.md").read_text(encoding="utf-8")
    log = (out / "device_check.log").read_text(encoding="utf-8")
    assert "CPU smoke mode" in markdown and "CPU smoke mode" in proc.stdout
    assert "[device_check] report written to" in log
    assert "- result: PASS" in markdown
    assert "- command: `scripts/device_check.sh --bench-only`" in markdown
    assert "- tests: not run (--bench-only)" in markdown
    assert "the Python reference (C++ op not loadable)" in markdown  # _C was blocked

    attention = _table(markdown, lambda cell: cell in ("decode", "prefill"))
    assert {(r[0], int(r[2])) for r in attention} == ATTENTION_CASES
    for row in attention:
        times, ratios = [_number(c) for c in row[3:6]], [_number(c) for c in row[6:8]]
        assert all(t > 0 for t in times) and all(r > 0 for r in ratios), row
        assert _number(row[8]) < 1e-4, f"Triton disagrees with SDPA: {row}"
        assert _number(row[9]) < 1e-3, f"mass total off: {row}"
        assert row[10] == "yes", row

    merges = _table(markdown, str.isdigit)
    assert {(int(r[0]), int(r[1]), int(r[2])) for r in merges} == MERGE_CASES
    for row in merges:  # both kernel sets ran, agreed, and took their own time
        assert int(row[3]) >= 1 and row[8] == "yes", row
        torch_ms, triton_ms, ratio = _number(row[4]), _number(row[5]), _number(row[6])
        select_ms = _number(row[7])
        assert 0 < select_ms <= min(torch_ms, triton_ms), row
        assert ratio == pytest.approx(triton_ms / torch_ms, rel=0.02, abs=0.01), row
        # Off CUDA no peak is measured; the reservation is engine.memory's for the round.
        layers, slots = int(row[0]), int(row[1])
        reserved = layers * slots * 4 * footprint_per_slot(1, 64, torch.float32, "gathered")
        assert row[9:] == ["- / -", f"{reserved / 2**20:.1f}", "yes"], row

    # SnapMerge's protected round: lock step vs one layer after another, same slots chosen,
    # one host round trip per sub-round instead of one per layer and sub-round.
    (snap,) = _table(markdown, lambda cell: cell == "snapmerge")
    assert (int(snap[1]), int(snap[2]), int(snap[3])) == (4, 1024, 256), snap
    lock_trips, serial_trips = (int(t) for t in snap[4].split(" / "))
    # A protected layer never frees more per sub-round than an unprotected one, so each of
    # the 4 layers needs at least the unprotected schedule's sub-rounds (1024 slots, sink
    # 32, recent 128, 768 freed, quarter-size sub-rounds). One by one makes a round trip
    # per layer and sub-round (the sum over layers), the lock step one per sub-round (the
    # most any layer needs).
    fewest = len(subround_sizes(1024 - 32 - 128, 768, 0.25))
    assert lock_trips >= fewest, snap
    assert serial_trips >= 4 * fewest, snap
    assert serial_trips <= 4 * lock_trips, snap  # a sum of 4 counts, each <= their maximum
    assert serial_trips > lock_trips, snap
    lock_ms, serial_ms = _number(snap[5]), _number(snap[6])
    assert lock_ms > 0 and serial_ms > 0, snap
    assert _number(snap[7]) == pytest.approx(lock_ms / serial_ms, rel=0.02, abs=0.01), snap
    assert _number(snap[9]) > 0 and snap[10] == "yes", snap

    # The eviction as CUDA caches run it: in place from a staged copy of the moved rows vs
    # gathered, the same caches left, each path's reservation from engine.memory.
    (evict,) = _table(markdown, lambda cell: cell == "eviction")
    assert evict[1:4] == ["4", "1024", "256"], evict
    staged_ms, gathered_ms = _number(evict[4]), _number(evict[5])
    assert staged_ms > 0 and gathered_ms > 0, evict
    assert _number(evict[6]) == pytest.approx(staged_ms / gathered_ms, rel=0.02, abs=0.01)
    reserved = [round_reserve_bytes(4, 1024, 1, 64, torch.float32, path) / 2**20
                for path in ("staged", "gathered")]
    assert evict[7:] == ["- / -", f"{reserved[0]:.1f} / {reserved[1]:.1f}", "yes", "yes"], \
        evict
    assert reserved[0] < reserved[1]
