"""The C++ paged round (round_stats + select_pairs + round_apply, run by
``kernels.paged_merge_round``) against its reference ``core.paged.paged_merge_round``
(gather the request's slots, ``core.merge.merge_round``, compact, store the state).

Both run on copies of one request's paged caches and slot state; afterwards every cache
row and every state entry must agree: moved rows, counts and positions exactly, merged
rows and Hessian proxies within rounding, the observation mass reset, and nothing outside
the request's slots or layers touched.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kvslimmer_vllm import kernels
from kvslimmer_vllm.core import paged as paged_ref
from kvslimmer_vllm.core.merge import DEFAULT_EPS, DEFAULT_GAMMA, keep_set
from kvslimmer_vllm.core.rope import RotarySpec, build_cos_sin_cache, default_inv_freq
from kvslimmer_vllm.core.select import pair_scores, pool_mass
from kvslimmer_vllm.core.stats import hessian_stats, normalize_mass, smooth_hessian

pytest.importorskip("kvslimmer_vllm._C", reason="C++ extension not built")
OPS = torch.ops.kvslimmer
TOTAL_LAYERS, BLOCK = 4, 8


def _request(n, heads, dim, dtype, seed, mass="random", hess="random", spare_blocks=3):
    """A paged cache of TOTAL_LAYERS layers holding one request of n slots in scattered
    blocks, and the slot state. Returns (kvs, slots, state dict)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-n // BLOCK) + spare_blocks
    num_slots = blocks * BLOCK
    kvs = [torch.randn(num_slots, heads, 2 * dim, generator=gen, dtype=torch.float64)
           .to(dtype) for _ in range(TOTAL_LAYERS)]
    order = torch.randperm(blocks, generator=gen)[: -(-n // BLOCK)]
    slots = paged_ref.slot_ids(order.tolist(), n, BLOCK)
    counts = torch.randint(1, 5, (TOTAL_LAYERS, num_slots), generator=gen).float()
    positions = torch.cumsum(counts.long(), dim=1) - 1
    positions[:, slots] = torch.cumsum(counts[:, slots].long(), dim=1) - 1  # in slot order
    state = dict(
        counts=counts,
        positions=positions,
        hess=torch.rand(TOTAL_LAYERS, num_slots, heads, generator=gen) - 0.2,
        mass=torch.rand(TOTAL_LAYERS, num_slots, heads, generator=gen) ** 4,
    )
    if hess == "nan":  # a first round: no smoothed proxy anywhere
        state["hess"].fill_(float("nan"))
    else:
        state["hess"][:, ::3] = float("nan")
    if mass == "zero":  # no query observed: uniform alpha, all scores tie
        state["mass"].zero_()
    elif mass == "one-hot":  # one slot per head takes all: alpha 1, w = -1
        state["mass"].zero_()
        state["mass"][:, slots[n // 2]] = 1.0
    elif mass == "some heads":
        state["mass"][:, :, 0] = 0.0
    return kvs, slots, state


def _rotary(kind, dim, dtype):
    if kind == "none":
        return None
    rotary_dim = dim if kind != "partial" else dim // 2
    if kind == "inv_freq":  # angles in the caches' precision, as vLLM's table would be
        inv_freq = default_inv_freq(rotary_dim, 1e4).to(dtype)
        return RotarySpec(rotary_dim, True, inv_freq=inv_freq)
    cache = build_cos_sin_cache(default_inv_freq(rotary_dim, 1e4), 4096).to(dtype)
    return RotarySpec(rotary_dim, kind != "gptj",
                      cos_sin_cache=cache * 1.3 if kind == "scaled" else cache)


def _run_both(kvs, slots, state, layers, **kwargs):
    """(reference, kernel) caches and states after the same round, and the mask of the
    slots to compare: all but those the round freed (``slots[N - k:]``), whose contents
    are stale either way."""
    outcomes = []
    for run in (paged_ref.paged_merge_round, kernels.paged_merge_round):
        c, s = [kv.clone() for kv in kvs], copy.deepcopy(state)
        extra = dict(selector=kernels.select_pairs) if run is paged_ref.paged_merge_round else {}
        if run is kernels.paged_merge_round:
            assert kernels.paged_round_backend_name(c[0]) == "cpp"
        run(c, slots, layers, s["counts"], s["positions"], s["hess"], s["mass"], **kwargs,
            **extra)
        outcomes.append((c, s))
    valid = torch.ones(kvs[0].shape[0], dtype=torch.bool)
    valid[slots[len(slots) - kwargs["k"]:]] = False
    return (*outcomes, valid)


def _assert_same(ref, got, valid, dtype):
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10,
                                                                         atol=1e-12)
    (ref_kvs, ref_state), (got_kvs, got_state) = ref, got
    for a, b in zip(got_kvs, ref_kvs):
        torch.testing.assert_close(a[valid], b[valid], **tol)
    assert torch.equal(got_state["counts"][:, valid], ref_state["counts"][:, valid])
    assert torch.equal(got_state["positions"][:, valid], ref_state["positions"][:, valid])
    assert torch.equal(got_state["mass"], ref_state["mass"])
    torch.testing.assert_close(got_state["hess"][:, valid], ref_state["hess"][:, valid],
                               equal_nan=True, rtol=1e-4, atol=1e-6)


CASES = [  # (n, sink, recent, k, heads, dim)
    (40, 4, 8, 1, 3, 8),
    (40, 4, 8, 14, 3, 8),     # every other slot of the region in a pair
    (12, 4, 6, 1, 1, 4),      # a two-slot region
    (75, 0, 0, 20, 8, 64),    # no sink, no recent slots
    (130, 6, 16, 37, 2, 32),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n,sink,recent,k,heads,dim", CASES)
@pytest.mark.parametrize("rope", ["neox", "gptj", "partial", "scaled", "inv_freq", "none"])
@pytest.mark.parametrize("weights", ["hessian", "count"])
def test_paged_round_matches_reference(dtype, n, sink, recent, k, heads, dim, rope, weights):
    """Random requests over block boundaries, two of four layers (in reverse order),
    every RoPE layout, both key weightings, float32 and float64, a round after earlier
    ones (smoothing) with pooled scores."""
    kvs, slots, state = _request(n, heads, dim, dtype, seed=n * 7 + dim)
    layers = torch.tensor([3, 1])
    both = _run_both([kvs[3], kvs[1]], slots, state, layers, sink=sink, recent=recent, k=k,
                     round_idx=3, gamma=DEFAULT_GAMMA, eps=DEFAULT_EPS,
                     rotary=_rotary(rope, dim, dtype), key_weights=weights, pool=3)
    _assert_same(*both, dtype)
    # Layers 0 and 2 and the slots outside the request are as they were.
    got_kvs, got_state = both[1]
    for name in ("counts", "positions", "hess", "mass"):
        assert torch.equal(got_state[name][[0, 2]].nan_to_num(),
                           state[name][[0, 2]].nan_to_num()), name
    outside = torch.ones(kvs[0].shape[0], dtype=torch.bool)
    outside[slots] = False
    assert torch.equal(got_kvs[0][outside], kvs[3][outside])
    assert torch.equal(got_state["counts"][:, outside], state["counts"][:, outside])


@pytest.mark.parametrize("n,k,max_fraction", [
    (200, 150, 0.25),   # a prompt-end step: many sub-rounds of at most a quarter
    (60, 40, 0.5),      # more than one round of disjoint pairs can free
    (60, 1, 0.01),      # a sub-round still frees one slot
    (60, 0, 0.25),      # nothing to free: statistics only
])
@pytest.mark.parametrize("weights", ["hessian", "count"])
def test_subrounds_in_place_match_the_composed_reference(n, k, max_fraction, weights):
    """A step of several sub-rounds (each over what the previous left, the mass carried
    from pairs to their merged slot, reset after the last) equals core.merge_rounds'
    composed result written back."""
    kvs, slots, state = _request(n, 3, 16, torch.float32, seed=n + k)
    both = _run_both(kvs[1:], slots, state, torch.tensor([1, 2, 3]), sink=4, recent=8, k=k,
                     round_idx=1, gamma=DEFAULT_GAMMA, eps=DEFAULT_EPS,
                     rotary=_rotary("neox", 16, torch.float32), key_weights=weights, pool=7,
                     max_fraction=max_fraction)
    _assert_same(*both, torch.float32)
    assert bool((both[1][1]["mass"][1:, slots] == 0).all())
    assert torch.equal(both[1][1]["mass"][0], state["mass"][0])


@pytest.mark.parametrize("reduce", [None, "sum over one rank"])
@pytest.mark.parametrize("k,max_fraction", [(30, 0.25), (12, 0.5), (0, 0.25)])
@pytest.mark.parametrize("pattern", ["snapkv keep set", "runs", "none"])
def test_protected_slots_match_the_reference(k, max_fraction, pattern, reduce):
    """SnapMerge's rounds: slots no pair may touch, each layer sub-rounded by its own
    mask (a SnapKV keep set per layer, long protected runs, or nothing protected); all
    layers in the C++ ``protected_round``, or, with a score reduction (tensor parallelism;
    here one rank's sum, the identity), layer by layer from Python."""

    n, sink, recent = 90, 4, 8
    kvs, slots, state = _request(n, 3, 16, torch.float32, seed=k + len(pattern))
    layers = torch.tensor([0, 2, 3])
    protect = torch.zeros(3, n, dtype=torch.bool)
    if pattern == "snapkv keep set":
        mass = state["mass"][layers[:, None], slots[sink:n - recent]]
        protect[:, sink:n - recent] = keep_set(pool_mass(mass.double(), 3).sum(-1), k)
    elif pattern == "runs":
        protect[0, 10:30] = protect[1, 40:44] = protect[2, sink:n - recent:4] = True
    both = _run_both([kvs[0], kvs[2], kvs[3]], slots, state, layers, sink=sink,
                     recent=recent, k=k, round_idx=2, gamma=DEFAULT_GAMMA, eps=DEFAULT_EPS,
                     rotary=_rotary("gptj", 16, torch.float32), pool=3,
                     max_fraction=max_fraction, protect=protect,
                     score_reduce=None if reduce is None else lambda scores: scores + 0.0)
    _assert_same(*both, torch.float32)
    if pattern == "runs":  # protected slots kept exactly, in order
        kept_rows = both[1][0][0][slots[:n - k]]
        assert any(torch.equal(kept_rows[i:i + 20], kvs[0][slots[10:30]])
                   for i in range(n - k - 19))


def test_too_many_protected_slots_are_refused():
    kvs, slots, state = _request(40, 2, 4, torch.float32, seed=3)
    protect = torch.zeros(1, 40, dtype=torch.bool)
    protect[0, 4:30] = True
    with pytest.raises(ValueError, match="cannot free k=6 slots without merging a protected"):
        kernels.paged_merge_round(kvs[:1], slots, torch.tensor([0]), state["counts"],
                                  state["positions"], state["hess"], state["mass"], sink=4,
                                  recent=4, k=6, round_idx=1, gamma=10.0, eps=1e-21,
                                  protect=protect)


@pytest.mark.parametrize("mass", ["zero", "one-hot", "some heads"])
@pytest.mark.parametrize("hess", ["nan", "random"])
@pytest.mark.parametrize("pool", [1, 7])
def test_paged_round_adversarial_statistics(mass, hess, pool):
    """No mass at all (every score ties: the lowest pairs win in both), one slot holding
    all mass (alpha 1, negative Hessian weights: the guard falls back to counts), heads
    without mass, a first round (no carried proxy), pooling wider than runs of pairs."""
    kvs, slots, state = _request(50, 3, 16, torch.float32, seed=5, mass=mass, hess=hess)
    layers = torch.tensor([0, 1, 2, 3])
    both = _run_both(kvs, slots, state, layers, sink=2, recent=6, k=12,
                     round_idx=1 if hess == "nan" else 2, gamma=DEFAULT_GAMMA,
                     eps=DEFAULT_EPS, rotary=_rotary("neox", 16, torch.float32),
                     key_weights="hessian", pool=pool)
    _assert_same(*both, torch.float32)


def test_identical_pairs_merge_losslessly_and_counts_add():
    """A request whose slots come in identical pairs (one RoPE-free layer): the merged
    rows equal the pairs', counts add up, the last position survives."""
    kvs, slots, state = _request(24, 2, 8, torch.float64, seed=2)
    rows = kvs[0][slots]
    rows[1::2] = rows[0::2]
    kvs[0][slots] = rows
    state["mass"].zero_()  # all pairs score alike; k = 10 takes every pair of the region
    before = state["counts"][0, slots].clone(), state["positions"][0, slots].clone()
    kernels.paged_merge_round(kvs[:1], slots, torch.tensor([0]), state["counts"],
                              state["positions"], state["hess"], state["mass"], sink=0,
                              recent=4, k=10, round_idx=1, gamma=DEFAULT_GAMMA,
                              eps=DEFAULT_EPS, key_weights="hessian")
    kept = slots[:14]
    torch.testing.assert_close(kvs[0][kept[:10]], rows[0:20:2])
    torch.testing.assert_close(kvs[0][kept[10:]], rows[20:])
    assert state["counts"][0, kept[:10]].tolist() == (before[0][0:20:2]
                                                      + before[0][1:20:2]).tolist()
    assert state["positions"][0, kept[:10]].tolist() == before[1][1:20:2].tolist()


def test_round_stats_match_the_core_statistics():
    """round_stats alone: alpha, the smoothed Hessian proxy and the pooled pair scores are
    the core functions' (the pieces the round's choice and weights come from)."""
    kvs, slots, state = _request(60, 3, 16, torch.float32, seed=11, mass="some heads")
    layers = torch.tensor([2, 0])
    sink, recent = 3, 5
    alpha, h, scores = OPS.round_stats([kvs[2], kvs[0]], slots, layers, state["hess"],
                                       state["mass"], sink, recent, 4, 100.0, 5)
    region = slots[sink:len(slots) - recent]
    mass = state["mass"][layers[:, None], region]
    values = torch.stack([kvs[2][region], kvs[0][region]])[..., 16:]
    want_alpha = normalize_mass(mass)
    h_new, _ = hessian_stats(want_alpha, values)
    want_h = smooth_hessian(h_new, state["hess"][layers[:, None], region], 4)
    torch.testing.assert_close(alpha, want_alpha)
    torch.testing.assert_close(h, want_h, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(scores, pair_scores(pool_mass(mass, 5), 100.0), rtol=1e-12,
                               atol=0.0)


def test_tensor_parallel_score_reduction_steers_both_alike():
    """A score reduction (the all-reduce under tensor parallelism) runs between the
    statistics and the choice, in both implementations: a reduction that makes the late
    pairs expensive moves every merge to the front."""
    kvs, slots, state = _request(40, 2, 8, torch.float32, seed=4)
    penalty = torch.arange(40 - 4 - 4 - 1, dtype=torch.float64) * 1e6

    def reduce(scores):
        return scores + penalty

    both = _run_both(kvs[:2], slots, state, torch.tensor([0, 1]), sink=4, recent=4, k=6,
                     round_idx=2, gamma=DEFAULT_GAMMA, eps=DEFAULT_EPS,
                     rotary=_rotary("neox", 8, torch.float32), score_reduce=reduce)
    _assert_same(*both, torch.float32)
    counts = both[1][1]["counts"][0, slots[4:10]]  # the first six pairs of the region
    assert bool((counts == state["counts"][0, slots[4:16:2]]
                 + state["counts"][0, slots[5:16:2]]).all())


def _apply_args(**change):
    kvs, slots, state = _request(20, 2, 4, torch.float32, seed=1)
    args = dict(kvs=kvs[:2], slots=slots, layers=torch.tensor([0, 1]), **state,
                left=torch.tensor([[0, 2], [1, 5]]), alpha=torch.zeros(2, 14, 2),
                h=torch.zeros(2, 14, 2), sink=2, recent=4, eps=1e-21, hessian_weights=True,
                cos_sin=None, rotary_dim=0, is_neox=True)
    args.update(change)
    return args


@pytest.mark.parametrize("change,pattern", [
    (dict(slots=torch.tensor([0, 1, 2, 999])), "region .* must hold at least 2 slots"),
    (dict(slots=torch.arange(16) + 1000), "slot id 1000 outside the cache's"),
    (dict(layers=torch.tensor([0, 7])), "layer 7 outside the state's 4 layers"),
    (dict(layers=torch.tensor([0])), "layers must be contiguous CPU int64 \\[L\\] with L = 2"),
    (dict(slots=torch.arange(32)[::2]), "slots must be contiguous CPU int64"),
    (dict(layers=torch.tensor([0, 9, 1])[::2]), "layers must be contiguous CPU int64"),
    (dict(left=torch.tensor([[0, 1], [1, 5]])), "ascending, disjoint pairs"),
    (dict(left=torch.tensor([[0, 13], [1, 5]])), "ascending, disjoint pairs of the 14-slot"),
    (dict(left=torch.tensor([[0, 2]])), "left must be CPU int64 \\[L, k\\] with L = 2"),
    (dict(alpha=torch.zeros(2, 13, 2)), "alpha and h must be contiguous \\[2, 14, 2\\]"),
    (dict(counts=torch.ones(4, 48, dtype=torch.float64)), "counts must be float32"),
    (dict(mass=torch.zeros(4, 48)), "hess and mass must be \\[layers, S, H\\]"),
    (dict(hess=torch.zeros(4, 40, 2)), "slot state must be contiguous CPU tensors"),
    (dict(cos_sin=torch.ones(8, 6), rotary_dim=6), "rotary_dim must be even and in \\(0, 4\\]"),
    (dict(cos_sin=torch.ones(8, 2), rotary_dim=4), "cos_sin must be a CPU \\[P, 4\\] table"),
    (dict(cos_sin=torch.ones(2, 4), rotary_dim=4), "shift .* is outside the 2 rows"),
    (dict(kvs=[torch.zeros(48, 2, 8, dtype=torch.bfloat16)] * 2),
     "float32 or float64 caches"),
])
def test_round_apply_errors_name_the_problem_and_write_nothing(change, pattern):
    args = _apply_args(**change)
    before = [t.clone() for t in args["kvs"]], args["counts"].clone()
    with pytest.raises(ValueError, match=pattern):
        OPS.round_apply(*args.values())
    if all(t.dtype == torch.float32 for t in args["kvs"]):
        assert all(torch.equal(a, b) for a, b in zip(args["kvs"], before[0]))
    assert torch.equal(args["counts"], before[1])


@pytest.mark.parametrize("change,pattern", [
    (dict(round_idx=0), "round_idx must be >= 1"),
    (dict(pool=2), "pool width must be an odd integer"),
    (dict(gamma=0.0), "gamma must be > 0"),
    (dict(recent=17), "region .* must hold at least 2 slots"),
])
def test_round_stats_errors_name_the_problem(change, pattern):
    kvs, slots, state = _request(20, 2, 4, torch.float32, seed=1)
    args = dict(kvs=kvs[:1], slots=slots, layers=torch.tensor([0]), hess=state["hess"],
                mass=state["mass"], sink=2, recent=4, round_idx=1, gamma=10.0, pool=1)
    args.update(change)
    with pytest.raises(ValueError, match=pattern):
        OPS.round_stats(*args.values())


@pytest.mark.parametrize("pool", [1, 3, 7, 99])
@pytest.mark.parametrize("sink,recent", [(4, 16), (0, 0), (30, 30), (31, 30)])
@pytest.mark.parametrize("mass", ["random", "zero", "one-hot", "some heads"])
def test_slot_scores_read_in_place_match_the_gathered_reference(pool, sink, recent, mass):
    """SnapKV's pooled scores of the region, read through the slot ids from two of the
    state's layers in reverse order: equal to pooling the gathered mass (pool wider than
    the region, a one-slot and an empty region included)."""
    kvs, slots, state = _request(61, 3, 4, torch.float32, seed=7, mass=mass)
    layers = torch.tensor([3, 1])
    want = paged_ref.slot_scores(slots, layers, state["mass"], sink=sink, recent=recent,
                                 pool=pool)
    got = OPS.slot_scores(slots, layers, state["mass"], sink, recent, pool)
    assert got.dtype == torch.float64 and got.shape == (2, 61 - sink - recent)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)
    assert torch.equal(kernels.paged_slot_scores(slots, layers, state["mass"], sink=sink,
                                                 recent=recent, pool=pool), got)


@pytest.mark.parametrize("change,pattern", [
    (dict(pool=4), "pool width must be an odd integer"),
    (dict(recent=60), "region .* must not be negative"),
    (dict(layers=torch.tensor([4])), "layer 4 outside the state's 4 layers"),
    (dict(slots=torch.arange(6) * 2_000), "slot id 2000 outside"),
    (dict(mass="float64"), "mass must be contiguous CPU float32"),
])
def test_slot_scores_errors_name_the_problem(change, pattern):
    kvs, slots, state = _request(20, 2, 4, torch.float32, seed=1)
    args = dict(slots=slots, layers=torch.tensor([0, 1]), mass=state["mass"], sink=2,
                recent=4, pool=3)
    args.update(change)
    if args["mass"] == "float64":
        args["mass"] = state["mass"].double()
    with pytest.raises(ValueError, match=pattern):
        OPS.slot_scores(*args.values())


def _protected_args(**change):
    kvs, slots, state = _request(40, 2, 8, torch.float32, seed=2)
    protect = torch.zeros(2, 40, dtype=torch.bool)
    protect[:, 10:14] = True
    args = dict(kvs=kvs[:2], slots=slots, layers=torch.tensor([0, 1]), **state,
                protect=protect, k=6, max_fraction=0.25, sink=4, recent=4, round_idx=1,
                gamma=10.0, eps=1e-21, pool=3, hessian_weights=True,
                cos_sin=_rotary("neox", 8, torch.float32).cos_sin_cache, rotary_dim=8,
                is_neox=True)
    args.update(change)
    return args


@pytest.mark.parametrize("change,pattern", [
    (dict(protect=torch.zeros(2, 39, dtype=torch.bool)),
     "protect must be contiguous CPU bool \\[L, N\\] = \\[2, 40\\]"),
    (dict(protect=torch.zeros(2, 40)), "protect must be contiguous CPU bool"),
    (dict(k=29), "cannot free k=29 slots without merging a protected slot"),
    (dict(k=-1), "cannot free k=-1 slots"),
    (dict(max_fraction=0.75), "max_fraction must be in \\(0, 0.5\\]"),
    (dict(pool=4), "pool width must be an odd integer"),
    (dict(cos_sin=torch.ones(16, 8)), "positions span .* but cos_sin has only 16 rows"),
    (dict(recent=35), "region .* must hold at least 2 slots"),
])
def test_protected_round_errors_name_the_problem_and_write_nothing(change, pattern):
    args = _protected_args(**change)
    before = [t.clone() for t in args["kvs"]], args["counts"].clone(), args["mass"].clone()
    with pytest.raises(ValueError, match=pattern):
        OPS.protected_round(*args.values())
    assert all(torch.equal(a, b) for a, b in zip(args["kvs"], before[0]))
    assert torch.equal(args["counts"], before[1]) and torch.equal(args["mass"], before[2])


def test_protected_round_runs_the_python_sub_rounds_in_one_call():
    """The C++ driver and the lock step kept for score reductions (every layer's sub-round
    s at once from Python, the C++ ops with ``held``) leave the same caches and state, bit
    for bit, on a float64 request (each layer its own keep set, so its own sub-round
    sizes); the reduction runs once per sub-round for all layers."""
    kvs, slots, state = _request(300, 3, 8, torch.float64, seed=5)
    layers = torch.arange(TOTAL_LAYERS)
    mass = state["mass"][layers[:, None], slots[4:300 - 16]]
    protect = torch.zeros(TOTAL_LAYERS, 300, dtype=torch.bool)
    protect[:, 4:300 - 16] = keep_set(pool_mass(mass, 7).sum(-1), 200)
    outcomes, reduced = [], []

    def reduce(scores):
        reduced.append(scores.shape[0])
        return scores + 0.0

    for reduce in (None, reduce):
        c, s = [kv.clone() for kv in kvs], copy.deepcopy(state)
        kernels.paged_merge_round(c, slots, layers, s["counts"], s["positions"], s["hess"],
                                  s["mass"], sink=4, recent=16, k=200, round_idx=3,
                                  gamma=DEFAULT_GAMMA, eps=DEFAULT_EPS,
                                  rotary=_rotary("neox", 8, torch.float64), pool=7,
                                  max_fraction=0.25, protect=protect, score_reduce=reduce)
        outcomes.append((c, s))
    (a_kvs, a), (b_kvs, b) = outcomes
    live = slots[:100]
    assert all(torch.equal(x[live], y[live]) for x, y in zip(a_kvs, b_kvs))
    for name in ("counts", "positions", "mass"):
        assert torch.equal(a[name][:, live], b[name][:, live]), name
    assert torch.equal(a["hess"][:, live].nan_to_num(-1.0), b["hess"][:, live].nan_to_num(-1.0))
    assert bool((a["counts"][:, live] > 1).any())  # the round merged
    # One reduction per lock-step sub-round, of every layer still freeing slots; the
    # layers' own sub-round counts differ, so some sat out the last ones.
    assert reduced[0] == TOTAL_LAYERS and min(reduced) < TOTAL_LAYERS, reduced


def _held_args(seed=2):
    kvs, slots, state = _request(60, 2, 8, torch.float64, seed=seed)
    return kvs, slots, state, torch.tensor([3, 0, 1]), torch.tensor([60, 41, 52])


def test_round_ops_with_held_equal_each_layer_alone():
    """``held``: layer l uses its first held[l] slots (layers in lock step); round_stats
    and round_apply (left padded with -1) equal each layer run alone on slots[:held[l]],
    bit for bit, and round_stats' outputs are 0 past a layer's region."""
    kvs, slots, state, layers, held = _held_args()
    sink, recent = 3, 5
    common = dict(round_idx=2, gamma=50.0, pool=3)
    alpha, h, scores = OPS.round_stats([kvs[i] for i in layers], slots, layers, state["hess"],
                                       state["mass"], sink, recent, *common.values(), held)
    width = int(held.max()) - sink - recent
    assert alpha.shape == (3, width, 2) and scores.shape == (3, width - 1)
    left = torch.tensor([[0, 5, 9, 20], [2, 4, -1, -1], [1, -1, -1, -1]])
    table = build_cos_sin_cache(default_inv_freq(8, 1e4), 4096).double()
    lock = [kv.clone() for kv in kvs], copy.deepcopy(state)
    OPS.round_apply([lock[0][i] for i in layers], slots, layers, lock[1]["counts"],
                    lock[1]["positions"], lock[1]["hess"], lock[1]["mass"], left, alpha, h,
                    sink, recent, 1e-21, True, table, 8, True, True, held)
    alone = [kv.clone() for kv in kvs], copy.deepcopy(state)
    for row, (layer, n) in enumerate(zip(layers.tolist(), held.tolist())):
        m = n - sink - recent
        a1, h1, s1 = OPS.round_stats([kvs[layer]], slots[:n], layers[row:row + 1],
                                     state["hess"], state["mass"], sink, recent,
                                     *common.values())
        assert torch.equal(alpha[row, :m], a1[0]) and torch.equal(h[row, :m], h1[0])
        assert torch.equal(scores[row, :m - 1], s1[0])
        assert not alpha[row, m:].any() and not scores[row, m - 1:].any()
        pairs = left[row:row + 1, :int((left[row] >= 0).sum())]
        OPS.round_apply([alone[0][layer]], slots[:n], layers[row:row + 1], alone[1]["counts"],
                        alone[1]["positions"], alone[1]["hess"], alone[1]["mass"], pairs, a1,
                        h1, sink, recent, 1e-21, True, table, 8, True, True)
    assert all(torch.equal(x, y) for x, y in zip(lock[0], alone[0]))
    for name in ("counts", "positions", "mass"):
        assert torch.equal(lock[1][name], alone[1][name]), name
    assert torch.equal(lock[1]["hess"].nan_to_num(-1.0), alone[1]["hess"].nan_to_num(-1.0))


@pytest.mark.parametrize("held,left,pattern", [
    (torch.tensor([60, 41]), None, "held must be CPU int64 \\[L\\] with L = 3"),
    (torch.tensor([60, 9, 52]), None, "held\\[1\\]=9 must leave a mergeable region"),
    (torch.tensor([60, 61, 52]), None, "held\\[1\\]=61 .* at most N = 60"),
    (None, torch.tensor([[0, -1, 4], [2, 4, 6], [1, 3, 5]]), "may end in -1 padding only"),
    (None, torch.tensor([[0, 2, 4], [2, 4, 40], [1, 3, 5]]), "pairs of the 33-slot region"),
])
def test_held_errors_name_the_problem_and_write_nothing(held, left, pattern):
    kvs, slots, state, layers, good = _held_args()
    held = good if held is None else held
    part = [kvs[i] for i in layers]
    before = [kv.clone() for kv in part]
    if left is None:
        with pytest.raises(ValueError, match=pattern):
            OPS.round_stats(part, slots, layers, state["hess"], state["mass"], 3, 5, 1, 50.0,
                            1, held)
        left = torch.tensor([[0], [2], [1]])
    alpha = torch.zeros(3, 52, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=pattern):
        OPS.round_apply(part, slots, layers, state["counts"], state["positions"],
                        state["hess"], state["mass"], left, alpha, alpha.clone(), 3, 5, 1e-21,
                        True, None, 0, True, True, held)
    assert all(torch.equal(a, b) for a, b in zip(part, before))


def test_freeing_the_whole_region_is_refused_before_anything_runs():
    kvs, slots, state = _request(20, 2, 4, torch.float32, seed=1)
    before = kvs[0].clone()
    with pytest.raises(ValueError, match="cannot free k=14 slots of a 14-slot"):
        kernels.paged_merge_round(kvs[:1], slots, torch.tensor([0]), state["counts"],
                                  state["positions"], state["hess"], state["mass"], sink=2,
                                  recent=4, k=14, round_idx=1, gamma=10.0, eps=1e-21)
    assert torch.equal(kvs[0], before)


# ----------------------------------------------------------------------- eviction in place
def _gathered_eviction(kvs, slots, layers, state, evict, **kwargs):
    """The gathered reference of an eviction round: the request's slots copied out, the
    core eviction on them, the result written back (what the engine did before)."""
    from kvslimmer_vllm.core.merge import evict_lowest, evict_oldest

    kvs, state = [kv.clone() for kv in kvs], copy.deepcopy(state)
    kv = paged_ref.gather_rows(kvs, slots, kvs[0].new_empty(len(kvs), len(slots),
                                                            *kvs[0].shape[1:]))
    rows, dim = layers[:, None], kv.shape[-1] // 2
    core = evict_lowest if evict == "lowest" else evict_oldest
    result = core(kv[..., :dim], kv[..., dim:], *(state[name][rows, slots] for name in
                                                  ("counts", "positions", "hess", "mass")),
                  **kwargs)
    paged_ref.store_round(kvs, slots, layers, state["counts"], state["positions"],
                          state["hess"], state["mass"], result)
    return kvs, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("n,sink,recent,k,heads,dim", CASES + [(40, 4, 8, 28, 3, 8),
                                                               (40, 4, 8, 0, 3, 8)])
@pytest.mark.parametrize("evict,pool", [("lowest", 1), ("lowest", 7), ("oldest", 1)])
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_eviction_in_place_matches_the_gathered_round(dtype, n, sink, recent, k, heads, dim,
                                                      evict, pool, impl):
    """An eviction chosen from the slots' mass alone (core.merge.lowest_mass_slots /
    oldest_slots) and compacted where the slots live (kernels.paged_drop: the C++
    compact_rows; core.paged.paged_drop: the reference) leaves every row and state entry
    the gathered eviction leaves: survivors moved down exactly, with their counts,
    positions and proxies, mass reset; other layers and slots untouched. Cases include
    the whole region dropped and nothing dropped."""
    from kvslimmer_vllm.core.merge import lowest_mass_slots, oldest_slots

    kvs, slots, state = _request(n, heads, dim, dtype, seed=n * 3 + k)
    layers = torch.tensor([3, 1])
    mine = [kvs[3], kvs[1]]
    kwargs = dict(sink=sink, recent=recent, k=k)
    want_kvs, want = _gathered_eviction(mine, slots, layers, state, evict, **kwargs,
                                        **(dict(pool=pool) if evict == "lowest" else {}))
    got_kvs, got = [kv.clone() for kv in mine], copy.deepcopy(state)
    mass = got["mass"][layers[:, None], slots]
    dropped = (lowest_mass_slots(mass, pool=pool, **kwargs) if evict == "lowest"
               else oldest_slots(2, n, device=mass.device, **kwargs))
    run = kernels.paged_drop if impl == "kernel" else paged_ref.paged_drop
    run(got_kvs, slots, layers, got["counts"], got["positions"], got["hess"], got["mass"],
        dropped)
    valid = torch.ones(kvs[0].shape[0], dtype=torch.bool)
    valid[slots[n - k:]] = False  # freed slots: stale either way
    for a, b in zip(got_kvs, want_kvs):
        assert torch.equal(a[valid], b[valid])
    for name in ("counts", "positions", "hess", "mass"):
        assert torch.equal(got[name][:, valid].nan_to_num(-1.0),
                           want[name][:, valid].nan_to_num(-1.0)), name
    assert torch.equal(got["counts"][[0, 2]], state["counts"][[0, 2]])


def test_eviction_drops_the_least_attended_slots_of_each_layer():
    """Each layer drops its own lowest-mass slots (summed over heads), the rest keep
    their order: the kept rows are the input rows minus exactly those."""
    kvs, slots, state = _request(30, 2, 4, torch.float32, seed=9)
    layers = torch.tensor([0, 2])
    state["mass"][0, slots] = 1.0
    state["mass"][2, slots] = 1.0
    low = {0: [5, 6, 17], 2: [9, 20, 21]}
    for layer, idx in low.items():
        state["mass"][layer, slots[idx]] = 0.01
    before = [kvs[0][slots].clone(), kvs[2][slots].clone()]
    mass = state["mass"][layers[:, None], slots]
    from kvslimmer_vllm.core.merge import lowest_mass_slots
    dropped = lowest_mass_slots(mass, sink=2, recent=4, k=3)
    assert dropped.tolist() == [low[0], low[2]]
    kernels.paged_drop([kvs[0], kvs[2]], slots, layers, state["counts"], state["positions"],
                       state["hess"], state["mass"], dropped)
    for row, (layer, idx) in enumerate(low.items()):
        keep = [i for i in range(30) if i not in idx]
        assert torch.equal(kvs[layer][slots[:27]], before[row][keep])


def test_evicting_more_than_the_region_is_refused_naming_the_settings():
    from kvslimmer_vllm.core.merge import lowest_mass_slots, oldest_slots

    with pytest.raises(ValueError, match="has 14 slots, fewer than k = 15 .*sink=2"):
        lowest_mass_slots(torch.rand(1, 20, 2), sink=2, recent=4, k=15)
    with pytest.raises(ValueError, match="must be >= 0"):
        oldest_slots(1, 20, sink=2, recent=4, k=-1)
