"""Quality smoke test: pass-key retrieval at about 1,000 tokens, merged in the engine.

One engine serves every run: full KV through ``vllm_xargs kv_merge: off``, then the
cases full KV answers with progressive rounds at per-request budgets of 85% and 35% of
the prompt (``kv_merge_budget``), as the eval runner varies budgets, and with the default
prompt-end step at 35% (``kv_merge_observe``). A 135M model does not survive
heavy compression of a 5-digit needle, so the assertion is about the engine path working
(most answers kept at a mild budget); the statistics are the eval suite's job
(``kvslimmer-vllm eval``).
"""

from __future__ import annotations

import pytest

from kvslimmer_vllm.engine.plugin import engine_kwargs
from kvslimmer_vllm.eval.tasks import passkey_cases
from helpers import offline_llm

NUM_CASES, NUM_TOKENS = 8, 1000
#: (observe mode, fraction of the prompt kept)
RUNS = (("progressive", 0.85), ("progressive", 0.35), ("prompt-end", 0.35))
#: Several rounds per prompt: a round merges interval + chunk (= 2 x 64) slots.
INTERVAL = 64


def _prompt_len(tokenizer, case) -> int:
    text = tokenizer.apply_chat_template(case.messages, add_generation_prompt=True,
                                         tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _answers(llm, cases, **xargs) -> tuple[list[bool], list[dict]]:
    """Whether each case is answered, and each request's merge summary."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, extra_args=xargs or None)
    outputs = llm.chat([c.messages for c in cases], params, use_tqdm=False)
    return ([c.correct(o.outputs[0].text) for c, o in zip(cases, outputs)],
            [(o.kv_transfer_params or {}).get("kv_merge") or {} for o in outputs])


@pytest.fixture(scope="module")
def cases(tokenizer):
    return passkey_cases(tokenizer, NUM_CASES, NUM_TOKENS, seed=5)


def test_passkey_survives_mild_merging(model_dir, tokenizer, cases):
    """Catches: merging that destroys what a mild budget should keep (wrong merged keys,
    values, positions or counts: the answers at 85% collapse), a budget of 35% doing
    better than 85% (budgets ignored or inverted), and a prompt-end step that is not
    query-aware (at 35% it must keep most answers, and at least what progressive rounds
    keep)."""
    prompt_len = min(_prompt_len(tokenizer, c) for c in cases)
    budgets = {f: int(f * prompt_len) for _, f in RUNS}
    with offline_llm(model_dir, num_gpu_blocks_override=64,
                     **engine_kwargs(budget=max(budgets.values()), interval=INTERVAL)) as llm:
        full, summaries = _answers(llm, cases, kv_merge="off")
        assert all(s.get("rounds", 0) == 0 for s in summaries), summaries
        answered = [c for c, ok in zip(cases, full) if ok]
        assert len(answered) >= NUM_CASES // 2, "full KV should answer most cases"
        accuracy = {}
        for observe, fraction in RUNS:
            budget = budgets[fraction]
            kept, summaries = _answers(llm, answered, kv_merge_budget=budget,
                                       kv_merge_observe=observe)
            if observe == "progressive":
                # Rounds during prefill: one per interval past the budget.
                assert all(s["rounds"] >= (1 if fraction > 0.5 else 2) for s in summaries)
                assert all(s["kv_slots"] <= budget + 2 * INTERVAL for s in summaries)
            else:  # one step before the first answer token
                assert all(s["rounds"] == 1 for s in summaries), summaries
                assert all(s["kv_slots"] <= budget + 12 for s in summaries), summaries
            accuracy[observe, fraction] = sum(kept) / len(answered)
            print(f"\n{observe} budget {int(fraction * 100)}% ({budget} slots): kept "
                  f"{[c.depth for c, ok in zip(answered, kept) if ok]}")
    print(f"pass-key accuracy over the {len(answered)}/{NUM_CASES} cases full KV answers "
          f"({prompt_len}+ token prompts): " + ", ".join(
              f"{o} {int(f * 100)}%: {a:.0%}" for (o, f), a in accuracy.items()))
    # Measured on a 2-core CPU (1,009+ token prompts, all 8 answered with full KV):
    # progressive 4 of 8 at 85%, 1 of 8 at 35%; prompt-end 7 of 8 at 35%. A broken merge
    # loses them all.
    assert accuracy["progressive", 0.85] >= 0.25
    assert accuracy["progressive", 0.85] >= accuracy["progressive", 0.35]
    assert accuracy["prompt-end", 0.35] >= 0.5
    assert accuracy["prompt-end", 0.35] >= accuracy["progressive", 0.35]
