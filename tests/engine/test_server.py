"""`vllm serve --kv-merge kvslimmer` over HTTP, started as users start it.

The KV cache holds 48 blocks of 128 slots (6,144 slots: three 2,000-token requests).
"""

from __future__ import annotations

import asyncio
import random

import httpx
import openai
import pytest

from helpers import long_text, running_server, token_prompt

NUM_BLOCKS = 48
CACHE_SLOTS = NUM_BLOCKS * 128
MERGE_FLAGS = (
    "--kv-merge", "kvslimmer", "--kv-merge-budget", "256", "--kv-merge-interval", "128",
    "--num-gpu-blocks-override", str(NUM_BLOCKS),
)


@pytest.fixture(scope="module")
def merge_server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "merge_server.log"
    with running_server(model_dir, *MERGE_FLAGS, log_path=log) as server:
        yield server


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_endpoints_answer_a_long_prompt_while_merging(merge_server):
    client = _client(merge_server)
    prompt = long_text(1100, seed=21) + "\nWhat is this text about?"
    before = merge_server.metrics()

    completion = client.completions.create(
        model="smol", prompt=prompt, max_tokens=16, temperature=0
    )
    assert completion.usage.prompt_tokens >= 1500
    assert completion.usage.completion_tokens == 16
    assert completion.choices[0].text.strip()
    # What merging did to this request rides along in "kv_transfer_params".
    summary = completion.model_extra["kv_transfer_params"]["kv_merge"]
    total = completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert summary["tokens"] in (total - 1, total)  # the last sampled token has no KV
    assert summary["kv_slots"] <= 256 + 128 + 48
    assert summary["merged_tokens"] == summary["tokens"] - summary["kv_slots"]
    assert summary["rounds"] >= 2 and 0 < summary["kv_ratio"] < 0.3

    chat = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": prompt}],
        max_tokens=16, temperature=0,
    )
    assert chat.usage.prompt_tokens >= 1500
    assert chat.choices[0].message.content.strip()

    pieces = []
    stream = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": prompt}],
        max_tokens=16, temperature=0, stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    # Greedy decoding: the stream spells out the same answer as the non-streamed call.
    assert "".join(pieces) == chat.choices[0].message.content

    after = merge_server.metrics()
    for name in ("vllm:kv_merge_rounds_total", "vllm:kv_merge_tokens_merged_total",
                 "vllm:kv_merge_blocks_freed_total"):
        assert after[name] > before.get(name, 0.0), name
    # 3 requests of >= 1500 tokens each, all brought down to the 256-slot budget.
    assert after["vllm:kv_merge_tokens_merged_total"] - before.get(
        "vllm:kv_merge_tokens_merged_total", 0.0) >= 3 * (1500 - 256 - 128 - 48)
    assert after["vllm:kv_merge_request_kv_ratio_count"] >= 3
    assert after["vllm:kv_cache_usage_perc"] == 0.0


def test_per_request_control_over_the_openai_api(merge_server):
    client = _client(merge_server)
    prompt = long_text(1100, seed=22)
    ask = dict(model="smol", prompt=prompt, max_tokens=4, temperature=0)
    before = merge_server.metrics()["vllm:kv_merge_tokens_merged_total"]
    off = client.completions.create(**ask, extra_body={"vllm_xargs": {"kv_merge": "off"}})
    assert off.usage.prompt_tokens > 1400
    assert merge_server.metrics()["vllm:kv_merge_tokens_merged_total"] == before
    client.completions.create(**ask, extra_body={"vllm_xargs": {"kv_merge_budget": 256}})
    assert merge_server.metrics()["vllm:kv_merge_tokens_merged_total"] > before

    for xargs, field, allowed in [
        ({"kv_merge_budget": 5000}, "kv_merge_budget", "from 256 to 256"),
        ({"kv_merge_budget": "lots"}, "kv_merge_budget", "integer"),
        ({"kv_merge": "sometimes"}, "kv_merge", "'on' or 'off'"),
        ({"kv_merge_method": "h2o"}, "kv_merge_method", "kvslimmer, average, evict"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**ask, extra_body={"vllm_xargs": xargs})
        assert err.value.status_code == 400
        assert f"vllm_xargs.{field}" in err.value.message and allowed in err.value.message


async def _drive(server, requests, abort_after=None, poll=0.2):
    """Send the requests concurrently (streaming); watch /metrics while they run.

    ``abort_after[i]``: close request i's stream after that many chunks (None: read all).
    Returns (texts, finish reasons, peak running requests, peak logical KV tokens).
    """
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                max_retries=0, timeout=900)
    peaks = {"running": 0.0, "logical": 0.0}
    done = asyncio.Event()

    async def watch():
        async with httpx.AsyncClient() as http:
            while not done.is_set():
                text = (await http.get(server.url + "/metrics")).text
                for line in text.splitlines():
                    if line.startswith("vllm:num_requests_running{"):
                        peaks["running"] = max(peaks["running"], float(line.split()[-1]))
                    if line.startswith("vllm:kv_merge_logical_tokens{"):
                        peaks["logical"] = max(peaks["logical"], float(line.split()[-1]))
                await asyncio.sleep(poll)

    async def one(i, prompt, max_tokens):
        stream = await client.completions.create(
            model="smol", prompt=prompt, max_tokens=max_tokens, temperature=0,
            stream=True,
        )
        text, finish, chunks = [], None, 0
        async for chunk in stream:
            chunks += 1
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
            if abort_after and abort_after[i] is not None and chunks >= abort_after[i]:
                await stream.close()
                return "".join(text), "aborted"
        return "".join(text), finish

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(
            *(one(i, p, n) for i, (p, n) in enumerate(requests))
        )
    finally:
        done.set()
        await watcher
    return results, peaks["running"], peaks["logical"]


