"""Where the KV-merge settings live inside vLLM's config, and the supported vLLM range.

Kept free of vLLM imports so every process can read the settings cheaply.
"""

from __future__ import annotations

from kvslimmer_vllm.core.config import KVMergeConfig

#: ``additional_config`` key holding the (resolved) KV-merge settings. ``additional_config``
#: is part of ``VllmConfig``, which vLLM pickles to every engine and worker process.
CONFIG_KEY = "kv_merge"
#: ``additional_config`` key holding the path of the shared metrics file.
METRICS_KEY = "kv_merge_metrics"
#: vLLM releases whose internals the adapter was written and tested against.
SUPPORTED_VLLM_SERIES = "0.32"


def supported_vllm_version(version: str) -> bool:
    parts = version.split("+")[0].split(".")
    return ".".join(parts[:2]) == SUPPORTED_VLLM_SERIES


def merge_config_from_vllm(vllm_config) -> KVMergeConfig:
    """The KV-merge settings carried by a ``VllmConfig`` (method 'none' if absent)."""
    data = (getattr(vllm_config, "additional_config", None) or {}).get(CONFIG_KEY)
    return KVMergeConfig.from_mapping(data) if data else KVMergeConfig()
