"""Memory the merging engine accounts for: its per-slot state and the worst case of a
merge round (engine.memory) come out of the KV budget before vLLM sizes the KV cache
(worker.KVMergeWorker.determine_available_memory), so KV cache + state + rounds fit in
what vLLM would have given the KV cache alone.

The byte functions are checked against what SlotState really allocates and against each
method's rounds as torch's memory profiler sees them; the engine test runs conftest's
tiny random-weight Llama (2 layers, 4 KV heads of 32 dims, float32) with and without
merging at the same explicit KV budget (``kv_cache_memory_bytes``: no memory probing, so
the block counts are exact).
"""

from __future__ import annotations

import pytest
import torch

from kvslimmer_vllm.core.config import KVMergeConfig
from kvslimmer_vllm.engine import memory as memory_module
from kvslimmer_vllm.engine.plan import MergeRound
from kvslimmer_vllm import kernels
from kvslimmer_vllm.engine.plugin import engine_kwargs
from kvslimmer_vllm.core.rope import RotarySpec, build_cos_sin_cache, default_inv_freq
from kvslimmer_vllm.engine.memory import (
    GATHERED_FOOTPRINT,
    batch_elements_within,
    batch_limit,
    blocks_within,
    footprint_per_slot,
    layers_per_batch,
    round_elements,
    round_reserve_bytes,
)
from kvslimmer_vllm.engine.slots import LayerCache, SlotState, apply_round, state_bytes_per_slot
from kvslimmer_vllm.methods import get_method
from helpers import offline_llm, peak_allocated_bytes, random_tokens, triton_kernel_modules

#: Whether this machine's CPU rounds run in place (the C++ extension is built).
IN_PLACE = kernels.paged_round_backend_name(torch.zeros(1)) == "cpp"


@pytest.mark.parametrize("layers, slots, heads", [(1, 1, 1), (2, 384, 4), (30, 1000, 3)])
def test_state_bytes_equal_what_slot_state_allocates(layers, slots, heads):
    """Catches: a SlotState tensor added, dropped or retyped without the reservation
    (state_bytes_per_slot) following, i.e. state the KV budget does not account for."""
    state = SlotState(layers, slots, heads, torch.device("cpu"))
    assert state.nbytes == layers * slots * state_bytes_per_slot(heads)
    assert state_bytes_per_slot(heads) == 4 + 8 + 2 * 4 * heads


@pytest.mark.parametrize("max_batch", [1 << 12, 1 << 16, 1 << 26])
@pytest.mark.parametrize("layers", [1, 3, 30])
@pytest.mark.parametrize("path", ["in place", "staged", "gathered"])
def test_round_bound_covers_every_round_length(layers, max_batch, path, monkeypatch):
    """round_elements is the most any round over up to N slots takes: the bound holds
    for every n <= N, and is reached (a real reservation, not a guess) when all layers fit
    one batch or one layer alone exceeds the cap. Catches: the batching of apply_round
    changing without the reservation following."""
    monkeypatch.setattr(memory_module, "MAX_BATCH_ELEMENTS", max_batch)
    per_slot = footprint_per_slot(2, 8, torch.float32, path)
    for max_slots in (1, 7, 100, 300, 5000):
        bound = round_elements(layers, max_slots, per_slot)
        taken = [min(layers, layers_per_batch(n * per_slot)) * n * per_slot
                 for n in range(1, max_slots + 1)]
        assert max(taken) <= bound
        whole = max_slots * per_slot
        if layers * whole <= max_batch or whole >= max_batch:
            assert max(taken) == bound
    assert round_reserve_bytes(2, 10, 2, 8, torch.bfloat16, "gathered") \
        == 2 * round_elements(2, 10, footprint_per_slot(2, 8, torch.bfloat16, "gathered"))
    # Gathered / staged: GATHERED_FOOTPRINT / STAGED_FOOTPRINT copies of the row beside what
    # an in-place round takes.
    in_place = footprint_per_slot(2, 8, torch.float32, "in place")
    assert footprint_per_slot(2, 8, torch.float32, "gathered") \
        == memory_module.GATHERED_FOOTPRINT * 2 * 2 * 8 + in_place
    assert footprint_per_slot(2, 8, torch.float32, "staged") == 2 * 2 * 8 + in_place
    assert memory_module.costliest_path(["in place", "staged"]) == "staged"
    assert memory_module.costliest_path(["staged", "gathered", "in place"]) == "gathered"
    with pytest.raises(ValueError, match="path must be one of"):
        footprint_per_slot(2, 8, torch.float32, "in-place")


