"""Per-request KV-merge control through the OpenAI API's ``vllm_xargs`` (vLLM's
``SamplingParams.extra_args``):

    extra_body={"vllm_xargs": {"kv_merge": "off"}}          # this request never merges
    extra_body={"vllm_xargs": {"kv_merge_budget": 512}}     # keep 512 slots, not the server's
    extra_body={"vllm_xargs": {"kv_merge_method": "evict"}} # another method than the server's
    extra_body={"vllm_xargs": {"kv_merge_observe": "prompt-end"}}  # score by the question
    extra_body={"vllm_xargs": {"kv_merge_continuation": 65}}  # see below

A request may lower its budget down to the smallest its observe mode allows (progressive:
the server's sink + recent + interval + prefill chunk; prompt-end: sink + window + 1),
but not raise it above the server's ``--kv-merge-budget`` (the server sizes admission by
it). Invalid values are refused (HTTP 400), never clamped.

``kv_merge_continuation: N`` (prompt-end only) treats the prompt's last ``N`` tokens as a
continuation given after the compression step: the step runs once the first
``prompt - N`` tokens are computed (its window is their last ``window`` tokens), and the
continuation is then prefilled against the compressed cache. Its ``prompt_logprobs``
thereby score the compressed cache (the evaluation's NLL of prompt-end methods; the
logprob of a token comes from the position before it, so scoring ``M`` tokens takes
``N = M + 1``). A continuation as long as the prompt leaves nothing to compress before it.
Nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvslimmer_vllm.core.config import METHODS, OBSERVE_MODES, KVMergeConfig

MODE_KEY = "kv_merge"
BUDGET_KEY = "kv_merge_budget"
METHOD_KEY = "kv_merge_method"
OBSERVE_KEY = "kv_merge_observe"
CONTINUATION_KEY = "kv_merge_continuation"
#: Every key this module reads; the API server names them in its errors.
KEYS = (MODE_KEY, BUDGET_KEY, METHOD_KEY, OBSERVE_KEY, CONTINUATION_KEY)
#: Largest ``kv_merge_continuation`` (a prompt is never longer).
MAX_CONTINUATION = 1 << 30
#: Methods a request may pick ('none' is spelled ``kv_merge: "off"``).
REQUEST_METHODS = tuple(m for m in METHODS if m != "none")
_MODES = {"on": True, "off": False, True: True, False: False}


class RequestSettingsError(ValueError):
    def __init__(self, field: str, message: str, value) -> None:
        super().__init__(message)
        self.field, self.value = field, value


@dataclass(frozen=True)
class RequestSettings:
    enabled: bool
    budget: int
    method: str
    observe: str = "progressive"
    #: Trailing prompt tokens computed after the prompt-end step (see the module doc).
    continuation: int = 0

    @property
    def prompt_end(self) -> bool:
        return self.enabled and self.observe == "prompt-end"


def request_settings(extra_args: dict | None, config: KVMergeConfig) -> RequestSettings:
    """The request's merge settings under the server's resolved ``config``."""
    extra = extra_args or {}
    mode = extra.get(MODE_KEY, "on")
    if isinstance(mode, str):
        mode = mode.lower()
    if not isinstance(mode, (str, bool)) or mode not in _MODES:
        raise RequestSettingsError(
            f"vllm_xargs.{MODE_KEY}",
            f"vllm_xargs.{MODE_KEY} must be 'on' or 'off'; got {mode!r}", mode,
        )
    method = extra.get(METHOD_KEY, config.method)
    if not isinstance(method, str) or method not in REQUEST_METHODS:
        raise RequestSettingsError(
            f"vllm_xargs.{METHOD_KEY}",
            f"vllm_xargs.{METHOD_KEY} must be one of {', '.join(REQUEST_METHODS)}; "
            f"got {method!r}", method,
        )
    observe = extra.get(OBSERVE_KEY, config.observe_of(method))
    if not isinstance(observe, str) or observe not in OBSERVE_MODES:
        raise RequestSettingsError(
            f"vllm_xargs.{OBSERVE_KEY}",
            f"vllm_xargs.{OBSERVE_KEY} must be one of {', '.join(OBSERVE_MODES)}; "
            f"got {observe!r}", observe,
        )
    budget = extra.get(BUDGET_KEY, config.budget)
    low, high = config.min_budget_of(observe), config.budget
    if isinstance(budget, bool) or not isinstance(budget, int) or not low <= budget <= high:
        floor = ("sink + window + 1" if observe == "prompt-end"
                 else "sink + recent + interval + prefill chunk")
        raise RequestSettingsError(
            f"vllm_xargs.{BUDGET_KEY}",
            f"vllm_xargs.{BUDGET_KEY} must be an integer from {low} ({floor}, with "
            f"{observe} observation) to {high} (this server's --kv-merge-budget); got "
            f"{budget!r}", budget,
        )
    continuation = extra.get(CONTINUATION_KEY, 0)
    if (isinstance(continuation, bool) or not isinstance(continuation, int)
            or not 0 <= continuation <= MAX_CONTINUATION):
        raise RequestSettingsError(
            f"vllm_xargs.{CONTINUATION_KEY}",
            f"vllm_xargs.{CONTINUATION_KEY} must be an integer from 0 to "
            f"{MAX_CONTINUATION} (prompt tokens computed after the prompt-end step); got "
            f"{continuation!r}", continuation,
        )
    if continuation and observe != "prompt-end":
        raise RequestSettingsError(
            f"vllm_xargs.{CONTINUATION_KEY}",
            f"vllm_xargs.{CONTINUATION_KEY} applies to prompt-end observation only; this "
            f"request observes {observe} (set vllm_xargs.{OBSERVE_KEY}: prompt-end)",
            continuation,
        )
    return RequestSettings(enabled=_MODES[mode], budget=budget, method=method,
                           observe=observe, continuation=continuation)
