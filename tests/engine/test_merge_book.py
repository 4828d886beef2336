"""Scheduler-side bookkeeping (engine.scheduler.MergeBook), simulated without vLLM's
scheduler: physical lengths stay bounded and every planned round is feasible."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvslimmer_vllm.core.config import KVMergeConfig, KVMergeConfigError
from kvslimmer_vllm.engine.requests import RequestSettingsError, request_settings
from kvslimmer_vllm.engine.scheduler import MergeBook


def _progressive(**settings) -> KVMergeConfig:
    """KVSlimmer with progressive observation, the mode these tests are about."""
    return KVMergeConfig(method="kvslimmer", observe="progressive", **settings)


def _request(req_id="r"):
    return SimpleNamespace(request_id=req_id, num_computed_tokens=0)


@settings(max_examples=200, deadline=None)
@given(
    budget=st.integers(64, 3000),
    interval=st.integers(1, 600),
    recent=st.one_of(st.none(), st.integers(0, 400)),
    prompt=st.integers(1, 12000),
    decode=st.integers(0, 1500),
    batch_cap=st.integers(1, 4096),
)
def test_request_stays_within_its_slots(budget, interval, recent, prompt, decode, batch_cap):
    try:
        cfg = _progressive(budget=budget, interval=interval,
                            recent=recent).resolve(16384)
    except KVMergeConfigError:
        return
    book, req = MergeBook(cfg, block_size=16), _request()
    total = prompt + decode
    merged_before = 0
    while req.num_computed_tokens < total:
        remaining = prompt - req.num_computed_tokens if req.num_computed_tokens < prompt else 1
        chunk = min(remaining, batch_cap, book.max_chunk(req))
        assert chunk >= 1
        if book.round_due(req):
            plan = book.plan_round(req, list(range(100)))
            n = plan.num_slots
            assert 2 * plan.num_merge <= n - cfg.sink - cfg.recent
            assert plan.num_slots_after == cfg.budget
            assert book.num_merged("r") == merged_before + plan.num_merge
            merged_before = book.num_merged("r")
        req.num_computed_tokens += chunk
        assert book.physical(req) <= cfg.max_physical_slots
    plans = book.take_plan({"r": 1}, dropped=set(), requests={"r": req})
    assert plans.num_merged.get("r", 0) == book.num_merged("r")


def test_dropped_requests_lose_their_rounds():
    cfg = _progressive(budget=64, interval=16).resolve(4096)
    book = MergeBook(cfg, block_size=16)
    a, b = _request("a"), _request("b")
    a.num_computed_tokens = b.num_computed_tokens = cfg.max_physical_slots
    book.plan_round(a, [1, 2, 3, 4, 5, 6])
    book.plan_round(b, [8, 9, 10, 11, 12, 13])
    plan = book.take_plan({"a": 1}, dropped={"b"}, requests={"a": a, "b": b})
    assert [r.req_id for r in plan.rounds] == ["a"]
    assert plan.num_merged == {"a": cfg.max_physical_slots - cfg.budget}
    assert book.take_plan({}, set(), {}).rounds == []


def _prompt_request(req_id, prompt, computed, **xargs):
    return SimpleNamespace(request_id=req_id, num_computed_tokens=computed,
                           num_prompt_tokens=prompt,
                           sampling_params=SimpleNamespace(extra_args=xargs or None))


def test_only_queries_a_round_reads_add_to_the_mass():
    """The plan names the scheduled requests whose queries this step no round will read
    the mass of: a prompt-end prompt's chunks that end before its window (the window's
    start resets the mass), and requests that do not merge. Progressive requests, the
    window, the tokens after the prompt, and prefill rounds under a prefill budget are
    observed."""
    cfg = KVMergeConfig(method="kvslimmer", budget=256, window=32).resolve(4096)
    book = MergeBook(cfg, block_size=16)
    requests = {
        "before window": _prompt_request("before window", 1000, 968),  # chunk ends at 968
        "window": _prompt_request("window", 1000, 1000),
        "window, first row": _prompt_request("window, first row", 1000, 969),
        "decoding": _prompt_request("decoding", 1000, 1001),
        "short prompt": _prompt_request("short prompt", 20, 10),
        "progressive": _prompt_request("progressive", 1000, 500,
                                       kv_merge_observe="progressive"),
        "off": _prompt_request("off", 1000, 1001, kv_merge="off"),
        "continuation": _prompt_request("continuation", 1000, 930,
                                        kv_merge_continuation=50),
    }
    plan = book.take_plan({rid: 1 for rid in requests}, dropped={"window"}, requests=requests)
    assert plan.unobserved == {"before window", "off"}
    assert bool(plan)
    # The continuation's step runs at 950, its window starts at 918.
    requests["continuation"].num_computed_tokens = 918
    assert not book.observes(requests["continuation"])
    budgeted = KVMergeConfig(method="kvslimmer", budget=256, window=32,
                             prefill_budget=512).resolve(4096)
    assert MergeBook(budgeted, 16).observes(_prompt_request("p", 1000, 500))


def test_an_oversized_request_is_brought_to_its_budget_in_sub_rounds():
    """A request holding more than one pairwise round can halve (which the chunk caps
    prevent) still returns to its budget: the round is planned in full and the method
    splits it into sub-rounds; the server does not fail."""
    from kvslimmer_vllm.core.merge import subround_sizes

    cfg = _progressive(budget=64, interval=16).resolve(4096)
    book, req = MergeBook(cfg, block_size=16), _request()
    req.num_computed_tokens = 100  # more than a config-respecting schedule allows
    plan = book.plan_round(req, list(range(7)))
    mergeable = 100 - cfg.sink - cfg.recent
    assert plan.num_merge == 100 - cfg.budget > mergeable // 2
    assert (plan.recent, plan.pool, plan.max_fraction) == (cfg.recent, 1, 0.5)
    sizes = subround_sizes(mergeable, plan.num_merge, plan.max_fraction)
    assert sum(sizes) == plan.num_merge and len(sizes) == 2


def test_requests_choose_their_own_budget_or_opt_out():
    cfg = _progressive(budget=1024, interval=64, recent=32).resolve(8192)
    assert cfg.min_budget == 32 + 32 + 64 + 64
    book = MergeBook(cfg, block_size=16)
    low, off, default = _request("low"), _request("off"), _request("default")
    low.sampling_params = SimpleNamespace(extra_args={"kv_merge_budget": 300})
    off.sampling_params = SimpleNamespace(extra_args={"kv_merge": "off"})
    for req in (low, off, default):
        req.num_computed_tokens, req.num_tokens = 420, 5000
    assert book.round_due(low) and not book.round_due(default) and not book.round_due(off)
    plan = book.plan_round(low, list(range(27)))
    assert (plan.num_merge, plan.method) == (420 - 300, "kvslimmer")
    assert book.max_chunk(off) > 10**9
    assert book.peak_slots(off) == 5000 and book.peak_slots(default) == cfg.max_physical_slots
    assert book.peak_slots(low) == 300 + 64 + 64


def test_requests_choose_their_own_method():
    cfg = _progressive(budget=1024, interval=64, recent=32).resolve(8192)
    book = MergeBook(cfg, block_size=16)
    req = _request("evicting")
    req.sampling_params = SimpleNamespace(
        extra_args={"kv_merge_method": "evict", "kv_merge_budget": 300}
    )
    req.num_computed_tokens, req.num_tokens = 420, 5000
    plan = book.plan_round(req, list(range(27)))
    assert (plan.method, plan.num_merge) == ("evict", 120)
    assert book.summary(req)["method"] == "evict"


@pytest.mark.parametrize("extra, field", [
    ({"kv_merge_budget": 5000}, "kv_merge_budget"),
    ({"kv_merge_budget": 10}, "kv_merge_budget"),
    ({"kv_merge_budget": "512"}, "kv_merge_budget"),
    ({"kv_merge_budget": True}, "kv_merge_budget"),
    ({"kv_merge": "maybe"}, "kv_merge"),
    ({"kv_merge_method": "none"}, "kv_merge_method"),
    ({"kv_merge_method": "h2o"}, "kv_merge_method"),
])
def test_invalid_request_settings_name_the_field_and_range(extra, field):
    cfg = _progressive(budget=1024, interval=64, recent=32).resolve(8192)
    with pytest.raises(RequestSettingsError) as err:
        request_settings(extra, cfg)
    assert err.value.field == f"vllm_xargs.{field}"
    if field == "kv_merge_budget":
        assert "from 192 (sink + recent + interval + prefill chunk, with progressive " \
            "observation) to 1024" in str(err.value)
    if field == "kv_merge_method":
        assert "kvslimmer, average, evict, streaming, snapkv" in str(err.value)


def _run(book, req, total, prompt, caps):
    """Schedule ``req`` to ``total`` tokens with per-step token caps cycling through
    ``caps``; return each round's (logical length, slots merged)."""
    rounds, step = [], 0
    while req.num_computed_tokens < total:
        remaining = prompt - req.num_computed_tokens if req.num_computed_tokens < prompt else 1
        chunk = min(remaining, caps[step % len(caps)], book.max_chunk(req))
        step += 1
        if book.round_due(req):
            plan = book.plan_round(req, list(range(100)))
            rounds.append((req.num_computed_tokens, plan.num_merge))
        req.num_computed_tokens += chunk
        assert book.physical(req) <= book.config.max_physical_slots
    return rounds


