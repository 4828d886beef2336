"""Memory the merging engine accounts for: its per-slot state and its round scratch come
out of the KV budget before vLLM sizes the KV cache (worker.KVMergeWorker
.determine_available_memory), so KV cache + state + scratch fit in what vLLM would have
given the KV cache alone.

The byte functions of engine.slots are checked against what SlotState really allocates;
the engine test runs conftest's tiny random-weight Llama (2 layers, 4 KV heads of 32
dims, float32) with and without merging at the same explicit KV budget
(``kv_cache_memory_bytes``: no memory probing, so the block counts are exact).
"""

from __future__ import annotations

import pytest
import torch

from kvslimmer_vllm.core.config import KVMergeConfig
from kvslimmer_vllm.engine import slots as slots_module
from kvslimmer_vllm.engine.plan import MergeRound
from kvslimmer_vllm import kernels
from kvslimmer_vllm.engine.plugin import engine_kwargs
from kvslimmer_vllm.engine.slots import (
    LayerCache,
    SlotState,
    apply_round,
    blocks_within,
    batch_elements_within,
    batch_limit,
    layers_per_batch,
    scratch_bytes,
    scratch_elements,
    state_bytes_per_slot,
)
from kvslimmer_vllm.methods import get_method
from helpers import offline_llm, random_tokens


@pytest.mark.parametrize("layers, slots, heads", [(1, 1, 1), (2, 384, 4), (30, 1000, 3)])
def test_state_bytes_equal_what_slot_state_allocates(layers, slots, heads):
    """Catches: a SlotState tensor added, dropped or retyped without the reservation
    (state_bytes_per_slot) following, i.e. state the KV budget does not account for."""
    state = SlotState(layers, slots, heads, torch.device("cpu"))
    assert state.nbytes == layers * slots * state_bytes_per_slot(heads)
    assert state_bytes_per_slot(heads) == 4 + 8 + 2 * 4 * heads


@pytest.mark.parametrize("max_batch", [1 << 12, 1 << 16, 1 << 26])
@pytest.mark.parametrize("layers", [1, 3, 30])
def test_scratch_bound_covers_every_round_length(layers, max_batch, monkeypatch):
    """scratch_elements is the most any round over up to N slots gathers: the bound
    holds for every n <= N, and is reached (a real reservation, not a guess) when all
    layers fit one batch or one layer alone exceeds MAX_BATCH_ELEMENTS. Catches: the
    batching of apply_round changing without the reservation following."""
    monkeypatch.setattr(slots_module, "MAX_BATCH_ELEMENTS", max_batch)
    heads, dim = 2, 8
    per_slot = heads * 2 * dim
    for max_slots in (1, 7, 100, 300, 5000):
        bound = scratch_elements(layers, max_slots, heads, dim)
        gathered = [min(layers, layers_per_batch(n * per_slot)) * n * per_slot
                    for n in range(1, max_slots + 1)]
        assert max(gathered) <= bound
        whole = max_slots * per_slot
        if layers * whole <= max_batch or whole >= max_batch:
            assert max(gathered) == bound
    assert scratch_bytes(2, 10, 2, 8, torch.bfloat16) == 2 * scratch_elements(2, 10, 2, 8)


@pytest.mark.parametrize("method", ["evict", "average"])
def test_a_real_round_stays_within_the_reserved_scratch(method):
    """A round over a whole cache's worth of slots: a gathering method (eviction) fills a
    scratch buffer of exactly what scratch_bytes reserves for that many slots; a pairwise
    method runs in place on CPU (C++ round ops): no scratch, and its transient
    statistics (alpha and h [L, M, H], float64 scores [L, M - 1]) fit the reservation."""
    layers, heads, dim, block, blocks = 3, 2, 8, 16, 10
    num_slots = block * blocks
    state = SlotState(layers, num_slots, heads, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    kvs = [torch.randn(num_slots, heads, 2 * dim, generator=g) for _ in range(layers)]
    caches = [LayerCache(i, kv, None) for i, kv in enumerate(kvs)]
    plan = MergeRound("r", tuple(range(blocks)), num_slots, 40, round_index=1,
                      method=method)
    cfg = KVMergeConfig(method=method, sink=4, recent=8, rope_aware=False)
    apply_round(plan, caches, state, get_method(cfg), block)
    reserved = scratch_bytes(layers, num_slots, heads, dim, torch.float32)
    if method == "evict" or kernels.paged_round_backend_name(kvs[0]) != "cpp":
        assert state.scratch_nbytes == reserved  # the whole request in one batch
    else:
        assert state.scratch_nbytes == 0
        region = num_slots - 4 - 8
        assert 2 * layers * region * heads * 4 + layers * (region - 1) * 8 <= reserved


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
    assert batch_elements_within(1 << 40, torch.float32) == slots_module.MAX_BATCH_ELEMENTS
    assert batch_elements_within(80 * 2**20, torch.float32) == 80 * 2**20 // 8 // 4
    assert batch_elements_within(80 * 2**20, torch.bfloat16) == 80 * 2**20 // 8 // 2
    assert batch_elements_within(3, torch.float32) == 1
    # On CPU batches stay cache-sized whatever the budget; on CUDA they may be larger.
    assert batch_limit(torch.device("cpu")) == slots_module.CPU_BATCH_ELEMENTS
    assert batch_limit(torch.device("cuda")) == slots_module.MAX_BATCH_ELEMENTS
    assert batch_elements_within(1 << 40, torch.float32, batch_limit(torch.device("cpu"))) \
        == slots_module.CPU_BATCH_ELEMENTS
    per_layer = 4096 * 3 * 2 * 64  # a 4,096-slot round of SmolLM2-135M
    small = batch_elements_within(100 * 2**20, torch.float32)
    assert layers_per_batch(per_layer, small) == small // per_layer == 2
    assert scratch_elements(30, 4096, 3, 64, small) == small
    assert scratch_elements(30, 4096, 3, 64, 1) == per_layer  # one layer at least


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
    scratch = scratch_bytes(LAYERS, MAX_MODEL_LEN, KV_HEADS, HEAD_DIM, torch.float32,
                            max_batch)
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
        assert state.scratch_nbytes <= scratch  # kvslimmer's CPU rounds need none
        evicting = SamplingParams(temperature=0.0, max_tokens=8, detokenize=False,
                                  extra_args={"kv_merge_method": "evict"})
        out = llm.generate([prompt], evicting, use_tqdm=False)[0]
        assert out.kv_transfer_params["kv_merge"]["rounds"] >= 1
        assert 0 < state.scratch_nbytes <= scratch  # a gathering method fills it

    used = blocks * (kv_per_block + state_per_block) + scratch
    assert used <= KV_BUDGET < used + kv_per_block + state_per_block
    assert blocks < plain_blocks
    print(f"KV budget {KV_BUDGET} B: {plain_blocks} blocks unmerged, {blocks} merging "
          f"(state {blocks * state_per_block} B, scratch {scratch} B)")
