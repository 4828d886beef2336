"""Pair scores and exact non-overlapping pair selection against brute force and a DP."""

import itertools
import math
import random

import pytest
import torch

from kvslimmer_vllm.core import pair_scores, select_pairs


def _brute_force_min(scores, k):
    """Minimal total over all sets of k pairwise non-adjacent indices."""
    best = math.inf
    for combo in itertools.combinations(range(len(scores)), k):
        if all(b - a >= 2 for a, b in zip(combo, combo[1:])):
            best = min(best, sum(scores[i] for i in combo))
    return best


def _dp_min(scores, k):
    """O(n k) dynamic programme for the same minimum (for instances too big for brute force)."""
    n = len(scores)
    # take[i][c]: best over the first i scores with c chosen.
    take = [[math.inf] * (k + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        take[i][0] = 0.0
    for i in range(1, n + 1):
        for c in range(1, k + 1):
            skip = take[i - 1][c]
            use = (take[i - 2][c - 1] if i >= 2 else (0.0 if c == 1 else math.inf)) + scores[i - 1]
            take[i][c] = min(skip, use)
    return take[n][k]


def _check_valid(chosen, num_slots, k):
    assert chosen.dtype == torch.int64 and chosen.shape == (k,)
    left = chosen.tolist()
    assert left == sorted(left)
    assert all(0 <= i < num_slots - 1 for i in left)
    slots = [s for i in left for s in (i, i + 1)]
    assert len(set(slots)) == len(slots), f"overlapping pairs {left}"


def test_matches_brute_force_on_small_instances():
    rng = random.Random(0)
    for trial in range(400):
        num_slots = rng.randint(2, 11)
        if trial % 2:
            scores = [float(rng.randint(0, 3)) for _ in range(num_slots - 1)]  # many ties
        else:
            scores = [rng.random() for _ in range(num_slots - 1)]
        for k in range(num_slots // 2 + 1):
            chosen = select_pairs(torch.tensor(scores, dtype=torch.float64), k)
            _check_valid(chosen, num_slots, k)
            total = sum(scores[i] for i in chosen.tolist())
            assert math.isclose(total, _brute_force_min(scores, k), abs_tol=1e-12), (scores, k)


def test_matches_dynamic_programme_on_larger_instances():
    rng = random.Random(1)
    for _ in range(10):
        num_slots = rng.randint(40, 120)
        scores = [rng.expovariate(1.0) for _ in range(num_slots - 1)]
        for k in (1, num_slots // 5, num_slots // 3, num_slots // 2):
            chosen = select_pairs(torch.tensor(scores), k)
            _check_valid(chosen, num_slots, k)
            total = sum(scores[i] for i in chosen.tolist())
            assert math.isclose(total, _dp_min(scores, k), rel_tol=1e-9)


def test_middle_pair_smallest_defeats_plain_greedy():
    # M = 4, k = 2: the only feasible choice is pairs (0, 1) and (2, 3).
    assert select_pairs(torch.tensor([5.0, 1.0, 5.0]), 2).tolist() == [0, 2]
    # M = 5, k = 2: greedy takes 0.9 and is then forced to 5.0 (total 5.9); the optimum is 2.0.
    assert select_pairs(torch.tensor([1.0, 0.9, 1.0, 5.0]), 2).tolist() == [0, 2]


def test_exact_fit_and_small_k():
    scores = torch.tensor([3.0, 0.0, 3.0, 0.0, 3.0])  # M = 6 = 2k with k = 3
    assert select_pairs(scores, 3).tolist() == [0, 2, 4]
    assert select_pairs(scores, 1).tolist() == [1]
    assert select_pairs(scores, 0).tolist() == []
    assert select_pairs(torch.tensor([2.0]), 1).tolist() == [0]


def test_ties_prefer_lower_indices():
    assert select_pairs(torch.zeros(7), 1).tolist() == [0]
    assert select_pairs(torch.zeros(7), 3).tolist() == [0, 2, 4]
    assert select_pairs(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]), 1).tolist() == [1]


def test_rejects_infeasible_k():
    with pytest.raises(ValueError, match="k=3"):
        select_pairs(torch.zeros(4), 3)  # M = 5 < 2k = 6
    with pytest.raises(ValueError):
        select_pairs(torch.zeros(4), -1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            select_pairs(torch.tensor([0.0, bad]), 1)


def test_pair_scores_formula():
    gen = torch.Generator().manual_seed(0)
    mass = torch.rand(9, 3, generator=gen)
    gamma = 4096 / math.log(512)
    scores = pair_scores(mass, gamma)
    assert scores.shape == (8,) and scores.dtype == torch.float64
    for t in range(1, 9):
        expected = (mass[t - 1].sum() + mass[t].sum()).item() / math.exp(t / gamma)
        assert scores[t - 1].item() == pytest.approx(expected, rel=1e-6)


def test_pair_scores_do_not_overflow_on_long_regions():
    scores = pair_scores(torch.ones(200_000, 1), gamma=100.0)
    assert torch.isfinite(scores).all()
