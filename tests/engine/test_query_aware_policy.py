"""Prompt-end observation in the scheduler's MergeBook, simulated without vLLM's scheduler:
where chunks stop, when the observation window opens, when the prompt-end step runs and
how far it compresses, what admission reserves, and per-request settings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvslimmer_vllm.core.config import KVMergeConfig, KVMergeConfigError
from kvslimmer_vllm.core.merge import subround_sizes
from kvslimmer_vllm.engine.requests import RequestSettingsError, request_settings
from kvslimmer_vllm.engine.scheduler import MergeBook


def _request(req_id="r", prompt=1000, extra=None):
    return SimpleNamespace(
        request_id=req_id, num_computed_tokens=0, num_prompt_tokens=prompt,
        num_tokens=prompt, sampling_params=SimpleNamespace(extra_args=extra),
        is_finished=lambda: False,
    )


def _run(book: MergeBook, req, decode: int, batch_cap: int = 1 << 20):
    """Schedule the request to its end like vLLM would (chunks capped by max_chunk);
    returns (chunks, rounds, observe starts) and checks every step's invariants."""
    cfg = book.config
    settings_ = book.settings_of(req)
    total = req.num_prompt_tokens + decode
    chunks, rounds, starts = [], [], []
    while req.num_computed_tokens < total:
        prompt_left = req.num_prompt_tokens - req.num_computed_tokens
        remaining = prompt_left if prompt_left > 0 else 1
        chunk = min(remaining, batch_cap, book.max_chunk(req))
        assert chunk >= 1
        if book.round_due(req):
            plan = book.plan_round(req, list(range(200)))
            rounds.append(plan)
            mergeable = plan.num_slots - cfg.sink - plan.recent
            assert 0 < plan.num_merge < mergeable
            sum(subround_sizes(mergeable, plan.num_merge, plan.max_fraction))  # feasible
        if book.observe_starts(req):
            starts.append(req.num_computed_tokens)
        chunks.append((req.num_computed_tokens, chunk))
        req.num_computed_tokens += chunk
        assert book.physical(req) <= book.peak_slots(SimpleNamespace(**{
            **vars(req), "num_tokens": total}))
    return chunks, rounds, starts


def test_prompt_end_step_is_scored_by_the_window_and_reaches_the_budget():
    cfg = KVMergeConfig(method="kvslimmer", budget=256, interval=64,
                        observe="prompt-end").resolve(4096)
    book, req = MergeBook(cfg, block_size=16), _request(prompt=1000)
    chunks, rounds, starts = _run(book, req, decode=80)
    # The prompt runs without rounds, its last 32 tokens as a chunk of their own, whose
    # observation starts anew.
    assert chunks[:2] == [(0, 968), (968, 32)]
    assert starts == [968]
    first = rounds[0]
    assert first.num_slots == 1000 and first.num_slots_after == 256
    assert (first.recent, first.pool, first.max_fraction) == (32, 7, 0.25)
    # Decoding runs the usual rounds once the request passes budget + interval.
    assert len(rounds) == 2 and rounds[1].num_slots == 256 + 64 + 1
    assert rounds[1].num_slots_after == 256 and rounds[1].recent == 32
    assert book.peak_slots(SimpleNamespace(**{**vars(req), "num_tokens": 1080})) == 1000


def test_prefill_budget_caps_the_prompt_with_progressive_rounds():
    cfg = KVMergeConfig(method="kvslimmer", budget=256, interval=64, observe="prompt-end",
                        prefill_budget=600).resolve(4096)
    book, req = MergeBook(cfg, block_size=16), _request(prompt=1500)
    chunks, rounds, starts = _run(book, req, decode=4)
    prefill = [r for r in rounds if r.num_slots_after == cfg.prefill_target]
    assert prefill and all((r.recent, r.pool, r.max_fraction) == (cfg.recent, 1, 0.5)
                           for r in prefill)
    assert max(r.num_slots for r in rounds) <= 600
    last = rounds[-1]
    assert last.num_slots_after == 256 and last.recent == cfg.window and last.pool == 7
    assert starts == [1500 - 32]
    assert book.peak_slots(SimpleNamespace(**{**vars(req), "num_tokens": 1504})) == 600


@settings(max_examples=120, deadline=None, derandomize=True)
@given(
    budget=st.integers(40, 1500),
    interval=st.integers(1, 300),
    window=st.integers(1, 64),
    prompt=st.integers(1, 4000),
    decode=st.integers(0, 400),
    cap=st.one_of(st.none(), st.integers(4, 3000)),
    batch_cap=st.integers(1, 2048),
    continuation=st.one_of(st.just(0), st.integers(1, 600)),
)
def test_prompt_end_schedules_stay_within_their_peak(budget, interval, window, prompt, decode,
                                                     cap, batch_cap, continuation):
    try:
        cfg = KVMergeConfig(method="kvslimmer", budget=budget, interval=interval,
                            window=window, observe="prompt-end",
                            prefill_budget=cap).resolve(8192)
    except KVMergeConfigError:
        return
    extra = {"kv_merge_continuation": continuation} if continuation else None
    book, req = MergeBook(cfg, block_size=16), _request(prompt=prompt, extra=extra)
    chunks, rounds, starts = _run(book, req, decode, batch_cap)
    end = max(0, prompt - continuation)  # where the prompt-end step runs
    assert starts == ([end - window] if end > window else [])
    # The window's queries are observed alone: a chunk starts where it starts.
    if end > window:
        assert any(start == end - window for start, _ in chunks)
    after_prompt = [r for r in rounds if r.num_slots_after == budget]
    if end > budget and end < prompt + decode:  # the step runs before the next token
        assert after_prompt, "a prompt longer than the budget is compressed at its end"
        assert any(start == end for start, _ in chunks)


