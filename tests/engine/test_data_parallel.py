"""Data parallelism: every DP engine runs its own scheduler, KV cache and merge rounds;
every API server validates per-request settings, and the merge metrics carry vLLM's
``engine`` label, one series per engine, whichever API server answers ``/metrics``.

A real ``vllm serve --data-parallel-size 2`` of the tiny random-weight Llama, as typed:
vLLM then runs one API server per engine (two processes sharing the port, Prometheus in
multiprocess mode); one CPU core per engine through ``VLLM_CPU_OMP_THREADS_BIND``. Its
greedy tokens are compared with a single in-process engine of the same settings.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvslimmer_vllm.engine.plugin import engine_kwargs
from helpers import Server, offline_llm, random_tokens

BUDGET, INTERVAL = 192, 32
FLAGS = ("--kv-merge", "kvslimmer", "--kv-merge-budget", str(BUDGET), "--kv-merge-interval",
         str(INTERVAL), "--kv-merge-observe", "progressive")
PROMPTS = [random_tokens(n, seed=70 + i) for i, n in enumerate((400, 650, 900, 1150))]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def dp_server(tiny_llama, tmp_path_factory):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("two data-parallel engines on CPU need two cores")
    half = len(cores) // 2
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores[:half])) + "|"
           + ",".join(map(str, cores[half:2 * half]))}
    server = Server.vllm(
        tiny_llama, "--skip-tokenizer-init", "--data-parallel-size", "2",
        "--max-model-len", "2048", "--num-gpu-blocks-override",
        "64", *FLAGS, log_path=tmp_path_factory.mktemp("dp") / "dp_server.log", name="tiny",
        env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _complete(server, prompt, engine: int, **extra):
    """Greedy token ids of a completion sent to DP engine ``engine`` (vLLM's
    ``X-data-parallel-rank`` header, so the split over engines is fixed)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS,
            "min_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, **extra}
    req = urllib.request.Request(
        server.url + "/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-data-parallel-rank": str(engine)})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["choices"][0]["token_ids"]


def _by_engine(server, name):
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            engine = labels.split('engine="', 1)[1].split('"', 1)[0]
            out[engine] = out.get(engine, 0.0) + float(value)
    return out


def test_each_engine_merges_its_requests_with_single_engine_tokens(dp_server, tiny_llama):
    """Catches: merging that only works on one DP engine (the other's rounds missing or
    its metrics block never written), metrics of both engines mixed in one series, greedy
    tokens that differ from one merging engine, and blocks left held after the requests."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    before = _by_engine(dp_server, "vllm:kv_merge_rounds_total")
    assert set(before) == {"0", "1"}
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        served = list(pool.map(lambda i: _complete(dp_server, PROMPTS[i], i % 2),
                               range(len(PROMPTS))))
    dp_server.wait_idle()
    after = _by_engine(dp_server, "vllm:kv_merge_rounds_total")
    assert all(after[e] > before[e] for e in ("0", "1")), (before, after)
    assert _by_engine(dp_server, "vllm:kv_cache_usage_perc") == {"0": 0.0, "1": 0.0}
    assert _by_engine(dp_server, "vllm:kv_merge_physical_tokens") == {"0": 0.0, "1": 0.0}

    with offline_llm(tiny_llama, skip_tokenizer_init=True, max_model_len=2048,
                     num_gpu_blocks_override=64,
                     **engine_kwargs(budget=BUDGET, interval=INTERVAL,
                                     observe="progressive")) as llm:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
            SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS,
                           ignore_eos=True, detokenize=False), use_tqdm=False)
    assert served == [list(o.outputs[0].token_ids) for o in outputs]


def test_every_api_server_validates_for_every_engine(dp_server):
    """Catches: per-request settings reaching a DP engine unchecked through an API server
    that does not know the merge settings (a bad budget would fail inside the engine
    instead of as the client's HTTP 400), and API servers without the merge metrics.
    Each request opens its own connection, which the kernel spreads over the two API
    servers sharing the port."""
    log = dp_server.log_path.read_text()
    assert "(ApiServer_0 " in log and "(ApiServer_1 " in log  # vLLM's default: two
    for _ in range(4):
        assert set(_by_engine(dp_server, "vllm:kv_merge_rounds_total")) == {"0", "1"}
    for engine in (0, 1, 0, 1):
        with pytest.raises(urllib.error.HTTPError) as err:
            _complete(dp_server, PROMPTS[0], engine, vllm_xargs={"kv_merge_budget": 1})
        assert err.value.code == 400
        assert "vllm_xargs.kv_merge_budget" in json.loads(err.value.read())["error"]["message"]
        off = _complete(dp_server, PROMPTS[0], engine, vllm_xargs={"kv_merge": "off"})
        assert len(off) == MAX_TOKENS


def test_streams_dropped_mid_answer_free_every_engine(dp_server):
    """Catches: blocks or merge bookkeeping leaked on a DP engine when its client goes away
    while the request is merging (vLLM aborts it)."""
    import http.client

    generated_before = _by_engine(dp_server, "vllm:generation_tokens_total")
    for engine in (0, 1):
        body = {"model": "tiny", "prompt": random_tokens(1200, seed=90 + engine),
                "max_tokens": 400, "min_tokens": 400, "ignore_eos": True,
                "temperature": 0.0, "stream": True}
        conn = http.client.HTTPConnection("127.0.0.1", dp_server.port, timeout=300)
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"Content-Type": "application/json",
                      "X-data-parallel-rank": str(engine)})
        response = conn.getresponse()
        assert response.status == 200
        for _ in range(20):  # ten streamed tokens (SSE: data line + blank line each)
            assert response.readline()
        conn.close()
    dp_server.wait_idle()
    generated = _by_engine(dp_server, "vllm:generation_tokens_total")
    # Stopped early (aborted), not run to its 400 tokens.
    assert all(5 <= generated[e] - generated_before[e] < 400 for e in ("0", "1")), (
        generated_before, generated)
    assert _by_engine(dp_server, "vllm:kv_cache_usage_perc") == {"0": 0.0, "1": 0.0}
    assert _by_engine(dp_server, "vllm:kv_merge_physical_tokens") == {"0": 0.0, "1": 0.0}
    assert _by_engine(dp_server, "vllm:num_requests_running") == {"0": 0.0, "1": 0.0}

