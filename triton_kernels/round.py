"""The data movement and per-slot math of a merge round, in Triton (CUDA caches).

Each function implements the contract of a ``core`` reference; the math is the reference's,
computed in float32 from caches of any float dtype:

| function             | reference                                       | launches            |
|----------------------|-------------------------------------------------|---------------------|
| :func:`gather_rows`  | :func:`kvslimmer_vllm.core.paged.gather_rows`   | 1 for all layers    |
| :func:`value_spread` | :func:`kvslimmer_vllm.core.stats.value_spread`  | 2 (mean, spread)    |
| :func:`merge_pairs`  | :func:`kvslimmer_vllm.core.merge.merge_pairs`   | 1                   |
| :func:`compact_rows` | :func:`kvslimmer_vllm.core.paged.compact_rows`  | 2 (moves, merged),  |
|                      |                                                 | 3 staging the moves |
| :func:`write_tokens` | :func:`kvslimmer_vllm.core.paged.write_tokens`  | 1                   |

Layer caches are separate tensors (``[S, Hkv, 2D]``, one per layer, of one shape and
strides, last dim contiguous); a kernel reaches all of them through a table of their
addresses, so one launch serves every layer of a round. :func:`compact_rows` reads the
surviving rows from a copy (the round's gathered ``rows``, or the moved rows staged
first), not from the cache it writes: programs run in any order, so moving rows inside one
cache would let a program overwrite a row another has yet to read. Shapes, dtypes and
devices are checked; slot ids and indices are not (that would cost a host synchronisation
per call): the engine builds them, and the ``core`` references and the C++ ops check them.

Reductions use ``tl.reduce`` with the combiners of :mod:`.paged_attention` (see there why:
the kernels also run under Triton's CPU interpreter, which the tests use without a GPU).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from triton.runtime.jit import JITFunction

from .paged_attention import _SUM_COMBINE

__all__ = ["compact_rows", "gather_rows", "is_interpreted", "merge_pairs", "value_spread",
           "write_tokens"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- helpers

def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError("all tensors must be on one device")
    if device.type != "cuda" and not is_interpreted():
        raise RuntimeError(
            "Triton kernels need CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
            "kvslimmer_vllm.triton_kernels is imported")


def _layer_table(kvs: list[torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """The caches' addresses ``[L]`` int64 on their device, their slot and head strides;
    every cache must have the same dtype, shape and strides, with a contiguous last dim."""
    if not kvs:
        raise ValueError("kvs must hold at least one layer cache")
    first = kvs[0]
    if first.dim() != 3 or first.dtype not in _FLOATS:
        raise ValueError(f"a layer cache must be a float32/16 or bfloat16 [S, Hkv, 2D] tensor, "
                         f"got {first.dtype} {tuple(first.shape)}")
    for kv in kvs:
        if (kv.shape != first.shape or kv.dtype != first.dtype or kv.stride() != first.stride()
                or kv.device != first.device):
            raise ValueError("every layer cache needs the first one's shape, dtype, strides "
                             "and device")
    if first.stride(2) != 1 or first.shape[2] % 2:
        raise ValueError("a layer cache needs an even, contiguous last dim (key, value)")
    table = _address_table(tuple(kv.data_ptr() for kv in kvs), first.device)
    return table, first.stride(0), first.stride(1)


@functools.lru_cache(maxsize=256)
def _address_table(addresses: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``addresses`` as an int64 tensor on ``device``, built once per set of caches (the
    engine's layer caches never move), so a round makes no host-to-device copy for it."""
    return torch.tensor(addresses, dtype=torch.int64).to(device)


def _row_tile(width: int) -> int:
    return min(triton.next_power_of_2(width), 1024)


# ----------------------------------------------------------------------------- gather

