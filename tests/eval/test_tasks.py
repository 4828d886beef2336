"""The evaluation's generated tasks, scoring, sweep settings and report, without an engine."""

from __future__ import annotations

import collections
import re

import pytest

from kvslimmer_vllm.eval.report import markdown, summarize
from kvslimmer_vllm.eval.runner import _chat_len, run_eval, token_agreement
from kvslimmer_vllm.eval.spec import EvalSpec, EvalSpecError, load_spec
from kvslimmer_vllm.eval.tasks import TASKS, DocCase, nll_cases


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [512, 1536])
def test_cases_are_deterministic_sized_and_answerable(tokenizer, task, length):
    cases = TASKS[task](tokenizer, 3, length, seed=4)
    again = TASKS[task](tokenizer, 3, length, seed=4)
    other = TASKS[task](tokenizer, 3, length, seed=5)
    assert cases == again
    assert [c.answers for c in cases] != [c.answers for c in other]
    for case in cases:
        n = _chat_len(tokenizer, case.conversation)
        assert 0.85 * length <= n <= 1.1 * length, n
        text = case.messages[-1]["content"]
        if task == "freqwords":
            counts = collections.Counter(text.split("\n\n")[0].split())
            top = [w for w, _ in counts.most_common(4)]
            assert tuple(top[:3]) == case.answers and counts[top[2]] > counts[top[3]]
        elif task == "docqa":
            quote = case.prefix.removeprefix("The passage reads: ")
            assert text.count(quote) == 2  # once in the document, once in the question
            assert (quote + " " + " ".join(case.answers)) in text
        else:
            assert all(a in text for a in case.answers)
        # The full answer scores 1, an unrelated one 0.
        assert case.score(" " + " ".join(case.answers) + ".") == 1.0
        assert case.score(" Xyzzy.") == 0.0


def test_docqa_scores_the_reproduced_prefix():
    case = DocCase([], ("the", "object", "is", "created", "first"), 0.5, "docqa")
    assert case.score(" the object is created first, then") == 1.0
    assert case.score(' "the object is made') == pytest.approx(0.6)
    assert case.score(" object is created first") == 0.0  # must start at the first word


def test_nll_cases_end_with_the_documents_continuation(tokenizer):
    (case,) = nll_cases(tokenizer, 1, 600, seed=2, num_target=48)
    assert len(case.prompt_ids) == 648 and case.num_target == 48


def test_token_agreement(tokenizer):
    assert token_agreement(tokenizer, "The pass key is 12345.", "The pass key is 12345.") == 1.0
    assert token_agreement(tokenizer, "", "") == 1.0
    assert 0 < token_agreement(tokenizer, "The pass key is 9.", "The pass key is 12345.") < 1
    assert token_agreement(tokenizer, "", "The pass key") == 0.0


@pytest.mark.parametrize("overrides, flag", [
    ({"lengths": [100]}, "--lengths"),
    ({"budgets": [1.5]}, "--budgets"),
    ({"budgets": [0]}, "--budgets"),
    ({"methods": ["h2o"]}, "--methods"),
    ({"tasks": ["summarise"]}, "--tasks"),
    ({"cases": 0}, "--cases"),
])
def test_bad_settings_name_the_flag(overrides, flag):
    with pytest.raises(EvalSpecError, match=re.escape(flag)):
        load_spec("default", None, overrides)


def test_presets_and_files(tmp_path):
    assert load_spec("quick").lengths == [512] and not load_spec("quick").skip_uncalibrated
    assert load_spec("default").skip_uncalibrated
    assert not load_spec("default", None, {"skip_uncalibrated": False}).skip_uncalibrated
    path = tmp_path / "sweep.yaml"
    path.write_text("lengths: [2048, 1024]\nbudgets: [0.25, 512]\nmax-tokens: 8\n")
    spec = load_spec("default", str(path), {"cases": 5})
    assert (spec.lengths, spec.budgets, spec.max_tokens, spec.cases) == (
        [1024, 2048], [512, 0.25], 8, 5)
    assert spec.budget_tokens(0.25, 1000) == 250 and spec.budget_tokens(512, 1000) == 512
    with pytest.raises(EvalSpecError, match="--preset"):
        load_spec("huge")


