"""Run an :class:`~kvslimmer_vllm.eval.spec.EvalSpec` on a backend; one row per case.

For each length, every case of every task is generated once and sent to the engine with
full KV (``kv_merge: off``); then, in one batch so the engine schedules them together,
once per (method, budget). With ``skip_uncalibrated`` the second batch holds only the
tasks whose full-KV score at that length reaches ``calibration``: the summary uses only
those cells, so compressing the others would only spend time (``--all-cells`` runs them).
Rows are plain dicts:

``task, length, case, method, budget, budget_tokens, prompt_tokens, score, depth, answer``

``method`` is ``none`` for full KV (``budget`` ``full``); ``score`` is the task score in
[0, 1], the continuation's mean NLL in nats per token for ``nll``, and, for
``agreement``, the fraction of answer tokens equal to full KV's, position by position;
``depth`` is where the case's (asked) needle sits, as a fraction of the context.
NLL is scored over a continuation at the end of the prompt. A prompt-end variant sends it
as ``vllm_xargs.kv_merge_continuation`` (the scored tokens + 1): its step then runs before
the continuation, scored by the window of context just before it, and the continuation's
logprobs come from the compressed cache (otherwise prompt-end would never compress it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from statistics import mean

from kvslimmer_vllm.eval.backends import Backend, ChatRequest, NLLRequest
from kvslimmer_vllm.eval.spec import EvalSpec, EvalSpecError, parse_variant
from kvslimmer_vllm.eval.tasks import AGREEMENT_TASK, NLL_TASK, TASKS, nll_cases

FULL_CONFIG = ("none", None)


def token_agreement(tokenizer, text: str, reference: str) -> float:
    """Fraction of positions where the two answers' tokens agree (over the longer one)."""
    a = tokenizer(text, add_special_tokens=False)["input_ids"]
    b = tokenizer(reference, add_special_tokens=False)["input_ids"]
    if not a and not b:
        return 1.0
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))


