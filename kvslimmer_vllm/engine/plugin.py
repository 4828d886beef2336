"""The ``vllm.general_plugins`` entry point: ``--kv-merge*`` flags and start-up checks.

vLLM calls :func:`register` once in each of its processes. It wraps three
``EngineArgs`` methods:

* ``add_cli_args`` adds the ``--kv-merge*`` flags to ``vllm serve`` (and ``--help``);
* ``from_cli_args`` turns those flags into ``additional_config["kv_merge"]``, the one
  place the settings live (``vllm.LLM(additional_config={"kv_merge": {...}})`` offline);
* ``create_engine_config`` validates the settings against the whole engine
  configuration before any model is loaded, switches vLLM to this package's scheduler
  and worker, and fails closed on every combination merging does not support.

With ``--kv-merge none`` (the default) nothing of vLLM's behaviour changes.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from typing import Any

from kvslimmer_vllm.core.config import (
    METHODS,
    OBSERVE_MODES,
    KVMergeConfig,
    KVMergeConfigError,
    option_name,
)
from kvslimmer_vllm.engine.settings import (
    CONFIG_KEY,
    SUPPORTED_VLLM_SERIES,
    supported_vllm_version,
)

logger = logging.getLogger("vllm.kvslimmer.plugin")

SCHEDULER_CLS = "kvslimmer_vllm.engine.scheduler.KVMergeScheduler"
CPU_WORKER_CLS = "kvslimmer_vllm.engine.worker.KVMergeCPUWorker"
GPU_WORKER_CLS = "kvslimmer_vllm.engine.worker.KVMergeGPUWorker"
_PATCHED = "_kvslimmer_patched"

#: (dest, flag, config field, help)
_INT_FLAGS = (
    ("kv_merge_budget", "--kv-merge-budget", "budget",
     "KV slots a request keeps after a merge round (default: min(2080, "
     "max_model_len // 4))."),
    ("kv_merge_sink", "--kv-merge-sink", "sink",
     "Leading slots of each request that are never merged (default: 32)."),
    ("kv_merge_recent", "--kv-merge-recent", "recent",
     "Newest slots that are never merged (default: the prefill chunk)."),
    ("kv_merge_interval", "--kv-merge-interval", "interval",
     "A round runs once a request holds more than budget + interval slots "
     "(default: min(512, budget // 4))."),
    ("kv_merge_window", "--kv-merge-window", "window",
     "prompt-end: the last prompt tokens whose attention scores the slots; they are "
     "never merged (default: 32)."),
    ("kv_merge_pool", "--kv-merge-pool", "pool",
     "Max-pool slot scores over this many neighbouring slots, odd (default: 7 with "
     "prompt-end, 1 = off with progressive)."),
    ("kv_merge_prefill_budget", "--kv-merge-prefill-budget", "prefill_budget",
     "prompt-end: most KV slots a request holds while its prompt is prefilled "
     "(default: no cap; longer prompts run progressive rounds under the cap)."),
)


def register() -> None:
    """Entry point: install the hooks (idempotent, cheap, no vLLM behaviour change)."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, _PATCHED, False):
        return
    if not supported_vllm_version(vllm.__version__):
        logger.warning(
            "kvslimmer-vllm is written for vLLM %s.x, found %s: --kv-merge will refuse "
            "to start", SUPPORTED_VLLM_SERIES, vllm.__version__,
        )
    _wrap_add_cli_args(EngineArgs)
    _wrap_from_cli_args(EngineArgs)
    _wrap_create_engine_config(EngineArgs)
    from kvslimmer_vllm.engine import metrics

    metrics.include_in_multiprocess_scrapes()
    setattr(EngineArgs, _PATCHED, True)


# ---------------------------------------------------------------------------- flags
def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum} (got {text!r})"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum} (got {value})")
        return value

    return parse


_MINIMUM = {
    field: (KVMergeConfig.model_fields[field].metadata[0].ge)
    for _dest, _flag, field, _text in _INT_FLAGS
}


