"""Paged-cache reference: attention over a batch of requests whose slots live in blocks.

The KV cache of one layer is slot-major, ``kv[S, Hkv, 2D]`` (key ``kv[s, h, :D]``,
value ``kv[s, h, D:]``), and a request's slots are found through its block-table row:
flat slot id ``block_id * block_size + offset``. This is the contract the C++ and Triton
paged-attention kernels implement; it is written for clarity, one request at a time.
"""

from __future__ import annotations

import torch

from .attention import merged_attention
from .merge import drop_slots, merge_rounds
from .merge import slot_scores as _slot_scores

__all__ = ["compact_rows", "gather_rows", "paged_attention", "paged_drop", "paged_merge_round",
           "slot_ids", "slot_scores", "store_round", "write_tokens"]


def slot_ids(block_ids, num_slots: int, block_size: int, device=None) -> torch.Tensor:
    """Flat slot ids of a request's first ``num_slots`` slots, in order."""
    blocks = torch.as_tensor(block_ids, dtype=torch.int64, device=device)
    offsets = torch.arange(block_size, dtype=torch.int64, device=device)
    return (blocks[:, None] * block_size + offsets[None, :]).flatten()[:num_slots]


def write_tokens(kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor,
                 positions: torch.Tensor, counts: torch.Tensor | None = None,
                 slot_positions: torch.Tensor | None = None, hess: torch.Tensor | None = None,
                 mass: torch.Tensor | None = None) -> None:
    """Write a step's new tokens into their slots of one layer's cache, and reset those
    slots' state: a written slot stands for one token again.

    Args:
        kv: ``[S, Hkv, 2D]`` the layer's cache.
        key, value: ``[T, Hkv, D]`` the new tokens' keys and values.
        slots: ``[T]`` int64 slot of each token; a negative id marks a padding token,
            which writes nothing.
        positions: ``[T]`` int64 logical (RoPE) position of each token.
        counts, slot_positions, hess, mass: the layer's slot state (``[S]`` float32,
            ``[S]`` int64, ``[S, Hkv]`` float32, ``[S, Hkv]`` float32), all or none: each
            written slot gets count 1, its token's position, Hessian NaN (none yet) and
            mass 0.

    ``kvslimmer::write_tokens`` (C++, CPU) and the Triton kernel (CUDA) do the same in one
    pass with no temporary and no host synchronisation
    (:func:`kvslimmer_vllm.kernels.write_tokens`).
    """
    state = (counts, slot_positions, hess, mass)
    with_state = all(t is not None for t in state)
    if not with_state and any(t is not None for t in state):
        raise ValueError("counts, slot_positions, hess and mass go together: all or none")
    written = slots >= 0
    ids = slots[written]
    kv.index_copy_(0, ids, torch.cat((key, value), dim=-1)[written].to(kv.dtype))
    if not with_state:
        return
    counts.index_fill_(0, ids, 1.0)
    slot_positions.index_copy_(0, ids, positions[written].to(slot_positions.dtype))
    hess.index_fill_(0, ids, float("nan"))
    mass.index_fill_(0, ids, 0.0)


