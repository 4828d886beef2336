"""Reliability of merging inside the engine: preemption, aborts and finishes in the
very step of a merge round, isolation between requests, determinism, and no lost block.

Everything here is engine plumbing, visible in greedy tokens, blocks and bookkeeping, so it
runs on conftest's tiny random-weight Llama: the same scheduler, KV manager, worker and
rounds as the real model at a fraction of its cost. The engine core runs in this process
(as every single-rank engine of ``helpers.offline_llm``), so a test can look at the
scheduler's block pool and merge bookkeeping directly.
"""

from __future__ import annotations

import pytest

from kvslimmer_vllm.engine.plugin import engine_kwargs
from helpers import offline_llm, random_tokens

BUDGET, INTERVAL = 256, 128
#: 9 blocks of 128 slots (8 usable). Admission reserves a merging request's peak
#: (budget + interval + chunk = 432 slots; a prompt-end one its whole prompt), but not
#: the growth of a request that opted out; as that one decodes, merging requests are
#: preempted mid-decode.
SMALL_CACHE, LARGE_CACHE = 9, 64
PREEMPT = dict(max_model_len=1024, skip_tokenizer_init=True,
               **engine_kwargs(budget=BUDGET, interval=INTERVAL, observe="progressive"))


def _params(max_tokens, **xargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens,
                          ignore_eos=True, detokenize=False, extra_args=xargs or None)


def _prompts(n, length, seed=0):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=random_tokens(length + 37 * i, seed=seed + i))
            for i in range(n)]


def _generate(llm, prompts, params):
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return ([list(o.outputs[0].token_ids) for o in outputs],
            [((o.kv_transfer_params or {}).get("kv_merge") or {}) for o in outputs])


@pytest.fixture(scope="module")
def preempting(tiny_llama):
    """The same engine settings on a roomy cache (the reference) and on a 9-block one."""
    with offline_llm(tiny_llama, num_gpu_blocks_override=LARGE_CACHE, **PREEMPT) as large, \
            offline_llm(tiny_llama, num_gpu_blocks_override=SMALL_CACHE, **PREEMPT) as small:
        yield large, small


@pytest.mark.parametrize("observe", ["progressive", "prompt-end"])
def test_preempted_requests_keep_their_greedy_output(preempting, observe):
    """A request that opts out decodes 800 tokens beside five merging ones on 9 blocks.
    Catches: a preempted (recomputed) merging request not replaying its rounds at the same
    lengths (its greedy tokens change): for prompt-end, its window, its prompt-end step
    and its decode rounds; admission not reserving what a request holds before its first
    round; or a small cache not preempting at all."""
    large, small = preempting
    base = 500 if observe == "progressive" else 400
    prompts = _prompts(1, 100, seed=39) + _prompts(5, base, seed=40)
    merging = dict(kv_merge_observe=observe)
    if observe == "prompt-end":
        merging["kv_merge_budget"] = 128
    params = [_params(800, kv_merge="off")] + [_params(200, **merging)] * 5
    reference, ref_summaries = _generate(large, prompts, params)
    tokens, summaries = _generate(small, prompts, params)
    assert all(s["preemptions"] == 0 for s in ref_summaries)
    assert all(s["observe"] == observe for s in summaries[1:])
    preempted = [i for i, s in enumerate(summaries) if s["preemptions"] > 0]
    assert preempted, "the small cache should force preemptions"
    # Preempted after rounds ran: their replay is what is checked.
    assert any(summaries[i]["rounds"] >= 2 for i in preempted), summaries
    for i in range(len(prompts)):
        assert tokens[i] == reference[i], f"request {i} ({summaries[i]}) changed"
    print(f"{observe}: preempted requests (same greedy output): {preempted}")


