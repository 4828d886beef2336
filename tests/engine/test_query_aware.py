"""Prompt-end observation in the real engine (vLLM offline, CPU, the default model).

One engine serves every test here; requests choose prompt-end observation and their method
per request (``vllm_xargs``), as users do. Preemption of prompt-end requests is tested with
the other preemption cases in test_reliability.py."""

from __future__ import annotations

import pytest
import torch

from kvslimmer_vllm.core import RotarySpec, default_inv_freq
from kvslimmer_vllm.core.config import DEFAULT_EPS, DEFAULT_GAMMA
from kvslimmer_vllm.core.merge import evict_lowest, merge_rounds
from kvslimmer_vllm.engine.plugin import engine_kwargs
from helpers import offline_llm, token_prompt

BUDGET, INTERVAL, WINDOW, LAYER = 256, 128, 32, 7
KW = dict(max_model_len=1024, **engine_kwargs(budget=BUDGET, interval=INTERVAL))


@pytest.fixture(scope="module")
def llm(model_dir):
    with offline_llm(model_dir, num_gpu_blocks_override=40, **KW) as engine:
        yield engine


def _params(max_tokens, **xargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens,
                          ignore_eos=True, extra_args=xargs or None)


def _prompt(tokenizer, length, seed):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=token_prompt(tokenizer, length, seed=seed))


def _traced(llm, prompt, params):
    llm.collective_rpc("kv_merge_set_trace", args=(LAYER,))
    try:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        trace = llm.collective_rpc("kv_merge_pop_trace")[0]
    finally:
        llm.collective_rpc("kv_merge_set_trace", args=(None,))
    tensors = [{k: torch.tensor(v) if isinstance(v, list) else v for k, v in r.items()}
               for r in trace]
    for record in tensors:
        for side in ("before", "after"):
            if side in record:
                record[side] = {k: torch.tensor(v) for k, v in record[side].items()}
    return out, tensors


ROTARY = RotarySpec(rotary_dim=64, is_neox=True, inv_freq=default_inv_freq(64, 100000.0))