def _round_request(layers, heads, n, seed=0):
    dim, block = 16, 16
    blocks = -(-n // block) + 2
    g = torch.Generator().manual_seed(seed)
    state = SlotState(layers, blocks * block, heads, torch.device("cpu"))
    state.mass.copy_(torch.rand(state.mass.shape, generator=g))
    state.positions.copy_(torch.arange(blocks * block).repeat(layers, 1))
    rotary = RotarySpec(dim, True,
                        cos_sin_cache=build_cos_sin_cache(default_inv_freq(dim, 1e4), 1024))
    kvs = [torch.randn(blocks * block, heads, 2 * dim, generator=g) for _ in range(layers)]
    perm = torch.randperm(blocks, generator=g)[: -(-n // block)]
    return state, [LayerCache(i, kv, rotary) for i, kv in enumerate(kvs)], tuple(perm.tolist())


#: (method, observe-like settings): a progressive round, a prompt-end step of sub-rounds.
ROUNDS = [("kvslimmer", 0.25, 0.5, 1), ("kvslimmer", 0.75, 0.25, 7), ("average", 0.75, 0.1, 7),
          ("snapmerge", 0.75, 0.5, 7), ("evict", 0.25, 0.5, 1), ("snapkv", 0.75, 0.25, 7),
          ("streaming", 0.25, 0.5, 1)]


def _route_round_kernels_to_triton(monkeypatch):
    """The round kernels as CUDA caches run them (Triton, interpreted on CPU tensors)."""
    (interpreted,) = triton_kernel_modules("round")
    monkeypatch.setattr(kernels, "_triton_round", lambda: interpreted)
    monkeypatch.setattr(kernels, "round_backend_name", lambda tensor: "triton")


@pytest.mark.parametrize("path, heads", [("in place", 1), ("in place", 8), ("gathered", 1),
                                         ("gathered", 8), ("staged", 8)])
def test_a_rounds_peak_allocation_stays_within_its_reservation(path, heads, monkeypatch):
    """Every method's round, measured with torch's memory profiler (every tensor it
    allocates, up to the peak held at once): at most round_reserve_bytes for the path it
    takes, and at least a third of its measurable part for the method that takes most (the
    reservation is sized by the rounds, not guessed). Catches: a round allocating what the KV budget
    does not account for (on a GPU: out of memory mid-serving), e.g. a sub-round's copies
    beyond the gathered scratch. In place: no scratch at all. Staged (eviction on CUDA
    caches: the Triton compact_rows, interpreted here): no scratch, one copy of the moved
    rows. Gathered: with the torch reference ops (the C++ ones allocate less: 3.1 vs 3.3 row
    copies at most)."""
    if path == "in place" and not IN_PLACE:
        pytest.skip("C++ extension not built")
    if path == "gathered":
        monkeypatch.setenv(kernels.ENV, "reference")
    layers, n = 3, 400
    if path == "staged":  # 8 heads only: the staged copy is then the larger share
        _route_round_kernels_to_triton(monkeypatch)
        layers, n = 2, 96  # the interpreter is slow under the profiler (~6 s per round here)
    reserve = round_reserve_bytes(layers, n, heads, 16, torch.float32, path)
    peaks = {}
    for method, freed, max_fraction, pool in ROUNDS:
        if path == "gathered" and method == "snapmerge":
            continue  # its lock-step round: the test below
        state, caches, blocks = _round_request(layers, heads, n, seed=len(method))
        impl = get_method(KVMergeConfig(method=method, sink=8, recent=16))
        if path == "staged":
            # Merge rounds gather on CUDA (the gathered case); of the evictions, which all
            # compact the same way, the one moving the most rows is measured.
            staged = impl.round_path(caches[0].kv) == "staged"
            assert staged == (method in ("evict", "snapkv", "streaming"))
            if (method, freed) != ("evict", 0.25):
                continue
        if path == "gathered":
            monkeypatch.setattr(impl, "round_path", lambda kv: "gathered")
        assert impl.round_path(caches[0].kv) == path
        plan = MergeRound("r", blocks, n, int(freed * (n - 24)), round_index=2,
                          method=method, max_fraction=max_fraction, recent=16, pool=pool)
        peaks[method, freed] = peak_allocated_bytes(
            lambda: apply_round(plan, caches, state, impl, 16))
        assert (state.scratch_nbytes == 0) == (path != "gathered")
    assert max(peaks.values()) <= reserve, (peaks, reserve)
    # The part the profiler sees (the C++ ops' own buffers are counted, not measured).
    seen = reserve - layers * n * memory_module.CPP_BUFFER_BYTES_PER_SLOT
    assert max(peaks.values()) >= seen / 3, (peaks, seen)
    print(path, heads, {f"{m}/{f}": round(v / (layers * n), 1) for (m, f), v in peaks.items()},
          "bytes per slot and layer; reserved", reserve / (layers * n))


@pytest.mark.parametrize("heads", [1, 8])
def test_snapmerge_gathered_lock_step_stays_within_its_reservation(heads, monkeypatch):
    """SnapMerge's gathered round as CUDA runs it (every layer's protected sub-rounds in lock
    step, kernels.lockstep): its peak allocation, measured as above, stays within the
    gathered reservation, a prompt-end step of quarter-size sub-rounds."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    layers, n = 3, 400
    reserve = round_reserve_bytes(layers, n, heads, 16, torch.float32, "gathered")
    state, caches, blocks = _round_request(layers, heads, n, seed=9)
    impl = get_method(KVMergeConfig(method="snapmerge", sink=8, recent=16))
    monkeypatch.setattr(impl, "round_path", lambda kv: "gathered")
    plan = MergeRound("r", blocks, n, int(0.75 * (n - 24)), round_index=1,
                      method="snapmerge", max_fraction=0.25, recent=16, pool=7)
    peak = peak_allocated_bytes(lambda: apply_round(plan, caches, state, impl, 16))
    assert peak <= reserve, (peak, reserve)
    print("lock step", heads, round(peak / (layers * n), 1), "bytes per slot and layer; "
          "reserved", reserve / (layers * n))


def test_batches_bound_a_long_requests_rounds():
    """With a cap below a whole request, apply_round takes fewer layers at once and the
    measured peak stays within the capped reservation (in place and gathered)."""
    layers, heads, n = 6, 2, 300
    for path in (("in place", "gathered") if IN_PLACE else ("gathered",)):
        per_slot = footprint_per_slot(heads, 16, torch.float32, path)
        cap = 2 * n * per_slot  # two layers per batch
        state, caches, blocks = _round_request(layers, heads, n)
        state.max_batch_elements = cap
        impl = get_method(KVMergeConfig(method="kvslimmer", sink=8, recent=16))
        if path == "gathered":
            impl.round_path = lambda kv: "gathered"
        plan = MergeRound("r", blocks, n, 200, round_index=2, method="kvslimmer",
                          max_fraction=0.25, recent=16, pool=7)
        peak = peak_allocated_bytes(lambda: apply_round(plan, caches, state, impl, 16))
        reserve = round_reserve_bytes(layers, n, heads, 16, torch.float32, path, cap)
        assert reserve == cap * 4 < round_reserve_bytes(layers, n, heads, 16, torch.float32,
                                                        path)
        assert peak <= reserve, (path, peak, reserve)


def test_blocks_within_is_the_most_that_fit():
    assert blocks_within(100, 10, 5, 0) == 6
    assert blocks_within(100, 10, 5, 10) == 6
    assert blocks_within(100, 10, 5, 11) == 5
    assert blocks_within(100, 10, 5, 100) == 0
    assert blocks_within(100, 10, 5, 500) == 0


# ----------------------------------------------------------------------- the engine
#: conftest.tiny_llama's KV shape and the engines' settings.
LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 2, 4, 32, 128
MAX_MODEL_LEN = 1024
#: An explicit KV budget, deliberately not a multiple of any block size.
KV_BUDGET = 20 * 2**20 + 12345
ENGINE = dict(max_model_len=MAX_MODEL_LEN, block_size=BLOCK, skip_tokenizer_init=True,
              kv_cache_memory_bytes=KV_BUDGET)


def test_small_budgets_batch_fewer_layers():
    """The batch cap is SCRATCH_SHARE of the budget (never above MAX_BATCH_ELEMENTS, never
    below one element), and apply_round's batches follow it. Catches: a small KV cache
    losing a fixed 256 MiB scratch reservation (or failing to start) because the cap
    ignores the budget."""
    assert batch_elements_within(1 << 40, torch.float32) == memory_module.MAX_BATCH_ELEMENTS
    assert batch_elements_within(80 * 2**20, torch.float32) == 80 * 2**20 // 8 // 4
    assert batch_elements_within(80 * 2**20, torch.bfloat16) == 80 * 2**20 // 8 // 2
    assert batch_elements_within(3, torch.float32) == 1
    # On CPU batches stay cache-sized whatever the budget; on CUDA they may be larger.
    assert batch_limit(torch.device("cpu")) == memory_module.CPU_BATCH_ELEMENTS
    assert batch_limit(torch.device("cuda")) == memory_module.MAX_BATCH_ELEMENTS
    assert batch_elements_within(1 << 40, torch.float32, batch_limit(torch.device("cpu"))) \
        == memory_module.CPU_BATCH_ELEMENTS
    per_slot = footprint_per_slot(3, 64, torch.float32, "gathered")
    per_layer = 4096 * per_slot  # a gathered 4,096-slot round of SmolLM2-135M
    small = batch_elements_within(500 * 2**20, torch.float32)
    assert layers_per_batch(per_layer, small) == small // per_layer == 2
    assert round_elements(30, 4096, per_slot, small) == small
    assert round_elements(30, 4096, per_slot, 1) == per_layer  # one layer at least
    # In place, the same request takes a fraction of that: all 30 layers at once.
    in_place = footprint_per_slot(3, 64, torch.float32, "in place")
    assert layers_per_batch(4096 * in_place, small) >= 30


def _runner(llm):
    return llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker \
        .model_runner


def _num_blocks(llm) -> int:
    return llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config.num_blocks


def test_merging_engine_kv_cache_shrinks_by_exactly_what_it_reserves(tiny_llama):
    """The same KV budget, with and without --kv-merge. Catches: the side state or the
    round scratch allocated on top of the KV cache vLLM sized (the process outgrows its
    budget; on a GPU, an out-of-memory error mid-serving), a reservation that no longer
    matches what SlotState and the rounds allocate, and a change to unmerged engines
    (their block count must stay budget // bytes per block)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    kv_per_block = LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 4  # float32 K and V
    state_per_block = LAYERS * BLOCK * state_bytes_per_slot(KV_HEADS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    max_batch = batch_elements_within(KV_BUDGET, torch.float32, batch_limit(device))
    in_place = IN_PLACE and device.type == "cpu"
    scratch = round_reserve_bytes(LAYERS, MAX_MODEL_LEN, KV_HEADS, HEAD_DIM, torch.float32,
                                  "in place" if in_place else "gathered", max_batch)
    expected = blocks_within(KV_BUDGET, kv_per_block, state_per_block, scratch)

    with offline_llm(tiny_llama, **ENGINE) as plain:
        plain_blocks = _num_blocks(plain)
        assert not hasattr(_runner(plain), "kv_merge_memory_plan")
    assert plain_blocks == KV_BUDGET // kv_per_block

    with offline_llm(tiny_llama, **ENGINE,
                     **engine_kwargs(budget=256, interval=128, observe="progressive")) as llm:
        blocks = _num_blocks(llm)
        state = _runner(llm)._kv_merge_state
        assert blocks == expected, (blocks, expected, plain_blocks)
        assert state.num_slots == blocks * BLOCK
        assert state.nbytes == blocks * state_per_block
        assert state.max_batch_elements == max_batch
        # A request long enough for rounds: the scratch it grows stays within the bound.
        params = SamplingParams(temperature=0.0, max_tokens=8, detokenize=False)
        prompt = TokensPrompt(prompt_token_ids=random_tokens(MAX_MODEL_LEN - 8, seed=5))
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        assert out.kv_transfer_params["kv_merge"]["rounds"] >= 1
        evicting = SamplingParams(temperature=0.0, max_tokens=8, detokenize=False,
                                  extra_args={"kv_merge_method": "evict"})
        out = llm.generate([prompt], evicting, use_tqdm=False)[0]
        assert out.kv_transfer_params["kv_merge"]["rounds"] >= 1
        # In place (CPU with the C++ ops) no method gathers; gathered, the copy is a
        # quarter of the reservation.
        if in_place:
            assert state.scratch_nbytes == 0
        else:
            rows = MAX_MODEL_LEN * KV_HEADS * 2 * HEAD_DIM * 4
            assert 0 < state.scratch_nbytes <= scratch * rows // (
                GATHERED_FOOTPRINT * rows + footprint_per_slot(KV_HEADS, HEAD_DIM, torch.float32,
                                                               "in place") * 4 * MAX_MODEL_LEN)

    used = blocks * (kv_per_block + state_per_block) + scratch
    assert used <= KV_BUDGET < used + kv_per_block + state_per_block
    assert blocks < plain_blocks
    if in_place:  # in-place rounds leave the KV cache more of the budget
        gathered = round_reserve_bytes(LAYERS, MAX_MODEL_LEN, KV_HEADS, HEAD_DIM,
                                       torch.float32, "gathered", max_batch)
        assert blocks > blocks_within(KV_BUDGET, kv_per_block, state_per_block, gathered)
    print(f"KV budget {KV_BUDGET} B: {plain_blocks} blocks unmerged, {blocks} merging "
          f"(state {blocks * state_per_block} B, scratch {scratch} B)")
