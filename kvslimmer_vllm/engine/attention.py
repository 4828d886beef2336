"""The attention backend used while merging: paged attention with ``log(count)`` per slot.

It owns its KV layout (slot-major, key and value of a head side by side), writes each
new token's KV at its physical slot, resets that slot's side state, attends with the
count bias through :func:`kvslimmer_vllm.core.merged_attention`, and accumulates each
slot's observation mass for the next merge round. This is the PyTorch reference path;
it serves both the CPU and the CUDA V1 model runner.
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

from kvslimmer_vllm.core.attention import merged_attention
from kvslimmer_vllm.engine.slots import PROFILE_ATTR, SLOT_BINDING, TRACE_ATTR, slot_ids


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
class RequestSlots:
    """One request of the batch: its query rows and the physical slots it attends to."""

    query_start: int
    query_end: int
    slots: torch.Tensor  # [L] flat slot ids, in order
    visible: torch.Tensor  # [T] slots each query row sees (causal, physical order)


@dataclass
class KVMergeAttentionMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [T] physical slot of each new token
    positions: torch.Tensor  # [T] logical (RoPE) position of each new token
    requests: list[RequestSlots]


class KVMergeMetadataBuilder(AttentionMetadataBuilder[KVMergeAttentionMetadata]):
    """Builds per-request slot lists once per step; every layer reuses them."""

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
        starts = common.query_start_loc_cpu.tolist()
        seq_lens = common.seq_lens.cpu().tolist()
        block_table = common.block_table_tensor
        device = block_table.device
        requests = []
        for r in range(common.num_reqs):
            q0, q1, length = starts[r], starts[r + 1], seq_lens[r]
            if q1 <= q0 or length <= 0:
                continue
            num_blocks = -(-length // self.block_size)
            slots = slot_ids(block_table[r, :num_blocks].tolist(), length,
                             self.block_size, device)
            num_queries = q1 - q0
            visible = torch.arange(
                length - num_queries + 1, length + 1, dtype=torch.int64, device=device
            )
            requests.append(RequestSlots(q0, q1, slots, visible))
        num_tokens = common.num_actual_tokens
        return KVMergeAttentionMetadata(
            num_actual_tokens=num_tokens,
            slot_mapping=common.slot_mapping[:num_tokens],
            positions=common.positions[:num_tokens],
            requests=requests,
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
        num_tokens = attn_metadata.num_actual_tokens
        flat = slot_major(kv_cache)
        head_dim = self.head_size
        # (SlotState, layer index), bound by the model runner once the cache exists.
        state, layer_index = getattr(layer, SLOT_BINDING, (None, -1))

        new_slots = attn_metadata.slot_mapping
        written = new_slots >= 0
        if not bool(written.all()):
            new_slots = new_slots[written]
        kv_new = torch.cat((key[:num_tokens], value[:num_tokens]), dim=-1)[written]
        flat.index_copy_(0, new_slots, kv_new.to(flat.dtype))
        if state is not None:
            state.on_write(layer_index, new_slots, attn_metadata.positions[written])

        out_rows = output[:num_tokens].view(num_tokens, self.num_heads, head_dim)
        trace = getattr(layer, TRACE_ATTR, None)
        for req in attn_metadata.requests:
            kv = flat.index_select(0, req.slots)
            counts = (
                state.counts[layer_index].index_select(0, req.slots)
                if state is not None else None
            )
            out, mass = merged_attention(
                query[req.query_start:req.query_end],
                kv[..., :head_dim],
                kv[..., head_dim:],
                counts,
                scale=self.scale,
                visible=req.visible,
                return_mass=True,
            )
            out_rows[req.query_start:req.query_end] = out
            if trace is not None:
                trace.append({
                    "kind": "attention", "slots": req.slots.clone(),
                    "query": query[req.query_start:req.query_end].clone(),
                    "output": out.clone(), "kv": kv, "counts": counts,
                    "visible": req.visible.clone(),
                })
            if state is not None:
                state.mass[layer_index].index_add_(0, req.slots, mass)


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
