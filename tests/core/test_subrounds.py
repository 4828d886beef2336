"""Query-aware building blocks: mass pooling, sub-round sizing and multi-sub-round merges."""

from __future__ import annotations

import pytest
import torch

from kvslimmer_vllm.core import RotarySpec, default_inv_freq
from kvslimmer_vllm.core.merge import (
    DEFAULT_EPS,
    DEFAULT_GAMMA,
    carry_mass,
    evict_lowest,
    merge_round,
    merge_rounds,
    subround_sizes,
)
from kvslimmer_vllm.core.select import pair_scores, pool_mass

ROTARY = RotarySpec(rotary_dim=16, is_neox=True, inv_freq=default_inv_freq(16, 10000.0))


def _slots(n: int, heads: int = 2, dim: int = 16, *, layers: int | None = None, seed: int = 0,
           mass: str = "random"):
    g = torch.Generator().manual_seed(seed)
    lead = () if layers is None else (layers,)
    keys = torch.randn(*lead, n, heads, dim, generator=g, dtype=torch.float64)
    values = torch.randn(*lead, n, heads, dim, generator=g, dtype=torch.float64)
    counts = torch.randint(1, 4, (*lead, n), generator=g).double()
    positions = torch.cumsum(counts, -1).long() - 1
    hess = torch.rand(*lead, n, heads, generator=g, dtype=torch.float64)
    hess[..., ::3, :] = float("nan")
    if mass == "random":
        m = torch.rand(*lead, n, heads, generator=g, dtype=torch.float64)
    elif mass == "zero":
        m = torch.zeros(*lead, n, heads, dtype=torch.float64)
    else:  # one spike: ties everywhere else
        m = torch.zeros(*lead, n, heads, dtype=torch.float64)
        m[..., n // 2, :] = 5.0
    return keys, values, counts, positions, hess, m


ROUND = dict(round_idx=1, gamma=DEFAULT_GAMMA, eps=DEFAULT_EPS, rotary=ROTARY)


def _naive_pool(mass: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.empty_like(mass)
    half = width // 2
    n = mass.shape[-2]
    for j in range(n):
        lo, hi = max(0, j - half), min(n, j + half + 1)
        out[..., j, :] = mass[..., lo:hi, :].amax(dim=-2)
    return out


@pytest.mark.parametrize("width", [1, 3, 7, 11])
@pytest.mark.parametrize("shape", [(1, 2), (5, 3), (40, 2), (4, 30, 3)])
def test_pool_mass_is_a_clipped_sliding_maximum(width, shape):
    mass = torch.rand(*shape, generator=torch.Generator().manual_seed(width))
    assert torch.equal(pool_mass(mass, width), _naive_pool(mass, width))


@pytest.mark.parametrize("width", [0, 2, -1])
def test_pool_mass_rejects_even_or_non_positive_widths(width):
    with pytest.raises(ValueError, match="odd integer >= 1"):
        pool_mass(torch.rand(5, 2), width)


@pytest.mark.parametrize("region, k, fraction, want", [
    (100, 30, 0.5, [30]),
    (100, 50, 0.5, [50]),
    (100, 60, 0.5, [50, 10]),
    (100, 60, 0.25, [25, 18, 14, 3]),
    (10, 9, 0.25, [2, 2, 1, 1, 1, 1, 1]),
    (40, 0, 0.25, [0]),
])
def test_subround_sizes(region, k, fraction, want):
    sizes = subround_sizes(region, k, fraction)
    assert sizes == want and sum(sizes) == k


@pytest.mark.parametrize("region, k, fraction", [(10, 10, 0.5), (10, 11, 0.25), (10, 2, 0.0),
                                                 (10, 2, 0.75), (10, -1, 0.5)])
def test_subround_sizes_rejects_what_cannot_be_freed(region, k, fraction):
    with pytest.raises(ValueError):
        subround_sizes(region, k, fraction)


def _sequential(inputs, *, sink, recent, k, fraction, pool, key_weights="hessian"):
    """The sub-rounds run one by one through merge_round, mass carried by hand."""
    keys, values, counts, positions, hess, mass = inputs
    n = keys.shape[-3]
    for step in subround_sizes(n - sink - recent, k, fraction):
        r = merge_round(keys, values, counts, positions, hess, mass, sink=sink, recent=recent,
                        k=step, pool=pool, key_weights=key_weights, **ROUND)
        summed = mass.clone()
        summed[r.pairs] += mass[r.pairs + 1]
        mass = summed[r.source]
        keys, values, counts, positions, hess = r.keys, r.values, r.counts, r.positions, r.hess
    return keys, values, counts, positions, hess, mass


@pytest.mark.parametrize("mass_kind", ["random", "zero", "spike"])
@pytest.mark.parametrize("n, sink, recent, k, fraction, pool", [
    (64, 4, 8, 40, 0.25, 7),
    (64, 4, 8, 40, 0.25, 1),
    (48, 0, 0, 47, 0.5, 3),
    (33, 2, 3, 20, 0.1, 7),
    (20, 1, 1, 9, 0.25, 1),
])
@pytest.mark.parametrize("key_weights", ["hessian", "count"])
def test_merge_rounds_equals_sub_rounds_one_by_one(mass_kind, n, sink, recent, k, fraction,
                                                   pool, key_weights):
    inputs = _slots(n, mass=mass_kind, seed=n + k)
    got = merge_rounds(*inputs, sink=sink, recent=recent, k=k, max_fraction=fraction,
                       pool=pool, key_weights=key_weights, **ROUND)
    keys, values, counts, positions, hess, _ = _sequential(
        inputs, sink=sink, recent=recent, k=k, fraction=fraction, pool=pool,
        key_weights=key_weights)
    torch.testing.assert_close(got.keys, keys, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.values, values, rtol=0, atol=1e-12)
    assert torch.equal(got.counts, counts)
    assert torch.equal(got.positions, positions)
    torch.testing.assert_close(got.hess, hess, equal_nan=True)
    assert got.counts.sum() == inputs[2].sum()  # every token still counted
    assert got.keys.shape[0] == n - k
    # Sink and recent slots are untouched, and the description is consistent: unchanged
    # slots come from their source, nothing before first_changed differs.
    assert torch.equal(got.keys[:sink], inputs[0][:sink])
    assert torch.equal(got.keys[n - k - recent:], inputs[0][n - recent:])
    merged = torch.zeros(n - k, dtype=torch.bool)
    merged[got.merged_slots] = True
    unchanged = ~merged
    assert torch.equal(got.keys[unchanged], inputs[0][got.source[unchanged]])
    assert bool((got.source >= torch.arange(n - k)).all())  # rows only move left
    assert torch.equal(got.keys[: got.first_changed], inputs[0][: got.first_changed])


def test_merge_rounds_with_one_sub_round_is_merge_round():
    inputs = _slots(50, seed=3)
    one = merge_rounds(*inputs, sink=4, recent=4, k=20, max_fraction=0.5, **ROUND)
    ref = merge_round(*inputs, sink=4, recent=4, k=20, **ROUND)
    assert torch.equal(one.pairs, ref.pairs) and torch.equal(one.keys, ref.keys)
    assert one.key_fallback is not None


def test_merge_rounds_batched_over_layers_equals_layer_by_layer():
    """Layers that merge different numbers of slots in their last sub-rounds still
    compose into one layer-batched description (merged slots padded per layer)."""
    layers = 3
    inputs = _slots(60, layers=layers, seed=9)
    inputs[-1][1].zero_()  # one layer with no mass at all: ties everywhere
    together = merge_rounds(*inputs, sink=3, recent=5, k=41, max_fraction=0.25, pool=7,
                            **ROUND)
    for index in range(layers):
        alone = merge_rounds(*(t[index] for t in inputs), sink=3, recent=5, k=41,
                             max_fraction=0.25, pool=7, **ROUND)
        torch.testing.assert_close(together.keys[index], alone.keys, rtol=0, atol=1e-12)
        torch.testing.assert_close(together.values[index], alone.values, rtol=0, atol=1e-12)
        assert torch.equal(together.counts[index], alone.counts)
        assert torch.equal(together.positions[index], alone.positions)


def test_carried_mass_of_a_merged_slot_is_the_sum_of_its_pair():
    keys, values, counts, positions, hess, mass = _slots(30, layers=2, seed=5)
    r = merge_round(keys, values, counts, positions, hess, mass, sink=2, recent=2, k=8,
                    **ROUND)
    carried = carry_mass(mass, r)
    assert carried.shape == (2, 22, 2)
    torch.testing.assert_close(carried.sum(1), mass.sum(1))
    for layer in range(2):
        for out, left in enumerate(r.pairs[layer].tolist()):
            slot = int(r.merged_slots[layer, out])
            torch.testing.assert_close(carried[layer, slot],
                                       mass[layer, left] + mass[layer, left + 1])


def test_pooling_protects_the_neighbours_of_an_attended_slot():
    """One strongly attended slot (a needle digit): with pooling neither it nor its
    neighbours are merged or evicted; without pooling its neighbours go first."""
    n, sink, recent = 40, 2, 2
    inputs = list(_slots(n, seed=1, mass="zero"))
    inputs[-1] += 1e-3
    inputs[-1][20] = 10.0
    pooled = evict_lowest(*inputs, sink=sink, recent=recent, k=20, pool=7)
    plain = evict_lowest(*inputs, sink=sink, recent=recent, k=20, pool=1)
    assert not set(range(17, 24)) & set(pooled.pairs.tolist())
    assert {17, 18, 19, 21, 22} <= set(plain.pairs.tolist())
    merged = merge_rounds(*inputs, sink=sink, recent=recent, k=20, max_fraction=0.25, pool=7,
                          **ROUND)
    kept = merged.positions.tolist()
    assert all(int(inputs[3][j]) in kept for j in range(17, 24))
    scores = pair_scores(pool_mass(inputs[-1][sink:n - recent], 7), DEFAULT_GAMMA)
    assert bool((scores[15:22] > 1).all())


# ------------------------------------------------------------ merging only what is dropped
def _runs_free(drop: list[bool]) -> int:
    """Slots freed by collapsing each run of dropped slots to one (written out)."""
    freed, run = 0, 0
    for d in drop + [False]:
        if d:
            run += 1
        else:
            freed += max(0, run - 1)
            run = 0
    return freed


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [0, 1, 7, 20, 38])
def test_keep_set_is_the_largest_top_set_whose_rest_frees_k(seed, k):
    from kvslimmer_vllm.core.merge import keep_set, mergeable_without

    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(3, 40, generator=g)
    scores[1] = 0.5  # all tied
    keep = keep_set(scores, k)
    for layer in range(3):
        order = torch.sort(scores[layer].double(), stable=True).indices.tolist()
        # The smallest prefix of the ascending order (SnapKV's drop order) that frees k.
        drop_count = next(d for d in range(41)
                          if _runs_free([i in set(order[:d]) for i in range(40)]) >= k)
        want = [i not in set(order[:drop_count]) for i in range(40)]
        assert keep[layer].tolist() == want
        assert int(mergeable_without(keep[layer:layer + 1])) >= k


def test_protected_slots_are_never_merged_and_the_rest_frees_k():
    from kvslimmer_vllm.core.merge import keep_set

    n, sink, recent, k = 80, 4, 6, 30
    inputs = _slots(n, layers=2, seed=12)
    region = inputs[-1][:, sink:n - recent].sum(-1)
    protect = torch.zeros(2, n, dtype=torch.bool)
    protect[:, sink:n - recent] = keep_set(region, k)
    result = merge_rounds(*inputs, sink=sink, recent=recent, k=k, max_fraction=0.25,
                          protect=protect, **ROUND)
    for layer in range(2):
        kept = protect[layer].nonzero().flatten()
        # Every protected slot survives unchanged (same key, value, count and position).
        out = {int(p): j for j, p in enumerate(result.positions[layer].tolist())}
        for slot in kept.tolist():
            j = out[int(inputs[3][layer, slot])]
            assert torch.equal(result.keys[layer, j], inputs[0][layer, slot])
            assert result.counts[layer, j] == inputs[2][layer, slot]
        assert result.counts[layer].sum() == inputs[2][layer].sum()
    assert result.keys.shape[1] == n - k


def test_protect_refuses_a_k_it_cannot_free():
    inputs = _slots(20, seed=2)
    protect = torch.zeros(20, dtype=torch.bool)
    protect[1::2] = True  # no two unprotected slots are adjacent
    with pytest.raises(ValueError, match="protected"):
        merge_rounds(*inputs, sink=0, recent=0, k=1, protect=protect, **ROUND)


def test_protected_merges_batched_over_layers_equal_layer_by_layer():
    from kvslimmer_vllm.core.merge import keep_set

    n, sink, recent, k, layers = 70, 3, 5, 33, 3
    inputs = _slots(n, layers=layers, seed=21)
    region = inputs[-1][:, sink:n - recent].sum(-1)
    region[2] = torch.linspace(0, 1, n - sink - recent)  # one long free run in layer 2
    protect = torch.zeros(layers, n, dtype=torch.bool)
    protect[:, sink:n - recent] = keep_set(region, k)
    together = merge_rounds(*inputs, sink=sink, recent=recent, k=k, max_fraction=0.25,
                            protect=protect, **ROUND)
    for i in range(layers):
        alone = merge_rounds(*(t[i] for t in inputs), sink=sink, recent=recent, k=k,
                             max_fraction=0.25, protect=protect[i], **ROUND)
        torch.testing.assert_close(together.keys[i], alone.keys, rtol=0, atol=0)
        torch.testing.assert_close(together.values[i], alone.values, rtol=0, atol=0)
        assert torch.equal(together.counts[i], alone.counts)
        assert torch.equal(together.positions[i], alone.positions)
