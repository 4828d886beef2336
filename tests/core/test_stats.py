"""Hessian proxy formulas against torch.autograd, normalisation, smoothing and d recovery."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from kvslimmer_vllm.core import (
    cross_hessian,
    hessian_stats,
    merged_attention,
    normalize_mass,
    recover_d,
    smooth_hessian,
)


def _second_derivatives(logits, values):
    """Exact ``d2 out / d logit_i d logit_j``, ``[n, n, D]``, for ``softmax(logits) @ values``."""

    def out(lg):
        return lg.softmax(-1) @ values

    def first(lg):
        return jacobian(out, lg, create_graph=True)  # [D, n]

    return jacobian(first, logits).permute(1, 2, 0)  # [D, n, n] -> [n, n, D]


@pytest.mark.parametrize("seed", range(4))
def test_formulas_match_autograd(seed):
    gen = torch.Generator().manual_seed(seed)
    n, dim = 6, 5
    logits = torch.randn(n, generator=gen, dtype=torch.float64) * 1.5
    values = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    if seed == 0:
        logits[2] += 4.0  # one dominant slot: P > 1/2 flips the sign of 1 - 2P
    second = _second_derivatives(logits, values)
    probs = logits.softmax(-1)
    out = probs @ values
    centred = values - out

    for j in range(n):
        diag = probs[j] * (1 - 2 * probs[j]) * centred[j]
        torch.testing.assert_close(second[j, j], diag)
        for i in range(n):
            if i != j:
                cross = -probs[i] * probs[j] * (centred[i] + centred[j])
                torch.testing.assert_close(second[i, j], cross)

    # The proxies are L1 reductions of these vectors, with alpha = P for a single query.
    alpha = normalize_mass(probs[:, None])
    torch.testing.assert_close(alpha[:, 0], probs)
    h_diag, d = hessian_stats(alpha, values[:, None, :])
    diag_l1 = torch.stack([second[j, j].abs().sum() for j in range(n)])
    torch.testing.assert_close(h_diag[:, 0], torch.sign(1 - 2 * probs) * diag_l1)
    d_from_autograd = diag_l1 / (probs * (1 - 2 * probs)).abs()
    torch.testing.assert_close(d[:, 0], d_from_autograd)

    h_cross = cross_hessian(alpha, d)[:, 0]
    for i in range(n - 1):
        # H_ij = P_i P_j (d_i + d_j) bounds the exact cross term's L1 norm (triangle inequality).
        expected = probs[i] * probs[i + 1] * (d_from_autograd[i] + d_from_autograd[i + 1])
        torch.testing.assert_close(h_cross[i], expected)
        assert second[i, i + 1].abs().sum() <= h_cross[i] + 1e-12


def test_alpha_from_attention_mass_is_the_softmax():
    gen = torch.Generator().manual_seed(7)
    query = torch.randn(1, 1, 8, generator=gen, dtype=torch.float64)
    keys = torch.randn(9, 1, 8, generator=gen, dtype=torch.float64)
    counts = torch.arange(1, 10, dtype=torch.float64)
    _, mass = merged_attention(query, keys, keys, counts, scale=0.4, return_mass=True)
    logits = 0.4 * keys[:, 0] @ query[0, 0] + counts.log()
    torch.testing.assert_close(normalize_mass(mass)[:, 0], logits.softmax(-1))


def test_normalize_mass_zero_head_is_uniform():
    mass = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 0.0], [4.0, 0.0]])
    alpha = normalize_mass(mass)
    torch.testing.assert_close(alpha[:, 0], torch.tensor([0.125, 0.375, 0.0, 0.5]))
    torch.testing.assert_close(alpha[:, 1], torch.full((4,), 0.25))


def test_hessian_stats_shapes_and_definition():
    gen = torch.Generator().manual_seed(3)
    alpha = normalize_mass(torch.rand(7, 3, generator=gen))
    values = torch.randn(7, 3, 4, generator=gen)
    h_diag, d = hessian_stats(alpha, values)
    assert h_diag.shape == d.shape == (7, 3)
    for head in range(3):
        mean = (alpha[:, head, None] * values[:, head]).sum(0)
        expected_d = (values[:, head] - mean).abs().sum(-1)
        torch.testing.assert_close(d[:, head], expected_d)
        a = alpha[:, head]
        torch.testing.assert_close(h_diag[:, head], a * (1 - 2 * a) * expected_d)
    assert cross_hessian(alpha, d).shape == (6, 3)


def test_smooth_hessian_new_and_old_slots():
    h_new = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    h_old = torch.tensor([[float("nan"), 10.0], [7.0, float("nan")], [1.0, 1.0]])
    smoothed = smooth_hessian(h_new, h_old, round_idx=4)
    expected = torch.tensor(
        [
            [1.0, 2.0 / 4 + 10.0 * 3 / 4],
            [3.0 / 4 + 7.0 * 3 / 4, 4.0],
            [5.0 / 4 + 0.75, 6.0 / 4 + 0.75],
        ]
    )
    torch.testing.assert_close(smoothed, expected)
    # Round 1 ignores any carried value; NaN never leaks out.
    torch.testing.assert_close(smooth_hessian(h_new, h_old, round_idx=1), h_new)
    with pytest.raises(ValueError, match="round_idx"):
        smooth_hessian(h_new, h_old, round_idx=0)


def test_recover_d_inverts_hessian_stats_and_stays_finite():
    gen = torch.Generator().manual_seed(5)
    mass = torch.rand(6, 2, generator=gen, dtype=torch.float64)
    mass[0, 1] = 20.0  # alpha > 1/2: negative weight and negative h
    alpha = normalize_mass(mass)
    h, d = hessian_stats(alpha, torch.randn(6, 2, 3, generator=gen, dtype=torch.float64))
    assert h[0, 1] < 0
    torch.testing.assert_close(recover_d(h, alpha, eps=1e-21), d)

    # alpha = 0 and alpha = 1/2 make the weight vanish: result stays finite and non-negative.
    alpha_edge = torch.tensor([[0.0], [0.5], [0.75]])
    h_edge = torch.tensor([[0.2], [-0.1], [0.3]])  # last: sign disagrees with alpha(1-2alpha) < 0
    d_edge = recover_d(h_edge, alpha_edge, eps=1e-6)
    assert torch.isfinite(d_edge).all() and (d_edge >= 0).all()
    assert math.isclose(d_edge[0, 0].item(), 0.2 / 1e-6, rel_tol=1e-5)
    assert d_edge[2, 0] == 0
