"""Pipeline parallelism: one scheduler plans every round, the plan rides on the step's
scheduler output to every stage, and each stage merges the layers it holds (a layer's
selection scores are local to its stage). Greedy tokens with ``pipeline_parallel_size=2``
must equal the single-stage run, in both observe modes, and aborted or finished requests
must leave every block free.

The tiny random-weight Llama of conftest has two layers: one per stage. vLLM keeps
several batches in flight with pipeline parallelism (its batch queue); each stage still
runs its steps in order, so a round reaches a stage after that stage wrote the KV of the
steps before it. On CPU this needs two cores (``VLLM_CPU_OMP_THREADS_BIND``, as for the
tensor-parallel test); ``scripts/gpu_check.sh`` runs it on machines with two GPUs.
"""

from __future__ import annotations

import os

import pytest

from kvslimmer_vllm.engine.plugin import engine_kwargs
from helpers import offline_llm, random_tokens

SETTINGS = engine_kwargs(budget=192, interval=32, observe="progressive")
PROMPTS = [random_tokens(n, seed=3 + i) for i, n in enumerate((300, 700, 1100))]


def _params(max_tokens, **xargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens,
                          ignore_eos=True, detokenize=False, extra_args=xargs or None)


def _engine(model, pp):
    return offline_llm(model, pipeline_parallel_size=pp, skip_tokenizer_init=True,
                       max_model_len=2048, num_gpu_blocks_override=64, **SETTINGS)


def _run(llm):
    """Every prompt once progressive and once prompt-end (per-request setting)."""
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p in PROMPTS] * 2
    params = [_params(40)] * len(PROMPTS) + [_params(40, kv_merge_observe="prompt-end")] \
        * len(PROMPTS)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return ([list(o.outputs[0].token_ids) for o in outputs],
            [o.kv_transfer_params["kv_merge"] for o in outputs])


@pytest.fixture(scope="module")
def two_stages(tiny_llama):
    """Two pipeline stages on this machine: two GPUs, or two CPU cores, one per stage."""
    import torch

    if torch.cuda.is_available():
        if torch.cuda.device_count() < 2:
            pytest.skip("pipeline parallelism needs two GPUs")
        yield
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("pipeline parallelism on CPU needs two cores")
    half = len(cores) // 2
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = (
        ",".join(map(str, cores[:half])) + "|" + ",".join(map(str, cores[half:2 * half])))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


@pytest.fixture(scope="module")
def single_stage_run(tiny_llama):
    with _engine(tiny_llama, 1) as llm:
        return _run(llm)


@pytest.fixture(scope="module")
def pipelined(tiny_llama, two_stages):
    with _engine(tiny_llama, 2) as llm:
        yield llm


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def test_two_stages_give_the_single_stage_tokens(single_stage_run, pipelined):
    """Catches: a stage that skips the plan (its layers keep stale slots), a stage that
    merges layers it does not hold, rounds applied before the KV of an in-flight step was
    written, and the CPU runner's missing pipeline buffer in eager mode."""
    tokens, stats = _run(pipelined)
    ref_tokens, ref_stats = single_stage_run
    assert all(s["rounds"] >= 1 for s in ref_stats)
    assert {s["observe"] for s in ref_stats} == {"progressive", "prompt-end"}
    assert stats == ref_stats
    assert tokens == ref_tokens


def test_aborts_under_pipelining_leak_nothing(pipelined):
    """Catches: blocks or merge bookkeeping leaked when a request is aborted while
    another of its steps is still in flight on the later stage."""
    from vllm.inputs import TokensPrompt

    sched = _scheduler(pipelined)
    book, pool = sched.merge_book, sched.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    engine = pipelined.llm_engine
    for i, n in enumerate((500, 900, 1300)):
        prompt = TokensPrompt(prompt_token_ids=random_tokens(n, seed=40 + i))
        engine.add_request(f"abort-{i}", prompt, _params(300))
    engine.add_request("finish", TokensPrompt(prompt_token_ids=random_tokens(400, seed=50)),
                       _params(60))
    steps, aborted = 0, []
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        merged = {r for r in ("abort-0", "abort-1", "abort-2") if r not in aborted and any(
            rid.startswith(r) for rid in book.states)}
        if steps in (12, 30, 45) and merged:
            victim = sorted(merged)[0]
            engine.abort_request([victim])
            aborted.append(victim)
    assert len(aborted) == 3
    assert pool.get_num_free_blocks() == free_at_start
    assert not (book.states or book.settings or book.round_points or book.replay_until
                or book.pending)
