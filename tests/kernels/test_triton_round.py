"""The Triton round kernels (``triton_kernels/round.py``) against their ``core`` references.

Without CUDA they run on CPU tensors under Triton's interpreter (see
:func:`helpers.triton_kernel_modules`), so shapes stay small; with a GPU they run natively.
Cases cover several layers (separate cache tensors reached through the address table),
padded cache rows, strided views of one gathered buffer, block edges (1, 15, 16, 17 pairs
or rows), float32 / float16 / bfloat16, NeoX / GPT-J / partial / scaled RoPE tables and
negative shifts.
"""

from __future__ import annotations

import pytest
import torch

from helpers import triton_kernel_modules
from kvslimmer_vllm.core.merge import merge_pairs as merge_pairs_ref
from kvslimmer_vllm.core.paged import compact_rows as compact_rows_ref
from kvslimmer_vllm.core.paged import gather_rows as gather_rows_ref
from kvslimmer_vllm.core.rope import RotarySpec, build_cos_sin_cache, default_inv_freq
from kvslimmer_vllm.core.stats import value_spread as value_spread_ref

(rk,) = triton_kernel_modules("round")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


def _caches(layers, num_slots, heads, dim, dtype, gen, padded=False):
    width = 2 * dim + (6 if padded else 0)
    return [(torch.randn(num_slots, heads, width, generator=gen) * 4).to(dtype)
            .to(DEVICE)[..., :2 * dim] for _ in range(layers)]