@settings(max_examples=150, deadline=None)
@given(
    budget=st.integers(128, 1500),
    interval=st.integers(8, 300),
    prompt=st.integers(1, 5000),
    decode=st.integers(0, 800),
    first_caps=st.lists(st.integers(1, 2048), min_size=1, max_size=5),
    replay_caps=st.lists(st.integers(1, 2048), min_size=1, max_size=5),
    preempt_at=st.floats(0.05, 1.0),
)
def test_a_preempted_request_replays_its_rounds_at_the_same_lengths(
    budget, interval, prompt, decode, first_caps, replay_caps, preempt_at
):
    try:
        cfg = _progressive(budget=budget,
                            interval=interval).resolve(16384)
    except KVMergeConfigError:
        return
    book, req = MergeBook(cfg, block_size=16), _request()
    req.is_finished = lambda: False
    total = prompt + decode
    stop = max(1, int(total * preempt_at))
    before = _run(book, req, stop, prompt, first_caps)
    book.forget(req)  # preempted: blocks freed, recomputed from scratch with its outputs
    req.num_computed_tokens, req.num_preemptions = 0, 1
    replayed = _run(book, req, stop, stop, replay_caps)
    assert replayed == before
    # ... and merging goes on as usual afterwards.
    after = _run(book, req, total, prompt, first_caps)
    assert all(n > stop - 1 for n, _ in after)
    assert book.summary(req)["preemptions"] == 1
    req.is_finished = lambda: True
    book.forget(req)
    assert not (book.round_points or book.replay_until or book.settings)
