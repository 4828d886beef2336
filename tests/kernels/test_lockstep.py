"""Lock-step protected sub-rounds (``kernels/lockstep.py``) against the reference, which runs
the layers one after another (``core.merge.merge_rounds`` with ``protect``), and
``select_pairs_rows`` (C++ op) against its reference.

Every layer is sized by its own mask, so the adversarial cases give layers different numbers
of sub-rounds (checked): the lock step must leave a finished layer alone while the others
go on. The pairs must be the reference's exactly (scores are elementwise in the mass), the
merged rows and state equal to rounding. The lock step's promise, one host round trip per
sub-round whatever the number of layers, is counted through its pair selector.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import triton_kernel_modules
from kvslimmer_vllm import kernels
from kvslimmer_vllm.core import merge as merge_ref
from kvslimmer_vllm.core.merge import DEFAULT_EPS, DEFAULT_GAMMA, slot_scores
from kvslimmer_vllm.core.rope import RotarySpec, build_cos_sin_cache, default_inv_freq
from kvslimmer_vllm.core.select import select_pairs, select_pairs_rows
from kvslimmer_vllm.kernels.lockstep import ProtectedSchedule, protected_rounds

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_CPP = kernels.attention_backend_name(torch.device("cpu")) == "cpp"
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the C++ extension is not built")
FIELDS = ("counts", "positions", "hess", "source", "merged_slots", "merged_keys",
          "merged_values")


def _state(layers, n, heads, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(layers, n, heads, 2 * dim, generator=gen, dtype=torch.float64)
    counts = torch.randint(1, 4, (layers, n), generator=gen).double()
    positions = torch.cumsum(counts.long(), dim=1) - 1
    hess = torch.rand(layers, n, heads, generator=gen, dtype=torch.float64)
    hess[:, -n // 5:] = float("nan")  # new since the last round
    mass = torch.rand(layers, n, heads, generator=gen) ** 4
    kv, counts, hess = kv.to(dtype), counts.to(dtype), hess.to(dtype)
    on = [t.to(DEVICE) for t in (kv, counts, positions, hess, mass)]
    dim = on[0].shape[-1] // 2
    return on[0][..., :dim], on[0][..., dim:], *on[1:]


def _snap_protect(mass, k, sink, recent, pool):
    """SnapMerge's keep set as the method builds it."""
    scores = slot_scores(mass, sink=sink, recent=recent, pool=pool)
    protect = torch.zeros(mass.shape[:2], dtype=torch.bool, device=mass.device)
    protect[:, sink:mass.shape[1] - recent] = merge_ref.keep_set(scores, k)
    return protect


def _rotary(dim):
    inv_freq = default_inv_freq(dim, 10000.0)
    return RotarySpec(dim, True, cos_sin_cache=build_cos_sin_cache(inv_freq, 4096).to(DEVICE))


def _settings(**overrides):
    base = dict(sink=2, recent=4, round_idx=2, gamma=DEFAULT_GAMMA, eps=DEFAULT_EPS,
                rotary=None, key_weights="hessian", pool=1, max_fraction=0.5)
    base.update(overrides)
    return base


def _assert_same(got, want, tol):
    assert got.first_changed == want.first_changed
    assert got.pairs.shape == want.pairs.shape
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape, name
        if a.dtype in (torch.int64, torch.int32):
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, equal_nan=True, **tol, msg=name)


def _subrounds_per_layer(state, protect, k, settings):
    """How many sub-rounds the reference runs in each layer (its selector counts them)."""
    counts = []
    for layer in range(protect.shape[0]):
        calls = []

        def selector(scores, step, calls=calls):
            calls.append(step)
            return select_pairs(scores, step)

        merge_ref.merge_rounds(*(t[layer:layer + 1] for t in state),
                               protect=protect[layer:layer + 1], k=k, selector=selector,
                               **settings)
        counts.append(len(calls))
    return counts