def add_kv_merge_arguments(parser) -> None:
    group = parser.add_argument_group(
        "KVMerge",
        "kvslimmer-vllm: merge adjacent KV-cache slots of long requests (KVSlimmer) and "
        "hand the freed blocks back to vLLM's block pool.",
    )
    group.add_argument(
        "--kv-merge", dest="kv_merge", choices=METHODS, default=None,
        help="KV compression method: kvslimmer (Hessian-weighted merging), average "
        "(count-weighted merging of the same pairs), evict (drop the least-attended "
        "slots), streaming (keep sink + recent slots), snapkv (drop the slots the end "
        "of the prompt attends least, pooled), snapmerge (keep what snapkv keeps, merge "
        "what it would drop); 'none' (default) runs unmodified vLLM.",
    )
    group.add_argument(
        "--kv-merge-observe", dest="kv_merge_observe", choices=OBSERVE_MODES,
        default=None,
        help="When rounds observe queries: progressive (while the prompt is prefilled, "
        "memory bounded throughout) or prompt-end (one step after the prompt, scored by "
        "its last --kv-merge-window tokens, i.e. the question). Default: prompt-end for "
        "kvslimmer, average, snapkv and snapmerge; progressive for evict and streaming.",
    )
    for dest, flag, field, text in _INT_FLAGS:
        group.add_argument(
            flag, dest=dest, type=_int_at_least(_MINIMUM[field]), default=None,
            metavar="TOKENS", help=text,
        )
    group.add_argument(
        "--kv-merge-config", dest="kv_merge_config", default=None,
        metavar="PATH_OR_JSON",
        help="YAML/JSON file or inline JSON with any KV-merge setting (method, budget, "
        "sink, recent, interval, prefill_chunk, observe, window, pool, prefill_budget, "
        "merge_fraction, gamma, eps, rope_aware); flags win.",
    )


