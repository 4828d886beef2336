"""The evaluation's observe-mode axis: variants, per-request settings, per-mode budget
floors, Wilson intervals and the best-method verdict."""

from __future__ import annotations

import pytest

from kvslimmer_vllm.eval.report import summarize, wilson
from kvslimmer_vllm.eval.runner import _xargs, configurations
from kvslimmer_vllm.eval.spec import EvalSpec, EvalSpecError, load_spec, parse_variant


def test_each_method_runs_under_each_observe_mode():
    spec = EvalSpec(methods=["evict", "snapkv", "streaming"],
                    observe=["progressive", "prompt-end"], budgets=[0.5])
    assert spec.variants == ["evict", "evict/prompt-end", "snapkv/progressive",
                             "snapkv", "streaming", "streaming/prompt-end"]
    assert [c[0] for c in configurations(spec)] == ["none", *spec.variants]
    assert parse_variant("snapkv") == ("snapkv", "prompt-end")
    assert parse_variant("kvslimmer/prompt-end") == ("kvslimmer", "prompt-end")
    # By default each method runs under its own mode only.
    assert EvalSpec(methods=["evict", "snapkv"]).variants == ["evict", "snapkv"]
    with pytest.raises(EvalSpecError, match="--observe"):
        load_spec("default", overrides={"observe": ["later"]})
    # A method may name its mode, outside the observe axis.
    spec = EvalSpec(methods=["evict", "snapkv/prompt-end", "streaming/prompt-end"],
                    observe=["progressive", "prompt-end"])
    assert spec.variants == ["evict", "evict/prompt-end", "snapkv", "streaming/prompt-end"]
    with pytest.raises(EvalSpecError, match="METHOD/prompt-end"):
        load_spec("default", overrides={"methods": ["evict/sometimes"]})


def test_requests_carry_the_variant_and_its_own_budget_floor():
    spec = EvalSpec(budgets=[0.1])
    floors = {"progressive": 200, "prompt-end": 65}
    assert _xargs(spec, "evict/prompt-end", 0.1, 1000, floors, 4096) == {
        "kv_merge_method": "evict", "kv_merge_observe": "prompt-end",
        "kv_merge_budget": 100}
    with pytest.raises(EvalSpecError, match="100 tokens, outside what the engine allows "
                                            r"\(200 to 4096"):
        _xargs(spec, "evict", 0.1, 1000, floors, 4096)
    assert _xargs(spec, "none", None, 1000, floors, 4096) == {"kv_merge": "off"}


@pytest.mark.parametrize("score, n, low, high", [
    (1.0, 8, 0.676, 1.0), (0.5, 8, 0.215, 0.785), (0.0, 16, 0.0, 0.194)])
def test_wilson_interval(score, n, low, high):
    got = wilson(score, n)
    assert got == pytest.approx((low, high), abs=1e-3)


def test_summary_names_the_best_variant_per_budget_with_intervals():
    spec = EvalSpec(lengths=[1024], budgets=[0.5], methods=["evict", "snapkv"],
                    observe=["progressive", "prompt-end"], tasks=["needle"])
    rows = [dict(task="needle", length=1024, case=i, method=m, budget=b, score=s)
            for i in range(4) for m, b, s in (
                ("none", "full", 1.0), ("evict", "50%", 0.0),
                ("evict/prompt-end", "50%", 1.0 if i else 0.0),
                ("snapkv", "50%", 0.5), ("snapkv/progressive", "50%", 0.0))]
    s = summarize(rows, spec)
    best = s["per"][("evict/prompt-end", "50%")]
    assert best["score"] == 0.75 and best["cases"] == 4
    assert best["interval"] == pytest.approx(wilson(0.75, 4))
    assert s["verdicts"][0] == "Best at 50%: evict/prompt-end (0.750)."


def test_default_preset_compares_every_method_on_enough_cases():
    """The default sweep runs every method (each in its own observe mode) on at least 8
    cases per calibrated cell, at both budgets -- what the README's table reports."""
    from kvslimmer_vllm.eval.spec import EVAL_METHODS

    spec = load_spec("default")
    assert spec.cases >= 8
    assert sorted(parse_variant(v)[0] for v in spec.variants) == sorted(EVAL_METHODS)
    assert spec.budgets == [0.5, 0.25]
