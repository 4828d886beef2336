"""Where evaluation requests run: an offline ``vllm.LLM`` or a running OpenAI-API server.

Both take the same per-request settings (``vllm_xargs``: ``kv_merge``,
``kv_merge_method``, ``kv_merge_budget``), so every method and budget runs in one engine,
on the same cases, side by side.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ChatRequest:
    """Chat messages ending with the assistant's answer prefix, which the model continues."""

    messages: list[dict]
    xargs: dict
    max_tokens: int


@dataclass(frozen=True)
class NLLRequest:
    prompt_ids: list[int]
    num_target: int
    xargs: dict


class EvalBackendError(RuntimeError):
    """The engine or server refused or failed a request."""


class Backend(Protocol):
    def chat(self, requests: list[ChatRequest], desc: str) -> list[str]: ...
    def nll(self, requests: list[NLLRequest], desc: str) -> list[float]: ...
    def close(self) -> None: ...


def _target_nll(prompt_logprobs, prompt_ids: list[int], num_target: int) -> float:
    """Mean negative log-likelihood of the last ``num_target`` prompt tokens."""
    total = 0.0
    for pos in range(len(prompt_ids) - num_target, len(prompt_ids)):
        entry = prompt_logprobs[pos]
        token = prompt_ids[pos]
        if entry is None:
            raise EvalBackendError(f"no prompt logprob at position {pos}")
        lp = entry.get(token, entry.get(str(token)))
        if lp is None:
            raise EvalBackendError(f"prompt logprobs miss token {token} at position {pos}")
        total -= lp if isinstance(lp, (int, float)) else (
            lp["logprob"] if isinstance(lp, dict) else lp.logprob
        )
    return total / num_target


class OfflineBackend:
    """A ``vllm.LLM`` with merging on (method ``kvslimmer``, budget ``engine_budget``);
    each request picks its own method and budget, or opts out for full KV."""

    def __init__(self, model: str, *, engine_budget: int, interval: int, sink: int,
                 max_model_len: int, memory_fraction: float | None = None) -> None:
        import torch
        from vllm import LLM

        from kvslimmer_vllm.engine.plugin import engine_kwargs

        cpu = not torch.cuda.is_available()
        if cpu:
            # vLLM's CPU worker leaves one core to the front-end process by default; an
            # offline sweep's front end only waits, so give the engine every core (1.8x
            # the prefill rate on two cores). An explicit setting is kept.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            # The engine core in this process: no second interpreter to start (15-20 s).
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = LLM(
            model=model,
            dtype="float32" if cpu else "auto",
            enforce_eager=cpu,
            max_model_len=max_model_len,
            gpu_memory_utilization=memory_fraction or (0.3 if cpu else 0.85),
            seed=0,
            **engine_kwargs(budget=engine_budget, interval=interval, sink=sink),
        )

    def chat(self, requests: list[ChatRequest], desc: str) -> list[str]:
        from vllm import SamplingParams

        params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens,
                                 extra_args=dict(r.xargs)) for r in requests]
        outputs = self.llm.chat([r.messages for r in requests], params, use_tqdm=True,
                                add_generation_prompt=False, continue_final_message=True)
        return [o.outputs[0].text for o in outputs]

    def nll(self, requests: list[NLLRequest], desc: str) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0,
                                 extra_args=dict(r.xargs)) for r in requests]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests], params,
            use_tqdm=True,
        )
        return [
            _target_nll(o.prompt_logprobs, r.prompt_ids, r.num_target)
            for o, r in zip(outputs, requests)
        ]

    def close(self) -> None:
        import gc

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()


class ServerBackend:
    """A running ``vllm serve ... --kv-merge METHOD`` server (OpenAI API over HTTP)."""

    def __init__(self, url: str, *, api_key: str | None = None, concurrency: int = 16,
                 timeout: float = 600.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.concurrency = concurrency
        try:
            models = self._post_or_get("GET", "/v1/models")
        except EvalBackendError as exc:
            raise EvalBackendError(f"--server {url}: {exc}") from None
        self.model = models["data"][0]["id"]

    def _post_or_get(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        try:
            response = self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise EvalBackendError(f"{method} {self.url}{path} failed: {exc}") from None
        if response.status_code != 200:
            try:
                message = response.json().get("error", {}).get("message", response.text)
            except (json.JSONDecodeError, AttributeError):
                message = response.text
            raise EvalBackendError(
                f"{method} {self.url}{path}: HTTP {response.status_code}: {message}"
            )
        return response.json()

    def _map(self, fn, items: list, desc: str) -> list:
        from tqdm import tqdm

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(tqdm(pool.map(fn, items), total=len(items), desc=desc))

    def chat(self, requests: list[ChatRequest], desc: str) -> list[str]:
        def one(r: ChatRequest) -> str:
            body = dict(model=self.model, messages=r.messages, max_tokens=r.max_tokens,
                        temperature=0.0, vllm_xargs=r.xargs, add_generation_prompt=False,
                        continue_final_message=True)
            return self._post_or_get("POST", "/v1/chat/completions", body)[
                "choices"][0]["message"]["content"] or ""

        return self._map(one, requests, desc)

    def nll(self, requests: list[NLLRequest], desc: str) -> list[float]:
        def one(r: NLLRequest) -> float:
            body = dict(model=self.model, prompt=r.prompt_ids, max_tokens=1, temperature=0.0,
                        prompt_logprobs=0, vllm_xargs=r.xargs)
            choice = self._post_or_get("POST", "/v1/completions", body)["choices"][0]
            logprobs = choice.get("prompt_logprobs")
            if logprobs is None:
                raise EvalBackendError("the server returned no prompt_logprobs")
            return _target_nll(logprobs, r.prompt_ids, r.num_target)

        return self._map(one, requests, desc)

    def close(self) -> None:
        self.client.close()