def gather_rows(kvs: list[torch.Tensor], slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Copy a request's slots of every layer into one tensor: ``out[l] = kvs[l][slots]``.

    Args:
        kvs: ``L`` caches ``[S, Hkv, 2D]``, one per layer.
        slots: ``[N]`` int64 slot ids.
        out: ``[L, N, Hkv, 2D]`` in the caches' dtype.

    Returns ``out``. The Triton kernel does the same in one launch for all layers
    (:func:`kvslimmer_vllm.kernels.gather_rows`).
    """
    for layer, kv in enumerate(kvs):
        torch.index_select(kv, 0, slots, out=out[layer])
    return out


def compact_rows(
    kvs: list[torch.Tensor],
    slots: torch.Tensor,
    source: torch.Tensor,
    start: int,
    merged_slots: torch.Tensor,
    merged_keys: torch.Tensor,
    merged_values: torch.Tensor,
) -> None:
    """Write a round's result into a request's slots of each layer's cache, in place.

    The request's ``N`` slots ``slots`` keep ``n`` (``source`` ``[L, n]``): output slot
    ``j`` of layer ``l`` (slot id ``slots[j]``) takes the row of its input slot
    ``source[l, j]``, for ``j >= start`` (rows before ``start`` stay); then the output slots
    ``merged_slots[l]`` take ``merged_keys[l]`` / ``merged_values[l]``. Rows only move to
    lower slots: ``source[l, j] >= j``.

    Args:
        kvs: ``L`` caches ``[S, Hkv, 2D]``, one per layer, of one dtype.
        slots: ``[N]`` int64 slot ids of the request, in order.
        source: ``[L, n]`` int64 input slot of each output slot.
        start: first output slot that may change.
        merged_slots: ``[L, w]`` int64 output slots.
        merged_keys, merged_values: ``[L, w, Hkv, D]`` in the caches' dtype.

    ``kvslimmer::compact_rows`` (C++) does the same with one row copy per moved slot and
    no temporary (:func:`kvslimmer_vllm.kernels.compact_rows`).
    """
    n = source.shape[1]
    dst = slots[:n]
    merged = torch.cat((merged_keys, merged_values), dim=-1)
    for layer, kv in enumerate(kvs):
        moved = kv.index_select(0, slots[source[layer, start:]])
        kv.index_copy_(0, dst[start:], moved)
        kv.index_copy_(0, dst[merged_slots[layer]], merged[layer])


def store_round(kvs: list[torch.Tensor], slots: torch.Tensor, layers: torch.Tensor,
                counts: torch.Tensor, positions: torch.Tensor, hess: torch.Tensor,
                mass: torch.Tensor, result, compact=compact_rows) -> None:
    """Write a layer-batched round's result (a :class:`~.merge.MergeResult` of ``[L, ...]``
    tensors) into a request's slots ``slots`` (``[N]``) of the caches ``kvs`` and into the
    slots' state rows ``layers`` (``[L]`` int64) of ``counts`` ``[Ltot, S]``,
    ``positions``, ``hess`` and ``mass`` ``[Ltot, S, Hkv]``, in place: the rows with
    ``compact`` (:func:`compact_rows`'s contract), then the kept slots' counts, positions
    and Hessian proxies; the observation mass of all ``N`` slots is reset."""
    compact(kvs, slots, result.source, result.first_changed, result.merged_slots,
            result.merged_keys, result.merged_values)
    rows = layers[:, None]
    dst = slots[: result.source.shape[1]]
    counts[rows, dst] = result.counts
    positions[rows, dst] = result.positions
    hess[rows, dst] = result.hess
    mass[rows, slots] = 0.0


def paged_merge_round(kvs: list[torch.Tensor], slots: torch.Tensor, layers: torch.Tensor,
                      counts: torch.Tensor, positions: torch.Tensor, hess: torch.Tensor,
                      mass: torch.Tensor, **round_kwargs) -> None:
    """One pairwise merge round of one request over ``L`` layers (:func:`~.merge.merge_rounds`:
    one round, or the sub-rounds ``max_fraction`` asks for), in place where its slots live:
    gather the slots, run the round, write it back (:func:`store_round`; arguments as
    there, ``round_kwargs`` those of ``merge_rounds`` but ``protect``).

    The reference of ``kvslimmer::round_stats`` + ``round_apply`` (C++), which read the
    slots where they are and move them in one walk
    (:func:`kvslimmer_vllm.kernels.paged_merge_round`).
    """
    kv = gather_rows(kvs, slots, kvs[0].new_empty(len(kvs), len(slots), *kvs[0].shape[1:]))
    rows = layers[:, None]
    dim = kv.shape[-1] // 2
    result = merge_rounds(kv[..., :dim], kv[..., dim:], counts[rows, slots],
                          positions[rows, slots], hess[rows, slots], mass[rows, slots],
                          **round_kwargs)
    store_round(kvs, slots, layers, counts, positions, hess, mass, result)


def slot_scores(slots: torch.Tensor, layers: torch.Tensor, mass: torch.Tensor, *, sink: int,
                recent: int, pool: int = 1) -> torch.Tensor:
    """SnapKV's ``[L, M]`` float64 scores (:func:`~.merge.slot_scores`) of the region
    ``[sink, N - recent)`` of one request's ``N`` slots ``slots``, from the observation
    mass rows ``layers`` of ``mass`` (``[Ltot, S, Hkv]``), gathered. The reference of
    ``kvslimmer::slot_scores`` (C++), which reads the mass where it is."""
    return _slot_scores(mass[layers[:, None], slots], sink=sink, recent=recent, pool=pool)


def paged_drop(kvs: list[torch.Tensor], slots: torch.Tensor, layers: torch.Tensor,
               counts: torch.Tensor, positions: torch.Tensor, hess: torch.Tensor,
               mass: torch.Tensor, dropped: torch.Tensor, compact=compact_rows) -> None:
    """Drop each layer's slots ``dropped[l]`` (``[L, k]`` sorted indices into the request's
    ``N`` slots ``slots``) in place: the survivors move down where they live (``compact``,
    :func:`compact_rows`'s contract), their counts, positions and Hessian proxies with
    them; the observation mass of all ``N`` slots is reset (arguments as in
    :func:`store_round`). Reads no key or value: what an eviction round leaves, without
    gathering the request (the engine's CPU eviction, with the C++ ``compact_rows``)."""
    rows = layers[:, None]
    head_dim = kvs[0].shape[-1] // 2
    no_rows = kvs[0].new_empty(len(kvs), 0, kvs[0].shape[1], head_dim)
    result = drop_slots(counts[rows, slots], positions[rows, slots], hess[rows, slots],
                        dropped, no_rows)
    store_round(kvs, slots, layers, counts, positions, hess, mass, result, compact)


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
    observed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention with ``log(count)`` per slot for a batch of requests (reference).

    Args:
        query: ``[T, Hq, D]``; request ``r``'s rows are
            ``query[query_start_loc[r]:query_start_loc[r + 1]]``.
        kv: ``[S, Hkv, 2D]`` slot-major cache of one layer (this step's KV already in it).
        counts: ``[S]`` float32 token counts per slot, or None for all ones.
        block_table: ``[R, max_blocks]`` int block ids per request.
        seq_lens: ``[R]`` physical slots per request, this step's tokens included.
        query_start_loc: ``[R + 1]`` row offsets of the requests.
        scale: logit scale.
        block_size: slots per block.
        mass: optional ``[S, Hkv]`` float32, accumulated in place with each slot's
            probability summed over the rows that see it and averaged over the query
            heads of its KV head.
        observed: optional ``[R]`` bool: only these requests' rows add to ``mass`` (None:
            every request's); the others' attention is the same.

    Row ``i`` of a request with ``T_r`` rows and ``L_r`` slots sees its first
    ``L_r - T_r + i + 1`` slots (causal in physical order). Requests without rows or
    slots are skipped; their output rows are zero.

    Returns:
        ``[T, Hq, D]`` in the query dtype.
    """
    head_dim = query.shape[-1]
    out = torch.zeros_like(query)
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    observing = [mass is not None] * len(lengths)
    if mass is not None and observed is not None:
        observing = [bool(o) for o in observed.tolist()]
    for r, length in enumerate(lengths):
        q0, q1 = starts[r], starts[r + 1]
        if q1 <= q0 or length <= 0:
            continue
        num_blocks = -(-length // block_size)
        slots = slot_ids(block_table[r, :num_blocks].tolist(), length, block_size,
                         kv.device)
        rows = kv.index_select(0, slots)
        visible = torch.arange(length - (q1 - q0) + 1, length + 1, device=kv.device)
        result = merged_attention(
            query[q0:q1], rows[..., :head_dim], rows[..., head_dim:],
            None if counts is None else counts.index_select(0, slots),
            scale=scale, visible=visible, return_mass=observing[r],
        )
        if not observing[r]:
            out[q0:q1] = result
        else:
            out[q0:q1], slot_mass = result
            mass.index_add_(0, slots, slot_mass.to(mass.dtype))
    return out
