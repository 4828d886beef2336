"""The real vLLM engine offline (`vllm.LLM`, CPU, float32, eager) with the default model."""

from __future__ import annotations

import math

import pytest
import torch

from kvslimmer_vllm.core import RotarySpec, default_inv_freq, merge_round
from kvslimmer_vllm.core.config import DEFAULT_EPS, DEFAULT_GAMMA
from kvslimmer_vllm.engine.plugin import engine_kwargs
from helpers import long_text, offline_llm

GREEDY = dict(temperature=0.0, max_tokens=24, seed=0)


@pytest.fixture(scope="module")
def base_llm(model_dir):
    """The plugin is installed, merging is off: this must be unmodified vLLM."""
    with offline_llm(model_dir, num_gpu_blocks_override=64) as llm:
        yield llm


def _mixed_prompts() -> list[str]:
    return [
        "What is the capital of France?",
        long_text(60, seed=1) + "\nSummarize the text above in one sentence:",
        long_text(400, seed=2) + "\nWhat is this text about?",
        long_text(900, seed=3) + "\nList three keywords of the text above:",
        "Write a haiku about the sea.",
        long_text(1500, seed=4) + "\nQuestion: which Python statement is described first?",
    ]


def _greedy_ids(llm, prompts):
    from vllm import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(**GREEDY), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


#: One merging engine for this module: a budget no prompt here reaches (identity), and
#: per-request budgets (vllm_xargs) where rounds must run.
ENGINE_BUDGET, INTERVAL = 3000, 128


@pytest.fixture(scope="module")
def merge_llm(model_dir):
    with offline_llm(model_dir, num_gpu_blocks_override=64,
                     **engine_kwargs(budget=ENGINE_BUDGET, interval=INTERVAL,
                                     observe="progressive")) as llm:
        yield llm


def test_default_model_answers_paris(base_llm):
    """Catches: the installed vLLM, the plugin's registration or the fetched checkpoint
    breaking plain generation."""
    from vllm import SamplingParams

    out = base_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=32),
        use_tqdm=False,
    )
    assert "Paris" in out[0].outputs[0].text


def test_merging_off_leaves_vllm_unmodified(base_llm):
    """Catches: the plugin swapping in its scheduler or worker (or adding settings)
    when merging is off."""
    config = base_llm.llm_engine.vllm_config
    assert config.scheduler_config.scheduler_cls in (
        None, "vllm.v1.core.sched.scheduler.Scheduler",
    ) or config.scheduler_config.scheduler_cls.__module__.startswith("vllm.")
    assert config.parallel_config.worker_cls.startswith("vllm.")
    assert "kv_merge" not in (config.additional_config or {})


def test_identity_when_budget_exceeds_every_request(base_llm, merge_llm):
    """kv-merge on with a budget no request reaches: the same greedy tokens as vLLM.
    Catches: the merging scheduler, worker or attention backend changing anything
    (chunking, slot mapping, attention numerics) for requests that never merge."""
    prompts = _mixed_prompts()
    expected = _greedy_ids(base_llm, prompts)
    cfg = merge_llm.llm_engine.vllm_config.additional_config["kv_merge"]
    assert cfg["budget"] == ENGINE_BUDGET
    assert _greedy_ids(merge_llm, prompts) == expected


def _as_tensors(record: dict) -> dict:
    """collective_rpc returns tensors as nested lists; turn them back into tensors."""
    return {k: torch.tensor(v) if isinstance(v, list) else v for k, v in record.items()}


def _smol_rotary() -> RotarySpec:
    return RotarySpec(rotary_dim=64, is_neox=True, inv_freq=default_inv_freq(64, 100000.0))