@triton.jit
def _gather_kernel(
    table_ptr, slots_ptr, out_ptr, num_slots, stride_slots_layer, stride_slot, stride_head,
    stride_out_layer, stride_out_row, ROW: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out[l, j] = cache_l[slots[l, j]]`` (``WIDTH = Hkv * ROW`` elements, ``ROW = 2D``;
    ``stride_slots_layer`` 0: the same slots in every layer)."""
    layer = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < num_slots
    cache = tl.load(table_ptr + layer).to(tl.pointer_type(out_ptr.dtype.element_ty))
    slot = tl.load(slots_ptr + layer * stride_slots_layer + offs_n, mask=n_ok,
                   other=0).to(tl.int64)
    src = cache + slot[:, None] * stride_slot
    dst = out_ptr + layer * stride_out_layer + offs_n[:, None].to(tl.int64) * stride_out_row
    for c0 in range(0, WIDTH, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ok = n_ok[:, None] & (offs_c < WIDTH)[None, :]
        in_cache = (offs_c // ROW) * stride_head + offs_c % ROW
        tl.store(dst + offs_c[None, :], tl.load(src + in_cache[None, :], mask=ok), mask=ok)


def gather_rows(kvs: list[torch.Tensor], slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[l, j] = kvs[l][slots[j]]`` for every layer ``l`` (one launch).

    Args:
        kvs: ``L`` layer caches ``[S, Hkv, 2D]`` (see the module docstring).
        slots: ``[N]`` int32/int64 slot ids.
        out: ``[L, N, Hkv, 2D]`` contiguous, the caches' dtype.
    """
    table, stride_slot, stride_head = _layer_table(kvs)
    shape = (len(kvs), slots.shape[0], *kvs[0].shape[1:])
    width = kvs[0].shape[1] * kvs[0].shape[2]
    if tuple(out.shape) != shape or out.dtype != kvs[0].dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {kvs[0].dtype} {shape}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    _check_device(kvs[0], slots, out)
    _gather(table, slots.contiguous(), 0, out, stride_slot, stride_head)
    return out


def _gather(table, slots, stride_slots_layer: int, out, stride_slot: int,
            stride_head: int) -> None:
    """One launch of :func:`_gather_kernel` over ``out``'s ``[L, n]`` rows."""
    layers, n, width = out.shape[0], out.shape[1], out.shape[2] * out.shape[3]
    if layers and n:
        block_n = 16
        _gather_kernel[(layers, triton.cdiv(n, block_n))](
            table, slots, out, n, stride_slots_layer, stride_slot, stride_head,
            out.stride(0), out.stride(1), ROW=out.shape[3], WIDTH=width, BLOCK_N=block_n,
            BLOCK_C=_row_tile(width))


# ----------------------------------------------------------------------------- value spread

@triton.jit
def _weighted_mean_kernel(
    v_ptr, alpha_ptr, mean_ptr, num_slots, num_heads,
    sv_l, sv_m, sv_h, sa_l, sa_m, sa_h,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``mean[l, h] = sum_m alpha[l, m, h] v[l, m, h]`` (one program per layer and head)."""
    layer = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    acc = tl.full([D_PAD], 0.0, tl.float32)
    v_base = v_ptr + layer * sv_l + head * sv_h
    a_base = alpha_ptr + layer * sa_l + head * sa_h
    for m0 in range(0, num_slots, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < num_slots
        rows = offs_m.to(tl.int64)
        v = tl.load(v_base + rows[:, None] * sv_m + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(a_base + rows * sa_m, mask=m_ok, other=0.0).to(tl.float32)
        acc += tl.reduce(a[:, None] * v, 0, _SUM_COMBINE)
    tl.store(mean_ptr + (layer * num_heads + head) * HEAD_DIM + offs_d, acc, mask=d_ok)


@triton.jit
def _spread_kernel(
    v_ptr, mean_ptr, out_ptr, num_slots, num_heads,
    sv_l, sv_m, sv_h,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``out[l, m, h] = sum_d |v[l, m, h, d] - mean[l, h, d]|`` for a tile of slots."""
    layer = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_slots
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    mean = tl.load(mean_ptr + (layer * num_heads + head) * HEAD_DIM + offs_d, mask=d_ok,
                   other=0.0)
    rows = offs_m.to(tl.int64)
    v = tl.load(v_ptr + layer * sv_l + head * sv_h + rows[:, None] * sv_m + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    diff = tl.where(d_ok[None, :], tl.abs(v - mean[None, :]), 0.0)
    spread = tl.reduce(diff, 1, _SUM_COMBINE)
    tl.store(out_ptr + (layer * num_slots + offs_m) * num_heads + head, spread, mask=m_ok)


def value_spread(values: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """:func:`kvslimmer_vllm.core.stats.value_spread` for ``[L, M, Hkv, D]`` values of any
    float dtype and strides (last dim contiguous) and ``[L, M, Hkv]`` float32 ``alpha``;
    returns ``[L, M, Hkv]`` float32."""
    if values.dim() != 4 or alpha.shape != values.shape[:3]:
        raise ValueError(f"values must be [L, M, Hkv, D] and alpha [L, M, Hkv], got "
                         f"{tuple(values.shape)} and {tuple(alpha.shape)}")
    if values.dtype not in _FLOATS or alpha.dtype != torch.float32:
        raise ValueError(f"values must be float32/16 or bfloat16 and alpha float32, got "
                         f"{values.dtype} and {alpha.dtype}")
    if values.stride(3) != 1:
        raise ValueError("values need a contiguous last dimension")
    _check_device(values, alpha)
    layers, num_slots, heads, dim = values.shape
    out = torch.empty(layers, num_slots, heads, dtype=torch.float32, device=values.device)
    if out.numel() == 0:
        return out
    mean = torch.empty(layers, heads, dim, dtype=torch.float32, device=values.device)
    d_pad = max(triton.next_power_of_2(dim), 16)
    strides = (values.stride(0), values.stride(1), values.stride(2))
    _weighted_mean_kernel[(layers, heads)](
        values, alpha, mean, num_slots, heads, *strides, *alpha.stride(),
        HEAD_DIM=dim, D_PAD=d_pad, BLOCK_M=32)
    block_m = 64
    _spread_kernel[(layers, heads, triton.cdiv(num_slots, block_m))](
        values, mean, out, num_slots, heads, *strides,
        HEAD_DIM=dim, D_PAD=d_pad, BLOCK_M=block_m)
    return out


# ----------------------------------------------------------------------------- pair merge

@triton.jit
def _merge_pairs_kernel(
    k_ptr, v_ptr, left_ptr, a_ptr, ci_ptr, cj_ptr, cs_ptr, shift_ptr, out_ptr,
    num_pairs, num_heads,
    sk_l, sk_n, sk_h, sv_l, sv_n, sv_h, sa_l, sa_p, sa_h, s_cs,
    so_l, so_p, so_h,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROT: tl.constexpr, IS_NEOX: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Merged key and value of ``BLOCK_P`` pairs of one layer, every head."""
    layer = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < num_pairs
    pair = layer * num_pairs + offs_p
    left = tl.load(left_ptr + pair, mask=p_ok, other=0).to(tl.int64)
    c_i = tl.load(ci_ptr + pair, mask=p_ok, other=1.0).to(tl.float32)
    c_j = tl.load(cj_ptr + pair, mask=p_ok, other=1.0).to(tl.float32)
    w_i = c_i / (c_i + c_j)

    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    ok = p_ok[:, None] & d_ok[None, :]
    if ROT > 0:
        # x'[d] = x[d] cos[f] + sign[d] x[partner[d]] sin[f] on the first ROT dims:
        # NeoX pairs d with d +- ROT/2, GPT-J pairs 2i with 2i+1.
        half = ROT // 2
        if IS_NEOX:
            low = offs_d < half
            freq = tl.where(low, offs_d, offs_d - half)
            partner = tl.where(low, offs_d + half, offs_d - half)
        else:
            low = (offs_d % 2) == 0
            freq = offs_d // 2
            partner = tl.where(low, offs_d + 1, offs_d - 1)
        rotated = offs_d < ROT
        partner = tl.where(rotated, partner, offs_d)
        shift = tl.load(shift_ptr + pair, mask=p_ok, other=0).to(tl.int64)
        row = cs_ptr + tl.abs(shift)[:, None] * s_cs
        f_ok = ok & rotated[None, :]
        cos = tl.load(row + freq[None, :], mask=f_ok, other=1.0).to(tl.float32)
        sin = tl.load(row + half + freq[None, :], mask=f_ok, other=0.0).to(tl.float32)
        norm = tl.sqrt(cos * cos + sin * sin)
        cos = cos / norm
        sin = tl.where(shift[:, None] < 0, -sin, sin) / norm
        sin = tl.where(low[None, :], -sin, sin)

    for head in range(num_heads):
        k_base = k_ptr + layer * sk_l + head * sk_h
        v_base = v_ptr + layer * sv_l + head * sv_h
        k_i = tl.load(k_base + left[:, None] * sk_n + offs_d[None, :], mask=ok,
                      other=0.0).to(tl.float32)
        k_j = tl.load(k_base + (left + 1)[:, None] * sk_n + offs_d[None, :], mask=ok,
                      other=0.0).to(tl.float32)
        if ROT > 0:
            k_p = tl.load(k_base + left[:, None] * sk_n + partner[None, :], mask=ok,
                          other=0.0).to(tl.float32)
            k_i = k_i * cos + k_p * sin
        a = tl.load(a_ptr + layer * sa_l + offs_p * sa_p + head * sa_h, mask=p_ok,
                    other=0.0).to(tl.float32)
        key = a[:, None] * k_i + (1.0 - a)[:, None] * k_j
        v_i = tl.load(v_base + left[:, None] * sv_n + offs_d[None, :], mask=ok,
                      other=0.0).to(tl.float32)
        v_j = tl.load(v_base + (left + 1)[:, None] * sv_n + offs_d[None, :], mask=ok,
                      other=0.0).to(tl.float32)
        value = w_i[:, None] * v_i + (1.0 - w_i)[:, None] * v_j
        out = out_ptr + layer * so_l + offs_p[:, None].to(tl.int64) * so_p + head * so_h
        tl.store(out + offs_d[None, :], key.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out + HEAD_DIM + offs_d[None, :], value.to(out_ptr.dtype.element_ty),
                 mask=ok)


def merge_pairs(keys, values, left, a, c_i, c_j, cos_sin=None, shift=None,
                rotary_dim: int = 0, is_neox: bool = True):
    """:func:`kvslimmer_vllm.core.merge.merge_pairs` with the RoPE shift read from a
    cos/sin table, as ``kvslimmer::merge_pairs`` (C++) does.

    Args:
        keys, values: ``[L, N, Hkv, D]`` of one float dtype, any strides (last dim
            contiguous); usually the two halves of a gathered ``[L, N, Hkv, 2D]`` copy.
        left: ``[L, k]`` int64 left slots (``0 <= i < N - 1``).
        a: ``[L, k, Hkv]`` float32 key weight of the left slot.
        c_i, c_j: ``[L, k]`` float32 counts of the left and right slots.
        cos_sin: ``[P, rotary_dim]`` table (cos then sin halves, vLLM's ``cos_sin_cache``
            layout), or None to merge keys as stored. Row ``|shift|`` rotates by ``shift``
            positions, normalised to unit length and mirrored for negative shifts
            (``RotarySpec.shift_cos_sin``).
        shift: ``[L, k]`` int64 ``p_j - p_i`` with ``cos_sin``.
        rotary_dim, is_neox: the RoPE's rotated dims and pairing.

    Returns:
        ``(merged_keys, merged_values)``: ``[L, k, Hkv, D]`` views of one
        ``[L, k, Hkv, 2D]`` buffer in the keys' dtype.
    """
    if keys.dim() != 4 or values.shape != keys.shape:
        raise ValueError(f"keys and values must be [L, N, Hkv, D] of one shape, got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    layers, _, heads, dim = keys.shape
    k = left.shape[-1]
    if left.shape != (layers, k) or a.shape != (layers, k, heads):
        raise ValueError(f"left must be [{layers}, k] and a [{layers}, k, {heads}], got "
                         f"{tuple(left.shape)} and {tuple(a.shape)}")
    if c_i.shape != left.shape or c_j.shape != left.shape:
        raise ValueError("c_i and c_j must have left's shape")
    if keys.dtype not in _FLOATS or values.dtype != keys.dtype:
        raise ValueError(f"keys and values must share a float dtype, got {keys.dtype} and "
                         f"{values.dtype}")
    if keys.stride(3) != 1 or values.stride(3) != 1:
        raise ValueError("keys and values need a contiguous last dimension")
    rot = 0
    if cos_sin is not None:
        rot = int(rotary_dim)
        if shift is None or shift.shape != left.shape:
            raise ValueError("shift must have left's shape when cos_sin is given")
        if rot <= 0 or rot % 2 or rot > dim or cos_sin.dim() != 2 or cos_sin.shape[1] != rot:
            raise ValueError(f"rotary_dim must be even, in (0, {dim}], and the cos_sin table "
                             f"[P, rotary_dim]; got {rot} and {tuple(cos_sin.shape)}")
        if cos_sin.stride(1) != 1:
            raise ValueError("cos_sin needs a contiguous last dimension")
    left, a = left.contiguous(), a.float()
    c_i, c_j = c_i.float().contiguous(), c_j.float().contiguous()
    _check_device(keys, values, left, a, c_i, c_j,
                  *(t for t in (cos_sin, shift) if t is not None))
    out = torch.empty(layers, k, heads, 2 * dim, dtype=keys.dtype, device=keys.device)
    if out.numel():
        block_p = 16
        table = cos_sin if cos_sin is not None else a
        shift_arg = shift.contiguous() if shift is not None else left
        _merge_pairs_kernel[(layers, triton.cdiv(k, block_p))](
            keys, values, left, a, c_i, c_j, table, shift_arg, out, k, heads,
            keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2),
            *a.stride(), table.stride(0), *out.stride()[:3],
            HEAD_DIM=dim, D_PAD=max(triton.next_power_of_2(dim), 16), ROT=rot,
            IS_NEOX=bool(is_neox), BLOCK_P=block_p)
    return out[..., :dim], out[..., dim:]


# ----------------------------------------------------------------------------- write-back

@triton.jit
def _move_rows_kernel(
    table_ptr, rows_ptr, slots_ptr, source_ptr, start, num_out, stride_slot, stride_head,
    s_rows_l, s_rows_n, s_src_l,
    ROW: tl.constexpr, WIDTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``cache_l[slots[j]] = rows[l, source[l, j]]`` for ``start <= j < num_out``."""
    layer = tl.program_id(0).to(tl.int64)
    offs = start + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs < num_out
    cache = tl.load(table_ptr + layer).to(tl.pointer_type(rows_ptr.dtype.element_ty))
    src = tl.load(source_ptr + layer * s_src_l + offs, mask=n_ok, other=0).to(tl.int64)
    slot = tl.load(slots_ptr + offs, mask=n_ok, other=0).to(tl.int64)
    src_row = rows_ptr + layer * s_rows_l + src[:, None] * s_rows_n
    dst_row = cache + slot[:, None] * stride_slot
    for c0 in range(0, WIDTH, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        ok = n_ok[:, None] & (offs_c < WIDTH)[None, :]
        in_cache = (offs_c // ROW) * stride_head + offs_c % ROW
        tl.store(dst_row + in_cache[None, :], tl.load(src_row + offs_c[None, :], mask=ok),
                 mask=ok)


@triton.jit
def _write_merged_kernel(
    table_ptr, slots_ptr, merged_slots_ptr, k_ptr, v_ptr, num_merged, num_heads, stride_slot,
    stride_head, s_ms_l, sk_l, sk_p, sk_h, sv_l, sv_p, sv_h,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``cache_l[slots[merged_slots[l, i]], h] = (merged_keys[l, i, h], merged_values[...])``."""
    layer = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs < num_merged
    cache = tl.load(table_ptr + layer).to(tl.pointer_type(k_ptr.dtype.element_ty))
    out_index = tl.load(merged_slots_ptr + layer * s_ms_l + offs, mask=n_ok, other=0)
    slot = tl.load(slots_ptr + out_index.to(tl.int64), mask=n_ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    ok = n_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs[:, None].to(tl.int64)
    for head in range(num_heads):
        dst = cache + slot[:, None] * stride_slot + head * stride_head + offs_d[None, :]
        key = tl.load(k_ptr + layer * sk_l + rows * sk_p + head * sk_h + offs_d[None, :],
                      mask=ok)
        value = tl.load(v_ptr + layer * sv_l + rows * sv_p + head * sv_h + offs_d[None, :],
                        mask=ok)
        tl.store(dst, key, mask=ok)
        tl.store(dst + HEAD_DIM, value, mask=ok)


def compact_rows(kvs, slots, source, start, merged_slots, merged_keys, merged_values,
                 rows=None) -> None:
    """:func:`kvslimmer_vllm.core.paged.compact_rows`, reading the surviving rows from a
    copy, so no program reads a row another one writes: ``rows``, the round's
    ``[L, N, Hkv, 2D]`` gathered copy of the request's slots (equal to the caches' rows
    before the round), or, without it, a copy of just the rows that move (``[L, n -
    start, Hkv, 2D]``, made first: an eviction, which gathers nothing).

    Two launches for all layers (the moved rows, then the merged ones), and one more to
    stage the moved rows when ``rows`` is None.
    """
    table, stride_slot, stride_head = _layer_table(kvs)
    layers = len(kvs)
    heads, dim = kvs[0].shape[1], kvs[0].shape[2] // 2
    n = source.shape[-1]
    if source.shape != (layers, n) or n > slots.shape[0]:
        raise ValueError(f"source must be [{layers}, n] with n <= N = {slots.shape[0]}, got "
                         f"{tuple(source.shape)}")
    if rows is not None:
        if (rows.dim() != 4 or rows.shape[0] != layers or rows.shape[1] != slots.shape[0]
                or rows.shape[2:] != kvs[0].shape[1:]):
            raise ValueError(f"rows must be [{layers}, {slots.shape[0]}, {heads}, {2 * dim}], "
                             f"got {tuple(rows.shape)}")
        if rows.dtype != kvs[0].dtype or rows.stride(3) != 1 or rows.stride(2) != 2 * dim:
            raise ValueError("rows must have the caches' dtype and contiguous [Hkv, 2D] rows")
    w = merged_slots.shape[-1]
    want = (layers, w, heads, dim)
    if (merged_slots.shape != (layers, w) or merged_keys.shape != want
            or merged_values.shape != want):
        raise ValueError(f"merged_slots must be [{layers}, w] and merged keys/values "
                         f"[{layers}, w, {heads}, {dim}]")
    if (merged_keys.dtype != kvs[0].dtype or merged_values.dtype != kvs[0].dtype
            or merged_keys.stride(3) != 1 or merged_values.stride(3) != 1):
        raise ValueError("merged keys/values need the caches' dtype and a contiguous last dim")
    if not 0 <= start <= n:
        raise ValueError(f"start must be in [0, {n}], got {start}")
    _check_device(kvs[0], slots, source, merged_slots, merged_keys, merged_values,
                  *([] if rows is None else [rows]))
    slots, source = slots.contiguous(), source.contiguous()
    merged_slots = merged_slots.contiguous()
    block_n = 16
    if n > start and rows is None:
        # Stage the rows that move: rows[l, j - start] = cache_l[slots[source[l, j]]].
        moving = slots[source[:, start:]].contiguous()
        rows = torch.empty(layers, n - start, heads, 2 * dim, dtype=kvs[0].dtype,
                           device=kvs[0].device)
        _gather(table, moving, moving.stride(0), rows, stride_slot, stride_head)
        # Output slot j reads row j - start of the copy (the same in every layer).
        source = torch.arange(-start, n - start, device=slots.device).expand(layers, n)
    if n > start:
        _move_rows_kernel[(layers, triton.cdiv(n - start, block_n))](
            table, rows, slots, source, start, n, stride_slot, stride_head,
            rows.stride(0), rows.stride(1), source.stride(0),
            ROW=2 * dim, WIDTH=heads * 2 * dim, BLOCK_N=block_n,
            BLOCK_C=_row_tile(heads * 2 * dim))
    if w:
        _write_merged_kernel[(layers, triton.cdiv(w, block_n))](
            table, slots, merged_slots, merged_keys, merged_values, w, heads, stride_slot,
            stride_head, merged_slots.stride(0), *merged_keys.stride()[:3],
            *merged_values.stride()[:3],
            HEAD_DIM=dim, D_PAD=max(triton.next_power_of_2(dim), 16), BLOCK_N=block_n)


# ----------------------------------------------------------------------------- new tokens

@triton.jit
def _write_tokens_kernel(
    kv_ptr, k_ptr, v_ptr, slots_ptr, pos_ptr, counts_ptr, slot_pos_ptr, hess_ptr, mass_ptr,
    num_tokens, num_heads, stride_slot, stride_head, sk_t, sk_h, sv_t, sv_h, s_count, s_spos,
    s_hess_s, s_hess_h, s_mass_s, s_mass_h,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    WITH_STATE: tl.constexpr,
):
    """``cache[slots[t]] = (key[t], value[t])`` and the slot's state reset, for the tokens
    whose slot id is not negative (padding tokens write nothing)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slot = tl.load(slots_ptr + offs_t, mask=offs_t < num_tokens, other=-1).to(tl.int64)
    t_ok = slot >= 0
    rows = offs_t[:, None].to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    ok = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    for head in range(num_heads):
        dst = kv_ptr + slot[:, None] * stride_slot + head * stride_head + offs_d[None, :]
        key = tl.load(k_ptr + rows * sk_t + head * sk_h + offs_d[None, :], mask=ok)
        value = tl.load(v_ptr + rows * sv_t + head * sv_h + offs_d[None, :], mask=ok)
        tl.store(dst, key, mask=ok)
        tl.store(dst + HEAD_DIM, value, mask=ok)
    if WITH_STATE:
        pos = tl.load(pos_ptr + offs_t, mask=t_ok, other=0)
        tl.store(counts_ptr + slot * s_count, tl.full((BLOCK_T,), 1.0, tl.float32), mask=t_ok)
        tl.store(slot_pos_ptr + slot * s_spos, pos.to(tl.int64), mask=t_ok)
        offs_h = tl.arange(0, H_PAD)
        h_ok = t_ok[:, None] & (offs_h < num_heads)[None, :]
        tl.store(hess_ptr + slot[:, None] * s_hess_s + offs_h[None, :] * s_hess_h,
                 tl.full((BLOCK_T, H_PAD), float("nan"), tl.float32), mask=h_ok)
        tl.store(mass_ptr + slot[:, None] * s_mass_s + offs_h[None, :] * s_mass_h,
                 tl.full((BLOCK_T, H_PAD), 0.0, tl.float32), mask=h_ok)


def write_tokens(kv, key, value, slots, positions, counts=None, slot_positions=None, hess=None,
                 mass=None) -> None:
    """:func:`kvslimmer_vllm.core.paged.write_tokens` in one launch, with no host
    synchronisation: padding tokens (negative slot ids) are masked out on the device.
    Slot ids are not bounds-checked (that would need the host); the engine's slot mapping
    holds only the cache's slots and padding."""
    if kv.dim() != 3 or kv.shape[2] % 2 or kv.stride(2) != 1 or kv.dtype not in _FLOATS:
        raise ValueError(f"kv must be a float [S, Hkv, 2D] tensor with a contiguous last dim, "
                         f"got {kv.dtype} {tuple(kv.shape)}")
    num_slots, heads, dim = kv.shape[0], kv.shape[1], kv.shape[2] // 2
    tokens = slots.shape[0]
    for name, t in (("key", key), ("value", value)):
        if t.shape != (tokens, heads, dim) or t.dtype != kv.dtype:
            raise ValueError(f"key and value must be [{tokens}, {heads}, {dim}] {kv.dtype}; "
                             f"{name} is {t.dtype} {tuple(t.shape)}")
    key = key if key.stride(2) == 1 else key.contiguous()
    value = value if value.stride(2) == 1 else value.contiguous()
    if slots.dim() != 1 or positions.shape != slots.shape:
        raise ValueError(f"slots and positions must be [T], got {tuple(slots.shape)} and "
                         f"{tuple(positions.shape)}")
    state = (counts, slot_positions, hess, mass)
    with_state = counts is not None
    if any((t is None) != (not with_state) for t in state):
        raise ValueError("counts, slot_positions, hess and mass go together: all or none")
    if with_state and (counts.shape != (num_slots,) or slot_positions.shape != (num_slots,)):
        raise ValueError(f"counts and slot_positions must be [{num_slots}], got "
                         f"{tuple(counts.shape)} and {tuple(slot_positions.shape)}")
    if with_state and (hess.shape != (num_slots, heads) or mass.shape != (num_slots, heads)):
        raise ValueError(f"hess and mass must be [{num_slots}, {heads}], got "
                         f"{tuple(hess.shape)} and {tuple(mass.shape)}")
    _check_device(kv, key, value, slots, positions, *(t for t in state if t is not None))
    if not tokens:
        return
    slots, positions = slots.contiguous(), positions.contiguous()
    if not with_state:  # unused pointers: the kernel does not touch them
        counts = slot_positions = hess = mass = kv
    block_t = 16
    _write_tokens_kernel[(triton.cdiv(tokens, block_t),)](
        kv, key, value, slots, positions, counts, slot_positions, hess, mass, tokens, heads,
        kv.stride(0), kv.stride(1), key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), counts.stride(0), slot_positions.stride(0), hess.stride(0),
        hess.stride(-1), mass.stride(0), mass.stride(-1),
        HEAD_DIM=dim, D_PAD=max(triton.next_power_of_2(dim), 16),
        H_PAD=max(triton.next_power_of_2(heads), 2), BLOCK_T=block_t, WITH_STATE=with_state)


def is_interpreted() -> bool:
    """Whether this module's kernels were built for Triton's CPU interpreter."""
    return not isinstance(_gather_kernel, JITFunction)
