"""Serving benchmark: unmodified vLLM vs ``--kv-merge kvslimmer``, side by side.

Starts two ``vllm serve`` processes on loopback with the same model and the same KV cache
size (``--num-gpu-blocks-override``), and drives them with the same OpenAI-API workload:
streaming clients sending long prompts of documentation text at a sweep of concurrency
levels, each level on every server in turn (one server busy at a time) before the next. While a level runs, ``/metrics`` is polled for running
requests, KV cache usage and, for the merging server, its physical/logical KV tokens and
merge time.

Reported per server and concurrency: peak running requests, request throughput, output
tokens/s, TTFT and time per output token (p50/p99), peak KV usage, preemptions and the
share of ``execute_model`` time spent merging; then the kv-merge/unmodified ratios. A
decode check compares the time per output token of one request at logical length L under
a budget B with unmodified vLLM at lengths B and L (the latter over the former: the most a
B-slot cache can speed decoding up). Outputs (in ``--out``): ``serve_bench.csv``,
``serve_bench.md`` (tables + the command line + machine), ``throughput.png`` and
``kv_usage.png``. Requests and time are bounded; progress goes to stderr.

    python benchmarks/serve_bench.py                  # default preset
    python benchmarks/serve_bench.py --preset small   # the CI smoke run
    python benchmarks/serve_bench.py --preset prefill-heavy

Servers already running (for example, two started with your own flags) are driven
instead with ``--base-url URL --merge-url URL [--api-key KEY]``: both must report the same
KV cache size on ``/metrics``, the merging server is recognised by its ``vllm:kv_merge_*``
metrics, and its requests carry the preset's budget and ``--observe`` per request
(``vllm_xargs``).

``--observe progressive,prompt-end`` (the default) drives the merging server once per
observe mode (``vllm_xargs.kv_merge_observe`` on every request), so both modes are
reported beside the same unmodified run: rows ``kv-merge/progressive`` and
``kv-merge/prompt-end``. ``off`` in the list adds a run of the merging server with
``vllm_xargs.kv_merge: "off"`` (its requests keep their full KV): what the merging server
costs before any round.

The ``ttft`` preset measures time to first token alone: one 3,000-token prompt at a time,
one output token, on unmodified vLLM and the merging server with merging off, in
progressive and in prompt-end mode, four prompts, each on every arm in turn; the ratio
table then compares medians over the four.

    python benchmarks/serve_bench.py --preset ttft   # about 5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PRESETS = {
    # Prompts of 2,000-4,000 tokens, 64-256 output tokens, a KV cache for ~3 requests.
    # A level sends max(requests_per_level, concurrency) requests. The merge interval of
    # one block (128) keeps a merging request within 8 blocks (budget 750 + 2 x 128).
    "default": dict(prompt_tokens=(2000, 4000), output_tokens=(64, 256),
                    concurrency=(2, 4, 8, 16), requests_per_level=8, budget_ratio=0.25,
                    cache_requests=3, interval=128),
    "small": dict(prompt_tokens=(600, 900), output_tokens=(8, 16),
                  concurrency=(2, 4), requests_per_level=4, budget_ratio=0.4,
                  cache_requests=3, interval=None),
    # Prefill-heavy: 12 clients at once, 2,000-3,000-token prompts and short answers, a
    # KV cache of 74 blocks (three of the longest requests), budget 625 (a quarter of the
    # mean prompt), a round per block of new tokens: most engine time is prefill, so the
    # rounds run during prefill are what this mix measures.
    "prefill-heavy": dict(prompt_tokens=(2000, 3000), output_tokens=(64, 128),
                          concurrency=(12,), requests_per_level=12, budget_ratio=0.25,
                          cache_requests=3, interval=128),
    # Time to first token alone: one 3,000-token prompt per level and one output token,
    # four levels (a new prompt each), every arm in turn within a level; the default
    # preset's cache and budget ratio. No decode check (one token has no TPOT).
    "ttft": dict(prompt_tokens=(3000, 3000), output_tokens=(1, 1), concurrency=(1, 1, 1, 1),
                 requests_per_level=1, budget_ratio=0.25, cache_requests=3, interval=128,
                 observe=("off", "progressive", "prompt-end"), decode_check=False),
}
#: Arms of the merging server besides the observe modes: ``off`` sends kv_merge "off".
OFF = "off"
BLOCK = 128


def cache_plan(prompt_tokens, output_tokens, budget_ratio: float, cache_requests: int,
               budget: int | None = None) -> tuple[int, int, int]:
    """``(budget, max_model_len, KV blocks)`` of a preset: the budget a share of the mean
    prompt (unless given), the smallest power of two (>= 1,024) above the longest request,
    a cache for ``cache_requests`` of the longest requests that also holds one request of
    max_model_len (vLLM insists on that)."""
    longest = prompt_tokens[1] + output_tokens[1]
    budget = budget or int(budget_ratio * statistics.mean(prompt_tokens))
    max_len = max(1024, 1 << math.ceil(math.log2(longest + 1)))
    blocks = max(math.ceil(cache_requests * longest / BLOCK), max_len // BLOCK + 1)
    return budget, max_len, blocks


def log(msg: str) -> None:
    print(f"[serve_bench] {msg}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


# --------------------------------------------------------------------------- servers
class Server:
    def __init__(self, name: str, model: str, flags: list[str], log_path: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.name, self.url = name, f"http://127.0.0.1:{self.port}"
        vllm = str(Path(sys.executable).parent / "vllm")
        cmd = [vllm, "serve", model, "--served-model-name", "bench", "--host", "127.0.0.1",
               "--port", str(self.port), *flags]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.cmd = cmd
        self.model, self.headers, self.xargs = "bench", {}, None
        self.budget: int | None = None  # started with the preset's --kv-merge-budget
        self.command = f"`vllm serve {' '.join([model, *flags])}`"

    def describe(self) -> str:
        return self.command

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited; see {self.log.name}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"{self.name} server not ready after {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


class RemoteServer:
    """A server someone else started: its served model is read from ``/v1/models``, and
    ``xargs`` (per-request ``vllm_xargs``) carry the settings the benchmark controls."""

    def __init__(self, name: str, url: str, api_key: str | None, flag: str) -> None:
        self.name, self.url, self.flag = name, url.rstrip("/"), flag
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.xargs: dict | None = None
        #: The preset's budget, sent per request (the server has its own flags).
        self.budget: int | None = None
        try:
            models = _get_json(self.url + "/v1/models", self.headers)
            self.model = models["data"][0]["id"]
            with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
                self.metrics_text = r.read().decode()
        except (OSError, KeyError, IndexError, ValueError) as e:
            raise SystemExit(f"serve_bench: error: {flag} {url}: no vLLM server answering "
                             f"/v1/models and /metrics ({e})") from None
        self.merges = "vllm:kv_merge_" in self.metrics_text
        self.blocks = _cache_blocks(self.metrics_text)

    def describe(self) -> str:
        return f"server at {self.url} (model `{self.model}`, {self.blocks} KV blocks)"

    def refusal(self) -> str | None:
        """The server's error for a one-token request with ``xargs`` (None: accepted)."""
        body = json.dumps({"model": self.model, "prompt": "Hello", "max_tokens": 1,
                           "vllm_xargs": self.xargs}).encode()
        request = urllib.request.Request(self.url + "/v1/completions", data=body,
                                         headers={**self.headers,
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300):
                return None
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}: {e.read().decode(errors='replace')[:300]}"

    def stop(self) -> None:
        pass