def test_merging_runs_twice_as_many_long_requests_on_the_same_cache(
    merge_server, model_dir, tokenizer, tmp_path_factory
):
    """Unmodified vLLM fits at most three 2,000-token requests in 6,144 slots; with
    merging (budget 256, interval 128) at least six run at once and all complete."""
    requests = [(token_prompt(tokenizer, 2000, seed=100 + i), 32) for i in range(8)]

    results, running, logical = asyncio.run(_drive(merge_server, requests))
    assert all(finish == "length" for _, finish in results)
    assert running >= 6, f"peak running requests with kv-merge: {running}"
    # More logical tokens were held at once than the cache has slots: freed blocks
    # were handed to other requests.
    assert logical > CACHE_SLOTS, f"peak logical tokens {logical}"

    log = tmp_path_factory.mktemp("logs") / "base_server.log"
    flags = ("--num-gpu-blocks-override", str(NUM_BLOCKS))
    with running_server(model_dir, *flags, log_path=log) as base:
        results, base_running, _ = asyncio.run(_drive(base, requests))
    assert all(finish == "length" for _, finish in results)
    # 48 blocks hold exactly three requests of 2,032 tokens (16 blocks each).
    assert base_running == 3, f"peak running requests without merging: {base_running}"
    print(f"peak running requests: unmodified {base_running:.0f}, kv-merge {running:.0f}")


def test_no_block_leaks_after_aborts_and_preemption(merge_server, tokenizer):
    rng = random.Random(7)
    requests, abort_after = [], []
    for i in range(30):
        length = rng.choice([20, 100, 200, 350, 800, 1800])
        requests.append((token_prompt(tokenizer, length, seed=300 + i),
                         rng.choice([200, 320, 420])))
        abort_after.append(rng.choice([None, None, 3, 25, 90]))
    before = merge_server.metrics()

    results, _, _ = asyncio.run(_drive(merge_server, requests, abort_after))

    after = merge_server.metrics()
    finished = [finish for _, finish in results if finish != "aborted"]
    assert finished and all(f in ("length", "stop") for f in finished)
    assert sum(1 for _, f in results if f == "aborted") >= 5
    assert after["vllm:num_preemptions_total"] > before.get("vllm:num_preemptions_total", 0)
    assert after["vllm:kv_merge_rounds_total"] > before["vllm:kv_merge_rounds_total"]
    # Every block is back in the pool and no request is left behind.
    assert after["vllm:kv_cache_usage_perc"] == 0.0
    assert after["vllm:num_requests_running"] == 0
    assert after["vllm:kv_merge_physical_tokens"] == 0
    chat = _client(merge_server).chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0,
    )
    assert "Paris" in chat.choices[0].message.content


def test_eval_against_the_running_server(merge_server, model_dir, tmp_path):
    """`kvslimmer-vllm eval --server URL`: methods and budgets picked per request."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "kvslimmer-vllm")
    common = [cli, "eval", "--server", merge_server.url, "--model", model_dir,
              "--lengths", "512", "--cases", "1", "--max-tokens", "8",
              "--methods", "kvslimmer,streaming"]
    before = merge_server.metrics()["vllm:kv_merge_tokens_merged_total"]
    proc = subprocess.run(
        [*common, "--budgets", "256", "--tasks", "needle,nll,agreement",
         "--out", str(tmp_path / "ok")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "ok" / "rows.csv")))
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in ("needle", "nll") for m in ("none", "kvslimmer", "streaming")
    } | {("agreement", "kvslimmer"), ("agreement", "streaming")}
    assert all(float(r["score"]) > 0.5 for r in rows if r["task"] == "nll")
    assert merge_server.metrics()["vllm:kv_merge_tokens_merged_total"] > before
    # A budget the server cannot grant: its HTTP 400 message reaches the user.
    bad = subprocess.run(
        [*common, "--budgets", "0.9", "--tasks", "needle", "--out", str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=600,
    )
    assert bad.returncode == 2
    assert "HTTP 400" in bad.stderr and "vllm_xargs.kv_merge_budget" in bad.stderr
