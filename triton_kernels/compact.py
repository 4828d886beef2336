"""In-place row moves for the compaction a merge round performs on the paged cache.

After a merge round a request keeps fewer slots, and its surviving rows move towards the
front of its own blocks: ``rows[src[i]] -> rows[dst[i]]``, where every destination precedes
its source in the request's order. Those ranges overlap (the destination of one move is
usually the source of another), so the moves cannot simply run in parallel in place: the
program writing ``dst[i]`` could overwrite ``src[j]`` before the program of ``j`` has read it.

Safety scheme: two kernel launches through a scratch buffer.

1. ``gather``:  ``scratch[i] = rows[src[i]]`` for every ``i`` (reads ``rows`` only);
2. ``scatter``: ``rows[dst[i]] = scratch[i]`` for every ``i`` (writes ``rows`` only).

Launches on one stream run one after the other, so every source is read (launch 1 ends)
before any destination is written (launch 2 starts); no program of either launch ever reads
what another program of the same launch writes. This holds for any set of moves with
distinct destinations, whatever their order or overlap (it does not even need "dst precedes
src"). The price is one extra read and write of the moved rows and a scratch buffer of
``len(src) * row_width`` elements, which the caller may pass in to reuse.

Every tensor is handled as a 2-D row view ``[S, W]`` (a slot's row must be contiguous):
the KV cache ``[S, Hkv, 2 * D]``, counts ``[S]``, positions ``[S]`` int64, hess and mass
``[S, Hkv]``, or one layer of the engine's ``[L, S, ...]`` side state; or as ``[L, S, W]``
to move the same slots of all layers of a side-state tensor in one launch pair.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["compact", "compact_layers", "compact_rows", "is_interpreted", "row_view"]


@triton.jit
def _copy_rows_kernel(
    in_ptr, in_idx_ptr, stride_in, stride_in_layer,
    out_ptr, out_idx_ptr, stride_out, stride_out_layer,
    num_rows, width,
    GATHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """``out[l, o(i)] = in[l, n(i)]`` for ``i < num_rows`` and layer ``l = program_id(2)``:
    with ``GATHER`` ``n(i) = in_idx[i]`` and ``o(i) = i``; without it ``n(i) = i`` and
    ``o(i) = out_idx[i]``."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    layer = tl.program_id(2).to(tl.int64)
    r_ok = offs_r < num_rows
    mask = r_ok[:, None] & (offs_w < width)[None, :]
    if GATHER:
        src = tl.load(in_idx_ptr + offs_r, mask=r_ok, other=0).to(tl.int64)
        dst = offs_r.to(tl.int64)
    else:
        src = offs_r.to(tl.int64)
        dst = tl.load(out_idx_ptr + offs_r, mask=r_ok, other=0).to(tl.int64)
    vals = tl.load(
        in_ptr + layer * stride_in_layer + src[:, None] * stride_in + offs_w[None, :],
        mask=mask,
    )
    tl.store(
        out_ptr + layer * stride_out_layer + dst[:, None] * stride_out + offs_w[None, :],
        vals, mask=mask,
    )


def is_interpreted() -> bool:
    """Whether the kernel of this module was built for Triton's CPU interpreter."""
    return not isinstance(_copy_rows_kernel, JITFunction)


def row_view(t: torch.Tensor, *, layered: bool = False) -> torch.Tensor:
    """``t`` (``[S, ...]``) as a ``[S, W]`` view sharing its memory, each row contiguous;
    with ``layered``, ``t`` (``[L, S, ...]``) as ``[L, S, W]``."""
    lead = 2 if layered else 1
    if t.dim() < lead:
        raise ValueError(f"need at least {lead} leading dimension(s), got {tuple(t.shape)}")
    rows = t.view(*t.shape[:lead], -1) if t.dim() > lead else t.unsqueeze(-1)
    if rows.shape[-1] > 1 and rows.stride(-1) != 1:
        raise ValueError(f"each slot's row must be contiguous, got strides {tuple(t.stride())}")
    return rows


def _launch_shape(width: int) -> tuple[int, int]:
    block_w = min(triton.next_power_of_2(max(width, 1)), 1024)
    block_r = max(1, 4096 // block_w)
    return block_r, block_w


def compact_rows(
    rows: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    *,
    scratch: torch.Tensor | None = None,
) -> None:
    """``rows[..., dst_slots[i], :] = rows[..., src_slots[i], :]`` for all ``i``, in place,
    race-free.

    Args:
        rows: ``[S, W]``, or ``[L, S, W]`` to move the same slots of ``L`` layers in one
            launch pair (see :func:`row_view`); any dtype Triton loads.
        src_slots, dst_slots: ``[n]`` int32/int64 flat slot ids on ``rows``' device;
            destinations must be distinct.
        scratch: optional contiguous buffer with at least ``L * n * W`` elements of
            ``rows``' dtype.
    """
    n = src_slots.shape[0]
    if src_slots.dim() != 1 or dst_slots.shape != src_slots.shape:
        raise ValueError(f"src_slots and dst_slots must be [n], got {tuple(src_slots.shape)} "
                         f"and {tuple(dst_slots.shape)}")
    if rows.dim() not in (2, 3):
        raise ValueError(f"rows must be [S, W] or [L, S, W], got {tuple(rows.shape)}")
    if n == 0:
        return
    if src_slots.device != rows.device or dst_slots.device != rows.device:
        raise ValueError("slot ids must be on the rows' device")
    if rows.device.type != "cuda" and not is_interpreted():
        raise RuntimeError(
            "Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
            "kvslimmer_vllm.triton_kernels.compact is imported"
        )
    rows3 = rows if rows.dim() == 3 else rows.unsqueeze(0)
    layers, width = rows3.shape[0], rows3.shape[2]
    if width > 1 and rows3.stride(2) != 1:
        raise ValueError("each slot's row must be contiguous")
    need = layers * n * width
    if scratch is None:
        scratch = torch.empty(need, dtype=rows.dtype, device=rows.device)
    elif scratch.dtype != rows.dtype or scratch.numel() < need or not scratch.is_contiguous():
        raise ValueError("scratch must be contiguous, of rows' dtype and hold L * n * W elements")
    block_r, block_w = _launch_shape(width)
    grid = (triton.cdiv(n, block_r), triton.cdiv(width, block_w), layers)
    # Launch 1 reads every source; launch 2, queued after it on the same stream, writes
    # every destination (see the module docstring for why this is race-free).
    _copy_rows_kernel[grid](
        rows3, src_slots, rows3.stride(1), rows3.stride(0),
        scratch, src_slots, width, n * width,
        n, width, GATHER=True, BLOCK_R=block_r, BLOCK_W=block_w,
    )
    _copy_rows_kernel[grid](
        scratch, dst_slots, width, n * width,
        rows3, dst_slots, rows3.stride(1), rows3.stride(0),
        n, width, GATHER=False, BLOCK_R=block_r, BLOCK_W=block_w,
    )


def compact(
    kv: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    *side_state: torch.Tensor,
    scratch: torch.Tensor | None = None,
) -> None:
    """Move the rows ``src_slots[i] -> dst_slots[i]`` of one request in place, in one layer.

    ``kv`` is the slot-major cache of one layer ``[S, Hkv, 2 * D]``; each extra positional
    tensor is a per-slot side-state row tensor of that layer sharing the slot ids (counts
    ``[S]``, positions ``[S]`` int64, hess / mass ``[S, Hkv]``) and gets the same moves.
    ``kv`` may itself be any ``[S, ...]`` tensor; ``scratch`` is reused for ``kv`` only.
    """
    compact_rows(row_view(kv), src_slots, dst_slots, scratch=scratch)
    for t in side_state:
        if t.shape[0] != kv.shape[0]:
            raise ValueError(f"side state has {t.shape[0]} slots, kv has {kv.shape[0]}")
        compact_rows(row_view(t), src_slots, dst_slots)


def compact_layers(
    src_slots: torch.Tensor, dst_slots: torch.Tensor, *tensors: torch.Tensor
) -> None:
    """The same moves in every layer of ``[L, S, ...]`` tensors (the engine's
    ``SlotState.counts`` ``[L, S]``, ``positions``, ``hess`` / ``mass`` ``[L, S, Hkv]``),
    one launch pair per tensor for all layers. Use it when every layer moves the same slots,
    as in a merge round (the same number of slots per layer, compacted to the front)."""
    for t in tensors:
        compact_rows(row_view(t, layered=True), src_slots, dst_slots)