def _assert_round_equals(record, want):
    after = record["after"]
    torch.testing.assert_close(after["keys"], want.keys, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after["values"], want.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(after["counts"], want.counts)
    assert torch.equal(after["positions"], want.positions)


def test_prompt_end_step_sees_only_the_window_and_equals_core(llm, tokenizer):
    """Catches: rounds running during the prompt in prompt-end mode, the window's mass
    mixed with earlier queries (no reset, or a chunk spanning the window's start), the
    step not reaching the request's budget, or the engine's sub-rounds / pooling / window
    protection differing from core.merge_rounds."""
    prompt_len = 800
    out, trace = _traced(llm, _prompt(tokenizer, prompt_len, seed=3),
                         _params(140, kv_merge_observe="prompt-end"))
    rounds = [r for r in trace if r["kind"] == "round"]
    attention = [r for r in trace if r["kind"] == "attention"]
    # The prompt's last WINDOW tokens run as a chunk of their own.
    prefill = [r["query"].shape[0] for r in attention if r["query"].shape[0] > 1]
    assert prefill[-1] == WINDOW and sum(prefill) == prompt_len
    # Only the window's and the decoded tokens' queries add to the mass: the chunks
    # before the window skip it (it is reset where the window starts).
    assert [r["observed"] for r in attention] == (
        [False] * (len(prefill) - 1) + [True] * (len(attention) - len(prefill) + 1))
    first, decode = rounds[0], rounds[1:]
    assert first["num_slots"] == prompt_len and first["num_merge"] == prompt_len - BUDGET
    before = first["before"]
    # One unit of mass per observed query (averaged over each KV head's 3 query heads):
    # exactly the window's 32 queries.
    torch.testing.assert_close(before["mass"].sum(0), torch.full((3,), float(WINDOW)),
                               rtol=1e-4, atol=1e-3)
    want = merge_rounds(
        before["keys"], before["values"], before["counts"], before["positions"],
        before["hess"], before["mass"], sink=32, recent=WINDOW, k=first["num_merge"],
        max_fraction=0.25, pool=7, round_idx=1, gamma=DEFAULT_GAMMA, eps=DEFAULT_EPS,
        rotary=ROTARY,
    )
    _assert_round_equals(first, want)
    # The window itself (the question) is kept as it was.
    assert torch.equal(first["after"]["positions"][-WINDOW:],
                       torch.arange(prompt_len - WINDOW, prompt_len))
    # Decoding then runs the usual rounds, observed by the decoded tokens since the step.
    assert len(decode) == 1 and decode[0]["num_slots"] == BUDGET + INTERVAL + 1
    torch.testing.assert_close(decode[0]["before"]["mass"].sum(0),
                               torch.full((3,), float(INTERVAL + 1)), rtol=1e-4, atol=1e-3)
    summary = out.kv_transfer_params["kv_merge"]
    assert summary["observe"] == "prompt-end" and summary["rounds"] == 2
    # The last sampled token is never fed back, so 139 of the 140 were computed.
    assert summary["tokens"] == prompt_len + 139
    assert summary["kv_slots"] == summary["tokens"] - summary["merged_tokens"] == BUDGET + 10


def test_snapkv_keeps_what_the_question_attends(llm, tokenizer):
    """Catches: snapkv not defaulting to prompt-end, or its eviction not being
    core.evict_lowest with pooled window scores that spares the sink and the window."""
    prompt_len = 700
    out, trace = _traced(llm, _prompt(tokenizer, prompt_len, seed=4),
                         _params(8, kv_merge_method="snapkv", kv_merge_budget=100))
    (step,) = [r for r in trace if r["kind"] == "round"]
    before = step["before"]
    assert step["num_slots"] == prompt_len and step["num_merge"] == prompt_len - 100
    want = evict_lowest(before["keys"], before["values"], before["counts"],
                        before["positions"], before["hess"], before["mass"], sink=32,
                        recent=WINDOW, k=prompt_len - 100, pool=7)
    _assert_round_equals(step, want)
    assert out.kv_transfer_params["kv_merge"]["observe"] == "prompt-end"
    assert out.kv_transfer_params["kv_merge"]["method"] == "snapkv"


def test_snapmerge_keeps_what_snapkv_keeps_and_merges_the_rest(llm, tokenizer):
    """Catches: the hybrid merging a slot of its keep set, dropping tokens instead of
    merging them, or differing from its class run on the gathered slots."""
    from kvslimmer_vllm.core.config import KVMergeConfig
    from kvslimmer_vllm.methods import SlotData, get_method

    prompt_len = 700
    out, trace = _traced(llm, _prompt(tokenizer, prompt_len, seed=5),
                         _params(8, kv_merge_method="snapmerge", kv_merge_budget=200))
    (step,) = [r for r in trace if r["kind"] == "round"]
    before, after = step["before"], step["after"]
    method = get_method(KVMergeConfig(method="snapmerge", budget=BUDGET, interval=INTERVAL
                                      ).resolve(1024))
    want = method.run_round(SlotData(**before), k=prompt_len - 200, round_index=1,
                            rotary=ROTARY, recent=WINDOW, pool=7, max_fraction=0.25)
    _assert_round_equals(step, want)
    # Nothing is dropped: the 200 slots still stand for every prompt token.
    assert float(after["counts"].sum()) == prompt_len
    summary = out.kv_transfer_params["kv_merge"]
    assert (summary["method"], summary["observe"]) == ("snapmerge", "prompt-end")


def test_admission_reserves_the_whole_prompt_until_its_step(llm, tokenizer):
    """Eight 1,000-token prompt-end prompts on a 5,120-slot cache: each holds its whole
    prompt until its step, so at most five are admitted at once and none is preempted.
    Catches: admission sized by the budget alone (all eight admitted, then preempted as
    their prompts outgrow the cache)."""
    prompts = [_prompt(tokenizer, 1000, seed=60 + i) for i in range(8)]
    out = llm.generate(prompts, _params(4, kv_merge_observe="prompt-end",
                                        kv_merge_budget=128), use_tqdm=False)
    summaries = [o.kv_transfer_params["kv_merge"] for o in out]
    assert all(s["preemptions"] == 0 for s in summaries), summaries
    assert all(s["rounds"] == 1 and s["kv_slots"] == 128 + 3 for s in summaries), summaries


def test_a_continuation_is_scored_after_the_step(llm, tokenizer):
    """``kv_merge_continuation``: prompt logprobs computed before the step equal full
    KV's, those of the continuation come from the compressed cache. Catches: the step
    running at the prompt's real end (the continuation scored with full KV: the eval's
    prompt-end NLL would equal full KV's) or before the continuation's start."""
    from vllm import SamplingParams

    prompt_len, continuation = 600, 65
    prompt = _prompt(tokenizer, prompt_len, seed=9)
    ids = prompt["prompt_token_ids"]

    def logprobs(**xargs):
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0,
                                extra_args=xargs)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        return torch.tensor([out.prompt_logprobs[i][ids[i]].logprob
                             for i in range(1, prompt_len)]), out

    full, _ = logprobs(kv_merge="off")
    whole, _ = logprobs(kv_merge_observe="prompt-end")
    scored, out = logprobs(kv_merge_observe="prompt-end",
                           kv_merge_continuation=continuation)
    summary = out.kv_transfer_params["kv_merge"]
    assert summary["rounds"] == 1 and summary["merged_tokens"] == prompt_len - continuation - BUDGET
    # Without a continuation the prompt is never compressed.
    torch.testing.assert_close(whole, full, atol=2e-3, rtol=0)
    # Token t's logprob comes from position t - 1 (entry t - 1 here): positions before
    # the step see full KV, the continuation's positions the compressed cache.
    before = prompt_len - continuation  # positions 0 .. before - 1 ran before the step
    torch.testing.assert_close(scored[:before], full[:before], atol=2e-3, rtol=0)
    changed = (scored[before:] - full[before:]).abs()
    assert changed.mean() > 1e-2 and changed.max() > 0.1, changed
