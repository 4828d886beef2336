"""A merging server under load, with an API key: 64 streaming clients with mixed prompt
and output lengths for about three minutes (``KVSLIMMER_STRESS_SECONDS``), a fifth of
them disconnecting mid-stream; malformed and fuzzed requests. Afterwards every block is
back in the pool and a fresh request gets exactly the answer it got before the load.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import running_server, token_prompt

API_KEY = "stress-test-key"
NUM_BLOCKS = 48
FLAGS = (
    "--kv-merge", "kvslimmer", "--kv-merge-budget", "256", "--kv-merge-interval", "128",
    "--num-gpu-blocks-override", str(NUM_BLOCKS), "--api-key", API_KEY,
)
CLIENTS = 64
SECONDS = float(os.environ.get("KVSLIMMER_STRESS_SECONDS", "180"))
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "stress_server.log"
    with running_server(model_dir, *FLAGS, log_path=log) as srv:
        yield srv


def _complete(server, prompt, max_tokens=16, **extra):
    return httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=600, json=dict(
        model="smol", prompt=prompt, max_tokens=max_tokens, temperature=0, **extra))


def test_api_key_is_enforced(server):
    body = dict(model="smol", prompt="Hello", max_tokens=2)
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(server.url + "/v1/completions", json=body, headers=wrong,
                      timeout=60).status_code == 401
    assert _complete(server, "Hello", 2).status_code == 200


MALFORMED = [
    b"{not json",
    b"[]",
    json.dumps({"model": "smol", "max_tokens": 2}).encode(),  # no prompt
    json.dumps({"model": "smol", "prompt": "x", "n": 0}).encode(),
    json.dumps({"model": "smol", "prompt": "x", "max_tokens": "many"}).encode(),
    json.dumps({"model": "smol", "prompt": "x", "max_tokens": -5}).encode(),
    json.dumps({"model": "smol", "prompt": "x", "max_tokens": 10**9}).encode(),
    json.dumps({"model": "smol", "prompt": "x", "temperature": "hot"}).encode(),
    json.dumps({"model": "smol", "prompt": 17}).encode(),
    json.dumps({"model": "smol", "prompt": "x", "vllm_xargs": "kv_merge=off"}).encode(),
    json.dumps({"model": "smol", "prompt": "x", "vllm_xargs": {"kv_merge": [1]}}).encode(),
    json.dumps({"model": "smol", "prompt": "x",
                "vllm_xargs": {"kv_merge_budget": 1.5}}).encode(),
    json.dumps({"model": "other", "prompt": "x"}).encode(),
]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_bodies_get_4xx(server, body):
    r = httpx.post(server.url + "/v1/completions", content=body, timeout=60,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])


XARG_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=6),
    st.sampled_from(["on", "off", "kvslimmer", "evict", "streaming", "average", 256]),
    st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(), max_size=2),
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(xargs=st.dictionaries(
    st.sampled_from(["kv_merge", "kv_merge_budget", "kv_merge_method"]), XARG_VALUES,
    max_size=3))
def test_fuzzed_per_request_options_get_200_or_400(server, xargs):
    r = _complete(server, "The weather today is", 2, vllm_xargs=xargs)
    assert r.status_code in (200, 400), (xargs, r.status_code, r.text[:300])
    if r.status_code == 400:
        assert "vllm_xargs.kv_merge" in r.json()["error"]["message"]


async def _load(server, prompts, seconds: float, seed: int = 0) -> Counter:
    rng = random.Random(seed)
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                max_retries=0, timeout=900)
    tally: Counter = Counter()
    deadline = time.monotonic() + seconds
    in_flight: set[asyncio.Task] = set()

    async def one(prompt, max_tokens, drop_after):
        stream = await client.completions.create(
            model="smol", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
        chunks = 0
        async for chunk in stream:
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                await stream.close()
                return "disconnected"
            if chunk.choices[0].finish_reason:
                return "served"
        return "served"

    async def worker():
        while time.monotonic() < deadline:
            task = asyncio.ensure_future(one(
                rng.choice(prompts), rng.choice([4, 16, 48, 128]),
                rng.randint(1, 8) if rng.random() < 0.2 else None,
            ))
            in_flight.add(task)
            try:
                tally[await task] += 1
            except openai.APIStatusError as exc:
                tally[f"HTTP {exc.status_code}"] += 1
            except asyncio.CancelledError:
                tally["cut at the deadline"] += 1
            except openai.APIError as exc:
                tally[f"error {type(exc).__name__}"] += 1
            finally:
                in_flight.discard(task)

    workers = [asyncio.ensure_future(worker()) for _ in range(CLIENTS)]
    while time.monotonic() < deadline:
        await asyncio.sleep(1)
    for task in list(in_flight):  # clients still waiting give up: their streams close
        task.cancel()
    await asyncio.gather(*workers)
    await client.close()
    return tally


def test_stress_with_disconnects_loses_no_block(server, tokenizer):
    lengths = [30, 120, 400, 900, 1500]
    prompts = [token_prompt(tokenizer, n, seed=500 + i)
               for i, n in enumerate(lengths * 3)]
    probe = token_prompt(tokenizer, 1400, seed=999)
    answer_before = _complete(server, probe, 24).json()["choices"][0]["text"]
    before = server.metrics()

    tally = asyncio.run(_load(server, prompts, SECONDS))

    # The server drains what the disconnected clients left, then idles.
    for _ in range(300):
        m = server.metrics()
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0:
            break
        time.sleep(1)
    assert server.proc.poll() is None, "the server died"
    fresh = _complete(server, probe, 24)
    assert fresh.status_code == 200
    assert fresh.json()["choices"][0]["text"] == answer_before
    after = server.metrics()
    errors = {k: v for k, v in tally.items() if k.startswith(("HTTP", "error"))}
    report = (
        f"stress: {CLIENTS} clients for {SECONDS:.0f} s: served {tally['served']}, "
        f"disconnected {tally['disconnected']}, cut at the deadline "
        f"{tally['cut at the deadline']}, preemptions "
        f"{after['vllm:num_preemptions_total'] - before['vllm:num_preemptions_total']:.0f}, "
        f"merge rounds "
        f"{after['vllm:kv_merge_rounds_total'] - before['vllm:kv_merge_rounds_total']:.0f}, "
        f"errors {errors or 0}, KV cache usage after {after['vllm:kv_cache_usage_perc']}"
    )
    print(report)
    assert not errors, report
    # Two CPU cores serve a few dozen of these in three minutes; many more wait.
    assert tally["served"] >= 16 and tally["disconnected"] >= 4, report
    assert after["vllm:kv_merge_rounds_total"] > before["vllm:kv_merge_rounds_total"]
    # Every block is back in the pool, and nothing is left running or merged.
    assert after["vllm:kv_cache_usage_perc"] == 0.0, report
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:kv_merge_physical_tokens"] == 0
