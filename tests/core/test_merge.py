"""Closed-form key weights, the merge round's bookkeeping, lossless value merging and ablations."""

import math

import pytest
import torch
from torch.autograd.functional import hessian, jacobian

from kvslimmer_vllm.core import (
    RotarySpec,
    cross_hessian,
    default_inv_freq,
    evict_lowest,
    evict_oldest,
    hessian_stats,
    merge_round,
    merge_weights,
    merged_attention,
    normalize_mass,
    pair_scores,
    recover_d,
    smooth_hessian,
)

GAMMA = 4096 / math.log(512)
EPS = 1e-6


def _state(seed, n=40, kv_heads=2, dim=8, dtype=torch.float32):
    """A random slot-major cache state with some merged slots and some new (NaN-hess) slots."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 12, (n,), generator=gen).to(dtype)
    hess = torch.rand(n, kv_heads, generator=gen, dtype=dtype) * 0.01
    hess[torch.rand(n, generator=gen) < 0.3] = float("nan")
    return dict(
        keys=torch.randn(n, kv_heads, dim, generator=gen, dtype=dtype),
        values=torch.randn(n, kv_heads, dim, generator=gen, dtype=dtype),
        counts=counts,
        positions=torch.cumsum(counts.long(), 0) - 1,
        hess=hess,
        mass=torch.rand(n, kv_heads, generator=gen, dtype=dtype) ** 3,
    )


def _round(state, **kwargs):
    args = dict(round_idx=3, gamma=GAMMA, eps=EPS, rotary=None)
    args.update(kwargs)
    return merge_round(**state, **args)


def _assert_same(a, b):
    torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)


# --- merge_weights -------------------------------------------------------------------------


def test_merge_weights_closed_form():
    h_i = torch.tensor([[3.0, 1.0]])
    h_j = torch.tensor([[2.0, 1.0]])
    h_ij = torch.tensor([[1.0, 0.5]])
    a, b, fallback = merge_weights(h_i, h_j, h_ij, torch.tensor([1.0]), torch.tensor([1.0]), EPS)
    torch.testing.assert_close(a, torch.tensor([[2 / 3, 0.5]]))
    torch.testing.assert_close(a + b, torch.ones(1, 2))
    assert not fallback.any()


def test_merge_weights_guard_falls_back_to_count_weighting():
    c_i, c_j = torch.tensor([3.0, 1.0, 5.0, 2.0]), torch.tensor([1.0, 4.0, 5.0, 6.0])
    h_i = torch.tensor([[1.0], [0.5], [float("nan")], [2.0]])
    h_j = torch.tensor([[1.0], [3.0], [1.0], [2.0]])
    h_ij = torch.tensor([[1.0], [1.0], [0.0], [1.0]])
    # rows: A + B = 0; A < 0 so a < 0; NaN; healthy (a = 1/2)
    a, b, fallback = merge_weights(h_i, h_j, h_ij, c_i, c_j, EPS)
    assert fallback[:, 0].tolist() == [True, True, True, False]
    torch.testing.assert_close(a[:, 0], torch.tensor([0.75, 0.2, 0.5, 0.5]))
    torch.testing.assert_close(b, 1 - a)
    # A + B tiny but positive: below eps it is guarded as well.
    a, _, fallback = merge_weights(
        torch.tensor([[1e-9]]), torch.tensor([[1e-9]]), torch.zeros(1, 1), c_i[:1], c_j[:1], EPS
    )
    assert fallback.item() and a.item() == pytest.approx(0.75)


@pytest.mark.parametrize("seed", range(5))
def test_merged_key_minimises_the_quadratic_form(seed):
    gen = torch.Generator().manual_seed(seed)
    dim = 6
    k1, k2 = torch.randn(2, dim, generator=gen, dtype=torch.float64)
    h11, h22 = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    h12 = torch.rand((), generator=gen, dtype=torch.float64) * 0.45  # A, B > 0
    if seed == 0:
        h12 = -h12  # a negative cross term is fine too as long as A, B > 0

    def form(k):
        cross = (k - k1) @ (k - k2)
        return h11 * (k - k1).square().sum() + h22 * (k - k2).square().sum() - 2 * h12 * cross

    origin = torch.zeros(dim, dtype=torch.float64)
    minimiser = -torch.linalg.solve(hessian(form, origin), jacobian(form, origin))
    a, b, fallback = merge_weights(
        h11.view(1, 1), h22.view(1, 1), h12.view(1, 1), torch.ones(1), torch.ones(1), 1e-12
    )
    assert not fallback.any()
    torch.testing.assert_close(a[0, 0] * k1 + b[0, 0] * k2, minimiser)


# --- merge_round bookkeeping ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_merge_round_bookkeeping(seed):
    state = _state(seed)
    n, sink, recent, k = 40, 4, 6, 12
    result = _round(state, sink=sink, recent=recent, k=k)
    out_n = n - k
    assert result.keys.shape == (out_n, 2, 8) and result.hess.shape == (out_n, 2)
    assert result.counts.sum() == state["counts"].sum()
    assert torch.all(result.positions[1:] >= result.positions[:-1])

    left = result.pairs.tolist()
    assert len(left) == k and left == sorted(left)
    assert all(sink <= i and i + 1 < n - recent for i in left)
    assert all(b - a >= 2 for a, b in zip(left, left[1:]))
    first = result.first_changed
    assert first == left[0]
    for name in ("keys", "values", "counts", "positions"):
        _assert_same(getattr(result, name)[:first], state[name][:first])
        _assert_same(getattr(result, name)[-recent:], state[name][-recent:])
    _assert_same(result.hess[:sink], state["hess"][:sink])
    _assert_same(result.hess[-recent:], state["hess"][-recent:])

    # Independent recomputation of the statistics and weights from the public building blocks.
    region = slice(sink, n - recent)
    alpha = normalize_mass(state["mass"][region])
    h = smooth_hessian(hessian_stats(alpha, state["values"][region])[0], state["hess"][region], 3)
    h_ij = cross_hessian(alpha, recover_d(h, alpha, EPS))
    local = torch.tensor(left) - sink
    c = state["counts"]
    i, j = torch.tensor(left), torch.tensor(left) + 1
    a, b, fallback = merge_weights(h[local], h[local + 1], h_ij[local], c[i], c[j], EPS)
    _assert_same(result.key_fallback, fallback)

    # Walk the input and the output together.
    out = 0
    merged = 0
    for slot in range(n):
        if slot in left:
            p = left.index(slot)
            keys = a[p, :, None] * state["keys"][slot] + b[p, :, None] * state["keys"][slot + 1]
            torch.testing.assert_close(result.keys[out], keys)
            value = (c[slot] * state["values"][slot] + c[slot + 1] * state["values"][slot + 1]) / (
                c[slot] + c[slot + 1]
            )
            torch.testing.assert_close(result.values[out], value)
            assert result.counts[out] == c[slot] + c[slot + 1]
            assert result.positions[out] == state["positions"][slot + 1]
            hess = a[p] ** 2 * h[slot - sink] + b[p] ** 2 * h[slot + 1 - sink]
            torch.testing.assert_close(result.hess[out], hess)
            merged += 1
        elif slot - 1 in left:
            continue
        else:
            for name in ("keys", "values", "counts", "positions"):
                _assert_same(getattr(result, name)[out], state[name][slot])
            if sink <= slot < n - recent:
                torch.testing.assert_close(result.hess[out], h[slot - sink])
        out += 1
    assert out == out_n and merged == k
    assert torch.isfinite(result.hess[sink : out_n - recent]).all()


def test_merge_round_guard_falls_back_when_one_slot_dominates():
    state = _state(11, n=6)
    state["mass"][2] = torch.tensor([9.0, 9.0])  # alpha > 1/2 in the two-slot region: A < 0
    state["mass"][3] = torch.tensor([1.0, 1.0])
    result = _round(state, sink=2, recent=2, k=1)
    assert result.key_fallback.all()
    c, keys = state["counts"], state["keys"]
    expected = (c[2] * keys[2] + c[3] * keys[3]) / (c[2] + c[3])
    torch.testing.assert_close(result.keys[2], expected)


def test_merge_round_with_zero_k_only_smooths():
    state = _state(4)
    result = _round(state, sink=3, recent=5, k=0)
    assert result.first_changed == 40 and result.pairs.numel() == 0
    for name in ("keys", "values", "counts", "positions"):
        _assert_same(getattr(result, name), state[name])
    assert torch.isfinite(result.hess[3:35]).all()


def test_merge_round_can_use_the_whole_region():
    state = _state(5, n=12)
    result = _round(state, sink=2, recent=2, k=4)
    assert result.pairs.tolist() == [2, 4, 6, 8]
    assert result.counts.shape == (8,)


def test_merge_round_keeps_input_dtypes():
    state = _state(6)
    state["keys"], state["values"] = state["keys"].bfloat16(), state["values"].bfloat16()
    result = _round(state, sink=4, recent=4, k=5)
    assert result.keys.dtype == result.values.dtype == torch.bfloat16
    assert result.counts.dtype == torch.float32 and result.positions.dtype == torch.int64
    assert result.hess.dtype == torch.float32

    state64 = {name: t.double() if t.is_floating_point() else t for name, t in _state(6).items()}
    result64 = _round(state64, sink=4, recent=4, k=5)
    assert result64.keys.dtype == torch.float64 and result64.hess.dtype == torch.float64


def test_merge_round_validates_inputs():
    state = _state(7)
    with pytest.raises(ValueError, match=r"sink=10, recent=11, k=10, N=40"):
        _round(state, sink=10, recent=11, k=10)
    with pytest.raises(ValueError, match="round_idx"):
        _round(state, sink=1, recent=1, k=1, round_idx=0)
    with pytest.raises(ValueError, match="key_weights"):
        _round(state, sink=1, recent=1, k=1, key_weights="mean")
    bad = dict(state, hess=state["hess"][:-1])
    with pytest.raises(ValueError, match="hess"):
        _round(bad, sink=1, recent=1, k=1)
    bad = dict(state, counts=state["counts"][:, None])
    with pytest.raises(ValueError, match="counts"):
        _round(bad, sink=1, recent=1, k=1)


# --- lossless value merge ------------------------------------------------------------------


@pytest.mark.parametrize("use_rotary", [False, True], ids=["post-rope", "rope"])
def test_merging_identical_keys_leaves_attention_unchanged(use_rotary):
    gen = torch.Generator().manual_seed(8)
    kv_heads, group, dim, sink, recent, p = 2, 3, 16, 3, 4, 700
    n = sink + 2 + recent
    positions = torch.arange(p - sink, p - sink + n)  # the pair sits at positions p and p + 1
    counts = torch.ones(n)
    counts[sink], counts[sink + 1] = 7.0, 40.0
    spec = RotarySpec(dim, True, inv_freq=default_inv_freq(dim, 10000.0)) if use_rotary else None

    raw = torch.randn(n, kv_heads, dim, generator=gen)
    raw[sink + 1] = raw[sink]  # identical un-rotated keys
    keys = spec.rotate(raw, positions) if use_rotary else raw
    values = torch.randn(n, kv_heads, dim, generator=gen)
    state = dict(
        keys=keys,
        values=values,
        counts=counts,
        positions=positions,
        hess=torch.full((n, kv_heads), float("nan")),
        mass=torch.rand(n, kv_heads, generator=gen),
    )
    result = _round(state, sink=sink, recent=recent, k=1, round_idx=1, rotary=spec)
    assert result.pairs.tolist() == [sink] and result.counts[sink] == 47.0

    reference_keys = keys.clone()
    if use_rotary:
        # Both tokens seen at the later position: the cache the merge must reproduce.
        later = spec.rotate(raw[sink : sink + 1], positions[sink + 1 : sink + 2])
        torch.testing.assert_close(result.keys[sink], later[0], atol=1e-5, rtol=1e-5)
        reference_keys[sink] = later[0]
        reference_keys[sink + 1] = later[0]

    query = torch.randn(5, kv_heads * group, dim, generator=gen)
    before = merged_attention(query, reference_keys, values, counts, scale=dim**-0.5)
    after = merged_attention(query, result.keys, result.values, result.counts, scale=dim**-0.5)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


# --- ablations -----------------------------------------------------------------------------


def test_count_key_weights_average_the_same_pairs():
    state = _state(9)
    hessian = _round(state, sink=4, recent=4, k=8)
    average = merge_round(
        **state, sink=4, recent=4, k=8, round_idx=3, gamma=GAMMA, eps=EPS, rotary=None,
        key_weights="count",
    )
    _assert_same(average.pairs, hessian.pairs)
    _assert_same(average.values, hessian.values)
    _assert_same(average.counts, hessian.counts)
    assert average.key_fallback is None
    c, keys = state["counts"], state["keys"]
    for out, slot in enumerate(average.pairs.tolist()):
        expected = (c[slot] * keys[slot] + c[slot + 1] * keys[slot + 1]) / (c[slot] + c[slot + 1])
        torch.testing.assert_close(average.keys[slot - out], expected)


def test_evict_lowest_drops_the_least_observed_slots():
    state = _state(10)
    sink, recent, k = 4, 6, 7
    result = evict_lowest(**state, sink=sink, recent=recent, k=k)
    summed = state["mass"].sum(1)
    expected = sorted(range(sink, 40 - recent), key=lambda s: (summed[s].item(), s))[:k]
    assert result.pairs.tolist() == sorted(expected)
    assert result.first_changed == min(expected)
    keep = [s for s in range(40) if s not in expected]
    for name in ("keys", "values", "counts", "positions", "hess"):
        _assert_same(getattr(result, name), state[name][keep])
    assert evict_lowest(**state, sink=sink, recent=recent, k=30).counts.shape == (10,)
    with pytest.raises(ValueError, match="k=31"):
        evict_lowest(**state, sink=sink, recent=recent, k=31)


def test_evict_oldest_keeps_sink_and_recent_slots():
    state = _state(10)
    sink, recent, k = 4, 6, 7
    result = evict_oldest(**state, sink=sink, recent=recent, k=k)
    assert result.pairs.tolist() == list(range(sink, sink + k))
    assert result.first_changed == sink
    keep = list(range(sink)) + list(range(sink + k, 40))
    for name in ("keys", "values", "counts", "positions", "hess"):
        _assert_same(getattr(result, name), state[name][keep])
    # the mass plays no part
    flipped = evict_oldest(**{**state, "mass": -state["mass"]}, sink=sink, recent=recent, k=k)
    assert flipped.pairs.tolist() == result.pairs.tolist()
    assert evict_oldest(**state, sink=sink, recent=recent, k=0).first_changed == 40
    with pytest.raises(ValueError, match="k=31"):
        evict_oldest(**state, sink=sink, recent=recent, k=31)


@pytest.mark.parametrize("ranks", [2, 4])
def test_tensor_parallel_ranks_merge_their_heads_under_one_plan(ranks):
    """Each rank holds ``Hkv / ranks`` heads; summing the ranks' pair scores (what an
    all-reduce does) gives every rank the single-rank pairs, and the heads it merges equal
    the single-rank result."""
    state = _state(21, n=64, kv_heads=4, dim=16)
    rotary = RotarySpec(rotary_dim=16, is_neox=True, inv_freq=default_inv_freq(16, 1e4))
    common = dict(sink=4, recent=8, k=20, round_idx=2, gamma=GAMMA, eps=1e-21)
    whole = merge_round(**state, rotary=rotary, **common)
    heads = torch.arange(4).chunk(ranks)

    def shard(h):
        return {name: (t[:, h] if t.dim() > 1 else t) for name, t in state.items()}

    partial = [pair_scores(shard(h)["mass"][4:56], GAMMA) for h in heads]
    for h, own in zip(heads, partial):
        all_reduce = lambda s, own=own: s - own + sum(partial)  # noqa: E731
        part = merge_round(**shard(h), rotary=rotary, score_reduce=all_reduce, **common)
        assert torch.equal(part.pairs, whole.pairs)
        torch.testing.assert_close(part.keys, whole.keys[:, h])
        torch.testing.assert_close(part.values, whole.values[:, h])
        torch.testing.assert_close(part.hess, whole.hess[:, h], equal_nan=True)
        assert torch.equal(part.counts, whole.counts)
        assert torch.equal(part.positions, whole.positions)
    evict_whole = evict_lowest(**state, sink=4, recent=8, k=20)
    slot_sums = [shard(h)["mass"][4:56].double().sum(1) for h in heads]
    for h, own in zip(heads, slot_sums):
        part = evict_lowest(**shard(h), sink=4, recent=8, k=20,
                            score_reduce=lambda s, own=own: s - own + sum(slot_sums))
        assert torch.equal(part.pairs, evict_whole.pairs)


# --- several layers at once ----------------------------------------------------------------


def _layers(num_layers, seed, n=40, kv_heads=2, dim=8):
    """Per-layer states with adversarial layers: zero mass (uniform alpha), tied mass."""
    layers = [_state(seed + i, n=n, kv_heads=kv_heads, dim=dim) for i in range(num_layers)]
    if num_layers > 1:
        layers[1]["mass"].zero_()
    if num_layers > 2:
        layers[2]["mass"].fill_(0.5)
    # layers of one request are merged independently, so their counts and positions
    # differ too (each _state draws its own)
    return layers, {name: torch.stack([s[name] for s in layers]) for name in layers[0]}


@pytest.mark.parametrize("num_layers", [1, 3, 5])
@pytest.mark.parametrize("k", [0, 1, 9, 15])
@pytest.mark.parametrize("method", ["hessian", "count", "evict", "streaming"])
def test_layer_batched_round_equals_one_layer_at_a_time(num_layers, k, method):
    """With a leading layer dimension each layer gets exactly the result it gets alone
    (its own pairs or dropped slots), also for zero and tied mass and k = 0 or the whole
    region."""
    layers, stacked = _layers(num_layers, seed=100 + k)
    rotary = RotarySpec(rotary_dim=8, is_neox=False, inv_freq=default_inv_freq(8, 1e4))
    sink, recent = 3, 7  # region of 30 slots: k = 15 uses all of it

    def run(state):
        if method == "evict":
            return evict_lowest(**state, sink=sink, recent=recent, k=k)
        if method == "streaming":
            return evict_oldest(**state, sink=sink, recent=recent, k=k)
        return merge_round(**state, sink=sink, recent=recent, k=k, round_idx=2, gamma=GAMMA,
                           eps=EPS, rotary=rotary, key_weights=method)

    together = run(stacked)
    assert together.pairs.shape == (num_layers, k)
    assert together.keys.shape == (num_layers, 40 - k, 2, 8)
    for index, state in enumerate(layers):
        alone = run(state)
        assert torch.equal(together.pairs[index], alone.pairs)
        for name in ("keys", "values", "counts", "positions", "hess"):
            torch.testing.assert_close(getattr(together, name)[index], getattr(alone, name),
                                       atol=1e-6, rtol=1e-5, equal_nan=True)
        assert together.first_changed <= alone.first_changed
        if alone.key_fallback is not None:
            assert torch.equal(together.key_fallback[index], alone.key_fallback)
    if k:
        assert together.first_changed == min(run(s).first_changed for s in layers)


def test_layer_batched_round_validates_shapes():
    _, stacked = _layers(2, seed=3)
    bad = {**stacked, "counts": stacked["counts"][:1]}
    with pytest.raises(ValueError, match=r"counts must have shape \[2, 40\], got \[1, 40\]"):
        _round(bad, sink=2, recent=2, k=3)
    with pytest.raises(ValueError, match=r"keys must be \[N, Hkv, D\]"):
        _round({**stacked, "keys": stacked["keys"][0, :, 0]}, sink=2, recent=2, k=3)
