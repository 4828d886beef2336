"""Observation statistics and the Hessian proxy of KVSlimmer (spec section 2).

All functions work on the mergeable region ``M`` of one request and one layer: ``M`` slots,
``Hkv`` KV heads, head dim ``D``. Tensors may carry leading batch dimensions (several layers of
one request, ``[L, M, Hkv]``); each batch entry is computed independently. With ``out = sum_j P_j v_j`` and ``P = softmax(logits)``:

    d out / d logit_j              =  P_j (v_j - out)
    d2 out / d logit_j^2           =  P_j (1 - 2 P_j) (v_j - out)
    d2 out / d logit_i d logit_j   = -P_i P_j ((v_i - out) + (v_j - out))

KVSlimmer reduces these vectors to scalars with the L1 norm ``d_j = ||v_j - o||_1`` and uses the
normalised observation mass ``alpha`` in place of ``P``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "cross_hessian",
    "hessian_stats",
    "normalize_mass",
    "recover_d",
    "smooth_hessian",
]


def normalize_mass(mass: torch.Tensor) -> torch.Tensor:
    """Normalise observation mass over the slots of the mergeable region, per head.

    Args:
        mass: ``[M, Hkv]`` non-negative float mass ``A_j`` accumulated since the last round.

    Returns:
        ``alpha``: ``[M, Hkv]`` (float32, or float64 for float64 input) with
        ``alpha_j = A_j / sum_i A_i``; a head whose total mass is 0 gets uniform ``1 / M``.
    """
    mass = mass.to(torch.promote_types(mass.dtype, torch.float32))
    total = mass.sum(dim=-2, keepdim=True)
    uniform = torch.full_like(mass, 1.0 / max(mass.shape[-2], 1))
    return torch.where(total > 0, mass / torch.where(total > 0, total, 1.0), uniform)


def value_spread(values: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``d_j = ||v_j - o||_1`` over ``D`` with ``o = sum_j alpha_j v_j`` (per head).

    Args:
        values: ``[M, Hkv, D]`` (or ``[L, M, Hkv, D]``) slot values (any float dtype; the
            computation runs in alpha's).
        alpha: ``[M, Hkv]`` (``[L, M, Hkv]``) normalised mass.

    Returns:
        ``d``: ``[M, Hkv]`` (``[L, M, Hkv]``) in alpha's dtype. The C++ op
        ``torch.ops.kvslimmer.value_spread`` computes the same without materialising
        ``values - o`` (:func:`kvslimmer_vllm.kernels.value_spread` dispatches).
    """
    values = values.to(alpha.dtype)
    mean = torch.einsum("...mh,...mhd->...hd", alpha, values)
    return (values - mean.unsqueeze(-3)).abs().sum(dim=-1)


def hessian_stats(
    alpha: torch.Tensor,
    values: torch.Tensor,
    spread: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = value_spread,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot diagonal Hessian proxy and value spread.

    Args:
        alpha: ``[M, Hkv]`` normalised mass (see :func:`normalize_mass`).
        values: ``[M, Hkv, D]`` slot values (means of the merged tokens' values).
        spread: implementation of :func:`value_spread` (a kernel with the same contract).

    Returns:
        ``(h_diag, d)``, both ``[M, Hkv]`` in alpha's float dtype:
        ``o = sum_j alpha_j v_j`` (per head), ``d_j = ||v_j - o||_1`` over ``D``, and
        ``h_diag_j = alpha_j (1 - 2 alpha_j) d_j``. ``|h_diag_j|`` is the L1 norm of the exact
        second derivative ``d2 o / d logit_j^2``; its sign is the sign of ``1 - 2 alpha_j``.
    """
    d = spread(values, alpha)
    return alpha * (1 - 2 * alpha) * d, d


def cross_hessian(alpha: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Cross-term magnitude for adjacent slot pairs ``(i, i + 1)``.

    Args:
        alpha: ``[M, Hkv]`` normalised mass.
        d: ``[M, Hkv]`` value spread ``||v_j - o||_1``.

    Returns:
        ``[M - 1, Hkv]``, row ``i`` is ``H_{i,i+1} = alpha_i alpha_{i+1} (d_i + d_{i+1})``, an upper
        bound (by the triangle inequality) of the L1 norm of ``d2 o / d logit_i d logit_{i+1}``.
    """
    return alpha[..., :-1, :] * alpha[..., 1:, :] * (d[..., :-1, :] + d[..., 1:, :])


def smooth_hessian(h_new: torch.Tensor, h_old: torch.Tensor, round_idx: int) -> torch.Tensor:
    """Running average of the diagonal Hessian proxy across merge rounds.

    Args:
        h_new: ``[M, Hkv]`` proxy measured in this round (:func:`hessian_stats`).
        h_old: ``[M, Hkv]`` smoothed proxy carried from earlier rounds; NaN marks a slot that is
            new since the last round.
        round_idx: this request's merge round, 1 for the first.

    Returns:
        ``[M, Hkv]`` in h_new's dtype: ``h_new / r + h_old (r - 1) / r`` where ``h_old`` is finite,
        ``h_new`` elsewhere.
    """
    if round_idx < 1:
        raise ValueError(f"round_idx must be >= 1, got {round_idx}")
    h_old = h_old.to(h_new.dtype)
    known = torch.isfinite(h_old)
    averaged = h_new / round_idx + torch.where(known, h_old, 0.0) * ((round_idx - 1) / round_idx)
    return torch.where(known, averaged, h_new)


def recover_d(h: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """Recover the value spread ``d`` from a (smoothed) diagonal proxy ``h``.

    ``d = h / (alpha (1 - 2 alpha) + eps)``, with two guards: ``eps`` is added with the sign of
    ``w = alpha (1 - 2 alpha)`` (``+eps`` when ``w == 0``), so the denominator never crosses or
    touches zero when ``alpha > 1/2`` makes ``w`` negative; and the result is clamped at 0, since
    ``d`` is an L1 norm (a smoothed ``h`` whose sign disagrees with this round's ``w`` yields 0).

    Args:
        h: ``[M, Hkv]`` diagonal proxy.
        alpha: ``[M, Hkv]`` normalised mass.
        eps: small positive constant (the reference uses 1e-21).

    Returns:
        ``d``: ``[M, Hkv]`` non-negative, in h's dtype. Without smoothing and away from
        ``w == 0`` it equals the ``d`` of :func:`hessian_stats`.
    """
    weight = (alpha * (1 - 2 * alpha)).to(h.dtype)
    denom = weight + torch.where(weight < 0, -eps, eps)
    return (h / denom).clamp_min(0.0)