@pytest.fixture(scope="module")
def inproc_llm(tiny_llama):
    with offline_llm(tiny_llama, num_gpu_blocks_override=24, max_model_len=2048,
                     skip_tokenizer_init=True,
                     **engine_kwargs(budget=192, interval=32, observe="progressive")) as llm:
        yield llm


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def test_aborts_and_finishes_in_a_round_step_leak_nothing(inproc_llm):
    """Catches: blocks or merge bookkeeping leaked by a request aborted right after its
    round ran, or finishing in the very step of its round, and stale merged state in
    reused blocks (a later request's greedy tokens change)."""
    from vllm.inputs import TokensPrompt

    llm = inproc_llm
    sched = _scheduler(llm)
    book, pool = sched.merge_book, sched.kv_cache_manager.block_pool
    free_at_start = pool.get_num_free_blocks()
    probe = _prompts(1, 600, seed=90)
    probe_before, _ = _generate(llm, probe, _params(24))

    engine = llm.llm_engine
    ids = {}
    # Three long requests, each aborted right after a step that ran its round.
    for i in range(3):
        prompt = TokensPrompt(prompt_token_ids=random_tokens(500 + 41 * i, seed=60 + i))
        ids[f"abort-{i}"] = engine.add_request(f"abort-{i}", prompt, _params(200))
    # The same prompt with output lengths covering a whole round period (interval + 1
    # decode steps): some of these finish in the very step their round runs.
    shared = TokensPrompt(prompt_token_ids=random_tokens(260, seed=64))
    for n in range(40, 40 + 33):
        ids[f"finish-{n}"] = engine.add_request(f"finish-{n}", shared, _params(n))
    to_abort = {f"abort-{i}" for i in range(3)}
    aborted_in_round = finished_in_round = 0
    merged_now: set[str] = set()  # requests whose round the current step runs
    plan_round = book.plan_round

    def recording_plan_round(request, block_ids):
        plan = plan_round(request, block_ids)
        if plan is not None:
            merged_now.add(request.request_id)
        return plan

    book.plan_round = recording_plan_round
    while engine.has_unfinished_requests():
        merged_now.clear()
        outputs = engine.step()
        for out in outputs:
            if out.finished and ids.get(out.request_id, out.request_id) in merged_now:
                finished_in_round += 1
        for ext in sorted(to_abort):
            if ids[ext] in merged_now:  # its round has just run: abort it now
                engine.abort_request([ext])
                to_abort.discard(ext)
                aborted_in_round += 1
    del book.plan_round
    assert aborted_in_round == 3
    assert finished_in_round >= 1
    assert pool.get_num_free_blocks() == free_at_start
    assert not (book.states or book.settings or book.round_points or book.replay_until
                or book.pending)
    # Blocks that held merged slots are reused with fresh counts and positions.
    probe_after, _ = _generate(llm, probe, _params(24))
    assert probe_after == probe_before


def test_merging_one_request_never_changes_another(inproc_llm):
    """Catches: a round touching another request's slots or state, and per-request
    methods or budgets leaking into other requests of the same batch."""
    llm = inproc_llm
    a, b = _prompts(2, 900, seed=70)
    alone_a, sa = _generate(llm, [a], _params(40))
    alone_b, sb = _generate(llm, [b], _params(40, kv_merge="off"))
    together, st = _generate(llm, [a, b], [_params(40), _params(40, kv_merge="off")])
    assert sa[0]["rounds"] > 0 and sb[0]["rounds"] == 0
    assert together == alone_a + alone_b
    # Both merging, with different methods and budgets, interleaved with a third.
    c = _prompts(1, 500, seed=71)[0]
    mixed = [_params(40, kv_merge_method="evict"), _params(40, kv_merge_budget=160),
             _params(40)]
    batch, _ = _generate(llm, [a, b, c], mixed)
    for prompt, params, got in zip([a, b, c], mixed, batch):
        assert _generate(llm, [prompt], params)[0][0] == got


def test_the_same_greedy_request_twice_gives_the_same_tokens(inproc_llm):
    """Catches: state left from an earlier request (mass, Hessian, counts in reused
    blocks) changing a later identical request's rounds or tokens."""
    prompt = _prompts(1, 1200, seed=80)
    first, s1 = _generate(inproc_llm, prompt, _params(48))
    second, s2 = _generate(inproc_llm, prompt, _params(48))
    assert s1[0]["rounds"] >= 5 and s1 == s2
    assert first == second