def _chat_len(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                         continue_final_message=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def configurations(spec: EvalSpec) -> list[tuple[str, float | None]]:
    """Full KV first, then every (method variant, budget) (see ``EvalSpec.variants``)."""
    return [FULL_CONFIG] + [(m, b) for m in spec.variants for b in spec.budgets]


def plan_limits(spec: EvalSpec) -> dict:
    """Engine sizes for the sweep: the largest budget any request asks for (at least
    ``sink + 3 * interval``, the smallest that leaves room for a round; smaller requested
    budgets are refused per request, by name) and the context length (prompts run up to
    about ``max(lengths) + nll_tokens`` tokens)."""
    longest = max(spec.lengths) + max(spec.nll_tokens, spec.max_tokens) + 64
    budget = max(spec.budget_tokens(b, longest) for b in spec.budgets)
    budget = max(budget, spec.sink + 3 * spec.interval)
    return {"engine_budget": min(budget, longest - 1), "max_model_len": longest + 64}


def _generation_tasks(spec: EvalSpec) -> list[str]:
    gen_tasks = [t for t in spec.tasks if t in TASKS]
    if AGREEMENT_TASK in spec.tasks and not gen_tasks:
        gen_tasks = list(TASKS)  # agreement is measured on the generation tasks
    return gen_tasks


def _plan_length(spec: EvalSpec, tokenizer, length: int, min_budget, max_budget):
    """The cases of one length, their prompt lengths and each request's ``vllm_xargs``
    per (case, variant, budget); raises EvalSpecError for a budget the engine refuses."""
    configs = configurations(spec)
    cases = [(t, i, c) for t in _generation_tasks(spec)
             for i, c in enumerate(TASKS[t](tokenizer, spec.cases, length, seed=spec.seed))]
    lens = {(t, i): _chat_len(tokenizer, c.conversation) for t, i, c in cases}
    xargs = {(t, i, m, b): _xargs(spec, m, b, lens[(t, i)], min_budget, max_budget)
             for t, i, _ in cases for m, b in configs}
    return cases, lens, xargs


def _nll_plan(spec: EvalSpec, tokenizer, length: int, min_budget, max_budget):
    """NLL requests of one length and what each row needs: (case, variant, budget,
    prompt length, xargs)."""
    requests, keys = [], []
    for i, case in enumerate(nll_cases(tokenizer, spec.cases, length, spec.seed,
                                       spec.nll_tokens)):
        plen = len(case.prompt_ids)
        for method, budget in configurations(spec):
            xargs = _xargs(spec, method, budget, plen, min_budget, max_budget)
            if xargs.get("kv_merge_observe") == "prompt-end":
                # Compress before the scored tokens; the logprob of the first comes
                # from the token before it, which must be computed after the step too.
                xargs["kv_merge_continuation"] = case.num_target + 1
            requests.append(NLLRequest(case.prompt_ids, case.num_target, xargs))
            keys.append((i, method, budget, plen, xargs))
    return requests, keys


def check_budgets(spec: EvalSpec, tokenizer, *, min_budget: int | Mapping[str, int],
                  max_budget: int) -> None:
    """Every request of the sweep, planned without an engine: a budget the engine would
    refuse raises :class:`EvalSpecError` (naming ``--budgets``) before one is started."""
    for length in spec.lengths:
        _plan_length(spec, tokenizer, length, min_budget, max_budget)
        if NLL_TASK in spec.tasks:
            _nll_plan(spec, tokenizer, length, min_budget, max_budget)


def run_eval(spec: EvalSpec, backend: Backend, tokenizer, *,
             min_budget: int | Mapping[str, int], max_budget: int,
             log: Callable[[str], None] = print) -> list[dict]:
    """All rows of the sweep. Budgets outside ``[min_budget, max_budget]`` (what the
    engine's interval, sink and budget allow; ``min_budget`` may differ per observe mode,
    as a mapping) are refused before a length's first request is sent."""
    rows: list[dict] = []
    configs = configurations(spec)
    want_agreement = AGREEMENT_TASK in spec.tasks
    for length in spec.lengths:
        cases, lens, xargs = _plan_length(spec, tokenizer, length, min_budget, max_budget)
        # Full KV first: it is the reference of every cell and decides which cells the
        # compressing methods run on.
        full = backend.chat(
            [ChatRequest(c.conversation, xargs[(t, i, *FULL_CONFIG)], spec.max_tokens)
             for t, i, c in cases], desc=f"full KV @ {length}") if cases else []
        reference = {(t, i): text for (t, i, _), text in zip(cases, full)}
        full_scores: dict[str, list[float]] = {}
        for (task, i, case), text in zip(cases, full):
            full_scores.setdefault(task, []).append(case.score(text))
            if task in spec.tasks:
                rows.append(_row(spec, task, length, i, "none", None, lens[(task, i)],
                                 xargs[(task, i, *FULL_CONFIG)], case.score(text), text,
                                 case.depth))
        full_mean = {t: mean(v) for t, v in full_scores.items()}
        skipped = [t for t, v in full_mean.items()
                   if spec.skip_uncalibrated and v < spec.calibration]
        keys = [(task, i, case, method, budget) for task, i, case in cases
                if task not in skipped for method, budget in configs[1:]]
        chat = [ChatRequest(case.conversation, xargs[(task, i, method, budget)],
                            spec.max_tokens) for task, i, case, method, budget in keys]
        log(f"length {length}: {len(cases)} cases with full KV, then "
            f"{len(keys) // max(1, len(configs) - 1)} cases x {len(configs) - 1} "
            "configurations" + (f"; skipped (full KV below {spec.calibration}): "
                                + ", ".join(f"{t} {full_mean[t]:.2f}" for t in skipped)
                                if skipped else ""))
        answers = backend.chat(chat, desc=f"generate @ {length}") if chat else []
        for (task, i, case, method, budget), text in zip(keys, answers):
            plen, used = lens[(task, i)], xargs[(task, i, method, budget)]
            if task in spec.tasks:
                rows.append(_row(spec, task, length, i, method, budget, plen, used,
                                 case.score(text), text, case.depth))
            if want_agreement:
                rows.append(_row(spec, AGREEMENT_TASK, length, f"{task}-{i}", method, budget,
                                 plen, used,
                                 token_agreement(tokenizer, text, reference[(task, i)]),
                                 depth=case.depth))
        if NLL_TASK in spec.tasks:
            nll_reqs, nll_keys = _nll_plan(spec, tokenizer, length, min_budget, max_budget)
            scores = backend.nll(nll_reqs, desc=f"nll @ {length}")
            for (i, method, budget, plen, xargs), score in zip(nll_keys, scores):
                rows.append(_row(spec, NLL_TASK, length, i, method, budget, plen, xargs, score))
    return rows


def _xargs(spec: EvalSpec, variant: str, budget: float | None, prompt_len: int,
           min_budget: int | Mapping[str, int], max_budget: int) -> dict:
    if variant == "none":
        return {"kv_merge": "off"}
    method, observe = parse_variant(variant)
    if isinstance(min_budget, Mapping):
        min_budget = min_budget[observe]
    tokens = spec.budget_tokens(budget, prompt_len)
    if not min_budget <= tokens <= max_budget:
        raise EvalSpecError(
            f"--budgets: {spec.budget_label(budget)} of a {prompt_len}-token prompt is "
            f"{tokens} tokens, outside what the engine allows ({min_budget} to {max_budget}: "
            "raise the budget or the length, or lower --interval/--sink)"
        )
    return {"kv_merge_method": method, "kv_merge_observe": observe, "kv_merge_budget": tokens}


def _row(spec, task, length, case, method, budget, prompt_len, xargs, score, text=None,
         depth=None):
    return {
        "task": task,
        "length": length,
        "case": case,
        "method": method,
        "observe": xargs.get("kv_merge_observe", ""),
        "budget": "full" if budget is None else spec.budget_label(budget),
        "budget_tokens": xargs.get("kv_merge_budget", prompt_len),
        "prompt_tokens": prompt_len,
        "score": float(score),
        "depth": "" if depth is None else round(depth, 3),
        "answer": text,
    }