class CountingRows:
    """A row selector that counts its calls (one per lock-step sub-round)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, scores, lengths, ks):
        self.calls += 1
        return select_pairs_rows(scores, lengths, ks)


TOL64 = dict(rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("layers,n,k,sink,recent,pool,max_fraction,key_weights", [
    (4, 64, 20, 2, 4, 1, 0.5, "hessian"),
    (6, 200, 150, 4, 8, 3, 0.25, "hessian"),
    (3, 50, 10, 0, 0, 7, 0.1, "count"),
    (1, 40, 5, 1, 1, 1, 0.5, "hessian"),
    (5, 97, 60, 3, 5, 5, 0.3, "hessian"),
    (2, 12, 1, 1, 1, 1, 0.5, "hessian"),
])
@pytest.mark.parametrize("rope", [False, True], ids=["post-rope", "rope"])
def test_lockstep_equals_layer_by_layer_reference(layers, n, k, sink, recent, pool,
                                                  max_fraction, key_weights, rope):
    state = _state(layers, n, 3, 16, torch.float64, seed=n + k)
    protect = _snap_protect(state[5], k, sink, recent, pool)
    settings = _settings(sink=sink, recent=recent, pool=pool, max_fraction=max_fraction,
                         key_weights=key_weights, rotary=_rotary(16) if rope else None)
    want = merge_ref.merge_rounds(*state, protect=protect, k=k, **settings)
    rows = CountingRows()
    got = protected_rounds(*state, protect, k=k, row_selector=rows, **settings)
    _assert_same(got, want, TOL64)
    assert rows.calls == max(_subrounds_per_layer(state, protect, k, settings))


def _adversarial_masks(layers, n, sink, recent):
    """Layers with very different protected slots: none, every other slot but one long free
    run, one free run at the region's end, a random half, a long run and isolated slots."""
    m = n - sink - recent
    region = torch.zeros(layers, m, dtype=torch.bool)
    region[1, ::2] = True
    region[1, m // 3: m // 3 + m // 2] = False
    region[2, : m - m // 2] = True
    region[3] = torch.rand(m, generator=torch.Generator().manual_seed(3)) < 0.5
    region[4, 1::3] = True
    region[4, : m // 4] = False
    protect = torch.zeros(layers, n, dtype=torch.bool)
    protect[:, sink:n - recent] = region
    return protect


@pytest.mark.parametrize("max_fraction", [0.5, 0.2, 0.05])
def test_layers_with_different_subround_counts(max_fraction):
    layers, n, sink, recent = 5, 160, 3, 6
    state = _state(layers, n, 2, 8, torch.float64, seed=7)
    protect = _adversarial_masks(layers, n, sink, recent).to(DEVICE)
    k = int(merge_ref.mergeable_without(protect[:, sink:n - recent].cpu()).min())
    settings = _settings(sink=sink, recent=recent, max_fraction=max_fraction, pool=3)
    per_layer = _subrounds_per_layer(state, protect, k, settings)
    assert len(set(per_layer)) > 1, per_layer  # the layers really are out of step
    rows = CountingRows()
    got = protected_rounds(*state, protect, k=k, row_selector=rows, **settings)
    want = merge_ref.merge_rounds(*state, protect=protect, k=k, **settings)
    _assert_same(got, want, TOL64)
    assert rows.calls == max(per_layer)
    # No protected slot was merged: each survives unchanged as some output slot.
    for layer in range(layers):
        kept = protect[layer].nonzero().flatten()
        assert set(kept.tolist()) <= set(got.source[layer].tolist())


def test_score_reduce_runs_once_per_subround_on_every_layer():
    layers, n, k = 4, 80, 30
    state = _state(layers, n, 3, 8, torch.float64, seed=11)
    protect = _snap_protect(state[5], k, 2, 4, 3)
    shapes = []

    def reduce(scores):  # doubling changes no choice; the shape says who it saw
        shapes.append(tuple(scores.shape))
        return scores * 2.0

    settings = _settings(pool=3, max_fraction=0.2)
    got = protected_rounds(*state, protect, k=k, score_reduce=reduce, **settings)
    want = merge_ref.merge_rounds(*state, protect=protect, k=k, **settings)
    _assert_same(got, want, TOL64)
    assert len(shapes) == max(_subrounds_per_layer(state, protect, k, settings))
    assert all(shape[0] == layers for shape in shapes)


def test_zero_k_and_single_layer_inputs():
    state = _state(3, 30, 2, 8, torch.float64, seed=5)
    protect = _snap_protect(state[5], 0, 2, 4, 1)
    settings = _settings()
    _assert_same(protected_rounds(*state, protect, k=0, **settings),
                 merge_ref.merge_rounds(*state, protect=protect, k=0, **settings), TOL64)
    one = [t[1] for t in state]  # [N, ...]: no layer dimension
    protect = _snap_protect(state[5][1:2], 6, 2, 4, 1)[0]
    got = protected_rounds(*one, protect, k=6, **settings)
    want = merge_ref.merge_rounds(*one, protect=protect, k=6, **settings)
    assert got.counts.shape == (24,)
    _assert_same(got, want, TOL64)


def test_errors_name_the_problem():
    state = _state(2, 30, 2, 8, torch.float64, seed=1)
    protect = torch.zeros(2, 30, dtype=torch.bool, device=DEVICE)
    protect[1, 2:26:2] = True  # layer 1 can free nothing without merging a protected slot
    with pytest.raises(ValueError, match="protected slot"):
        protected_rounds(*state, protect, k=3, **_settings())
    with pytest.raises(ValueError, match=r"protect must be \[2, 30\]"):
        protected_rounds(*state, protect[:, :29], k=3, **_settings())
    with pytest.raises(ValueError, match="key_weights"):
        protected_rounds(*state, protect, k=0, **_settings(key_weights="mean"))


@needs_cpp
@pytest.mark.parametrize("rope", [False, True], ids=["post-rope", "rope"])
def test_dispatch_with_cpp_kernels_matches_reference_float32(rope):
    """What SnapMerge's gathered round runs: kernels.merge_rounds with the C++ value spread,
    pair merge and row selection (CPU), or Triton (CUDA)."""
    layers, n, k, pool = 6, 300, 220, 7
    state = _state(layers, n, 3, 32, torch.float32, seed=3)
    protect = _snap_protect(state[5], k, 4, 16, pool)
    settings = _settings(sink=4, recent=16, pool=pool, max_fraction=0.25,
                         rotary=_rotary(32) if rope else None)
    got = kernels.merge_rounds(*state, protect=protect, k=k, selector=kernels.select_pairs,
                               row_selector=kernels.select_pairs_rows,
                               spread=kernels.value_spread, pair_merge=kernels.merge_pairs,
                               **settings)
    want = merge_ref.merge_rounds(*state, protect=protect, k=k, **settings)
    _assert_same(got, want, dict(rtol=2e-4, atol=2e-5))


def test_triton_round_kernels_in_lockstep():
    """The Triton value spread and pair merge (interpreted without CUDA) inside the lock
    step, float32 and bfloat16 caches."""
    (rk,) = triton_kernel_modules("round")

    def pair_merge(keys, values, left, a, c_i, c_j, rotary=None, delta=None):
        return rk.merge_pairs(keys, values, left, a, c_i, c_j,
                              *kernels.shift_table(rotary, delta, torch.float32))

    for dtype, tol in ((torch.float32, dict(rtol=1e-4, atol=1e-5)),
                       (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))):
        state = _state(3, 48, 2, 16, dtype, seed=9)
        protect = _snap_protect(state[5], 20, 2, 4, 3)
        settings = _settings(pool=3, max_fraction=0.25, rotary=_rotary(16))
        got = protected_rounds(*state, protect, k=20, spread=rk.value_spread,
                               pair_merge=pair_merge, **settings)
        want = merge_ref.merge_rounds(*state, protect=protect, k=20, **settings)
        _assert_same(got, want, tol)


@settings(max_examples=60)
@given(layers=st.integers(1, 5), n=st.integers(10, 120), sink=st.integers(0, 4),
       recent=st.integers(0, 6), density=st.sampled_from([0.0, 0.2, 0.5, 0.8]),
       share=st.floats(0.0, 1.0), max_fraction=st.sampled_from([0.05, 0.2, 0.25, 0.5]),
       pool=st.sampled_from([1, 3, 5]), count_weights=st.booleans(), seed=st.integers(0, 99),
       cpp_books=st.booleans())
def test_any_masks_and_sizes_equal_the_reference(layers, n, sink, recent, density, share,
                                                 max_fraction, pool, count_weights, seed,
                                                 cpp_books):
    """Random protect masks (each layer its own), region sizes and settings: the lock
    step (its books in torch or in C++) equals the layer-by-layer reference."""
    if cpp_books and not HAS_CPP:
        cpp_books = False
    gen = torch.Generator().manual_seed(seed)
    protect = torch.zeros(layers, n, dtype=torch.bool)
    protect[:, sink:n - recent] = torch.rand(layers, n - sink - recent, generator=gen) < density
    k = int(share * int(merge_ref.mergeable_without(protect[:, sink:n - recent]).min()))
    state = _state(layers, n, 2, 8, torch.float64, seed=seed)
    settings_ = _settings(sink=sink, recent=recent, pool=pool, max_fraction=max_fraction,
                          key_weights="count" if count_weights else "hessian")
    want = merge_ref.merge_rounds(*state, protect=protect.to(DEVICE), k=k, **settings_)
    got = protected_rounds(*state, protect.to(DEVICE), k=k, **settings_,
                           schedule_ops=torch.ops.kvslimmer if cpp_books else None)
    _assert_same(got, want, TOL64)


# ------------------------------------------------------------------ the host's bookkeeping

@needs_cpp
@pytest.mark.parametrize("layers,n,k,sink,recent,max_fraction,masks", [
    (6, 400, 300, 4, 16, 0.25, "keep set"), (5, 160, 40, 3, 6, 0.05, "adversarial"),
    (3, 60, 0, 2, 2, 0.3, "keep set"), (4, 200, 150, 0, 0, 0.5, "keep set"),
])
def test_schedule_in_cpp_equals_torch(layers, n, k, sink, recent, max_fraction, masks):
    """ProtectedSchedule's steps and merged, by the C++ ops (protected_steps,
    protected_merged) and by torch ops, step for step through a whole step's schedule:
    sizes, orders, masks, slot counts and what is left to free."""
    if masks == "keep set":
        scores = torch.rand(layers, n - sink - recent, generator=torch.Generator().manual_seed(n),
                            dtype=torch.float64)
        protect = torch.zeros(layers, n, dtype=torch.bool)
        protect[:, sink:n - recent] = merge_ref.keep_set(scores, k)
    else:
        protect = _adversarial_masks(layers, n, sink, recent)
        k = int(merge_ref.mergeable_without(protect[:, sink:n - recent]).min())
    plain = ProtectedSchedule(protect, sink, recent, k)
    cpp = ProtectedSchedule(protect, sink, recent, k, torch.ops.kvslimmer)
    gen = torch.Generator().manual_seed(1)
    turns = 0
    while turns == 0 or bool(plain.remaining.any()):
        steps = plain.steps(max_fraction)
        assert torch.equal(cpp.steps(max_fraction), steps)
        rows = steps.nonzero().flatten()
        if not len(rows):
            break
        width = int(plain.held[rows].max()) - sink - recent
        scores = torch.rand(len(rows), width - 1, generator=gen, dtype=torch.float64)
        local = select_pairs_rows(plain.guard(scores, rows), plain.lengths(rows), steps[rows])
        assert torch.equal(cpp.merged(rows, local), plain.merged(rows, local))
        for name in ("masks", "held", "remaining"):
            assert torch.equal(getattr(cpp, name), getattr(plain, name)), name
        turns += 1
    assert int(plain.remaining.sum()) == 0 and bool((plain.held == n - k).all())


@needs_cpp
def test_schedule_ops_errors_name_the_problem_and_write_nothing():
    masks = torch.zeros(2, 20, dtype=torch.bool)
    held, remaining = torch.tensor([20, 18]), torch.tensor([4, 4])
    ops = torch.ops.kvslimmer
    with pytest.raises(ValueError, match="max_fraction must be in"):
        ops.protected_steps(masks, held, remaining, 2, 2, 0.7)
    with pytest.raises(ValueError, match=r"held\[1\]=3 must hold sink \+ recent = 4"):
        ops.protected_steps(masks, torch.tensor([20, 3]), remaining, 2, 2, 0.5)
    with pytest.raises(ValueError, match=r"held and remaining must be contiguous CPU int64 \[L\]"):
        ops.protected_steps(masks, held[:1], remaining, 2, 2, 0.5)
    with pytest.raises(ValueError, match="masks must be contiguous CPU bool"):
        ops.protected_steps(masks.int(), held, remaining, 2, 2, 0.5)
    before = masks.clone(), held.clone(), remaining.clone()
    for left, pattern in ((torch.tensor([[0, -1, 4]]), "then -1 padding; got 4 at 2"),
                          (torch.tensor([[0, 1]]), "ascending, disjoint pairs"),
                          (torch.tensor([[16]]), "within layer 1's 18 slots")):
        with pytest.raises(ValueError, match=pattern):
            ops.protected_merged(masks, held, remaining, torch.tensor([1]), left, 1)
    with pytest.raises(ValueError, match="rows must be distinct layers"):
        ops.protected_merged(masks, held, remaining, torch.tensor([1, 1]),
                             torch.tensor([[0], [2]]), 1)
    assert all(torch.equal(a, b) for a, b in zip((masks, held, remaining), before))


# ----------------------------------------------------------------------- select_pairs_rows

def test_select_pairs_rows_reference_is_select_pairs_per_row():
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 30, generator=gen, dtype=torch.float64)
    lengths, ks = [29, 30, 7, 0, 1], [4, 15, 4, 0, 1]
    out = select_pairs_rows(scores, lengths, ks)
    assert out.shape == (5, 15)
    for row, (n, k) in enumerate(zip(lengths, ks)):
        assert torch.equal(out[row, :k], select_pairs(scores[row, :n], k))
        assert bool((out[row, k:] == -1).all())


@needs_cpp
@pytest.mark.parametrize("seed", range(6))
def test_select_pairs_rows_cpp_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    rows, width = 7, 1 + 97 * seed
    scores = torch.rand(rows, width, generator=gen, dtype=torch.float64)
    if seed % 2:  # integer ties
        scores = torch.randint(0, 4, (rows, width), generator=gen).double()
    scores[:, -1] = float("inf")  # past every row's length but the widest: never read
    lengths = torch.randint(0, width, (rows,), generator=gen)
    ks = torch.stack([torch.randint(0, int(n) // 2 + 2, (1,), generator=gen)[0]
                      .clamp_max((int(n) + 1) // 2) for n in lengths])
    got = torch.ops.kvslimmer.select_pairs_rows(scores, lengths, ks)
    assert torch.equal(got, select_pairs_rows(scores, lengths, ks))
    assert torch.equal(kernels.select_pairs_rows(scores, lengths, ks), got)


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_select_pairs_rows_errors(impl):
    select = (select_pairs_rows if impl == "reference"
              else lambda s, n, k: torch.ops.kvslimmer.select_pairs_rows(
                  s, torch.as_tensor(n), torch.as_tensor(k)))
    scores = torch.zeros(2, 6, dtype=torch.float64)
    with pytest.raises((ValueError, RuntimeError), match=r"lengths\[1\]=7"):
        select(scores, [3, 7], [1, 1])
    with pytest.raises((ValueError, RuntimeError), match=r"ks\[0\]=3"):
        select(scores, [4, 6], [3, 1])
    with pytest.raises((ValueError, RuntimeError), match="one per row"):
        select(scores, [4], [1])
    with pytest.raises((ValueError, RuntimeError), match=r"\[L, P\]"):
        select(scores[0], [4], [1])
