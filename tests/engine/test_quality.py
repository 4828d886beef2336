"""Quality smoke test: pass-key retrieval at about 1,500 tokens, merged in the engine.

One engine serves every run: full KV through ``vllm_xargs kv_merge: off``, then the
cases full KV answers at per-request budgets of 85% and 35% of the prompt
(``kv_merge_budget``), as the eval runner varies budgets. A 135M model does not survive
heavy compression of a 5-digit needle, so the assertion is about the engine path working
(most answers kept at a mild budget); the statistics are the eval suite's job
(``kvslimmer-vllm eval``).
"""

from __future__ import annotations

import pytest

from kvslimmer_vllm.engine.plugin import engine_kwargs
from kvslimmer_vllm.eval.tasks import passkey_cases
from helpers import offline_llm

NUM_CASES, NUM_TOKENS = 8, 1500
FRACTIONS = (0.85, 0.35)
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
    values, positions or counts: the answers at 85% collapse), and a budget of 35%
    doing better than 85% (budgets ignored or inverted)."""
    prompt_len = min(_prompt_len(tokenizer, c) for c in cases)
    budgets = {f: int(f * prompt_len) for f in FRACTIONS}
    with offline_llm(model_dir, num_gpu_blocks_override=64,
                     **engine_kwargs(budget=max(budgets.values()), interval=INTERVAL)) as llm:
        full, summaries = _answers(llm, cases, kv_merge="off")
        assert all(s.get("rounds", 0) == 0 for s in summaries), summaries
        answered = [c for c, ok in zip(cases, full) if ok]
        assert len(answered) >= NUM_CASES // 2, "full KV should answer most cases"
        accuracy = {}
        for fraction, budget in budgets.items():
            kept, summaries = _answers(llm, answered, kv_merge_budget=budget)
            assert all(s["rounds"] >= 2 for s in summaries), "several rounds per prompt"
            assert all(s["kv_slots"] <= budget + 2 * INTERVAL for s in summaries), summaries
            accuracy[fraction] = sum(kept) / len(answered)
            print(f"\nbudget {int(fraction * 100)}% ({budget} slots): kept "
                  f"{[c.depth for c, ok in zip(answered, kept) if ok]}")
    print(f"pass-key accuracy over the {len(answered)}/{NUM_CASES} cases full KV answers "
          f"({prompt_len}+ token prompts): " + ", ".join(
              f"budget {int(f * 100)}%: {a:.0%}" for f, a in accuracy.items()))
    # 3 of 8 measured at 85% on the 2-core CI machine (24 cases there, before the change
    # to one engine: 75% / 12% / 4% at 85% / 60% / 35%); a broken merge loses them all.
    assert accuracy[0.85] >= 0.25
    assert accuracy[0.85] >= accuracy[0.35]