def _get_json(url: str, headers: dict) -> dict:
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


def _cache_blocks(metrics_text: str) -> int | None:
    """``num_gpu_blocks`` from vLLM's ``vllm:cache_config_info`` labels."""
    found = re.search(r'^vllm:cache_config_info\{(?:.*,)?num_gpu_blocks="(\d+)"',
                      metrics_text, re.MULTILINE)
    return int(found.group(1)) if found else None


def remote_servers(args, budget: int) -> dict[str, RemoteServer]:
    """The two running servers named by --base-url / --merge-url, checked to be
    comparable: same KV cache size, one merging and one not."""
    base = RemoteServer("unmodified", args.base_url, args.api_key, "--base-url")
    merge = RemoteServer("kv-merge", args.merge_url, args.api_key, "--merge-url")
    if base.merges:
        raise SystemExit(f"serve_bench: error: --base-url {base.url} merges KV "
                         "(it reports vllm:kv_merge_* metrics); give an unmodified server")
    if not merge.merges:
        raise SystemExit(f"serve_bench: error: --merge-url {merge.url} does not merge KV "
                         "(no vllm:kv_merge_* metrics); start it with --kv-merge kvslimmer")
    if base.blocks != merge.blocks:
        raise SystemExit(f"serve_bench: error: the servers' KV caches differ ({base.blocks} "
                         f"vs {merge.blocks} blocks): compare them at the same "
                         "--num-gpu-blocks-override")
    merge.budget = budget
    for mode in args.observe:
        merge.xargs = merge_xargs(merge, mode)
        refused = merge.refusal()
        if refused:
            raise SystemExit(f"serve_bench: error: --merge-url {merge.url} refuses the "
                             f"benchmark's per-request settings {merge.xargs}: {refused}")
    return {"unmodified": base, "kv-merge": merge}


