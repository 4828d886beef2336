"""KVMergeConfig: defaults, derivation, and errors that name the option and the range."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvslimmer_vllm.core.config import (
    DEFAULT_GAMMA,
    KVMergeConfig,
    KVMergeConfigError,
    load_config_source,
)


def test_reference_constants_are_the_defaults():
    cfg = KVMergeConfig(method="kvslimmer")
    assert (cfg.sink, cfg.gamma, cfg.eps) == (32, DEFAULT_GAMMA, 1e-21)
    assert DEFAULT_GAMMA == pytest.approx(4096 / 6.238324625039508)
    resolved = cfg.resolve(max_model_len=8192)
    # The paper's 2048 recent + 32 sink and its 512-token window.
    assert (resolved.budget, resolved.interval) == (2048, 512)
    assert resolved.recent == resolved.prefill_chunk == 512


def test_none_method_needs_no_resolution():
    assert KVMergeConfig().resolve(100) == KVMergeConfig()
    assert not KVMergeConfig().enabled


@pytest.mark.parametrize(
    "values, option",
    [
        ({"budget": 0}, "--kv-merge-budget"),
        ({"sink": -1}, "--kv-merge-sink"),
        ({"interval": 0}, "--kv-merge-interval"),
        ({"recent": -5}, "--kv-merge-recent"),
        ({"gamma": 0}, "'gamma'"),
        ({"eps": 1.0}, "'eps'"),
        ({"method": "magic"}, "--kv-merge"),
        ({"budgett": 100}, "'budgett'"),
    ],
)
def test_invalid_values_name_the_option(values, option):
    with pytest.raises(KVMergeConfigError) as err:
        KVMergeConfig.from_mapping({"method": "kvslimmer", **values})
    assert option in str(err.value)
    assert "\n" not in str(err.value)


def test_region_too_small_for_a_round_is_rejected():
    cfg = KVMergeConfig(method="kvslimmer", budget=100, interval=90)
    with pytest.raises(KVMergeConfigError) as err:
        cfg.resolve(4096)
    msg = str(err.value)
    for option in ("--kv-merge-budget", "--kv-merge-sink", "--kv-merge-recent",
                   "--kv-merge-interval"):
        assert option in msg
    with pytest.raises(KVMergeConfigError, match="context length"):
        KVMergeConfig(method="kvslimmer", budget=5000).resolve(4096)
    with pytest.raises(KVMergeConfigError, match="prefill_chunk"):
        KVMergeConfig(method="kvslimmer", budget=256, interval=128,
                      prefill_chunk=100).resolve(4096)


@settings(max_examples=300, deadline=None)
@given(
    budget=st.integers(4, 5000),
    sink=st.integers(0, 200),
    recent=st.one_of(st.none(), st.integers(0, 600)),
    interval=st.one_of(st.none(), st.integers(1, 1000)),
)
def test_every_accepted_config_can_always_run_its_round(budget, sink, recent, interval):
    """If resolve() accepts a config, the largest round it can face (a request at
    budget + interval + prefill_chunk slots) has room for its disjoint pairs."""
    cfg = KVMergeConfig(method="kvslimmer", budget=budget, sink=sink, recent=recent,
                        interval=interval)
    try:
        r = cfg.resolve(max_model_len=8192)
    except KVMergeConfigError:
        return
    n = r.max_physical_slots
    k = n - r.budget
    # The chunk is the largest the budget leaves room for (the documented derivation).
    room = r.budget - r.sink - r.interval
    expected_chunk = min(r.interval, room // 2 if recent is None else room - r.recent)
    assert r.prefill_chunk == expected_chunk >= 1
    assert 2 * k <= n - r.sink - r.recent


def test_config_source_json_yaml_and_overrides(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("kv_merge:\n  method: kvslimmer\n  budget: 512\n  rope-aware: false\n")
    cfg = KVMergeConfig.from_source(str(path), {"interval": 64, "budget": None})
    assert (cfg.budget, cfg.interval, cfg.rope_aware) == (512, 64, False)
    cfg = KVMergeConfig.from_source(json.dumps({"method": "kvslimmer", "budget": 300}),
                                    {"budget": 400})
    assert cfg.budget == 400
    with pytest.raises(KVMergeConfigError, match="no such file"):
        load_config_source(str(tmp_path / "missing.yaml"))
    with pytest.raises(KVMergeConfigError, match="invalid JSON"):
        load_config_source("{not json")


def test_every_method_flag_value_has_a_registered_class():
    from typing import get_args

    from kvslimmer_vllm.core.config import METHODS, KVMergeConfig
    from kvslimmer_vllm.methods import get_method

    assert get_args(KVMergeConfig.model_fields["method"].annotation) == METHODS
    for name in METHODS[1:]:
        method = get_method(KVMergeConfig(method=name))
        assert method.name == name
    with pytest.raises(Exception, match="--kv-merge"):
        KVMergeConfig.from_mapping({"method": "h2o"})
