"""Fuzzed settings: config values, flag strings and per-request options end in a valid
run or one clear error naming the option, never in another exception or a hang."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvslimmer_vllm.core.config import FLAG_OF_FIELD, METHODS, KVMergeConfig, KVMergeConfigError
from kvslimmer_vllm.engine.requests import RequestSettingsError, request_settings

FIELDS = list(KVMergeConfig.model_fields)
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(METHODS), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _names_an_option(message: str) -> bool:
    return any(flag in message for flag in FLAG_OF_FIELD.values()) or (
        "--kv-merge-config" in message)


@settings(max_examples=400, deadline=None)
@given(values=st.dictionaries(st.sampled_from(FIELDS + ["budgets", "Sink"]), ANY_VALUE,
                              max_size=6),
       max_model_len=st.integers(1, 1 << 20))
def test_config_values(values, max_model_len):
    try:
        config = KVMergeConfig.from_mapping(values).resolve(max_model_len)
    except KVMergeConfigError as exc:
        assert _names_an_option(str(exc)), str(exc)
        return
    if config.enabled:
        assert config.min_budget <= config.budget < max_model_len
        assert config.max_physical_slots <= config.budget + 2 * config.interval


FLAG_VALUE = st.one_of(
    st.integers(-5, 10**7).map(str), st.text(max_size=8),
    st.sampled_from(["", "1e3", "0x10", " 12", "12.5", "-0", "nan", "inf", "٣"]),
)
FLAGS = ["--kv-merge-budget", "--kv-merge-sink", "--kv-merge-recent", "--kv-merge-interval"]


@pytest.fixture(scope="module")
def parser():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from kvslimmer_vllm.engine.plugin import register

    register()
    return EngineArgs, EngineArgs.add_cli_args(FlexibleArgumentParser())


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.one_of(st.sampled_from(METHODS), st.text(max_size=6)),
    flag_values=st.dictionaries(st.sampled_from(FLAGS), FLAG_VALUE, max_size=4),
    config=st.one_of(st.none(), st.text(max_size=10),
                     st.dictionaries(st.sampled_from(FIELDS), ANY_VALUE, max_size=3)
                     .map(json.dumps)),
)
def test_flag_strings(parser, method, flag_values, config):
    engine_args_cls, p = parser
    argv = ["--model", "unused", "--kv-merge", method]
    for flag, value in flag_values.items():
        argv.append(f"{flag}={value}")
    if config is not None:
        argv.append(f"--kv-merge-config={config}")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args = p.parse_args(argv)
            engine_args = engine_args_cls.from_cli_args(args)
            raw = (engine_args.additional_config or {}).get("kv_merge")
            if raw:
                KVMergeConfig.from_mapping(raw).resolve(4096)
        except SystemExit as exc:
            assert exc.code == 2
            message = stderr.getvalue().strip().split("\n")[-1]
            assert "error:" in message and "--kv-merge" in message, message
        except KVMergeConfigError as exc:
            assert _names_an_option(str(exc)), str(exc)


SERVER = KVMergeConfig(method="kvslimmer", observe="progressive", budget=1024,
                       interval=64).resolve(8192)


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["kv_merge", "kv_merge_budget", "kv_merge_method",
                                     "temperature"]), ANY_VALUE, max_size=3),
))
def test_per_request_options(extra):
    try:
        got = request_settings(extra, SERVER)
    except RequestSettingsError as exc:
        assert exc.field.startswith("vllm_xargs.kv_merge") and exc.field in str(exc)
        return
    assert SERVER.min_budget <= got.budget <= SERVER.budget
    assert got.method in METHODS and got.method != "none"


@pytest.mark.parametrize("key, value", [
    ("kv_merge", [-(2**63) - 1]),          # once drawn by the server fuzz test
    ("kv_merge_budget", 2**64),
    ("kv_merge_budget", -(2**63) - 1),
    ("kv_merge_method", {"x": [2**70]}),
])
@pytest.mark.parametrize("configured", [True, False], ids=["server", "no config"])
def test_out_of_range_integers_are_refused_by_their_field(monkeypatch, key, value,
                                                          configured):
    """vLLM refuses integers beyond 64 bits in extra_args when the SamplingParams is built
    (before the plugin's verify hook) with a message naming no field. Catches: that
    message reaching a user who set a vllm_xargs.kv_merge* option; the plugin's own
    message (field and allowed values) must win, or name the field without a config."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from kvslimmer_vllm.engine import plugin

    # The hooks stay installed (as in any process that built a merging engine); the
    # server settings are put back as they were afterwards.
    monkeypatch.setattr(plugin, "_request_config", plugin._request_config)
    plugin._validate_requests_against(SERVER)
    plugin._request_config = SERVER if configured else None
    with pytest.raises(VLLMValidationError) as err:
        SamplingParams(extra_args={key: value})
    assert err.value.parameter == f"vllm_xargs.{key}"
    assert f"vllm_xargs.{key}" in str(err.value)
    if configured and key == "kv_merge_budget":
        assert f"from {SERVER.min_budget} " in str(err.value)
    # Other keys keep vLLM's own check, and in-range kv_merge values are unaffected.
    with pytest.raises(VLLMValidationError, match="extra_args integers"):
        SamplingParams(extra_args={"other": 2**64})
    assert SamplingParams(extra_args={"kv_merge": "off"}).extra_args == {"kv_merge": "off"}
