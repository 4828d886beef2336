"""A merge round on a paged cache (engine.slots) equals core.merge_round on the
gathered slots, across block boundaries, without touching other requests' slots."""

from __future__ import annotations

import pytest
import torch

from kvslimmer_vllm.core import (
    RotarySpec,
    default_inv_freq,
    evict_lowest,
    evict_oldest,
    merge_round,
)
from kvslimmer_vllm.core.merge import keep_set, merge_rounds, slot_scores
from helpers import triton_kernel_modules
from kvslimmer_vllm import kernels
from kvslimmer_vllm.core.config import KVMergeConfig
from kvslimmer_vllm.engine import slots as slots_module
from kvslimmer_vllm.engine.plan import MergeRound
from kvslimmer_vllm.engine.slots import LayerCache, SlotState, apply_round, gather, slot_ids
from kvslimmer_vllm.methods import get_method

BLOCK, HEADS, DIM, LAYERS, BLOCKS = 16, 3, 8, 3, 40


def _filled(num_slots, seed):
    g = torch.Generator().manual_seed(seed)
    state = SlotState(LAYERS, num_slots, HEADS, torch.device("cpu"))
    state.counts.copy_(torch.randint(1, 9, state.counts.shape, generator=g).float())
    state.positions.copy_(torch.arange(num_slots).repeat(LAYERS, 1) * 3)
    state.hess.copy_(torch.rand(state.hess.shape, generator=g))
    state.hess[:, ::3] = float("nan")
    state.mass.copy_(torch.rand(state.mass.shape, generator=g))
    kvs = [torch.randn(num_slots, HEADS, 2 * DIM, generator=g) for _ in range(LAYERS)]
    return state, kvs


def _core_round(method, b, k, cfg, rotary):
    """What the method's round must equal: its core function on the gathered slots."""
    args = (b.keys, b.values, b.counts, b.positions, b.hess, b.mass)
    if method in ("kvslimmer", "average"):
        return merge_round(*args, sink=4, recent=8, k=k, round_idx=2, gamma=cfg.gamma,
                           eps=cfg.eps, rotary=rotary,
                           key_weights="hessian" if method == "kvslimmer" else "count")
    if method == "snapmerge":  # SnapKV's keep set protected, the rest merged around it
        protect = torch.zeros(b.mass.shape[0], dtype=torch.bool)
        protect[4:-8] = keep_set(slot_scores(b.mass[None], sink=4, recent=8), k)[0]
        return merge_rounds(*args, sink=4, recent=8, k=k, round_idx=2, gamma=cfg.gamma,
                            eps=cfg.eps, rotary=rotary, protect=protect)
    evict = evict_lowest if method == "evict" else evict_oldest
    return evict(*args, sink=4, recent=8, k=k)


def _use_triton_round_kernels(monkeypatch):
    """Route the round kernels to Triton (interpreted on CPU tensors without a GPU), as
    they run on CUDA caches."""
    (interpreted,) = triton_kernel_modules("round")
    monkeypatch.setattr(kernels, "_triton_round", lambda: interpreted)
    monkeypatch.setattr(kernels, "round_backend_name", lambda tensor: "triton")


