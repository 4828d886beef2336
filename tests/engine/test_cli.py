"""`vllm` on the command line after the project's install: version, help, bad input.

Bad flag values and rejected combinations must stop `vllm serve` before the model
loads, with a one-line message naming the option and what is allowed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VLLM = str(Path(sys.executable).parent / "vllm")
ON_CPU = not torch.cuda.is_available()


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([VLLM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})


def test_vllm_version_reports_the_pinned_release():
    proc = _run("--version")
    assert proc.returncode == 0, proc.stderr
    version = proc.stdout.strip().splitlines()[-1]
    assert version.startswith("0.32.0")
    if ON_CPU:
        assert version == "0.32.0+cpu"


def test_cpu_platform_is_detected():
    code = "from vllm.platforms import current_platform as p; print(p.device_type)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == ("cpu" if ON_CPU else "cuda")


def test_transformers_imports_cleanly_beside_the_cpu_torch():
    code = ("from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "import vllm.model_executor.models.llama; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_serve_help_lists_the_kv_merge_flags():
    proc = _run("serve", "--help=KVMerge")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--kv-merge {none,kvslimmer,average,evict,streaming}", "--kv-merge-budget",
                 "--kv-merge-sink", "--kv-merge-recent", "--kv-merge-interval",
                 "--kv-merge-config"):
        assert flag in proc.stdout


def test_plugin_is_registered_for_every_vllm_process():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("kvslimmer") == "kvslimmer_vllm.engine.plugin:register"


@pytest.fixture(scope="module")
def sliding_window_model(model_dir, tmp_path_factory) -> str:
    """The default model's files with a Mistral config that has a sliding window."""
    path = tmp_path_factory.mktemp("mistral-sw")
    for name in os.listdir(model_dir):
        if name != "config.json":
            os.symlink(os.path.join(model_dir, name), path / name)
    config = json.loads(Path(model_dir, "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"],
                  sliding_window=256)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


MERGE = ("--kv-merge", "kvslimmer")
BAD_INPUT = [
    (("--kv-merge", "magic"), "--kv-merge"),
    ((*MERGE, "--kv-merge-budget", "0"), "--kv-merge-budget"),
    ((*MERGE, "--kv-merge-budget", "lots"), "--kv-merge-budget"),
    ((*MERGE, "--kv-merge-sink", "-1"), "--kv-merge-sink"),
    ((*MERGE, "--kv-merge-interval", "0"), "--kv-merge-interval"),
    ((*MERGE, "--kv-merge-recent", "-3"), "--kv-merge-recent"),
    ((*MERGE, "--kv-merge-budget", "100", "--kv-merge-interval", "90"),
     "--kv-merge-interval"),
    ((*MERGE, "--kv-merge-budget", "5000", "--max-model-len", "4096"),
     "--kv-merge-budget"),
    ((*MERGE, "--kv-merge-config", '{"gamma": -1}'), "'gamma'"),
    ((*MERGE, "--kv-merge-config", '{"budgets": 10}'), "'budgets'"),
    ((*MERGE, "--kv-merge-config", "/nonexistent/preset.yaml"), "--kv-merge-config"),
    ((*MERGE, "--enable-prefix-caching"), "--enable-prefix-caching"),
    ((*MERGE, "--kv-cache-dtype", "fp8"), "--kv-cache-dtype"),
    ((*MERGE, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2,'
      ' "prompt_lookup_max": 3}'), "--speculative-config"),
    ((*MERGE, "--async-scheduling"), "--async-scheduling"),
    ((*MERGE, "--no-enable-chunked-prefill"), "--no-enable-chunked-prefill"),
    ((*MERGE, "--pipeline-parallel-size", "2"), "--pipeline-parallel-size"),
]


@pytest.fixture(scope="module")
def bad_input_runs(model_dir) -> dict[tuple, subprocess.CompletedProcess]:
    """Every bad invocation, two at a time (each spends most of its time importing)."""
    from concurrent.futures import ThreadPoolExecutor

    def serve(flags):
        return _run("serve", model_dir, "--dtype", "float32", "--enforce-eager",
                    "--max-model-len", "4096", *flags)

    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(serve, [flags for flags, _ in BAD_INPUT]))
    return {flags: run for (flags, _), run in zip(BAD_INPUT, runs)}


@pytest.mark.parametrize("flags, option", BAD_INPUT, ids=[" ".join(f) for f, _ in BAD_INPUT])
def test_bad_input_stops_before_the_model_loads(bad_input_runs, flags, option):
    proc = bad_input_runs[flags]
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Starting to load model" not in output and "Loading weights" not in output
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "error:" in last and option in last, last
    assert "Traceback" not in output


def test_sliding_window_model_is_rejected(sliding_window_model):
    proc = _run("serve", sliding_window_model, "--dtype", "float32", "--enforce-eager",
                "--max-model-len", "4096", *MERGE)
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert proc.returncode != 0
    assert "sliding-window" in last and "--kv-merge" in last, last


def test_offline_engine_raises_a_clear_error(model_dir):
    from vllm import LLM

    from kvslimmer_vllm.core.config import KVMergeConfigError

    with pytest.raises(KVMergeConfigError, match="--enable-prefix-caching"):
        LLM(model=model_dir, enable_prefix_caching=True,
            additional_config={"kv_merge": {"method": "kvslimmer"}})