def _explicit_attention(query, keys, values, counts, scale, visible):
    """softmax(scale * q.k + log count) @ v, written out head by head."""
    num_tokens, num_heads, _ = query.shape
    group = num_heads // keys.shape[1]
    out = torch.empty_like(query, dtype=torch.float64)
    for t in range(num_tokens):
        n = int(visible[t])
        for h in range(num_heads):
            k = keys[:n, h // group].double()
            logits = scale * (k @ query[t, h].double()) + counts[:n].double().log()
            out[t, h] = torch.softmax(logits, 0) @ values[:n, h // group].double()
    return out


def test_paged_state_equals_core_math(merge_llm):
    """After several rounds inside the engine (a request budget below the engine's),
    one layer's paged K, V, counts and positions equal what core.merge_round computes
    from the same inputs, the observation mass covers exactly the queries since the last
    round, and the backend's attention over merged slots equals the formula.
    Catches: any drift between the engine's paged rounds (gather, RoPE, compaction,
    mass accumulation, count bias) and the reference math."""
    from vllm import SamplingParams

    llm, interval = merge_llm, INTERVAL
    budget = 448  # >= sink + recent + interval + chunk (32 + 3 x 128)
    layer = 7
    prompt = long_text(900, seed=11) + "\nWhat is this text about?"
    cfg = llm.llm_engine.vllm_config.additional_config["kv_merge"]
    llm.collective_rpc("kv_merge_set_trace", args=(layer,))
    try:
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=160,
                                                    extra_args={"kv_merge_budget": budget}),
                           use_tqdm=False)[0]
    finally:
        trace = llm.collective_rpc("kv_merge_pop_trace")[0]
        llm.collective_rpc("kv_merge_set_trace", args=(None,))
    assert out.kv_transfer_params["kv_merge"]["kv_slots"] <= budget + interval + 1
    logical = len(out.prompt_token_ids) + len(out.outputs[0].token_ids)
    rounds = [r for r in trace if r["kind"] == "round"]
    assert len(rounds) >= 4, "expected several rounds, in prefill and in decode"
    assert any(r["num_slots"] - budget <= interval + 1 for r in rounds[-2:])

    rotary = _smol_rotary()
    previous_after = 0
    for record in rounds:
        before, after = _as_tensors(record["before"]), _as_tensors(record["after"])
        # The observation mass is exactly one unit per query since the last round
        # (each query's probabilities sum to 1, averaged over the 3 query heads).
        observed = record["num_slots"] - previous_after
        torch.testing.assert_close(
            before["mass"].sum(0), torch.full((3,), float(observed)), rtol=1e-4, atol=1e-3
        )
        want = merge_round(
            before["keys"], before["values"], before["counts"], before["positions"],
            before["hess"], before["mass"], sink=cfg["sink"], recent=cfg["recent"],
            k=record["num_merge"], round_idx=record["round_index"],
            gamma=DEFAULT_GAMMA, eps=DEFAULT_EPS, rotary=rotary,
        )
        torch.testing.assert_close(after["keys"], want.keys, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(after["values"], want.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(after["counts"], want.counts)
        assert torch.equal(after["positions"], want.positions)
        assert float(after["counts"].sum()) == float(before["counts"].sum())
        assert after["keys"].shape[0] == record["num_slots"] - record["num_merge"] == budget
        assert bool((after["mass"] == 0).all())
        previous_after = budget
    last = _as_tensors(rounds[-1]["after"])
    assert bool((last["positions"][1:] > last["positions"][:-1]).all())
    assert int(last["counts"].max()) > 5

    # Attention of decode steps after the last round: the backend equals the formula.
    attention = [_as_tensors(r) for r in trace if r["kind"] == "attention"]
    decodes = [r for r in attention if r["query"].shape[0] == 1]
    merged_decodes = [r for r in decodes if float(r["counts"].max()) > 1]
    assert merged_decodes
    for record in merged_decodes[-3:]:
        n = record["kv"].shape[0]
        assert float(record["counts"].sum()) <= logical
        want = _explicit_attention(
            record["query"], record["kv"][..., :64], record["kv"][..., 64:],
            record["counts"], 1 / math.sqrt(64), record["visible"],
        )
        assert n == int(record["visible"][-1])
        torch.testing.assert_close(record["output"].double(), want, rtol=1e-4, atol=1e-5)