@pytest.mark.parametrize("method", ["kvslimmer", "average", "snapmerge", "evict", "streaming"])
@pytest.mark.parametrize("num_slots, num_merge", [(100, 20), (64, 1), (47, 6), (160, 50)])
@pytest.mark.parametrize("batching", ["one batch", "two ropes", "one layer per batch"])
@pytest.mark.parametrize("round_kernels", ["this device's", "triton"])
def test_apply_round_matches_core_and_spares_other_slots(num_slots, num_merge, method,
                                                         batching, round_kernels,
                                                         monkeypatch):
    """Layers are merged as layer batches (grouped by RoPE, bounded in size); every
    layer must still equal the core round on that layer alone, with this device's round
    kernels and with the CUDA ones (Triton: one-launch gather, value spread, pair merge,
    write-back reading the gathered copy; SnapMerge's protected sub-rounds of all layers in
    lock step; eviction compacted where the slots live from a staged copy of the rows it
    moves, nothing gathered)."""
    if round_kernels == "triton":
        _use_triton_round_kernels(monkeypatch)
    cfg = KVMergeConfig(method="kvslimmer", sink=4, recent=8)
    rotary = RotarySpec(rotary_dim=DIM, is_neox=True, inv_freq=default_inv_freq(DIM, 1e4))
    other = RotarySpec(rotary_dim=DIM // 2, is_neox=False, inv_freq=default_inv_freq(4, 500))
    ropes = [other if batching == "two ropes" and i == 1 else rotary for i in range(LAYERS)]
    if batching == "one layer per batch":
        monkeypatch.setattr(slots_module, "MAX_BATCH_ELEMENTS", num_slots * HEADS * 2 * DIM)
    state, kvs = _filled(BLOCKS * BLOCK, seed=num_slots)
    layers = [LayerCache(i, kv, rope) for i, (kv, rope) in enumerate(zip(kvs, ropes))]
    # Scattered, non-monotonic blocks, so compaction crosses block boundaries.
    perm = torch.randperm(BLOCKS, generator=torch.Generator().manual_seed(1)).tolist()
    blocks = tuple(perm[: -(-num_slots // BLOCK)])
    plan = MergeRound("r", blocks, num_slots, num_merge, round_index=2, method=method)
    src = slot_ids(blocks, num_slots, BLOCK)
    others = torch.ones(BLOCKS * BLOCK, dtype=torch.bool)
    others[slot_ids(blocks, len(blocks) * BLOCK, BLOCK)] = False
    before = [gather(layer, state, src) for layer in layers]
    untouched = [(kv[others].clone(), state.counts[i][others].clone()) for i, kv in enumerate(kvs)]

    impl = get_method(cfg.model_copy(update={"method": method}))
    gathers = []
    real_gather = slots_module._gather_rows
    monkeypatch.setattr(slots_module, "_gather_rows",
                        lambda *args: gathers.append(1) or real_gather(*args))
    apply_round(plan, layers, state, impl, BLOCK)
    path = impl.round_path(kvs[0])
    if round_kernels == "triton":
        assert path == ("staged" if method in ("evict", "streaming") else "gathered")
    assert bool(gathers) == (path == "gathered")

    dst = src[: num_slots - num_merge]
    for i, layer in enumerate(layers):
        b = before[i]
        want = _core_round(method, b, num_merge, cfg, ropes[i])
        got = gather(layer, state, dst)
        torch.testing.assert_close(got.keys, want.keys)
        torch.testing.assert_close(got.values, want.values)
        assert torch.equal(got.counts, want.counts)
        assert torch.equal(got.positions, want.positions)
        torch.testing.assert_close(got.hess, want.hess, equal_nan=True)
        assert bool((state.mass[i][src] == 0).all())
        assert torch.equal(kvs[i][others], untouched[i][0])
        assert torch.equal(state.counts[i][others], untouched[i][1])


def test_writing_a_slot_resets_its_state():
    """Catches: a new token's slot keeping a merged slot's count, position, Hessian or
    mass (blocks are reused after rounds), or a write touching other slots or layers."""
    state, _ = _filled(64, seed=3)
    state.counts.fill_(7.0)  # every slot merged: a reset to 1 is visible
    before = {name: getattr(state, name).clone() for name in ("counts", "positions",
                                                              "hess", "mass")}
    slots = torch.tensor([5, 17, 40])
    heads, dim = state.hess.shape[-1], 4
    kv = torch.zeros(state.num_slots, heads, 2 * dim)
    key, value = torch.randn(2, 3, heads, dim)
    state.write_tokens(1, kv, key, value, slots, torch.tensor([100, 101, 102]))
    assert torch.equal(kv[slots], torch.cat((key, value), dim=-1))
    assert state.counts[1][slots].tolist() == [1.0, 1.0, 1.0]
    assert state.positions[1][slots].tolist() == [100, 101, 102]
    assert bool(state.hess[1][slots].isnan().all())
    assert bool((state.mass[1][slots] == 0).all())
    # Everything else is exactly as it was: other layers, and layer 1's other slots.
    written = torch.zeros_like(before["counts"], dtype=torch.bool)
    written[1, slots] = True
    for name, old in before.items():
        new = getattr(state, name)
        keep = ~written if old.dim() == 2 else ~written.unsqueeze(-1).expand_as(old)
        assert torch.equal(new[keep].nan_to_num(-1.0), old[keep].nan_to_num(-1.0)), name


def test_slot_ids_follow_the_block_table():
    """Catches: slots numbered in block-id order instead of block-table order."""
    assert slot_ids((3, 0, 7), 35, 16).tolist() == (
        list(range(48, 64)) + list(range(0, 16)) + list(range(112, 115))
    )


@pytest.mark.parametrize("method", ["kvslimmer", "average", "snapmerge", "evict", "snapkv",
                                    "streaming"])
def test_cpu_rounds_run_in_place(method, monkeypatch):
    """Catches: the engine gathering a request's slots on CPU, where every method has an
    in-place round (the C++ pairwise round for KVSlimmer, its count-weighted ablation and
    SnapMerge, one round or sub-rounds; eviction chosen from the slots' state and
    compacted by the C++ compact_rows): the worker reserves no gather scratch there
    (engine.slots.round_reserve_bytes)."""
    if kernels.paged_round_backend_name(torch.zeros(1)) != "cpp":
        pytest.skip("C++ extension not built")
    calls = []
    real = slots_module._gather_rows

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(slots_module, "_gather_rows", spy)
    cfg = KVMergeConfig(method=method, sink=4, recent=8)
    rotary = RotarySpec(rotary_dim=DIM, is_neox=True, inv_freq=default_inv_freq(DIM, 1e4))
    state, kvs = _filled(BLOCKS * BLOCK, seed=7)
    layers = [LayerCache(i, kv, rotary) for i, kv in enumerate(kvs)]
    for max_fraction in (0.5, 0.1):
        plan = MergeRound("r", tuple(range(10)), 150, 40, round_index=1, method=method,
                          max_fraction=max_fraction)
        apply_round(plan, layers, state, get_method(cfg), BLOCK)
    assert not calls
    assert state.scratch_nbytes == 0


def test_a_steps_observed_rows_are_decided_once_on_the_host():
    """The worker's per-step flags: all observed -> no mask (every request adds mass);
    some -> a bool mask on the state's device; none -> attention runs without mass."""
    state = SlotState(2, 64, 3, torch.device("cpu"))
    for flags, mask, any_ in [(None, None, True), ([True, True], None, True),
                              ([True, False, True], [True, False, True], True),
                              ([False, False], [False, False], False)]:
        state.set_observed(flags)
        assert state.observes_any is any_
        if mask is None:
            assert state.observed is None
        else:
            assert state.observed.dtype == torch.bool and state.observed.tolist() == mask
