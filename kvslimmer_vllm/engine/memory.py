"""What a merge round may allocate, known before anything is allocated.

The worker reserves it out of the KV budget before vLLM sizes the KV cache
(:func:`round_reserve_bytes`, :func:`blocks_within`), and :func:`~.slots.apply_round`
batches a request's layers so that no round takes more. Plain integer arithmetic on
shapes and dtypes: nothing here imports vLLM or pydantic (``scripts/device_check.py``
checks these bounds against CUDA's allocator on a machine without either).
"""

from __future__ import annotations

import torch

#: Most elements (of the cache dtype) one batched round may allocate at once; longer
#: requests run their layers in several batches (256 MiB of float32).
MAX_BATCH_ELEMENTS = 1 << 26
#: The same on CPU (64 MiB of float32). The cases of ``benchmarks/merge_round.py`` timed
#: through apply_round with caps of 4M and 16M elements, interleaved (2-core AVX-512 machine,
#: with the C++ merge_pairs / compact_rows / value_spread ops): 16M was 5-16% faster in all
#: but one case (a progressive round of 3,104 slots: equal within noise). Before those ops
#: a round made a dozen torch passes over its batch and 4M was best.
CPU_BATCH_ELEMENTS = 1 << 24
#: Batching layers beyond one may take at most this share of the KV cache budget: a small
#: cache rounds one layer at a time rather than give a quarter of itself to rounds.
SCRATCH_SHARE = 1 / 8

#: Every round's peak tensor allocation per slot and layer for its statistics: bytes per
#: KV head (the slots' gathered mass, pooled float64 scores, alpha and Hessian proxies)
#: plus bytes per slot (index tensors, counts, positions, masks). In-place rounds of every
#: method, measured with torch's memory profiler: at most 55 B per slot and layer with one
#: KV head, 215 B with eight (tests/engine/test_memory.py).
STATS_BYTES_PER_HEAD, STATS_BYTES_PER_SLOT = 32, 64
#: The C++ round ops' own buffers per slot and layer, which the profiler does not see
#: (every layer may run at once): select_pairs' copy of the scores, run bookkeeping and
#: heap (~130 B), round_stats' row pointers, spreads and pooled scores (~20 B).
CPP_BUFFER_BYTES_PER_SLOT = 160
#: A gathered round's peak allocation beyond its statistics, in copies of the rows it
#: gathers: the gathered copy (the state's scratch), then, for a step of sub-rounds, the
#: composed copy of what each sub-round leaves and the merged rows (measured with torch's
#: memory profiler, CPU, torch and C++ ops: at most 3.1 copies plus the statistics, a
#: prompt-end step of 10% sub-rounds; tests/engine/test_memory.py). The Triton kernels on
#: CUDA take and return tensors of the same shapes.
GATHERED_FOOTPRINT = 4
#: An eviction on CUDA caches compacts in place, staging the rows it moves in one copy
#: (the Triton ``compact_rows`` without a gathered copy): at most one copy of the rows.
STAGED_FOOTPRINT = 1
#: Row copies per path a round may take (:meth:`MergeMethod.round_path`).
ROW_COPIES = {"in place": 0, "staged": STAGED_FOOTPRINT, "gathered": GATHERED_FOOTPRINT}


def costliest_path(paths) -> str:
    """Of round paths (``ROW_COPIES``' keys), the one whose rounds copy the most rows:
    what the worker reserves when requests may choose among methods."""
    return max(paths, key=ROW_COPIES.__getitem__)


def batch_limit(device: torch.device) -> int:
    """The largest batch cap for rounds on ``device``."""
    return CPU_BATCH_ELEMENTS if torch.device(device).type == "cpu" else MAX_BATCH_ELEMENTS


def batch_elements_within(budget: int, dtype: torch.dtype,
                          limit: int | None = None) -> int:
    """The batch cap (``limit`` at most, default :data:`MAX_BATCH_ELEMENTS`) for a KV
    budget of ``budget`` bytes: :data:`SCRATCH_SHARE` of it, in elements of ``dtype``."""
    limit = MAX_BATCH_ELEMENTS if limit is None else limit
    return max(1, min(limit, int(budget * SCRATCH_SHARE) // dtype.itemsize))


def footprint_per_slot(num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                       path: str) -> int:
    """Elements of ``dtype`` (rounded up) a round taking ``path`` (``"in place"``,
    ``"staged"`` or ``"gathered"``) allocates at its peak per slot and layer: its
    statistics (:data:`STATS_BYTES_PER_HEAD`, :data:`STATS_BYTES_PER_SLOT`,
    :data:`CPP_BUFFER_BYTES_PER_SLOT`) and :data:`ROW_COPIES` copies of the slot's
    ``Hkv * 2D`` row."""
    if path not in ROW_COPIES:
        raise ValueError(f"path must be one of {sorted(ROW_COPIES)}, got {path!r}")
    nbytes = (STATS_BYTES_PER_HEAD * num_kv_heads + STATS_BYTES_PER_SLOT
              + CPP_BUFFER_BYTES_PER_SLOT
              + ROW_COPIES[path] * num_kv_heads * 2 * head_dim * dtype.itemsize)
    return -(-nbytes // dtype.itemsize)


def layers_per_batch(slot_elements: int, max_batch: int | None = None) -> int:
    """Layers one batched round takes at once when each layer's footprint is
    ``slot_elements`` elements (at least one, however long the request), with at most
    ``max_batch`` elements (default :data:`MAX_BATCH_ELEMENTS`) per batch."""
    cap = MAX_BATCH_ELEMENTS if max_batch is None else max_batch
    return max(1, cap // max(slot_elements, 1))


def round_elements(num_layers: int, max_slots: int, per_slot: int,
                   max_batch: int | None = None) -> int:
    """Most elements a round over at most ``max_slots`` slots of ``num_layers`` layers
    allocates, ``per_slot`` elements per slot and layer (:func:`footprint_per_slot`):
    ``min(L * N * p, max(B, N * p))`` with ``B = max_batch`` (default
    :data:`MAX_BATCH_ELEMENTS`), an upper bound of ``layers_per_batch(n * p, B) * n * p``
    over every ``n <= N`` (one layer alone may exceed ``B``)."""
    cap = MAX_BATCH_ELEMENTS if max_batch is None else max_batch
    per_layer = max_slots * per_slot
    return min(num_layers * per_layer, max(cap, per_layer))


def round_reserve_bytes(num_layers: int, max_slots: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype, path: str,
                        max_batch: int | None = None) -> int:
    """Worst-case bytes a round taking ``path`` allocates with a KV cache of ``dtype``
    (in place, staged, or gathered into :meth:`SlotState.scratch`): what the worker
    reserves."""
    per_slot = footprint_per_slot(num_kv_heads, head_dim, dtype, path)
    return round_elements(num_layers, max_slots, per_slot, max_batch) * dtype.itemsize


def blocks_within(budget: int, kv_bytes_per_block: int, state_bytes_per_block: int,
                  scratch: int) -> int:
    """Most KV blocks such that their KV, their slots' state and the scratch together
    take at most ``budget`` bytes (0 when not even the scratch fits)."""
    if budget <= scratch:
        return 0
    return (budget - scratch) // (kv_bytes_per_block + state_bytes_per_block)
