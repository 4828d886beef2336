"""The attention backend used while merging: paged attention with ``log(count)`` per slot.

It owns its KV layout (slot-major, key and value of a head side by side), writes each
new token's KV at its physical slot, resets that slot's side state, attends with the
count bias and accumulates each slot's observation mass for the next merge round, through
:func:`kvslimmer_vllm.kernels.paged_attention` (C++ on CPU, Triton on CUDA, the
``core`` reference otherwise). It serves both the CPU and the CUDA V1 model runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_layout import KVCacheLayout

from kvslimmer_vllm import kernels
from kvslimmer_vllm.core.paged import slot_ids
from kvslimmer_vllm.engine.slots import PROFILE_ATTR, SLOT_BINDING, TRACE_ATTR


def slot_major(kv_cache: torch.Tensor) -> torch.Tensor:
    """View a layer's cache ``[B, H, N, C]`` (stored B, N, H, C) as ``[B * N, H, C]``."""
    view = kv_cache.transpose(1, 2)
    if not view.is_contiguous():
        raise RuntimeError(
            "kv-merge expects the KV cache stored block, slot, head (layout LBNHC); "
            f"got strides {tuple(kv_cache.stride())} for shape {tuple(kv_cache.shape)}"
        )
    return view.reshape(-1, view.shape[2], view.shape[3])


@dataclass
class KVMergeAttentionMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [T] physical slot of each new token
    positions: torch.Tensor  # [T] logical (RoPE) position of each new token
    block_table: torch.Tensor  # [R, max_blocks]
    seq_lens: torch.Tensor  # [R] physical slots, this step's tokens included
    query_start_loc: torch.Tensor  # [R + 1]
    block_size: int


class KVMergeMetadataBuilder(AttentionMetadataBuilder[KVMergeAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> KVMergeAttentionMetadata:
        common = common_attn_metadata
        num_reqs, num_tokens = common.num_reqs, common.num_actual_tokens
        return KVMergeAttentionMetadata(
            num_actual_tokens=num_tokens,
            slot_mapping=common.slot_mapping[:num_tokens],
            positions=common.positions[:num_tokens],
            block_table=common.block_table_tensor[:num_reqs],
            seq_lens=common.seq_lens[:num_reqs],
            query_start_loc=common.query_start_loc[: num_reqs + 1],
            block_size=self.block_size,
        )


class KVMergeAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        **extra,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logit soft-capping": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            "KV sharing across layers": kv_sharing_target_layer_name is not None,
            f"attention type {attn_type}": attn_type != AttentionType.DECODER,
        }
        found = [name for name, present in unsupported.items() if present]
        if found:
            raise NotImplementedError(
                f"--kv-merge does not support models with {', '.join(found)}"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = None

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KVMergeAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("kv-merge attention has no fused output quantization")
        if attn_metadata is None:  # profiling run
            return output
        profile = getattr(layer, PROFILE_ATTR, None)
        started = profile.now() if profile is not None else 0.0
        self._forward(layer, query, key, value, kv_cache, attn_metadata, output)
        if profile is not None:
            profile.add("attention", profile.now() - started)
        return output

    def _forward(self, layer, query, key, value, kv_cache, attn_metadata, output) -> None:
        meta = attn_metadata
        num_tokens = meta.num_actual_tokens
        flat = slot_major(kv_cache)
        # (SlotState, layer index), bound by the model runner once the cache exists.
        state, layer_index = getattr(layer, SLOT_BINDING, (None, -1))

        # New tokens into their slots, their slots' state reset: one pass, padding skipped.
        new = (flat, key[:num_tokens], value[:num_tokens], meta.slot_mapping, meta.positions)
        if state is not None:
            state.write_tokens(layer_index, *new)
        else:
            kernels.write_tokens(*new)

        counts = state.counts[layer_index] if state is not None else None
        observing = state is not None and state.observes_any
        mass = state.mass[layer_index] if observing else None
        observed = state.observed if observing else None
        if observed is not None and observed.shape != meta.seq_lens.shape:
            observed = None  # a batch the plan does not describe: observe every request
        out = kernels.paged_attention(
            query[:num_tokens], flat, counts, meta.block_table, meta.seq_lens,
            meta.query_start_loc, self.scale, meta.block_size, mass, observed,
        )
        output[:num_tokens].view(num_tokens, self.num_heads, self.head_size).copy_(out)
        if (trace := getattr(layer, TRACE_ATTR, None)) is not None:
            self._trace(trace, query[:num_tokens], out, flat, counts, meta, mass is not None,
                        observed)

    @staticmethod
    def _trace(trace: list, query, out, flat, counts, meta, with_mass, observed) -> None:
        """Record each request's call (diagnostics; see the worker's kv_merge_set_trace),
        with whether its rows added to the mass."""
        starts, lengths = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
        block_size = meta.block_size
        for r, length in enumerate(lengths):
            q0, q1 = starts[r], starts[r + 1]
            if q1 <= q0 or length <= 0:
                continue
            blocks = meta.block_table[r, : -(-length // block_size)].tolist()
            slots = slot_ids(blocks, length, block_size, flat.device)
            trace.append({
                "kind": "attention", "slots": slots, "query": query[q0:q1].clone(),
                "output": out[q0:q1].clone(), "kv": flat.index_select(0, slots),
                "counts": None if counts is None else counts.index_select(0, slots),
                "visible": torch.arange(length - (q1 - q0) + 1, length + 1),
                "observed": with_mass and (observed is None or bool(observed[r])),
            })


class KVMergeAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16, torch.bfloat16, torch.float32,
    ]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # vLLM maps the name back to the registry member this class is registered as.
        from vllm.platforms import current_platform

        return "CPU_ATTN" if current_platform.is_cpu() else "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KVMergeAttentionImpl]:
        return KVMergeAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVMergeMetadataBuilder]:
        return KVMergeMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBNHC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER
