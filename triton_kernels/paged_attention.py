"""Paged attention with a per-slot ``log(count)`` bias, and the observation mass, in Triton.

The math is :func:`kvslimmer_vllm.core.merged_attention`, evaluated straight from the paged
KV cache of one layer:

    logit_j = scale * q . k_j + log(c_j)      P_j = softmax_j(logit_j)      out = sum_j P_j v_j

Layout (the one :mod:`kvslimmer_vllm.engine.slots` describes): ``kv`` is ``[S, Hkv, 2 * D]``,
slot-major, key ``kv[s, h, :D]`` and value ``kv[s, h, D:]``, flat slot id
``block_id * block_size + offset``. Request ``r`` owns the query rows
``query_start_loc[r] : query_start_loc[r + 1]`` and its first ``seq_lens[r]`` slots in the
order of ``block_table[r]``; row ``i`` of its ``T_r`` rows sees the first
``seq_lens[r] - T_r + i + 1`` of them (causal in physical-slot order).

Kernels
-------
``_attention_kernel``: one program per (block of query rows of one request, KV head). The
program stacks ``BLOCK_Q`` query rows times the ``G`` query heads of its KV head into one
``BLOCK_M``-row tile, so every K/V tile it gathers through the block table serves all ``G``
heads. It streams the request's slots in tiles of ``TILE_N`` with an online (running max)
softmax in base 2, accumulates ``sum p v`` in float32 and writes the output in the query's dtype
and, when the mass is wanted, each row's log-sum-exp (base 2).

``_mass_kernel``: the same program layout, run after the first kernel when ``mass`` is given.
It recomputes each tile's logits, takes the exact probability ``p = 2^(logit2 - lse2)``, sums
it over the rows it owns and over the ``G`` heads, divides by ``G`` and atomically adds the
result into ``mass[slot, kv_head]``. Atomics (rather than plain read-modify-write) keep it
correct when several programs touch one slot: several query blocks of a prefill do, and so
would two requests that share a physical block.

Which program serves which request is found without any host synchronisation: request ``r``'s
query blocks are numbered from ``query_start_loc[r] // BLOCK_Q + r`` on, a strictly increasing
sequence, so a program finds its request by binary search, and ``T // BLOCK_Q + R`` programs
always cover every block (a request of ``T_r`` rows needs at most
``(qsl[r+1] // BLOCK_Q - qsl[r] // BLOCK_Q) + 1`` of them). Programs past the end of their
request return at once.

Rows that see no slot (a request with ``seq_len`` 0, or ``seq_len < T_r``) get a zero output
and add no mass, as in the reference. Rows of ``query`` that no request owns are left
untouched in ``out`` (zero in a freshly allocated output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["is_interpreted", "paged_attention"]

_LOG2E = 1.4426950408889634


# Reductions call tl.reduce with Triton's own max / sum combiners instead of tl.max / tl.sum,
# and zeros come from tl.full instead of tl.zeros. tl.max, tl.sum and tl.zeros are @triton.jit
# functions of Triton's standard library, built compiled (not interpreted) when Triton is
# imported before TRITON_INTERPRET is set (vLLM imports it early), and then refuse to run under
# the interpreter; the combiners are only compared by identity there (fast NumPy reductions)
# and never called. The GPU code is what tl.max / tl.sum generate. Own combiners stand in if
# a Triton version lacks those private names (correct everywhere, slow when interpreted).
@triton.jit
def _max_op(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_op(a, b):
    return a + b


_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", _max_op)
_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _add_op)


@triton.jit
def _find_request(qsl_ptr, num_reqs, pid, BLOCK_Q: tl.constexpr):
    """Largest ``r`` in ``[0, num_reqs)`` with ``qsl[r] // BLOCK_Q + r <= pid``."""
    lo = tl.program_id(0) * 0  # int32 scalar 0 (a loop-carried tensor, not a constant)
    hi = num_reqs - 1 + lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_block = tl.load(qsl_ptr + mid).to(tl.int32) // BLOCK_Q + mid
        if first_block <= pid:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _load_kv_tile(
    kv_ptr, bt_row_ptr, kv_head, start, limit, offs_n, offs_d, d_ok,
    stride_kv_slot, stride_kv_head,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, LOAD_V: tl.constexpr,
):
    """Gather the key tile ``[D_PAD, TILE_N]`` (and the value tile ``[TILE_N, D_PAD]``) of the
    request's logical slots ``start + offs_n``; slots at or past ``limit`` are masked."""
    pos = start + offs_n
    n_ok = pos < limit
    block = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    slot = block * BLOCK_SIZE + (pos % BLOCK_SIZE)
    base = kv_ptr + slot * stride_kv_slot + kv_head * stride_kv_head
    k = tl.load(base[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    if LOAD_V:
        v = tl.load(
            base[:, None] + HEAD_DIM + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )
    else:
        v = k
    return k, v, slot, n_ok


@triton.jit
def _mm(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with a float32 result. ``UPCAST`` multiplies in float32 (exactly the values
    of the low-precision operands); it is used only under Triton's CPU interpreter, whose
    ``tl.dot`` mishandles bfloat16 operands (Triton 3.9)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _attention_kernel(
    q_ptr, kv_ptr, counts_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, lse_ptr,
    qk_scale, num_reqs,
    stride_q_tok, stride_q_head,
    stride_kv_slot, stride_kv_head,
    stride_counts, stride_bt,
    stride_o_tok, stride_o_head,
    stride_lse_tok,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr, HAS_COUNTS: tl.constexpr, WRITE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(qsl_ptr, num_reqs, pid, BLOCK_Q)
    q_start = tl.load(qsl_ptr + req).to(tl.int32)
    num_rows = tl.load(qsl_ptr + req + 1).to(tl.int32) - q_start
    q_block = pid - (q_start // BLOCK_Q + req)
    if q_block * BLOCK_Q < num_rows:
        seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)

        # Tile row m is query row q_block * BLOCK_Q + m // GROUP, query head
        # kv_head * GROUP + m % GROUP. Padding rows see nothing.
        offs_m = tl.arange(0, BLOCK_M)
        row = q_block * BLOCK_Q + offs_m // GROUP
        head = kv_head * GROUP + offs_m % GROUP
        row_ok = (offs_m < BLOCK_Q * GROUP) & (row < num_rows)
        visible = tl.where(row_ok, seq_len - num_rows + row + 1, 0)
        visible = tl.maximum(visible, 0)
        limit = tl.reduce(visible, 0, _MAX_COMBINE)
        tok = (q_start + row).to(tl.int64)

        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_DIM
        offs_n = tl.arange(0, TILE_N)
        q = tl.load(
            q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head
            + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )
        bt_row_ptr = bt_ptr + req.to(tl.int64) * stride_bt

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        acc = tl.full([BLOCK_M, D_PAD], 0.0, dtype=tl.float32)
        for start in range(0, limit, TILE_N):
            k, v, slot, n_ok = _load_kv_tile(
                kv_ptr, bt_row_ptr, kv_head, start, limit, offs_n, offs_d, d_ok,
                stride_kv_slot, stride_kv_head, HEAD_DIM, BLOCK_SIZE, True,
            )
            s = _mm(q, k.to(q.dtype), DOT_PRECISION, UPCAST_DOT) * qk_scale
            if HAS_COUNTS:
                c = tl.load(counts_ptr + slot * stride_counts, mask=n_ok, other=1.0)
                s += tl.log2(c.to(tl.float32))[None, :]
            seen = (start + offs_n)[None, :] < visible[:, None]
            s = tl.where(seen, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX_COMBINE))
            # A row that has seen nothing yet keeps m = -inf; shift it by 0 to avoid NaN.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, _SUM_COMBINE)
            acc = acc * alpha[:, None] + _mm(
                p.to(q.dtype), v.to(q.dtype), DOT_PRECISION, UPCAST_DOT
            )
            m_i = m_new

        has_mass = l_i > 0.0
        out = acc / tl.where(has_mass, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_o_tok + head[:, None] * stride_o_head
            + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
        if WRITE_LSE:
            lse = tl.where(has_mass, m_i + tl.log2(tl.where(has_mass, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + tok * stride_lse_tok + head, lse, mask=row_ok)


@triton.jit
def _mass_kernel(
    q_ptr, kv_ptr, counts_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, lse_ptr, mass_ptr, observed_ptr,
    qk_scale, inv_group, num_reqs,
    stride_q_tok, stride_q_head,
    stride_kv_slot, stride_kv_head,
    stride_counts, stride_bt,
    stride_lse_tok,
    stride_mass_slot, stride_mass_head,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr, HAS_COUNTS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, HAS_OBSERVED: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(qsl_ptr, num_reqs, pid, BLOCK_Q)
    q_start = tl.load(qsl_ptr + req).to(tl.int32)
    num_rows = tl.load(qsl_ptr + req + 1).to(tl.int32) - q_start
    q_block = pid - (q_start // BLOCK_Q + req)
    if HAS_OBSERVED:  # an unobserved request's rows add no mass
        num_rows = tl.where(tl.load(observed_ptr + req) != 0, num_rows, 0)
    if q_block * BLOCK_Q < num_rows:
        seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
        offs_m = tl.arange(0, BLOCK_M)
        row = q_block * BLOCK_Q + offs_m // GROUP
        head = kv_head * GROUP + offs_m % GROUP
        row_ok = (offs_m < BLOCK_Q * GROUP) & (row < num_rows)
        visible = tl.where(row_ok, seq_len - num_rows + row + 1, 0)
        visible = tl.maximum(visible, 0)
        limit = tl.reduce(visible, 0, _MAX_COMBINE)
        tok = (q_start + row).to(tl.int64)

        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_DIM
        offs_n = tl.arange(0, TILE_N)
        q = tl.load(
            q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head
            + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )
        lse = tl.load(lse_ptr + tok * stride_lse_tok + head, mask=row_ok, other=0.0)
        bt_row_ptr = bt_ptr + req.to(tl.int64) * stride_bt
        for start in range(0, limit, TILE_N):
            k, _v, slot, n_ok = _load_kv_tile(
                kv_ptr, bt_row_ptr, kv_head, start, limit, offs_n, offs_d, d_ok,
                stride_kv_slot, stride_kv_head, HEAD_DIM, BLOCK_SIZE, False,
            )
            s = _mm(q, k.to(q.dtype), DOT_PRECISION, UPCAST_DOT) * qk_scale
            if HAS_COUNTS:
                c = tl.load(counts_ptr + slot * stride_counts, mask=n_ok, other=1.0)
                s += tl.log2(c.to(tl.float32))[None, :]
            seen = (start + offs_n)[None, :] < visible[:, None]
            p = tl.where(seen, tl.exp2(s - lse[:, None]), 0.0)
            col = tl.reduce(p, 0, _SUM_COMBINE) * inv_group
            tl.atomic_add(
                mass_ptr + slot * stride_mass_slot + kv_head * stride_mass_head,
                col, mask=n_ok, sem="relaxed",
            )


def is_interpreted() -> bool:
    """Whether the kernels of this module were built for Triton's CPU interpreter
    (``TRITON_INTERPRET=1`` when the module was imported)."""
    return not isinstance(_attention_kernel, JITFunction)


def _launch_config(
    num_tokens: int, num_reqs: int, group: int, d_pad: int, elem_bytes: int
) -> dict:
    """Tile sizes from tensor shapes only (no host synchronisation).

    Decode-like batches (under 4 query rows per request on average) use 16-row query tiles,
    prefill-like ones larger tiles so each gathered K/V tile serves more rows. Compiled
    offline for sm_90 and read with ``cuobjdump -res-usage``, the 16-bit configurations of
    both kernels spill no registers for D 32..128 and G 1..8 (a few dozen bytes at D 256
    prefill); float32 ones spill at D >= 128. None of this is tuned on a GPU yet.
    """
    prefill = num_tokens >= 4 * max(num_reqs, 1)
    if elem_bytes >= 4:  # float32 (3xTF32 dots): tiles twice as large in registers
        block_m, tile_n = (32, 32 if d_pad <= 128 else 16) if prefill else (16, 16)
        num_warps = 8 if (prefill or d_pad >= 256) else 4
    elif prefill:
        block_m, tile_n = 64, (64 if d_pad <= 128 else 32)
        num_warps = 4 if d_pad <= 64 else 8
    else:
        block_m, tile_n, num_warps = 16, (32 if d_pad <= 64 else 16), 4
    block_m = max(block_m, triton.next_power_of_2(group))
    return dict(BLOCK_M=block_m, BLOCK_Q=block_m // group, TILE_N=tile_n,
                num_warps=num_warps)


def paged_attention(
    query: torch.Tensor,
    kv: torch.Tensor,
    counts: torch.Tensor | None,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    block_size: int,
    mass: torch.Tensor | None = None,
    *,
    observed: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Count-biased causal attention of a batch straight from the paged cache of one layer.

    Args:
        query: ``[T, Hq, D]`` float32, float16 or bfloat16 (post-RoPE); ``stride(2) == 1``.
        kv: ``[S, Hkv, 2 * D]`` slot-major cache of the layer (key then value per head);
            ``stride(2) == 1``. Loaded K/V are cast to the query's dtype.
        counts: ``[S]`` tokens per slot (float32), or None for all ones.
        block_table: ``[R', max_blocks]`` int32/int64 block ids, ``R' >= R``.
        seq_lens: ``[R]`` physical slots per request, this step's new tokens included.
        query_start_loc: ``[R + 1]`` row offsets of the requests in ``query``.
        scale: logit scale, usually ``1 / sqrt(D)``.
        block_size: slots per block.
        mass: optional ``[S, Hkv]`` float32, accumulated in place: each slot's probability
            summed over the rows that see it and averaged over the G query heads per KV head.
        observed: optional ``[R]`` bool: only these requests' rows add to ``mass``.
        out: optional ``[T, Hq, D]`` output buffer (query dtype); rows no request owns are
            not written.

    Returns:
        ``out``, ``[T, Hq, D]`` in the query's dtype.
    """
    if query.dim() != 3 or kv.dim() != 3:
        raise ValueError(f"query must be [T, Hq, D] and kv [S, Hkv, 2D], got "
                         f"{tuple(query.shape)} and {tuple(kv.shape)}")
    num_tokens, num_q_heads, head_dim = query.shape
    num_slots, num_kv_heads, width = kv.shape
    if width != 2 * head_dim:
        raise ValueError(f"kv last dim {width} != 2 * head_dim {2 * head_dim}")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"Hq={num_q_heads} is not a multiple of Hkv={num_kv_heads}")
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported query dtype {query.dtype}")
    if query.stride(2) != 1 or kv.stride(2) != 1:
        raise ValueError("query and kv need a contiguous last dimension")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_reqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_reqs + 1,):
        raise ValueError(f"query_start_loc must have shape [{num_reqs + 1}], "
                         f"got {tuple(query_start_loc.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] < num_reqs:
        raise ValueError(f"block_table must be [>= {num_reqs}, max_blocks], "
                         f"got {tuple(block_table.shape)}")
    if counts is not None and counts.shape != (num_slots,):
        raise ValueError(f"counts must have shape [{num_slots}], got {tuple(counts.shape)}")
    if mass is not None and (mass.shape != (num_slots, num_kv_heads)
                             or mass.dtype != torch.float32):
        raise ValueError(f"mass must be float32 [{num_slots}, {num_kv_heads}], got "
                         f"{mass.dtype} {tuple(mass.shape)}")
    if observed is not None and (observed.shape != (num_reqs,) or observed.dtype != torch.bool):
        raise ValueError(f"observed must be bool [{num_reqs}], got {observed.dtype} "
                         f"{tuple(observed.shape)}")
    others = (kv, counts, block_table, seq_lens, query_start_loc, mass, observed, out)
    if any(t is not None and t.device != query.device for t in others):
        raise ValueError("all tensors must be on the query's device")
    if query.device.type != "cuda" and not is_interpreted():
        raise RuntimeError(
            "Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
            "kvslimmer_vllm.triton_kernels.paged_attention is imported"
        )
    if out is None:
        out = torch.zeros_like(query, memory_format=torch.contiguous_format)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(2) != 1:
        raise ValueError("out must match query's shape and dtype, with a contiguous last dim")
    if num_tokens == 0 or num_reqs == 0:
        return out

    group = num_q_heads // num_kv_heads
    d_pad = max(triton.next_power_of_2(head_dim), 16)
    cfg = _launch_config(num_tokens, num_reqs, group, d_pad, query.element_size())
    grid = (num_tokens // cfg["BLOCK_Q"] + num_reqs, num_kv_heads)
    qk_scale = float(scale) * _LOG2E
    precision = "tf32x3" if query.dtype == torch.float32 else "tf32"
    upcast = query.dtype == torch.bfloat16 and is_interpreted()
    counts_arg = counts if counts is not None else kv  # never read without HAS_COUNTS
    counts_stride = counts.stride(0) if counts is not None else 0
    lse = None
    if mass is not None:
        lse = torch.empty(num_tokens, num_q_heads, dtype=torch.float32, device=query.device)

    _attention_kernel[grid](
        query, kv, counts_arg, block_table, seq_lens, query_start_loc, out,
        lse if lse is not None else out,
        qk_scale, num_reqs,
        query.stride(0), query.stride(1),
        kv.stride(0), kv.stride(1),
        counts_stride, block_table.stride(0),
        out.stride(0), out.stride(1),
        lse.stride(0) if lse is not None else 0,
        GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_Q=cfg["BLOCK_Q"], TILE_N=cfg["TILE_N"],
        HAS_COUNTS=counts is not None, WRITE_LSE=lse is not None,
        DOT_PRECISION=precision, UPCAST_DOT=upcast, num_warps=cfg["num_warps"],
    )
    if mass is not None:
        _mass_kernel[grid](
            query, kv, counts_arg, block_table, seq_lens, query_start_loc, lse, mass,
            observed if observed is not None else seq_lens,  # never read without it
            qk_scale, 1.0 / group, num_reqs,
            query.stride(0), query.stride(1),
            kv.stride(0), kv.stride(1),
            counts_stride, block_table.stride(0),
            lse.stride(0),
            mass.stride(0), mass.stride(1),
            GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_Q=cfg["BLOCK_Q"], TILE_N=cfg["TILE_N"],
            HAS_COUNTS=counts is not None, DOT_PRECISION=precision, UPCAST_DOT=upcast,
            HAS_OBSERVED=observed is not None, num_warps=cfg["num_warps"],
        )
    return out