def _row(task, length, method, budget, score):
    return dict(task=task, length=length, case=0, method=method, budget=budget, score=score)


def test_summary_uses_only_calibrated_cells():
    spec = EvalSpec(lengths=[1024], budgets=[0.5], methods=["kvslimmer", "evict"],
                    tasks=["needle", "vartrack", "nll", "agreement"])
    rows = [
        _row("needle", 1024, "none", "full", 1.0),
        _row("needle", 1024, "kvslimmer", "50%", 0.5),
        _row("needle", 1024, "evict", "50%", 0.75),
        _row("vartrack", 1024, "none", "full", 0.25),  # full KV fails: not calibrated
        _row("vartrack", 1024, "kvslimmer", "50%", 1.0),
        _row("vartrack", 1024, "evict", "50%", 0.0),
        _row("nll", 1024, "none", "full", 2.0),
        _row("nll", 1024, "kvslimmer", "50%", 2.1),
        _row("nll", 1024, "evict", "50%", 2.5),
        _row("agreement", 1024, "kvslimmer", "50%", 0.9),
        _row("agreement", 1024, "evict", "50%", 0.7),
    ]
    s = summarize(rows, spec)
    assert s["calibrated"] == [("needle", 1024)]
    assert s["per"][("kvslimmer", "50%")]["kept"] == 0.5
    assert s["per"][("evict", "50%")]["kept"] == 0.75
    assert s["per"][("kvslimmer", "50%")]["nll_increase"] == pytest.approx(0.1)
    assert s["per"][("evict", "50%")]["agreement"] == 0.7
    verdicts = " ".join(s["verdicts"])
    assert "missed by 40.0 points" in verdicts and "does not beat evict" in verdicts
    assert "smallest NLL increase is kvslimmer's" in verdicts


class _ScriptedBackend:
    """Answers needle cases correctly and everything else wrongly; records requests."""

    def __init__(self, tokenizer, spec):
        self.right = {}
        for n in spec.lengths:
            for case in TASKS["needle"](tokenizer, spec.cases, n, seed=spec.seed):
                self.right[str(case.conversation)] = " ".join(case.answers)
        self.sent = []

    def chat(self, requests, desc):
        self.sent += requests
        return [self.right.get(str(r.messages), "no idea") for r in requests]


@pytest.mark.parametrize("skip", [True, False])
def test_methods_run_only_on_cells_full_kv_can_do(tokenizer, skip):
    spec = EvalSpec(lengths=[512], budgets=[0.5, 0.25], methods=["kvslimmer", "evict"],
                    tasks=["needle", "vartrack", "agreement"], cases=2,
                    skip_uncalibrated=skip)
    backend = _ScriptedBackend(tokenizer, spec)
    logs = []
    rows = run_eval(spec, backend, tokenizer, min_budget=1, max_budget=4096, log=logs.append)
    ran = collections.Counter((r["task"], r["method"]) for r in rows)
    assert ran[("needle", "none")] == ran[("vartrack", "none")] == 2
    assert ran[("needle", "kvslimmer")] == ran[("needle", "evict")] == 4  # 2 cases x 2 budgets
    assert ran[("vartrack", "kvslimmer")] == (0 if skip else 4)
    assert ran[("agreement", "evict")] == (4 if skip else 8)
    assert len(backend.sent) == 4 + (8 if skip else 16)
    assert all(r["score"] == 1.0 for r in rows if r["task"] in ("needle", "agreement"))
    assert ("skipped (full KV below 0.6): vartrack 0.00" in logs[0]) is skip
    summary = summarize(rows, spec)
    assert summary["calibrated"] == [("needle", 512)]
    assert summary["per"][("kvslimmer", "25%")]["kept"] == 1.0
    # Needle depths spread from 10% to 90%; only calibrated cells count by depth.
    assert list(summary["by_depth"]) == [0.1, 0.9]
    assert summary["by_depth"][0.1][("evict", "50%")] == 1.0
    assert {r["depth"] for r in rows if r["task"] == "needle"} == {0.1, 0.9}
    report = markdown(rows, spec, summary)
    assert "| 10% | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in report
    assert ("| vartrack | 512 | 0.000 | - | - | - | - |" in report) is skip