def test_a_continuation_is_computed_after_the_step():
    """``kv_merge_continuation: N``: the step runs after ``prompt - N`` tokens, observed by
    the window before it, and the continuation is prefilled against the compressed cache.
    Catches: the step at the prompt's real end (the continuation scored with full KV), or
    the window placed at the end of the continuation."""
    cfg = KVMergeConfig(method="kvslimmer", budget=256, interval=64,
                        observe="prompt-end").resolve(4096)
    book = MergeBook(cfg, block_size=16)
    req = _request(prompt=1000, extra={"kv_merge_continuation": 65})
    chunks, rounds, starts = _run(book, req, decode=4)
    assert chunks[:3] == [(0, 903), (903, 32), (935, 65)]
    assert starts == [903]
    step = rounds[0]
    assert step.num_slots == 935 and step.num_slots_after == 256 and step.recent == 32
    # After the continuation (256 + 65 slots) the usual rounds resume.
    assert rounds[1].num_slots == 256 + 65 and len(rounds) == 2
    assert book.peak_slots(SimpleNamespace(**{**vars(req), "num_tokens": 1004})) == 935


@pytest.mark.parametrize("extra, message", [
    ({"kv_merge_continuation": -1}, "must be an integer from 0 to"),
    ({"kv_merge_continuation": "65"}, "must be an integer from 0 to"),
    ({"kv_merge_continuation": True}, "must be an integer from 0 to"),
    ({"kv_merge_continuation": 2**31}, "must be an integer from 0 to"),
    ({"kv_merge_continuation": 65, "kv_merge_observe": "progressive"},
     "applies to prompt-end observation only"),
])
def test_invalid_continuations_name_the_field(extra, message):
    cfg = KVMergeConfig(method="kvslimmer", budget=1024, interval=64).resolve(8192)
    with pytest.raises(RequestSettingsError, match=message) as err:
        request_settings(extra, cfg)
    assert err.value.field == "vllm_xargs.kv_merge_continuation"
    assert request_settings({"kv_merge_continuation": 0, "kv_merge_observe": "progressive"},
                            cfg).continuation == 0


def test_requests_pick_their_observe_mode_and_go_as_low_as_it_allows():
    cfg = KVMergeConfig(method="kvslimmer", observe="progressive", budget=1024, interval=64,
                        recent=32).resolve(8192)
    assert cfg.min_budget == 192
    low = request_settings({"kv_merge_observe": "prompt-end", "kv_merge_budget": 65}, cfg)
    assert (low.observe, low.budget, low.prompt_end) == ("prompt-end", 65, True)
    with pytest.raises(RequestSettingsError) as err:
        request_settings({"kv_merge_observe": "prompt-end", "kv_merge_budget": 64}, cfg)
    assert err.value.field == "vllm_xargs.kv_merge_budget"
    assert "from 65 (sink + window + 1, with prompt-end observation) to 1024" in str(err.value)
    with pytest.raises(RequestSettingsError, match="from 192 .* to 1024"):
        request_settings({"kv_merge_budget": 65}, cfg)  # progressive floor
    with pytest.raises(RequestSettingsError) as err:
        request_settings({"kv_merge_observe": "later"}, cfg)
    assert err.value.field == "vllm_xargs.kv_merge_observe"
    assert "progressive, prompt-end" in str(err.value)
    # A server that names its observe mode sets it for every method; a request may
    # still name its own; with none named, each method has its own default.
    assert request_settings({"kv_merge_method": "snapkv"}, cfg).observe == "progressive"
    assert request_settings({"kv_merge_method": "snapkv", "kv_merge_observe": "prompt-end"},
                            cfg).observe == "prompt-end"
    default = cfg.model_copy(update={"observe": None})
    assert request_settings({"kv_merge_method": "snapkv"}, default).observe == "prompt-end"
    assert request_settings({"kv_merge_method": "evict"}, default).observe == "progressive"


def test_a_small_prompt_end_budget_runs_rounds_to_the_end():
    cfg = KVMergeConfig(method="kvslimmer", budget=1024, interval=64, recent=32).resolve(8192)
    book = MergeBook(cfg, block_size=16)
    req = _request(prompt=700, extra={"kv_merge_observe": "prompt-end", "kv_merge_budget": 65})
    _, rounds, _ = _run(book, req, decode=200)
    assert [r.num_slots_after for r in rounds] == [65] * len(rounds) and len(rounds) == 4
    assert rounds[0].num_slots == 700
    assert book.summary(req)["kv_slots"] == 700 + 200 - book.num_merged("r")


@pytest.mark.parametrize("settings_, message", [
    (dict(observe="prompt-end", budget=64, interval=8, window=40),
     r"--kv-merge-budget \(64\) must exceed --kv-merge-sink \(32\) \+ --kv-merge-window"),
    (dict(pool=4), "--kv-merge-pool must be an odd number"),
    (dict(prefill_budget=300), "--kv-merge-prefill-budget must be from 384"),
    (dict(prefill_budget=5000), "to 4095"),
])
def test_bad_query_aware_settings_name_the_flag(settings_, message):
    with pytest.raises(KVMergeConfigError, match=message):
        KVMergeConfig(method="kvslimmer", **{"budget": 256, "interval": 64, **settings_}
                      ).resolve(4096)


def test_unknown_observe_mode_is_rejected_by_name():
    with pytest.raises(KVMergeConfigError, match="--kv-merge-observe"):
        KVMergeConfig.from_mapping({"method": "kvslimmer", "observe": "never"})
    with pytest.raises(KVMergeConfigError, match="merge_fraction"):
        KVMergeConfig.from_mapping({"method": "kvslimmer", "merge_fraction": 0.7})