def _tol(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("layers,num_slots,heads,dim,n,padded", [
    (1, 4, 1, 2, 1, False), (3, 64, 3, 64, 17, False), (2, 40, 2, 40, 33, True),
    (1, 300, 8, 16, 256, False),
])
def test_gather_rows_matches_reference(dtype, layers, num_slots, heads, dim, n, padded):
    gen = torch.Generator().manual_seed(n)
    kvs = _caches(layers, num_slots, heads, dim, dtype, gen, padded)
    slots = torch.randperm(num_slots, generator=gen)[:n].to(DEVICE)
    out = torch.full((layers, n, heads, 2 * dim), float("nan"), dtype=dtype, device=DEVICE)
    rk.gather_rows(kvs, slots, out)
    want = gather_rows_ref(kvs, slots, torch.empty_like(out))
    assert torch.equal(out, want)
    assert torch.equal(want, torch.stack([kv[slots] for kv in kvs]))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("layers,slots,heads,dim", [
    (1, 1, 1, 2), (2, 65, 3, 64), (3, 31, 2, 40), (1, 200, 1, 128),
])
@pytest.mark.parametrize("alpha_kind", ["random", "one-hot", "uniform"])
def test_value_spread_matches_reference(dtype, layers, slots, heads, dim, alpha_kind):
    """Values as the engine passes them (the value half of a gathered [L, N, H, 2D]
    buffer); mass on one slot, spread evenly, or random; large offsets keep the mean from
    hiding small spreads."""
    gen = torch.Generator().manual_seed(slots * 7 + dim)
    kv = (torch.randn(layers, slots + 3, heads, 2 * dim, generator=gen) * 3 + 50).to(dtype)
    values = kv[:, 2:slots + 2, :, dim:].to(DEVICE)  # strided, offset view
    if alpha_kind == "random":
        alpha = torch.rand(layers, slots, heads, generator=gen)
    elif alpha_kind == "one-hot":
        alpha = torch.zeros(layers, slots, heads)
        alpha[:, slots // 2] = 1.0
    else:
        alpha = torch.ones(layers, slots, heads)
    alpha = (alpha / alpha.sum(1, keepdim=True)).to(DEVICE)
    got = rk.value_spread(values, alpha)
    want = value_spread_ref(values.double(), alpha.double())
    assert got.dtype == torch.float32 and got.shape == (layers, slots, heads)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3 * dim)


def test_value_spread_empty_and_bad_inputs():
    empty = rk.value_spread(torch.zeros(2, 0, 3, 8, device=DEVICE),
                            torch.zeros(2, 0, 3, device=DEVICE))
    assert empty.shape == (2, 0, 3)
    with pytest.raises(ValueError, match="alpha \\[L, M, Hkv\\]"):
        rk.value_spread(torch.zeros(2, 4, 3, 8, device=DEVICE), torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="alpha float32"):
        rk.value_spread(torch.zeros(2, 4, 3, 8, device=DEVICE),
                        torch.zeros(2, 4, 3, dtype=torch.float64, device=DEVICE))


def _pairs(layers, slots, k, gen):
    if not k:
        return torch.zeros(layers, 0, dtype=torch.int64)
    return torch.stack([torch.randperm(slots - 1, generator=gen)[:k].sort().values
                        for _ in range(layers)])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("layers,slots,heads,dim,k", [
    (1, 2, 1, 4, 1), (2, 40, 3, 64, 17), (3, 33, 2, 40, 16), (1, 50, 8, 128, 15),
    (2, 10, 2, 8, 0),
])
@pytest.mark.parametrize("rope", ["neox", "gptj", "partial", "scaled", "none"])
def test_merge_pairs_matches_reference(dtype, layers, slots, heads, dim, k, rope):
    gen = torch.Generator().manual_seed(slots * 13 + k)
    kv = (torch.randn(layers, slots, heads, 2 * dim, generator=gen) * 3).to(dtype)
    keys, values = kv[..., :dim], kv[..., dim:]
    left = _pairs(layers, slots, k, gen)
    a = torch.rand(layers, k, heads, generator=gen)
    a[..., ::3] = 1.0  # all weight on the left key
    c_i = torch.randint(1, 4000, (layers, k), generator=gen).float()
    c_j = torch.randint(1, 4000, (layers, k), generator=gen).float()
    delta = torch.randint(-5, 1500, (layers, k), generator=gen)
    rotary_dim = dim if rope != "partial" else max(2, dim // 2 - (dim // 2) % 2)
    rotary = None
    if rope != "none":
        cache = build_cos_sin_cache(default_inv_freq(rotary_dim, 10000.0), 2048)
        rotary = RotarySpec(rotary_dim, rope != "gptj",
                            cos_sin_cache=cache * 1.3 if rope == "scaled" else cache)
    want = merge_pairs_ref(keys, values, left, a, c_i, c_j, rotary, delta)
    on = [t.to(DEVICE) for t in (keys, values, left, a, c_i, c_j)]
    got = rk.merge_pairs(*on, rotary.cos_sin_cache.to(DEVICE) if rotary else None,
                         delta.to(DEVICE) if rotary else None,
                         rotary_dim if rotary else 0, rope != "gptj")
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == (layers, k, heads, dim)
        torch.testing.assert_close(g.cpu(), w, **_tol(dtype))
    if k:  # key and value of a head side by side, as a cache row holds them
        assert got[1].data_ptr() == got[0].data_ptr() + dim * kv.element_size()


def test_merge_pairs_rejects_bad_tables():
    keys = torch.zeros(1, 4, 1, 8, device=DEVICE)
    left = torch.zeros(1, 1, dtype=torch.int64, device=DEVICE)
    a = torch.zeros(1, 1, 1, device=DEVICE)
    c = torch.ones(1, 1, device=DEVICE)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        rk.merge_pairs(keys, keys, left, a, c, c, torch.zeros(16, 6, device=DEVICE), left, 8)
    with pytest.raises(ValueError, match="shift must have left's shape"):
        rk.merge_pairs(keys, keys, left, a, c, c, torch.zeros(16, 8, device=DEVICE), None, 8)
    with pytest.raises(ValueError, match="share a float dtype"):
        rk.merge_pairs(keys, keys.double(), left, a, c, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("layers,num_slots,heads,dim,n_in,freed,width,padded", [
    (1, 4, 1, 2, 2, 1, 1, False), (3, 96, 3, 64, 60, 17, 17, False),
    (2, 64, 2, 40, 40, 0, 0, True), (1, 64, 8, 16, 33, 16, 16, False),
])
@pytest.mark.parametrize("copy", ["gathered", "staged"])
def test_compact_rows_matches_reference(dtype, layers, num_slots, heads, dim, n_in, freed,
                                        width, padded, copy):
    """Bit-equal caches after the round, every start; slots outside the request never
    change. The surviving rows come from the gathered copy, as a gathered round passes it,
    or from a copy of the rows that move, made by compact_rows itself (an eviction in
    place)."""
    gen = torch.Generator().manual_seed(n_in + dim)
    kvs = _caches(layers, num_slots, heads, dim, dtype, gen, padded)
    slots = torch.randperm(num_slots, generator=gen)[:n_in].to(DEVICE)
    n = n_in - freed
    source = torch.stack([torch.randperm(n_in, generator=gen)[:n].sort().values
                          for _ in range(layers)]).to(DEVICE)
    if layers > 1:  # one layer drops only its first slots: every row moves down by `freed`
        source[-1] = torch.arange(freed, n_in, device=DEVICE)
    merged_slots = torch.stack([torch.randperm(n, generator=gen)[:width]
                                for _ in range(layers)]).to(DEVICE)
    merged = torch.randn(layers, width, heads, 2 * dim, generator=gen).to(dtype).to(DEVICE)
    rows = gather_rows_ref(kvs, slots, torch.empty(layers, n_in, heads, 2 * dim, dtype=dtype,
                                                   device=DEVICE))
    outside = torch.ones(num_slots, dtype=torch.bool, device=DEVICE)
    outside[slots] = False
    for start in sorted({0, n // 2, n}):
        ours = [kv.clone() for kv in kvs]
        theirs = [kv.clone() for kv in kvs]
        args = (slots, source, start, merged_slots, merged[..., :dim], merged[..., dim:])
        rk.compact_rows(ours, *args, *([rows] if copy == "gathered" else []))
        compact_rows_ref(theirs, *args)
        for before, got, want in zip(kvs, ours, theirs):
            assert torch.equal(got, want)
            assert torch.equal(got[outside], before[outside])


def test_layer_caches_must_agree():
    a = torch.zeros(8, 2, 8, device=DEVICE)
    out = torch.zeros(2, 3, 2, 8, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="at least one layer cache"):
        rk.gather_rows([], slots, out)
    with pytest.raises(ValueError, match="first one's shape, dtype, strides"):
        rk.gather_rows([a, torch.zeros(9, 2, 8, device=DEVICE)], slots, out)
    with pytest.raises(ValueError, match="out must be contiguous"):
        rk.gather_rows([a, a.clone()], slots, out[:1])
