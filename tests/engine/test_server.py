"""`vllm serve --kv-merge kvslimmer` over HTTP, started as users start it (the session's
shared merging server: the CPU image's entrypoint, budget 256, interval 128, API key).

The KV cache holds 48 blocks of 128 slots (6,144 slots: three 2,000-token requests).
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from helpers import MERGE, long_text, token_prompt

CACHE_SLOTS = MERGE.CACHE_SLOTS


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key or "unused",
                         max_retries=0)


def test_openai_endpoints_answer_a_long_prompt_while_merging(merge_server):
    """Catches: completions, chat or streaming breaking with merging on; the per-request
    summary (kv_transfer_params) missing or wrong; rounds not bringing a long request
    down to its budget; merge counters not exported; blocks not returned."""
    client = _client(merge_server)
    prompt = long_text(1100, seed=21) + "\nWhat is this text about?"
    before = merge_server.metrics()

    completion = client.completions.create(
        model=merge_server.name, prompt=prompt, max_tokens=16, temperature=0
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
        model=merge_server.name, messages=[{"role": "user", "content": prompt}],
        max_tokens=16, temperature=0,
    )
    assert chat.usage.prompt_tokens >= 1500
    assert chat.choices[0].message.content.strip()

    pieces = []
    stream = client.chat.completions.create(
        model=merge_server.name, messages=[{"role": "user", "content": prompt}],
        max_tokens=16, temperature=0, stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    # Greedy decoding: the stream spells out the same answer as the non-streamed call.
    assert "".join(pieces) == chat.choices[0].message.content

    after = merge_server.wait_idle()
    for name in ("vllm:kv_merge_rounds_total", "vllm:kv_merge_tokens_merged_total",
                 "vllm:kv_merge_blocks_freed_total"):
        assert after[name] > before.get(name, 0.0), name
    # 3 requests of >= 1500 tokens each, all brought down to the 256-slot budget.
    assert after["vllm:kv_merge_tokens_merged_total"] - before.get(
        "vllm:kv_merge_tokens_merged_total", 0.0) >= 3 * (1500 - 256 - 128 - 48)
    assert after["vllm:kv_merge_request_kv_ratio_count"] >= 3
    assert after["vllm:kv_cache_usage_perc"] == 0.0


def test_per_request_control_over_the_openai_api(merge_server):
    """Catches: vllm_xargs kv_merge off still merging, a lower budget not merging, and a
    bad value not refused with a 400 that names the field and what it allows."""
    client = _client(merge_server)
    prompt = long_text(1100, seed=22)
    ask = dict(model=merge_server.name, prompt=prompt, max_tokens=4, temperature=0)
    before = merge_server.metrics()["vllm:kv_merge_tokens_merged_total"]
    off = client.completions.create(**ask, extra_body={"vllm_xargs": {"kv_merge": "off"}})
    assert off.usage.prompt_tokens > 1400
    assert merge_server.metrics()["vllm:kv_merge_tokens_merged_total"] == before
    client.completions.create(**ask, extra_body={"vllm_xargs": {"kv_merge_budget": 256}})
    assert merge_server.metrics()["vllm:kv_merge_tokens_merged_total"] > before

    for xargs, field, allowed in [
        ({"kv_merge_budget": 5000}, "kv_merge_budget", "to 256 (this server's"),
        ({"kv_merge_budget": 2**64}, "kv_merge_budget", "to 256 (this server's"),
        ({"kv_merge_budget": "lots"}, "kv_merge_budget", "integer"),
        ({"kv_merge": "sometimes"}, "kv_merge", "'on' or 'off'"),
        ({"kv_merge_method": "h2o"}, "kv_merge_method", "kvslimmer, average, evict"),
        ({"kv_merge_observe": "later"}, "kv_merge_observe", "progressive, prompt-end"),
        ({"kv_merge_observe": "prompt-end", "kv_merge_budget": 64}, "kv_merge_budget",
         "from 65 (sink + window + 1, with prompt-end observation)"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(**ask, extra_body={"vllm_xargs": xargs})
        assert err.value.status_code == 400
        assert f"vllm_xargs.{field}" in err.value.message and allowed in err.value.message


async def _drive(server, requests, poll=0.2):
    """Send the requests concurrently (streaming); watch /metrics while they run.
    Returns ((text, finish reason) per request, peak running requests, peak logical KV
    tokens). The peaks are states held for many steps, not instants."""
    client = openai.AsyncOpenAI(base_url=server.url + "/v1",
                                api_key=server.api_key or "unused", max_retries=0,
                                timeout=900)
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

    async def one(prompt, max_tokens):
        stream = await client.completions.create(
            model=server.name, prompt=prompt, max_tokens=max_tokens, temperature=0,
            stream=True,
        )
        text, finish = [], None
        async for chunk in stream:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(text), finish

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(one(p, n) for p, n in requests))
    finally:
        done.set()
        await watcher
    return results, peaks["running"], peaks["logical"]


def test_merging_runs_twice_as_many_long_requests_on_the_same_cache(
    merge_server, base_server, tokenizer
):
    """Unmodified vLLM fits at most three 2,000-token requests in 6,144 slots; with
    merging (budget 256, interval 128) at least six run at once and all complete.
    Catches: freed blocks not handed back to the pool (or admission not sized by the
    merged peak), which would leave the merging server at three like unmodified vLLM."""
    requests = [(token_prompt(tokenizer, 2000, seed=100 + i), 32) for i in range(8)]

    results, running, logical = asyncio.run(_drive(merge_server, requests))
    assert all(finish == "length" for _, finish in results)
    assert running >= 6, f"peak running requests with kv-merge: {running}"
    # More logical tokens were held at once than the cache has slots: freed blocks
    # were handed to other requests.
    assert logical > CACHE_SLOTS, f"peak logical tokens {logical}"

    # Four are enough to fill the unmodified server's cache: three run, one waits.
    results, base_running, _ = asyncio.run(_drive(base_server, requests[:4]))
    assert all(finish == "length" for _, finish in results)
    # 48 blocks hold exactly three requests of 2,032 tokens (16 blocks each).
    assert base_running == 3, f"peak running requests without merging: {base_running}"
    print(f"peak running requests: unmodified {base_running:.0f}, kv-merge {running:.0f}")


def test_eval_against_the_running_server(merge_server, model_dir, tmp_path):
    """`kvslimmer-vllm eval --server URL --api-key`: methods, observe modes and budgets
    picked per request. Catches: the eval's server backend not passing vllm_xargs (no
    merging, or rows missing for a method), losing the API key, or hiding the server's
    400."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "kvslimmer-vllm")
    common = [cli, "eval", "--server", merge_server.url, "--api-key", merge_server.api_key,
              "--model", model_dir,
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
    # kvslimmer observes at the prompt's end (its default): its NLL request carries
    # vllm_xargs.kv_merge_continuation through the API server, and its NLL differs from
    # full KV's (the continuation is scored on the compressed cache).
    assert {(r["task"], r["method"]) for r in rows} == {
        (t, m) for t in ("needle", "nll") for m in ("none", "kvslimmer", "streaming")
    } | {("agreement", "kvslimmer"), ("agreement", "streaming")}
    nll = {r["method"]: float(r["score"]) for r in rows if r["task"] == "nll"}
    assert nll["kvslimmer"] != nll["none"]
    assert {r["observe"] for r in rows if r["method"] == "kvslimmer"} == {"prompt-end"}
    assert all(float(r["score"]) > 0.5 for r in rows if r["task"] == "nll")
    assert merge_server.metrics()["vllm:kv_merge_tokens_merged_total"] > before
    # A budget the server cannot grant: its HTTP 400 message reaches the user.
    bad = subprocess.run(
        [*common, "--budgets", "0.9", "--tasks", "needle", "--out", str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=600,
    )
    assert bad.returncode == 2
    assert "HTTP 400" in bad.stderr and "vllm_xargs.kv_merge_budget" in bad.stderr
