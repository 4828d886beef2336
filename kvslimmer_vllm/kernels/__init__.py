"""Kernel dispatch: the fastest implementation of each contract for the device.

| contract (reference in ``core``)  | CUDA                           | CPU                         |
|-----------------------------------|--------------------------------|-----------------------------|
| ``core.paged.paged_attention``    | Triton ``paged_attention.py``  | C++ op ``kvslimmer._C`` (*) |
| ``core.select.select_pairs``      | C++ op (host)                  | C++ op                      |
| ``core.select.select_pairs_rows`` | C++ op (host)                  | C++ op                      |
| ``core.merge.keep_set``           | C++ op (host)                  | C++ op                      |
| ``core.paged.slot_scores``        | reference                      | C++ op                      |
| ``core.stats.value_spread``       | Triton ``round.py``            | C++ op                      |
| ``core.merge.merge_pairs``        | Triton ``round.py``            | C++ op                      |
| ``core.paged.compact_rows``       | Triton ``round.py`` (**)       | C++ op                      |
| ``core.paged.gather_rows``        | Triton ``round.py``            | reference (index_select)    |
| ``core.paged.write_tokens``       | Triton ``round.py``            | C++ op                      |
| ``core.merge.merge_rounds``       | ``lockstep.py`` with protected | the same (gathered rounds)  |
|                                   | slots (****), else reference   |                             |
| ``core.paged.paged_merge_round``  | reference                      | C++ ops (***)               |
| ``core.paged.paged_drop``         | reference, Triton staged       | C++ ``compact_rows`` (***)  |
|                                   | ``compact_rows`` (**)          |                             |

(*) The C++ op holds AVX-512, AVX2 and portable versions and picks the best the CPU runs at
run time (:func:`cpu_isa`; ``KVSLIMMER_CPU_ISA=avx512|avx2|portable`` pins one).
(**) Programs read the surviving rows from the round's gathered copy when the caller passes
it (a gathered round), else from a copy of just the rows that move (an eviction, which
gathers nothing), so moving rows inside a cache cannot race.
(***) ``round_stats`` + ``round_apply``: a whole pairwise round read from and written into
the paged caches in place (no gathered copy), pairs chosen by ``select_pairs`` in between;
an eviction chosen from the slots' state alone and compacted where the slots live;
:func:`paged_round_backend_name` says whether a cache runs them.
(****) Every layer's protected sub-rounds in lock step, each layer at its own size: one
host round trip per sub-round instead of one per layer and sub-round (PyTorch ops plus the
round kernels above).

When a kernel is unavailable (the C++ extension did not build, Triton is missing) the
``core`` reference runs instead and a notice is logged once. ``KVSLIMMER_KERNELS=reference``
forces the reference everywhere (for debugging and for measuring the kernels).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from kvslimmer_vllm.core import merge as _merge_ref
from kvslimmer_vllm.core import paged as _paged_ref
from kvslimmer_vllm.core import select as _select_ref
from kvslimmer_vllm.core import stats as _stats_ref
from kvslimmer_vllm.kernels import lockstep as _lockstep

logger = logging.getLogger("vllm.kvslimmer.kernels")
ENV = "KVSLIMMER_KERNELS"
CPU_ISA_ENV = "KVSLIMMER_CPU_ISA"
CPU_ISAS = ("avx512", "avx2", "portable")

__all__ = ["attention_backend_name", "check_cpu_isa_setting", "compact_rows", "cpu_isa",
           "gather_rows", "keep_set", "merge_pairs", "merge_rounds", "paged_attention",
           "paged_drop", "paged_merge_round", "paged_round_backend_name", "paged_slot_scores",
           "round_backend_name", "select_pairs", "select_pairs_rows", "shift_table",
           "value_spread", "write_tokens"]

#: Cache dtypes the Triton round kernels take.
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _forced_reference() -> bool:
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in ("auto", "reference"):
        raise ValueError(f"{ENV} must be 'auto' or 'reference', got {value!r}")
    return value == "reference"


@functools.cache
def _cpp_ops():
    """``torch.ops.kvslimmer`` if the C++ extension is importable, else None."""
    try:
        import kvslimmer_vllm._C  # noqa: F401  (registers torch.ops.kvslimmer.*)
    except ImportError as exc:
        logger.warning("kvslimmer-vllm: C++ kernels unavailable (%s); using the PyTorch "
                       "reference on CPU", exc)
        return None
    ops = torch.ops.kvslimmer
    logger.info("kvslimmer-vllm: CPU paged attention runs the C++ %s kernels (this CPU runs: %s)",
                ops.cpu_isa(), ", ".join(ops.cpu_isas()))
    return ops


@functools.cache
def _triton_module(name: str):
    """``kvslimmer_vllm.triton_kernels.<name>``, or None (logged once) when it cannot be
    imported: the PyTorch reference then runs on GPU."""
    try:
        return importlib.import_module(f"kvslimmer_vllm.triton_kernels.{name}")
    except Exception as exc:  # noqa: BLE001 - any import failure means "no Triton"
        logger.warning("kvslimmer-vllm: Triton kernels (%s) unavailable (%s); using the "
                       "PyTorch reference on GPU", name, exc)
        return None


def _cpu_ops(tensor: torch.Tensor):
    """``torch.ops.kvslimmer`` for a CPU ``tensor`` when the extension is built and the
    reference is not forced; else None (for ops that take any dtype)."""
    if tensor.device.type != "cpu" or _forced_reference():
        return None
    return _cpp_ops()


def _triton_attention():
    module = _triton_module("paged_attention")
    return None if module is None else module.paged_attention


def _triton_round():
    return _triton_module("round")


def round_backend_name(tensor: torch.Tensor) -> str:
    """Which implementation the round kernels (:func:`value_spread`, :func:`merge_pairs`,
    :func:`compact_rows`, :func:`gather_rows`) use for ``tensor``'s device and dtype:
    ``triton`` (CUDA, 16/32-bit floats), ``cpp`` (CPU, float32/float64) or ``reference``."""
    if _forced_reference():
        return "reference"
    if tensor.device.type == "cuda":
        ok = tensor.dtype in _TRITON_DTYPES and _triton_round() is not None
        return "triton" if ok else "reference"
    ok = tensor.dtype in (torch.float32, torch.float64) and _cpp_ops() is not None
    return "cpp" if ok else "reference"


def attention_backend_name(device: torch.device) -> str:
    """Which implementation :func:`paged_attention` uses on ``device``."""
    if _forced_reference():
        return "reference"
    if device.type == "cuda":
        return "triton" if _triton_attention() is not None else "reference"
    return "cpp" if _cpp_ops() is not None else "reference"


def check_cpu_isa_setting() -> None:
    """Raise ValueError, naming ``KVSLIMMER_CPU_ISA``, when it asks for an instruction set that
    is unknown or that this CPU (or this build) cannot run. Engines call it at start-up, so a
    bad value stops them before the first attention call would."""
    value = os.environ.get(CPU_ISA_ENV, "")
    if value in ("", "auto"):
        return
    if value not in CPU_ISAS:
        raise ValueError(f"{CPU_ISA_ENV} must be one of auto, {', '.join(CPU_ISAS)}; "
                         f"got {value!r}")
    try:
        import kvslimmer_vllm._C  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"{CPU_ISA_ENV}={value} needs the C++ extension, which is not "
                         f"importable ({exc})") from exc
    here = torch.ops.kvslimmer.cpu_isas()
    if value not in here:
        raise ValueError(f"{CPU_ISA_ENV}={value}: this CPU cannot run it (it runs: "
                         f"{', '.join(here)})")


def cpu_isa() -> str | None:
    """The instruction set of the C++ CPU attention (``avx512``, ``avx2``, ``portable``), or
    None when the CPU runs the PyTorch reference."""
    if attention_backend_name(torch.device("cpu")) != "cpp":
        return None
    return _cpp_ops().cpu_isa()


def paged_attention(query, kv, counts, block_table, seq_lens, query_start_loc,
                    scale: float, block_size: int, mass=None, observed=None):
    """:func:`kvslimmer_vllm.core.paged.paged_attention`, on the device's kernel. With
    ``observed`` (``[R]`` bool) only those requests add to ``mass`` (a caller whose batch
    observes none passes no mass: nothing here reads the flags back to the host)."""
    if mass is None:
        observed = None
    if observed is not None and (observed.shape != seq_lens.shape
                                 or observed.dtype != torch.bool):
        raise ValueError(f"observed must be bool [{len(seq_lens)}] (one per request), "
                         f"got {observed.dtype} {tuple(observed.shape)}")
    name = attention_backend_name(query.device)
    args = (query, kv, counts, block_table, seq_lens, query_start_loc, scale, block_size)
    if name == "triton":
        return _triton_attention()(*args, mass, observed=observed)
    if name == "cpp":
        return _cpp_ops().paged_attention(*args, mass, observed)
    return _paged_ref.paged_attention(*args, mass, observed)


def write_tokens(kv, key, value, slots, positions, counts=None, slot_positions=None,
                 hess=None, mass=None) -> None:
    """:func:`kvslimmer_vllm.core.paged.write_tokens`: one pass per layer and step, with no
    host synchronisation (the C++ op on CPU, Triton on CUDA, for keys and values in the
    cache's dtype; the reference elsewhere)."""
    args = (kv, key, value, slots, positions, counts, slot_positions, hess, mass)
    backend = round_backend_name(kv)
    same = key.dtype == kv.dtype and value.dtype == kv.dtype
    if backend == "triton" and same:
        _triton_round().write_tokens(*args)
    elif same and _cpu_ops(kv) is not None:
        _cpu_ops(kv).write_tokens(*args)  # any cache dtype (rows are copied as bytes)
    else:
        _paged_ref.write_tokens(*args)


def gather_rows(kvs: list[torch.Tensor], slots: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """:func:`kvslimmer_vllm.core.paged.gather_rows` (one Triton launch on CUDA; the
    reference, an ``index_select`` per layer, elsewhere)."""
    if round_backend_name(out) == "triton":
        return _triton_round().gather_rows(kvs, slots, out)
    return _paged_ref.gather_rows(kvs, slots, out)


def value_spread(values: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """:func:`kvslimmer_vllm.core.stats.value_spread` (the C++ op for float32/float64 CPU
    tensors, Triton for float32 ``alpha`` on CUDA; the reference elsewhere)."""
    backend = round_backend_name(values)
    if backend == "triton" and alpha.dtype == torch.float32:
        if values.dim() == 3:
            return _triton_round().value_spread(values[None], alpha[None])[0]
        return _triton_round().value_spread(values, alpha)
    if backend != "cpp" or values.dtype != alpha.dtype:
        return _stats_ref.value_spread(values, alpha)
    ops = _cpp_ops()
    if values.dim() == 3:
        return ops.value_spread(values.unsqueeze(0), alpha.unsqueeze(0)).squeeze(0)
    return ops.value_spread(values, alpha)


def select_pairs(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`kvslimmer_vllm.core.select.select_pairs` (the C++ op when built)."""
    ops = None if _forced_reference() else _cpp_ops()
    if ops is None:
        return _select_ref.select_pairs(scores, k)
    return ops.select_pairs(scores.detach().to("cpu", torch.float64), k).to(scores.device)


def select_pairs_rows(scores: torch.Tensor, lengths, ks) -> torch.Tensor:
    """:func:`kvslimmer_vllm.core.select.select_pairs_rows` (the C++ op when built: rows in
    parallel)."""
    ops = None if _forced_reference() else _cpp_ops()
    if ops is None:
        return _select_ref.select_pairs_rows(scores, lengths, ks)
    return ops.select_pairs_rows(scores.detach().to("cpu", torch.float64),
                                 torch.as_tensor(lengths), torch.as_tensor(ks)).to(scores.device)


def keep_set(scores: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`kvslimmer_vllm.core.merge.keep_set` (the C++ op when built: one sort and one
    pass per layer instead of a binary search over torch ops)."""
    ops = None if _forced_reference() else _cpp_ops()
    if ops is None:
        return _merge_ref.keep_set(scores, k)
    return ops.keep_set(scores, k)


def merge_rounds(keys, values, counts, positions, hess, mass, *, protect=None,
                 selector=select_pairs, row_selector=select_pairs_rows, **kwargs):
    """:func:`kvslimmer_vllm.core.merge.merge_rounds` for gathered slots (any device). With
    ``protect`` every layer's sub-rounds run in lock step (:mod:`.lockstep`: one host round
    trip per sub-round for all layers, the pairs chosen by ``row_selector``) instead of one
    layer after another (the reference, with ``selector``, when forced)."""
    args = (keys, values, counts, positions, hess, mass)
    if protect is None or _forced_reference():
        return _merge_ref.merge_rounds(*args, protect=protect, selector=selector, **kwargs)
    return _lockstep.protected_rounds(*args, protect, row_selector=row_selector,
                                      schedule_ops=_cpp_ops(), **kwargs)


def shift_table(rotary, delta: torch.Tensor, dtype: torch.dtype):
    """``(cos_sin, shift, rotary_dim, is_neox)`` for the merge_pairs kernels: rows
    ``|shift|`` of ``cos_sin`` rotate by ``shift`` (the kernels normalise and mirror them).
    vLLM's own cos_sin_cache when it is on the keys' device in ``dtype``; else this round's
    rows, built once (already normalised and signed, with ``shift`` = their row numbers)."""
    if rotary is None:
        return None, None, 0, True
    table = rotary.cos_sin_cache
    if table is None or table.dtype != dtype or table.device != delta.device:
        cos, sin = rotary.shift_cos_sin(delta.flatten())
        table = torch.cat((cos, sin), dim=-1).to(delta.device, dtype)
        delta = torch.arange(table.shape[0], device=delta.device).view_as(delta)
    return table, delta, rotary.rotary_dim, rotary.is_neox


def merge_pairs(keys, values, left, a, c_i, c_j, rotary=None, delta=None):
    """:func:`kvslimmer_vllm.core.merge.merge_pairs` (the C++ op for float32/float64 CPU
    tensors of one dtype, Triton on CUDA for float32 weights; the reference elsewhere)."""
    backend = round_backend_name(keys)
    if backend == "triton" and a.dtype == torch.float32 and values.dtype == keys.dtype:
        return _triton_round().merge_pairs(keys, values, left, a, c_i, c_j,
                                           *shift_table(rotary, delta, torch.float32))
    dtype = keys.dtype
    if backend != "cpp" or any(t.dtype != dtype for t in (values, a, c_i, c_j)):
        return _merge_ref.merge_pairs(keys, values, left, a, c_i, c_j, rotary, delta)
    return _cpp_ops().merge_pairs(keys, values, left, a, c_i, c_j,
                                  *shift_table(rotary, delta, dtype))


def compact_rows(kvs, slots, source, start, merged_slots, merged_keys, merged_values,
                 rows=None) -> None:
    """:func:`kvslimmer_vllm.core.paged.compact_rows` (the C++ op for CPU caches; Triton on
    CUDA, reading the surviving rows from ``rows``, the round's ``[L, N, Hkv, 2D]``
    gathered copy of the slots, when given, else from a staged copy of the rows it moves;
    the reference elsewhere)."""
    args = (kvs, slots, source, start, merged_slots, merged_keys, merged_values)
    if round_backend_name(kvs[0]) == "triton":
        _triton_round().compact_rows(*args, rows)
    elif _cpu_ops(kvs[0]) is not None:  # any cache dtype
        _cpu_ops(kvs[0]).compact_rows(*args)
    else:
        _paged_ref.compact_rows(*args)


def paged_round_backend_name(kv: torch.Tensor) -> str:
    """Which kernels :func:`paged_merge_round` and :func:`paged_drop` use for caches like
    ``kv``: ``cpp`` (float32/float64 CPU caches with the C++ extension: both in place),
    ``triton`` (CUDA caches: an eviction compacted by the Triton :func:`compact_rows`
    from a staged copy of the rows it moves; a merge round is gathered) or
    ``reference``."""
    name = round_backend_name(kv)
    return "reference" if name == "cpp" and kv.device.type != "cpu" else name


def paged_drop(kvs, slots, layers, counts, positions, hess, mass, dropped) -> None:
    """:func:`kvslimmer_vllm.core.paged.paged_drop` with :func:`compact_rows` (on CPU the
    C++ op moves each surviving row once, in place; on CUDA the Triton kernels copy the
    rows that move, then write them: two launches for all layers)."""
    _paged_ref.paged_drop(kvs, slots, layers, counts, positions, hess, mass, dropped,
                          compact_rows)


def paged_slot_scores(slots, layers, mass, *, sink: int, recent: int, pool: int = 1
                      ) -> torch.Tensor:
    """:func:`kvslimmer_vllm.core.paged.slot_scores` (the C++ op for a float32 CPU mass
    state: read through the slot ids, nothing gathered)."""
    if mass.dtype == torch.float32 and _cpu_ops(mass) is not None:
        return _cpu_ops(mass).slot_scores(slots, layers, mass, sink, recent, pool)
    return _paged_ref.slot_scores(slots, layers, mass, sink=sink, recent=recent, pool=pool)


def paged_merge_round(kvs, slots, layers, counts, positions, hess, mass, *, sink: int,
                      recent: int, k: int, round_idx: int, gamma: float, eps: float,
                      rotary=None, key_weights: str = "hessian", pool: int = 1,
                      max_fraction: float = 0.5, protect=None, score_reduce=None) -> None:
    """:func:`kvslimmer_vllm.core.paged.paged_merge_round` (the C++ ops on CPU: per
    sub-round, the statistics, the scores reduced by ``score_reduce``, the pairs chosen by
    :func:`select_pairs`, the merge and compaction, the observation mass carried between
    sub-rounds and reset after the last; the reference elsewhere). With ``protect``
    (``[L, N]`` bool: slots no pair may touch) each layer runs its own sub-rounds, sized
    as :func:`kvslimmer_vllm.core.merge.merge_rounds` sizes them for its mask: all of them
    in the one C++ op ``protected_round`` (layers in parallel), or, with ``score_reduce``
    (whose reduction must run between a sub-round's statistics and its choice), every
    layer's sub-round ``s`` at once from here, one reduction each (:func:`_paged_lockstep`)."""
    if key_weights not in ("hessian", "count"):
        raise ValueError(f"key_weights must be 'hessian' or 'count', got {key_weights!r}")
    if paged_round_backend_name(kvs[0]) != "cpp":
        _paged_ref.paged_merge_round(
            kvs, slots, layers, counts, positions, hess, mass, sink=sink, recent=recent, k=k,
            round_idx=round_idx, gamma=gamma, eps=eps, rotary=rotary, key_weights=key_weights,
            pool=pool, max_fraction=max_fraction, protect=protect, score_reduce=score_reduce,
            selector=select_pairs)
        return
    if protect is not None and score_reduce is None:
        # Every layer's sub-rounds in one op, layers in parallel (it checks k and
        # max_fraction against each layer's mask before it writes anything).
        table, rotary_dim, is_neox = _shift_rows(rotary, kvs[0].dtype, positions, layers,
                                                 slots)
        _cpp_ops().protected_round(
            kvs, slots, layers, counts, positions, hess, mass,
            protect.to(torch.bool).contiguous(), k, max_fraction, sink, recent, round_idx,
            gamma, eps, pool, key_weights == "hessian", table, rotary_dim, is_neox)
        return
    table, rotary_dim, is_neox = _shift_rows(rotary, kvs[0].dtype, positions, layers, slots)
    common = dict(slots=slots, counts=counts, positions=positions, hess=hess, mass=mass,
                  sink=sink, recent=recent, round_idx=round_idx, gamma=gamma, eps=eps,
                  pool=pool, hessian_weights=key_weights == "hessian", table=table,
                  rotary_dim=rotary_dim, is_neox=is_neox, score_reduce=score_reduce)
    if protect is None:
        sizes = _merge_ref.subround_sizes(len(slots) - sink - recent, k, max_fraction)
        _paged_subrounds(kvs, layers, sizes, **common)
        return
    _merge_ref.check_protected(protect[:, sink:len(slots) - recent], k, max_fraction)
    _paged_lockstep(kvs, layers, protect, k=k, max_fraction=max_fraction, **common)


def _paged_lockstep(kvs, layers, protect, *, k: int, max_fraction: float, slots, counts,
                    positions, hess, mass, sink: int, recent: int, round_idx: int,
                    gamma: float, eps: float, pool: int, hessian_weights: bool, table,
                    rotary_dim: int, is_neox: bool, score_reduce) -> None:
    """Protected sub-rounds in place with a score reduction between each sub-round's
    statistics and its choice: every layer's sub-round ``s`` at once, each at its own size
    (the C++ ops with ``held``: a layer's first ``held[l]`` slots), so one reduction per
    sub-round serves all layers. The layers with nothing left to free sit out; with ``k``
    0 every layer runs one sub-round of no pairs (the statistics still update). Every rank
    sees the same reduced scores, so all take the same steps."""
    ops = _cpp_ops()
    schedule = _lockstep.ProtectedSchedule(protect, sink, recent, k, ops)
    first = True
    while first or bool(schedule.remaining.any()):
        steps = schedule.steps(max_fraction)
        rows = torch.arange(len(kvs)) if first and k == 0 else steps.nonzero().flatten()
        first = False
        part = [kvs[i] for i in rows.tolist()]
        held = schedule.held[rows]
        alpha, h, scores = ops.round_stats(part, slots, layers[rows], hess, mass, sink, recent,
                                           round_idx, gamma, pool, held)
        if score_reduce is not None:
            scores = score_reduce(scores)
        left = select_pairs_rows(schedule.guard(scores.to(torch.float64), rows),
                                 schedule.lengths(rows), steps[rows])
        ops.round_apply(part, slots, layers[rows], counts, positions, hess, mass, left, alpha,
                        h, sink, recent, eps, hessian_weights, table, rotary_dim, is_neox,
                        True, held)
        schedule.merged(rows, left)
    mass[layers[:, None], slots] = 0.0


def _paged_subrounds(kvs, layers, sizes: list[int], *, slots, counts, positions, hess, mass,
                     sink, recent, round_idx, gamma, eps, pool, hessian_weights, table,
                     rotary_dim, is_neox, score_reduce) -> None:
    """The C++ in-place sub-rounds over ``kvs``, every layer freeing ``sizes[s]`` slots in
    sub-round ``s``; with several, the mass is carried between them and reset after the
    last (else round_apply resets it)."""
    ops = _cpp_ops()
    held, carry = len(slots), len(sizes) > 1
    for step in sizes:
        now = slots[:held]
        alpha, h, scores = ops.round_stats(kvs, now, layers, hess, mass, sink, recent,
                                           round_idx, gamma, pool)
        if score_reduce is not None:
            scores = score_reduce(scores)
        left = ops.select_pairs(scores.to(torch.float64), step)
        ops.round_apply(kvs, now, layers, counts, positions, hess, mass, left, alpha, h, sink,
                        recent, eps, hessian_weights, table, rotary_dim, is_neox, carry)
        held -= step
    if carry:
        mass[layers[:, None], slots] = 0.0


def _shift_rows(rotary, dtype: torch.dtype, positions, layers, slots):
    """``(cos_sin, rotary_dim, is_neox)`` for ``round_apply``: a table whose row ``r`` holds
    the angles of a shift by ``r`` positions (normalised there). vLLM's cos_sin_cache when it
    is in ``dtype``; else rows up to the request's last position, built for this round."""
    if rotary is None:
        return None, 0, True
    table = rotary.cos_sin_cache
    if table is None or table.dtype != dtype or table.device.type != "cpu":
        last = int(positions[layers[:, None], slots].max()) if len(slots) else 0
        cos, sin = rotary.shift_cos_sin(torch.arange(last + 1))
        table = torch.cat((cos, sin), dim=-1).to("cpu", dtype)
    return table, rotary.rotary_dim, rotary.is_neox