def merge_xargs(server: Server | RemoteServer, mode: str) -> dict:
    """Per-request settings of the merging server's requests in observe mode ``mode``
    (a running server also gets the preset's budget; one the benchmark starts has it)."""
    if mode == OFF:
        return {"kv_merge": "off"}
    budget = {"kv_merge_budget": server.budget} if server.budget else {}
    return budget | {"kv_merge_observe": mode}


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


# -------------------------------------------------------------------------- workload
@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    ttft: float = float("nan")
    tpot: float = float("nan")
    output_tokens: int = 0
    latency: float = float("nan")


@dataclass
class LevelResult:
    server: str
    concurrency: int
    results: list[RequestResult]
    wall: float
    samples: list[dict] = field(default_factory=list)  # /metrics over time
    merge_seconds: float = 0.0
    execute_seconds: float = 0.0
    preemptions: float = 0.0


async def run_level(server: Server | RemoteServer, prompts: list[tuple[list[int], int]], concurrency: int,
                    timeout: float, label: str | None = None) -> LevelResult:
    import httpx

    limit = asyncio.Semaphore(concurrency)
    samples: list[dict] = []
    done = asyncio.Event()
    started = time.monotonic()

    async def one(client: httpx.AsyncClient, prompt: list[int], max_tokens: int):
        async with limit:
            body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            if server.xargs:
                body["vllm_xargs"] = server.xargs
            t0 = time.monotonic()
            stamps: list[float] = []
            try:
                async with client.stream("POST", server.url + "/v1/completions",
                                         json=body, timeout=timeout) as response:
                    if response.status_code != 200:
                        body = (await response.aread()).decode(errors="replace")
                        return RequestResult(ok=False,
                                             error=f"HTTP {response.status_code}: {body[:300]}")
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if chunk.get("choices") and chunk["choices"][0].get("text"):
                            stamps.append(time.monotonic())
            except (httpx.HTTPError, asyncio.TimeoutError) as exc:
                return RequestResult(ok=False, error=f"{type(exc).__name__}: {exc}")
            if not stamps:
                return RequestResult(ok=False, error="no token streamed")
            tpot = ((stamps[-1] - stamps[0]) / (len(stamps) - 1)) if len(stamps) > 1 else 0.0
            return RequestResult(ok=True, ttft=stamps[0] - t0, tpot=tpot,
                                 output_tokens=len(stamps), latency=stamps[-1] - t0)

    async def watch(client: httpx.AsyncClient):
        while not done.is_set():
            try:
                m = parse_metrics((await client.get(server.url + "/metrics")).text)
                m["t"] = time.monotonic() - started
                samples.append(m)
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)

    async with httpx.AsyncClient(headers=server.headers) as client:
        before = parse_metrics((await client.get(server.url + "/metrics")).text)
        watcher = asyncio.create_task(watch(client))
        results = await asyncio.gather(*(one(client, p, n) for p, n in prompts))
        wall = time.monotonic() - started
        done.set()
        await watcher
        after = parse_metrics((await client.get(server.url + "/metrics")).text)
    key_m, key_e = "vllm:kv_merge_step_seconds_sum", "vllm:kv_merge_model_execute_seconds_total"
    key_p = "vllm:num_preemptions_total"
    return LevelResult(
        server=label or server.name, concurrency=concurrency, results=list(results),
        wall=wall,
        samples=samples,
        merge_seconds=after.get(key_m, 0.0) - before.get(key_m, 0.0),
        execute_seconds=after.get(key_e, 0.0) - before.get(key_e, 0.0),
        preemptions=after.get(key_p, 0.0) - before.get(key_p, 0.0),
    )