def _wrap_add_cli_args(engine_args_cls) -> None:
    original = engine_args_cls.add_cli_args

    @functools.wraps(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        if not any(a.dest == "kv_merge" for a in parser._actions):
            add_kv_merge_arguments(parser)
        return parser

    engine_args_cls.add_cli_args = staticmethod(add_cli_args)


def _wrap_from_cli_args(engine_args_cls) -> None:
    original = engine_args_cls.from_cli_args.__func__

    @functools.wraps(original)
    def from_cli_args(cls, args: argparse.Namespace):
        engine_args = original(cls, args)
        overrides = {"method": getattr(args, "kv_merge", None),
                     "observe": getattr(args, "kv_merge_observe", None)}
        for dest, _flag, field, _text in _INT_FLAGS:
            overrides[field] = getattr(args, dest, None)
        source = getattr(args, "kv_merge_config", None)
        if source is None and all(v is None for v in overrides.values()):
            return engine_args
        try:
            config = KVMergeConfig.from_source(source, overrides)
        except KVMergeConfigError as exc:
            _cli_error(str(exc))
        extra = dict(engine_args.additional_config or {})
        extra[CONFIG_KEY] = config.model_dump()
        engine_args.additional_config = extra
        engine_args._kv_merge_from_cli = True
        return engine_args

    engine_args_cls.from_cli_args = classmethod(from_cli_args)


def _cli_error(message: str):
    print(f"kvslimmer-vllm: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# ----------------------------------------------------------------- start-up checks
#: How the process that starts the engines hands the merge settings to the API server
#: processes that `vllm serve --api-server-count N` spawns.
API_SERVER_CONFIG_ENV = "KVSLIMMER_API_SERVER_CONFIG"


def _wrap_create_engine_config(engine_args_cls) -> None:
    original = engine_args_cls.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        raw = (self.additional_config or {}).get(CONFIG_KEY)
        # `vllm serve --api-server-count N` (N > 1) marks the process that starts the
        # engines rank -1 and its API server processes 0..N-1; one API server keeps the
        # defaults (count 1).
        several = getattr(self, "_api_process_count", 1) > 1
        api_rank = getattr(self, "_api_process_rank", 0)
        api_server_child = several and api_rank >= 0
        parent_of_api_servers = several and api_rank < 0
        if not raw and api_server_child and os.environ.get(API_SERVER_CONFIG_ENV):
            # An API server process of `vllm serve --api-server-count N`: it built its
            # engine arguments before vLLM loaded this plugin in it, so without the merge
            # flags; the process that started the engines handed the settings over.
            raw = json.loads(os.environ[API_SERVER_CONFIG_ENV])
            self.additional_config = {**(self.additional_config or {}), CONFIG_KEY: raw}
        if not raw:
            _merging_off_in_this_process()
            return original(self, *args, **kwargs)
        try:
            config = KVMergeConfig.from_mapping(raw)
            if not config.enabled:
                _merging_off_in_this_process()
                return original(self, *args, **kwargs)
            _prepare_engine_args(self)
            vllm_config = original(self, *args, **kwargs)
            resolved = _check_engine_config(vllm_config, config)
        except KVMergeConfigError as exc:
            if getattr(self, "_kv_merge_from_cli", False):
                _cli_error(str(exc))
            raise
        vllm_config.additional_config[CONFIG_KEY] = resolved.model_dump()
        if parent_of_api_servers:
            os.environ[API_SERVER_CONFIG_ENV] = json.dumps(raw)  # inherited by API servers
        _validate_requests_against(resolved)
        from kvslimmer_vllm.engine import metrics

        # With several API servers the config is built in the process that starts the
        # engines, then again in each API server process, which must read the metrics
        # file the engines write.
        metrics.setup_frontend_metrics(
            vllm_config.additional_config, vllm_config.model_config.served_model_name,
            vllm_config.parallel_config.data_parallel_size,
            inherit=api_server_child, hand_over=parent_of_api_servers,
        )
        logger.info("kv-merge enabled: %s", resolved.model_dump())
        return vllm_config

    engine_args_cls.create_engine_config = create_engine_config


def _merging_off_in_this_process() -> None:
    """An engine without merging is being configured: undo what an earlier merging engine
    of this process changed (its attention backend, its per-request validation), so this
    one is unmodified vLLM even in the same process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
    or in processes forked from it."""
    global _request_config
    _request_config = None
    from kvslimmer_vllm.engine.worker import release_attention_backend

    release_attention_backend()


def _reject(option: str, why: str):
    raise KVMergeConfigError(f"{option} {why}; it cannot be combined with --kv-merge")


def _prepare_engine_args(ea) -> None:
    """Checks on the engine arguments, and the settings merging needs, before vLLM
    builds its configuration."""
    import vllm
    from vllm.platforms import current_platform

    if not supported_vllm_version(vllm.__version__):
        raise KVMergeConfigError(
            f"--kv-merge supports vLLM {SUPPORTED_VLLM_SERIES}.x; this is vLLM "
            f"{vllm.__version__}"
        )
    if ea.enable_prefix_caching:
        _reject("--enable-prefix-caching", "hashes blocks by token ids, which merged "
                "blocks no longer match")
    if ea.enable_prefix_caching is None:
        logger.info("kv-merge: prefix caching turned off (merged blocks cannot be shared)")
    ea.enable_prefix_caching = False
    if ea.speculative_config:
        _reject("--speculative-config", "is not supported")
    if ea.kv_transfer_config is not None:
        _reject("--kv-transfer-config", "(KV connectors) is not supported")
    if ea.ec_transfer_config is not None:
        _reject("--ec-transfer-config", "is not supported")
    if ea.kv_offloading_size:
        _reject("--kv-offloading-size", "(KV offloading) is not supported")
    if ea.decode_context_parallel_size != 1 or ea.prefill_context_parallel_size != 1:
        _reject("--decode/prefill-context-parallel-size", "must be 1")
    if ea.kv_cache_dtype not in ("auto", None):
        _reject("--kv-cache-dtype", f"'{ea.kv_cache_dtype}' is not supported (use auto)")
    if ea.kv_sharing_fast_prefill:
        _reject("--kv-sharing-fast-prefill", "is not supported")
    if ea.enable_chunked_prefill is False:
        _reject("--no-enable-chunked-prefill", "is not supported (merging caps chunks)")
    if ea.async_scheduling:
        _reject("--async-scheduling", "is not supported (rounds need the previous "
                "step's KV written)")
    ea.async_scheduling = False
    if ea.scheduler_cls not in (None, SCHEDULER_CLS):
        _reject("--scheduler-cls", f"'{ea.scheduler_cls}' is set")
    worker = CPU_WORKER_CLS if current_platform.is_cpu() else GPU_WORKER_CLS
    if ea.worker_cls not in ("auto", worker):
        _reject("--worker-cls", f"'{ea.worker_cls}' is set")
    if current_platform.is_cpu():
        from kvslimmer_vllm import kernels

        try:
            kernels.check_cpu_isa_setting()
        except ValueError as exc:
            raise KVMergeConfigError(str(exc)) from None
    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        raise KVMergeConfigError(
            f"--kv-merge supports CPU and CUDA platforms, not {current_platform.device_name}"
        )
    if current_platform.is_cuda():
        if not ea.enforce_eager:
            # Full CUDA graphs would skip the attention backend's Python side effects.
            logger.info("kv-merge: CUDA graphs turned off (--enforce-eager)")
        ea.enforce_eager = True
        # The adapter hooks the V1 model runner.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        if ea.attention_backend not in (None, AttentionBackendEnum.CUSTOM):
            _reject("--attention-backend", f"'{ea.attention_backend}' is set")
        # The KV-merge worker registers its backend under CUSTOM.
        ea.attention_backend = AttentionBackendEnum.CUSTOM
    ea.scheduler_cls = SCHEDULER_CLS
    ea.worker_cls = worker


def _check_engine_config(vllm_config, config: KVMergeConfig) -> KVMergeConfig:
    """Checks that need the model's facts; returns the resolved settings."""
    model = vllm_config.model_config
    checks: list[tuple[bool, str, str]] = [
        (model.is_encoder_decoder, "model", "is an encoder-decoder model"),
        (model.use_mla, "model", "uses multi-head latent attention (MLA)"),
        (model.is_hybrid or model.has_inner_state, "model",
         "is a hybrid/recurrent model"),
        (model.is_attention_free, "model", "has no attention"),
        (model.uses_mrope, "model", "uses multimodal RoPE (M-RoPE)"),
        (model.get_sliding_window() is not None, "model",
         "uses sliding-window attention"),
        (model.runner_type != "generate", "--runner", "must be 'generate'"),
    ]
    for failed, option, why in checks:
        if failed:
            _reject(f"{option} {model.model}" if option == "model" else option, why)
    if vllm_config.scheduler_config.async_scheduling:
        _reject("--async-scheduling", "is not supported")
    resolved = config.resolve(model.max_model_len)
    block_size = vllm_config.cache_config.block_size
    num_blocks = vllm_config.cache_config.num_gpu_blocks_override
    if num_blocks is not None and num_blocks * block_size < resolved.max_physical_slots:
        raise KVMergeConfigError(
            f"the KV cache ({num_blocks} blocks of {block_size}) cannot hold one merging "
            f"request ({resolved.max_physical_slots} slots); lower "
            f"{option_name('budget')} or enlarge the cache"
        )
    return resolved


def _validate_requests_against(config: KVMergeConfig) -> None:
    """Refuse invalid per-request settings (``vllm_xargs``) in the API server with a
    client error (HTTP 400), before the request reaches the engine."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from kvslimmer_vllm.engine.requests import RequestSettingsError, request_settings

    global _request_config
    _request_config = config
    if getattr(SamplingParams.verify, _PATCHED, False):
        return
    original = SamplingParams.verify

    @functools.wraps(original)
    def verify(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if _request_config is None:  # merging off in this process
            return
        try:
            request_settings(self.extra_args, _request_config)
        except RequestSettingsError as exc:
            raise VLLMValidationError(str(exc), parameter=exc.field, value=exc.value) from None

    setattr(verify, _PATCHED, True)
    SamplingParams.verify = verify
    _name_out_of_range_integers(SamplingParams)


#: What vLLM's transport carries (``SamplingParams._verify_extra_args``: MessagePack's
#: signed/unsigned 64-bit integers).
_INT_RANGE = (-(2**63), 2**64)


def _out_of_range_int(value, depth: int = 0):
    """The first integer in ``value`` (nested lists/dicts too) that vLLM cannot carry."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None if _INT_RANGE[0] <= value < _INT_RANGE[1] else value
    if depth < 32 and isinstance(value, (list, tuple, dict)):
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        for item in items:
            found = _out_of_range_int(item, depth + 1)
            if found is not None:
                return found
    return None


def _name_out_of_range_integers(sampling_params_cls) -> None:
    """vLLM refuses an integer beyond 64 bits anywhere in ``extra_args`` when the
    ``SamplingParams`` is built (before ``verify``), with a message that names no field.
    Under a ``kv_merge*`` key, the 400 names ``vllm_xargs.<key>`` and what it allows."""
    from vllm.exceptions import VLLMValidationError

    from kvslimmer_vllm.engine.requests import KEYS, RequestSettingsError, request_settings

    original = sampling_params_cls._verify_extra_args
    if getattr(original, _PATCHED, False):
        return

    @functools.wraps(original)
    def _verify_extra_args(self) -> None:
        extra = self.extra_args
        if isinstance(extra, dict):
            for key in KEYS:
                bad = _out_of_range_int(extra.get(key))
                if bad is None:
                    continue
                field, message = f"vllm_xargs.{key}", None
                if _request_config is not None:
                    try:
                        request_settings(extra, _request_config)
                    except RequestSettingsError as exc:
                        field, message = exc.field, str(exc)
                if message is None:
                    message = (f"{field} got the integer {bad}, outside what a request can "
                               f"carry (-2**63 to 2**64 - 1)")
                raise VLLMValidationError(message, parameter=field, value=bad)
        original(self)

    setattr(_verify_extra_args, _PATCHED, True)
    sampling_params_cls._verify_extra_args = _verify_extra_args


_request_config: KVMergeConfig | None = None


def engine_kwargs(**settings: Any) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments that turn merging on, e.g.
    ``LLM(model, **engine_kwargs(method="kvslimmer", budget=256))``."""
    config = KVMergeConfig.from_mapping({"method": "kvslimmer", **settings})
    return {"additional_config": {CONFIG_KEY: config.model_dump()}}
