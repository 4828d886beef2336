"""kvslimmer_vllm.kernels picks the kernel for the device and agrees with the core
reference it stands in for."""

from __future__ import annotations

import pytest
import torch

from kvslimmer_vllm import kernels
from kvslimmer_vllm.core import paged, select


def _batch(seed=0, block=16, hq=9, hkv=3, d=64):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 24
    kv = torch.randn(num_blocks * block, hkv, 2 * d, generator=g)
    counts = torch.randint(1, 50, (num_blocks * block,), generator=g).float()
    lengths, rows = [37, 1, 100, 64], [5, 1, 1, 20]
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(lengths), 8, dtype=torch.int32)
    used = 0
    for r, length in enumerate(lengths):
        n = -(-length // block)
        table[r, :n] = perm[used:used + n].int()
        used += n
    qsl = torch.tensor([0] + list(torch.tensor(rows).cumsum(0)), dtype=torch.int32)
    query = torch.randn(int(qsl[-1]), hq, d, generator=g)
    return query, kv, counts, table, torch.tensor(lengths, dtype=torch.int32), qsl, block


@pytest.mark.skipif(kernels._cpp_ops() is None,
                    reason="C++ extension kvslimmer_vllm._C not built for this interpreter")
def test_cpu_uses_the_cpp_kernel_and_matches_the_reference():
    assert kernels.attention_backend_name(torch.device("cpu")) == "cpp"
    query, kv, counts, table, lens, qsl, block = _batch()
    mass_k = torch.zeros(kv.shape[0], kv.shape[1])
    mass_r = torch.zeros_like(mass_k)
    out_k = kernels.paged_attention(query, kv, counts, table, lens, qsl, 0.125, block, mass_k)
    out_r = paged.paged_attention(query, kv, counts, table, lens, qsl, 0.125, block, mass_r)
    torch.testing.assert_close(out_k, out_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mass_k, mass_r, rtol=1e-4, atol=1e-5)


def test_reference_can_be_forced(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "reference")
    assert kernels.attention_backend_name(torch.device("cpu")) == "reference"
    monkeypatch.setenv(kernels.ENV, "fastest")
    with pytest.raises(ValueError, match=kernels.ENV):
        kernels.attention_backend_name(torch.device("cpu"))


@pytest.mark.parametrize("seed", range(5))
def test_select_pairs_dispatch_matches_core(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(301, generator=g, dtype=torch.float64)
    scores[::7] = scores[3]  # ties
    for k in (0, 1, 60, 151):
        assert torch.equal(kernels.select_pairs(scores, k), select.select_pairs(scores, k))


@pytest.mark.parametrize("shape", [(40, 3, 64), (2, 40, 3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_value_spread_dispatch_matches_core(shape, dtype):
    """One layer ([M, H, D]) or a layer batch; bf16 falls back to the reference."""
    from kvslimmer_vllm.core import stats

    g = torch.Generator().manual_seed(4)
    values = torch.randn(*shape, generator=g).to(dtype)
    alpha = torch.softmax(torch.randn(*shape[:-1], generator=g), dim=-2).to(dtype)
    torch.testing.assert_close(kernels.value_spread(values, alpha),
                               stats.value_spread(values, alpha), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("joined", [True, False], ids=["kv-views", "separate"])
def test_merge_round_with_the_kernels_matches_the_reference(joined):
    """A whole layer-batched KVSlimmer round (sub-rounds, RoPE-aware keys) with the C++
    value spread, pair merge and batched selection equals the reference round: same
    slots, keys and Hessians within float32. Keys and values as the engine passes them
    (views of one gathered [L, N, H, 2D] buffer) and as separate tensors."""
    from kvslimmer_vllm.core import merge
    from kvslimmer_vllm.core.rope import RotarySpec, default_inv_freq

    g = torch.Generator().manual_seed(5)
    layers, n, heads, d = 4, 300, 3, 64
    if joined:
        kv = torch.randn(layers, n, heads, 2 * d, generator=g)
        keys, values = kv[..., :d], kv[..., d:]
    else:
        keys, values = torch.randn(2, layers, n, heads, d, generator=g).unbind(0)
    counts = torch.randint(1, 4, (layers, n), generator=g).float()
    positions = torch.cumsum(counts.long(), dim=1) - 1
    hess = torch.rand(layers, n, heads, generator=g)
    hess[:, ::3] = float("nan")
    mass = torch.rand(layers, n, heads, generator=g) ** 4
    rotary = RotarySpec(d, True, inv_freq=default_inv_freq(d, 10000.0))
    kw = dict(sink=8, recent=16, k=180, max_fraction=0.25, pool=7, round_idx=2,
              gamma=656.0, eps=1e-21, rotary=rotary)
    want = merge.merge_rounds(keys, values, counts, positions, hess, mass, **kw)
    got = merge.merge_rounds(keys, values, counts, positions, hess, mass,
                             spread=kernels.value_spread, pair_merge=kernels.merge_pairs,
                             selector=kernels.select_pairs, **kw)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.positions, want.positions)
    assert torch.equal(got.source, want.source)
    assert torch.equal(got.merged_slots, want.merged_slots)
    torch.testing.assert_close(got.keys, want.keys, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.values, want.values)
    torch.testing.assert_close(got.hess, want.hess, rtol=1e-4, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_pairs_dispatch_matches_core(dtype):
    """float32 runs the C++ op, bf16 falls back to the reference; both as the core says."""
    from kvslimmer_vllm.core import merge
    from kvslimmer_vllm.core.rope import RotarySpec, default_inv_freq

    g = torch.Generator().manual_seed(6)
    kv = torch.randn(2, 50, 3, 128, generator=g).to(dtype)
    keys, values = kv[..., :64], kv[..., 64:]
    left = torch.stack([torch.arange(0, 48, 3), torch.arange(1, 49, 3)])
    a = torch.rand(2, 16, 3, generator=g)
    c_i, c_j = (torch.randint(1, 9, (2, 16), generator=g).float() for _ in range(2))
    rotary = RotarySpec(64, True, inv_freq=default_inv_freq(64, 10000.0))
    delta = torch.randint(1, 9, (2, 16), generator=g)
    got = kernels.merge_pairs(keys, values, left, a.to(torch.float32), c_i, c_j, rotary, delta)
    want = merge.merge_pairs(keys, values, left, a, c_i, c_j, rotary, delta)
    for x, y in zip(got, want):
        assert x.dtype == dtype
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_rows_dispatch_matches_core(dtype):
    g = torch.Generator().manual_seed(7)
    caches = [torch.randn(64, 2, 16, generator=g).to(dtype) for _ in range(3)]
    copies = [c.clone() for c in caches]
    slots = torch.randperm(64, generator=g)[:40]
    source = torch.stack([torch.arange(40)[torch.arange(40) % 4 != 1] for _ in range(3)])
    merged_slots = torch.tensor([[2, 5], [0, 29], [7, 12]])
    merged = torch.randn(3, 2, 2, 16, generator=g).to(dtype)
    args = (slots, source, 1, merged_slots, merged[..., :8], merged[..., 8:])
    kernels.compact_rows(caches, *args)
    paged.compact_rows(copies, *args)
    for got, want in zip(caches, copies):
        assert torch.equal(got, want)


def test_round_backend_follows_device_dtype_and_setting(monkeypatch):
    """CPU float32/float64 tensors take the C++ ops, other CPU dtypes the reference; the
    setting forces the reference; the gather dispatch equals index_select per layer."""
    monkeypatch.delenv(kernels.ENV, raising=False)
    cpp = "cpp" if kernels._cpp_ops() is not None else "reference"
    assert kernels.round_backend_name(torch.zeros(2)) == cpp
    assert kernels.round_backend_name(torch.zeros(2, dtype=torch.float64)) == cpp
    assert kernels.round_backend_name(torch.zeros(2, dtype=torch.bfloat16)) == "reference"
    monkeypatch.setenv(kernels.ENV, "reference")
    assert kernels.round_backend_name(torch.zeros(2)) == "reference"
    monkeypatch.delenv(kernels.ENV)
    g = torch.Generator().manual_seed(4)
    kvs = [torch.randn(50, 3, 16, generator=g) for _ in range(3)]
    slots = torch.randperm(50, generator=g)[:21]
    out = kernels.gather_rows(kvs, slots, torch.empty(3, 21, 3, 16))
    assert torch.equal(out, torch.stack([kv[slots] for kv in kvs]))