def summarize(level: LevelResult) -> dict:
    ok = [r for r in level.results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    peak = max((s.get("vllm:num_requests_running", 0) for s in level.samples), default=0)
    usage = max((s.get("vllm:kv_cache_usage_perc", 0) for s in level.samples), default=0)
    return {
        "server": level.server, "concurrency": level.concurrency,
        "requests": len(level.results), "completed": len(ok),
        "peak_running": peak, "req_per_s": len(ok) / level.wall,
        "out_tok_per_s": out_tokens / level.wall,
        "ttft_p50": percentile([r.ttft for r in ok], 50),
        "ttft_p99": percentile([r.ttft for r in ok], 99),
        "tpot_p50": percentile([r.tpot for r in ok], 50),
        "tpot_p99": percentile([r.tpot for r in ok], 99),
        "peak_kv_usage": usage,
        "preemptions": level.preemptions,
        "merge_share": (level.merge_seconds / level.execute_seconds
                        if level.execute_seconds else float("nan")),
        "wall_s": level.wall,
    }


# ----------------------------------------------------------------------------- main
def build_prompts(tokenizer, args, level_index: int,
                  count: int) -> list[tuple[list[int], int]]:
    from kvslimmer_vllm.eval.text import documentation_tokens

    rng = random.Random(args.seed * 1000 + level_index)
    lo, hi = args.prompt_tokens
    olo, ohi = args.output_tokens
    return [
        (documentation_tokens(tokenizer, rng.randint(lo, hi), seed=rng.randrange(10**6)),
         rng.randint(olo, ohi))
        for _ in range(count)
    ]


async def decode_tpot(server: Server | RemoteServer, tokenizer, length: int, output: int,
                      seed: int) -> float:
    """Time per output token of one request alone: a `length`-token prompt of
    documentation text, `output` tokens (NaN when it fails)."""
    from kvslimmer_vllm.eval.text import documentation_tokens

    prompt = [(documentation_tokens(tokenizer, length, seed=seed), output)]
    result = (await run_level(server, prompt, 1, 900)).results[0]
    return result.tpot if result.ok else float("nan")


def decode_check(base: Server | RemoteServer, merge: Server | RemoteServer, tokenizer,
                 length: int, budget: int, output: int, modes: list[str]) -> list[dict]:
    """Decode alone, per observe mode: one request at logical length `length` on the
    merging server vs unmodified at lengths `budget` (what the merged cache holds) and
    `length` (what it replaces). unmodified at L / at B is the most that shrinking the
    cache to B slots can speed decoding up; kv-merge at L / unmodified at B what merging
    costs on top of the B slots it reads."""
    at_b = asyncio.run(decode_tpot(base, tokenizer, budget, output, seed=778))
    at_l = asyncio.run(decode_tpot(base, tokenizer, length, output, seed=777))
    checks = []
    for mode in modes:
        merge.xargs = merge_xargs(merge, mode)
        merged = asyncio.run(decode_tpot(merge, tokenizer, length, output, seed=777))
        checks.append({"variant": f"kv-merge/{mode}", "logical_length": length,
                       "budget": budget, "output_tokens": output, "tpot_merge_at_L": merged,
                       "tpot_base_at_B": at_b, "tpot_base_at_L": at_l,
                       "ratio": merged / at_b, "ceiling": at_l / at_b})
    return checks


def write_outputs(out: Path, rows: list[dict], levels: list[LevelResult], checks: list[dict],
                  args, servers: dict[str, str]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "serve_bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    cols = ["concurrency", "completed", "peak_running", "req_per_s", "out_tok_per_s",
            "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "peak_kv_usage", "preemptions",
            "merge_share"]
    lines = ["# Serving benchmark: unmodified vLLM vs --kv-merge kvslimmer", ""]
    variants = [f"kv-merge/{mode}" for mode in args.observe]
    for server in ("unmodified", *variants):
        lines += [f"## {server}", "", "| " + " | ".join(cols) + " |",
                  "|" + "---|" * len(cols)]
        for r in rows:
            if r["server"] == server:
                lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
        lines.append("")
    ratio_cols = ["peak_running", "req_per_s", "out_tok_per_s", "ttft_p50", "tpot_p50"]
    lines += ["## kv-merge / unmodified", "", "| kv-merge | concurrency | "
              + " | ".join(ratio_cols) + " |", "|---|---|" + "---|" * len(ratio_cols)]
    by = _by_level(rows)
    for variant in variants:
        for c in dict.fromkeys(args.concurrency):
            b, m = by[("unmodified", c)], by[(variant, c)]
            lines.append(f"| {variant} | {c} | " + " | ".join(
                _fmt(m[k] / b[k] if b[k] else float("nan")) for k in ratio_cols) + " |")
    decode = ["", "## Decode alone at logical length L with budget B",
              "", "One request at a time. unmodified at L / at B: the most a cache of B "
              "slots can speed up decoding at this model size (weights are read at every "
              "length); kv-merge at L / unmodified at B: what merging adds to reading B "
              "slots.", "",
              "| kv-merge | L | B | output tokens | TPOT kv-merge at L (s) | "
              "TPOT unmodified at B (s) | TPOT unmodified at L (s) | "
              "kv-merge at L / unmodified at B | unmodified at L / at B |",
              "|---|---|---|---|---|---|---|---|---|"]
    if checks:
        lines += decode
    lines += [f"| {c['variant']} | {c['logical_length']} | {c['budget']} | "
              f"{c['output_tokens']} | {_fmt(c['tpot_merge_at_L'])} | "
              f"{_fmt(c['tpot_base_at_B'])} | {_fmt(c['tpot_base_at_L'])} | "
              f"{_fmt(c['ratio'])} | {_fmt(c['ceiling'])} |" for c in checks]
    lines += ["", "## Setup", "",
              f"- command: `{' '.join(sys.argv)}`",
              f"- prompts {args.prompt_tokens[0]}-{args.prompt_tokens[1]} tokens of CPython "
              f"documentation text, {args.output_tokens[0]}-{args.output_tokens[1]} output "
              f"tokens (ignore_eos), max({args.requests_per_level}, concurrency) streaming "
              "requests per level",
              f"- KV cache: {args.blocks} blocks of {BLOCK} slots for both servers",
              f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, "
              f"Python {platform.python_version()}"]
    for name, described in servers.items():
        lines.append(f"- {name}: {described}")
    text = "\n".join(lines) + "\n"
    (out / "serve_bench.md").write_text(text)
    _plots(out, rows, levels, args)
    return text


def _by_level(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """Each (server, concurrency)'s row; a concurrency run more than once (the ttft preset)
    gets the median of its runs in every numeric column."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["server"], r["concurrency"]), []).append(r)
    return {key: {k: (statistics.median(r[k] for r in group)
                      if isinstance(group[0][k], (int, float)) else group[0][k])
                  for k in group[0]}
            for key, group in groups.items()}


def _fmt(x) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.3g}"
    return str(x)


def _plots(out: Path, rows: list[dict], levels: list[LevelResult], args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plots")
        return
    servers = ("unmodified", *(f"kv-merge/{mode}" for mode in args.observe))
    if len(set(args.concurrency)) < len(args.concurrency):  # repeats (ttft): TTFT per run
        fig, ax = plt.subplots(figsize=(6, 4))
        for server in servers:
            ttfts = [r["ttft_p50"] for r in rows if r["server"] == server]
            ax.plot(range(1, len(ttfts) + 1), ttfts, marker="o", label=server)
        ax.set_xticks(range(1, len(args.concurrency) + 1))
        ax.set_xlabel("prompt (each sent to every arm in turn)")
        ax.set_ylabel("TTFT p50 (s)")
        ax.set_title(f"Time to first token, {args.prompt_tokens[1]}-token prompts")
        _save(plt, fig, ax, out / "ttft.png", legend_size=8)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for server in servers:
        pts = [(r["concurrency"], r["out_tok_per_s"]) for r in rows if r["server"] == server]
        ax.plot(*zip(*pts), marker="o", label=server)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Throughput vs concurrency")
    _save(plt, fig, ax, out / "throughput.png")

    top = max(args.concurrency)
    fig, ax = plt.subplots(figsize=(6, 4))
    for level in levels:
        if level.concurrency == top:
            ts = [s["t"] for s in level.samples]
            ax.plot(ts, [100 * s.get("vllm:kv_cache_usage_perc", 0) for s in level.samples],
                    label=f"{level.server}: KV blocks used %")
            if level.server != "unmodified":
                ax.plot(ts, [s.get("vllm:num_requests_running", 0) * 10
                             for s in level.samples], linestyle=":",
                        label=f"{level.server}: running requests x10")
        if level.concurrency == top and level.server == "unmodified":
            ax.plot([s["t"] for s in level.samples],
                    [s.get("vllm:num_requests_running", 0) * 10 for s in level.samples],
                    linestyle=":", label="unmodified: running requests x10")
    ax.set_xlabel("seconds")
    ax.set_title(f"KV usage over time ({top} clients)")
    _save(plt, fig, ax, out / "kv_usage.png", legend_size=7)


def _save(plt, fig, ax, path: Path, legend_size=None) -> None:
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--model", default=None, help="checkpoint (default: SmolLM2)")
    parser.add_argument("--out", type=Path, default=Path("results/serve_bench"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="per request, seconds")
    parser.add_argument("--vllm-flag", action="append", default=[],
                        help="extra flag for both servers (repeatable)")
    parser.add_argument("--observe", default=None,
                        help="observe modes the kv-merge server is driven in, one after "
                        "the other, comma-separated (progressive, prompt-end; prompt-end "
                        "holds a whole prompt until its compression step; off: requests "
                        "with kv_merge off); default: the preset's (both modes; the ttft "
                        "preset also off)")
    parser.add_argument("--budget", type=int, default=None,
                        help="KV budget in tokens of the kv-merge server (default: the "
                        "preset's share of the mean prompt length)")
    parser.add_argument("--base-url", default=None,
                        help="a running unmodified vLLM server to drive (with --merge-url)")
    parser.add_argument("--merge-url", default=None,
                        help="a running --kv-merge server to drive (with --base-url)")
    parser.add_argument("--api-key", default=None, help="API key of the running servers")
    args = parser.parse_args(argv)
    if (args.base_url is None) != (args.merge_url is None):
        parser.error("--base-url and --merge-url go together (or neither: start servers)")
    if args.budget is not None and args.budget < 1:
        parser.error(f"--budget must be a positive number of tokens; got {args.budget}")
    from kvslimmer_vllm.core.config import OBSERVE_MODES

    preset = dict(PRESETS[args.preset])
    preset_observe = preset.pop("observe", ("progressive", "prompt-end"))
    if args.observe is None:
        args.observe = ",".join(preset_observe)
    modes = [m.strip() for m in args.observe.split(",") if m.strip()]
    bad = [m for m in modes if m not in (*OBSERVE_MODES, OFF)]
    if bad or not modes or len(set(modes)) != len(modes):
        parser.error(f"--observe must list distinct modes of {', '.join(OBSERVE_MODES)} "
                     f"or {OFF}, comma-separated; got {args.observe!r}")
    args.observe = modes
    if args.base_url and args.vllm_flag:
        parser.error("--vllm-flag only applies to servers the benchmark starts")
    args.decode_check = preset.pop("decode_check", True)
    for key, value in preset.items():
        setattr(args, key, value)

    budget, max_len, blocks = cache_plan(args.prompt_tokens, args.output_tokens,
                                         args.budget_ratio, args.cache_requests, args.budget)
    # Running servers are checked first: a wrong URL fails before anything loads.
    remote = remote_servers(args, budget) if args.base_url else None

    from transformers import AutoTokenizer

    from kvslimmer_vllm.models import fetch_model

    model = args.model or str(fetch_model())
    tokenizer = AutoTokenizer.from_pretrained(model)
    args.blocks = remote["kv-merge"].blocks if remote else blocks
    common = ["--max-model-len", str(max_len), "--num-gpu-blocks-override", str(args.blocks),
              "--seed", "0", *args.vllm_flag]
    import torch

    if not torch.cuda.is_available():
        common += ["--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.3"]
    first_mode = next((m for m in args.observe if m != OFF), "prompt-end")
    merging = ["--kv-merge", "kvslimmer", "--kv-merge-budget", str(budget),
               "--kv-merge-observe", first_mode]
    if args.interval is not None:
        merging += ["--kv-merge-interval", str(args.interval)]
    launch = {"unmodified": common, "kv-merge": common + merging}
    args.out.mkdir(parents=True, exist_ok=True)

    levels: list[LevelResult] = []
    running: dict[str, Server | RemoteServer] = {}
    checks: list[dict] = []
    try:
        if remote:
            running.update(remote)
        else:
            for name in launch:
                log(f"starting {name} server")
                running[name] = Server(name, model, launch[name], args.out / f"{name}.log")
            for server in running.values():
                server.wait_ready()
        # Level by level, every server (and observe mode) in turn: a drift in the
        # machine's speed over the run falls on all of them alike.
        runs = [("unmodified", None), *(("kv-merge", mode) for mode in args.observe)]
        for i, c in enumerate(args.concurrency):
            prompts = build_prompts(tokenizer, args, i, max(args.requests_per_level, c))
            for name, mode in runs:
                server = running[name]
                label = name if mode is None else f"{name}/{mode}"
                server.xargs = None if mode is None else merge_xargs(server, mode)
                log(f"{label}: {len(prompts)} requests at concurrency {c}")
                level = asyncio.run(run_level(server, prompts, c, args.timeout, label))
                levels.append(level)
                s = summarize(level)
                log(f"{label} c={c}: {s['completed']}/{s['requests']} done, peak "
                    f"running {s['peak_running']:.0f}, {s['out_tok_per_s']:.1f} tok/s")
                failed = [r.error for r in level.results if not r.ok]
                if failed:
                    log(f"{label} c={c}: first failure: {failed[0]}")
        # Both servers stay up for the decode check, run in each observe mode.
        if args.decode_check:
            log("decode check")
            checks = decode_check(running["unmodified"], running["kv-merge"], tokenizer,
                                  args.prompt_tokens[1], budget, args.output_tokens[1],
                                  [m for m in args.observe if m != OFF])
    finally:
        for server in running.values():
            server.stop()
    rows = [summarize(level) for level in levels]
    described = {name: server.describe() for name, server in running.items()}
    described["kv-merge"] += "; its requests carry, per observe mode, " + ", ".join(
        f"`vllm_xargs {json.dumps(merge_xargs(running['kv-merge'], m))}`"
        for m in args.observe)
    text = write_outputs(args.out, rows, levels, checks, args, described)
    print(text)
    incomplete = sum(r["requests"] - r["completed"] for r in rows)
    if incomplete:
        log(f"{incomplete} requests did not complete")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
