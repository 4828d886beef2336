"""Rotary position embedding (RoPE) in vLLM's convention, with an exact inverse.

vLLM caches post-RoPE keys ``k_j = Rot(p_j) k~_j``. KVSlimmer merges keys in the un-rotated frame
and rotates the result to the merged slot's position, so the core needs both directions.

Conventions (those of vLLM's ``RotaryEmbedding``), for the first ``R = rotary_dim`` dims of a head
and frequency index ``i < R / 2``:

* neox style: pairs ``(x[i], x[i + R/2])`` (halves ``[x1 | x2]``);
* GPT-J style: interleaved pairs ``(x[2i], x[2i + 1])``;
* ``y1 = x1 cos - x2 sin``, ``y2 = x2 cos + x1 sin``; dims ``R..D`` pass through.

``cos``/``sin`` may carry a common scale ``m`` (YaRN's mscale); the inverse divides it out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "RotarySpec",
    "apply_rotary",
    "build_cos_sin_cache",
    "default_inv_freq",
    "invert_rotary",
    "linear_scaled_inv_freq",
    "rope_cos_sin",
]


def default_inv_freq(
    rotary_dim: int, base: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard RoPE inverse frequencies ``base ** (-2i / rotary_dim)``, ``i < rotary_dim / 2``.

    Returns:
        ``[rotary_dim / 2]`` tensor of ``dtype``.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return (1.0 / base**exponents).to(dtype)


def linear_scaled_inv_freq(
    rotary_dim: int, base: float, factor: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse frequencies of linear position scaling (positions divided by ``factor``)."""
    return (default_inv_freq(rotary_dim, base, torch.float64) / factor).to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine and sine of the rotation angles ``positions * inv_freq``.

    Args:
        positions: ``[N]`` int64 logical positions.
        inv_freq: ``[R / 2]`` float inverse frequencies.

    Returns:
        ``(cos, sin)``, each ``[N, R / 2]``; float64 if ``inv_freq`` is float64, else float32.
        Angles are formed in float64.
    """
    dtype = torch.promote_types(inv_freq.dtype, torch.float32)
    freqs = inv_freq.to(positions.device, torch.float64)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def build_cos_sin_cache(
    inv_freq: torch.Tensor, max_position: int, mscale: float = 1.0
) -> torch.Tensor:
    """A vLLM-layout ``cos_sin_cache``: ``[max_position, R]``, first ``R/2`` columns
    ``mscale * cos``, last ``R/2`` columns ``mscale * sin`` (dtype follows :func:`rope_cos_sin`)."""
    cos, sin = rope_cos_sin(torch.arange(max_position), inv_freq)
    return torch.cat((cos, sin), dim=-1) * mscale


def _split(x: torch.Tensor, rotary_dim: int, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The two halves ``(x1, x2)`` of the rotated dims, paired per frequency."""
    if is_neox:
        return x[..., : rotary_dim // 2], x[..., rotary_dim // 2 : rotary_dim]
    return x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]


def _join(y1: torch.Tensor, y2: torch.Tensor, rest: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Inverse of :func:`_split`, with the pass-through dims ``rest`` appended."""
    rotated = torch.cat((y1, y2), dim=-1) if is_neox else torch.stack((y1, y2), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1)


def _prepare(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes; return x, cos, sin in the compute dtype, cos/sin as ``[N, 1, R/2]``."""
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim={rotary_dim} must be even and in (0, {x.shape[-1]}]")
    if cos.shape != (x.shape[0], rotary_dim // 2) or sin.shape != cos.shape:
        raise ValueError(
            f"cos/sin must be [{x.shape[0]}, {rotary_dim // 2}], "
            f"got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    return x.to(dtype), cos.to(x.device, dtype)[:, None, :], sin.to(x.device, dtype)[:, None, :]


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotary_dim: int, is_neox: bool
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of every head by the given angles.

    Args:
        x: ``[N, H, D]`` float (un-rotated keys or queries).
        cos, sin: ``[N, rotary_dim / 2]`` (see :func:`rope_cos_sin` / :meth:`RotarySpec.cos_sin`),
            shared by all heads of a row.
        rotary_dim: number of rotated dims ``R`` (even, ``<= D``); the rest pass through.
        is_neox: neox (half-split) pairing if true, GPT-J (interleaved) pairing otherwise.

    Returns:
        ``[N, H, D]`` in ``x.dtype``, computed in float32 (float64 if ``x`` or ``cos`` is float64).
    """
    xf, c, s = _prepare(x, cos, sin, rotary_dim)
    x1, x2 = _split(xf, rotary_dim, is_neox)
    out = _join(x1 * c - x2 * s, x2 * c + x1 * s, xf[..., rotary_dim:], is_neox)
    return out.to(x.dtype)


def invert_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotary_dim: int, is_neox: bool
) -> torch.Tensor:
    """Exact inverse of :func:`apply_rotary` with the same arguments.

    Divides by ``cos^2 + sin^2``, so it also undoes a common scale of ``cos`` and ``sin`` (YaRN's
    mscale): ``x1 = (y1 c + y2 s) / (c^2 + s^2)``, ``x2 = (y2 c - y1 s) / (c^2 + s^2)``.
    Shapes and dtypes as in :func:`apply_rotary`.
    """
    yf, c, s = _prepare(x, cos, sin, rotary_dim)
    y1, y2 = _split(yf, rotary_dim, is_neox)
    norm = c * c + s * s
    out = _join((y1 * c + y2 * s) / norm, (y2 * c - y1 * s) / norm, yf[..., rotary_dim:], is_neox)
    return out.to(x.dtype)


@dataclass(frozen=True, eq=False)
class RotarySpec:
    """The rotary parameters of one attention layer.

    Give exactly one of:

    * ``inv_freq``: ``[rotary_dim / 2]`` inverse frequencies (already scaled if the model scales);
    * ``cos_sin_cache``: ``[max_position, rotary_dim]`` laid out as vLLM's ``RotaryEmbedding``
      buffer (first half cos, second half sin, any scaling and mscale already applied). Passing
      vLLM's own buffer covers every scaling type it implements (linear, llama3, YaRN, ...).

    Attributes:
        rotary_dim: number of rotated dims per head (even).
        is_neox: neox (half-split) pairing if true, GPT-J (interleaved) otherwise.
    """

    rotary_dim: int
    is_neox: bool
    inv_freq: torch.Tensor | None = None
    cos_sin_cache: torch.Tensor | None = None

    def __post_init__(self) -> None:
        """Check that the fields describe one consistent rotary layout."""
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")
        if (self.inv_freq is None) == (self.cos_sin_cache is None):
            raise ValueError("give exactly one of inv_freq and cos_sin_cache")
        if self.inv_freq is not None and self.inv_freq.shape != (self.rotary_dim // 2,):
            raise ValueError(
                f"inv_freq must have shape [{self.rotary_dim // 2}], "
                f"got {tuple(self.inv_freq.shape)}"
            )
        if self.cos_sin_cache is not None and (
            self.cos_sin_cache.dim() != 2 or self.cos_sin_cache.shape[1] != self.rotary_dim
        ):
            raise ValueError(
                f"cos_sin_cache must have shape [max_position, {self.rotary_dim}], "
                f"got {tuple(self.cos_sin_cache.shape)}"
            )

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[N, rotary_dim / 2]``, for ``[N]`` int64 positions.

        From the cache: its dtype and device. From ``inv_freq``: see :func:`rope_cos_sin`.
        """
        if self.cos_sin_cache is None:
            return rope_cos_sin(positions, self.inv_freq)
        rows = self.cos_sin_cache.index_select(0, positions.to(self.cos_sin_cache.device))
        return rows.chunk(2, dim=-1)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``[N, H, D]`` un-rotated vectors to their ``[N]`` positions (see apply_rotary)."""
        cos, sin = self.cos_sin(positions)
        return apply_rotary(x, cos, sin, rotary_dim=self.rotary_dim, is_neox=self.is_neox)

    def shift(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Move ``[N, H, D]`` rotated vectors by ``delta`` ``[N]`` int64 positions:
        ``rotate(unrotate(x, p), p + delta)`` in one rotation, since RoPE angles are linear
        in the position. A common scale of the cache rows (YaRN's mscale) is divided out,
        as that round trip does."""
        cos, sin = self.shift_cos_sin(delta)
        return apply_rotary(x, cos, sin, rotary_dim=self.rotary_dim, is_neox=self.is_neox)

    def shift_cos_sin(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[N, rotary_dim / 2]``, that :meth:`shift` rotates by:
        the angles of ``delta`` ``[N]`` int64 positions, the cache's common scale divided
        out."""
        cos, sin = self.cos_sin(delta.abs())
        norm = torch.sqrt(cos * cos + sin * sin)
        sign = torch.where(delta < 0, -1.0, 1.0).to(sin.device, sin.dtype)[:, None]
        return cos / norm, sin * sign / norm

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Un-rotate ``[N, H, D]`` vectors from their ``[N]`` positions (see invert_rotary)."""
        cos, sin = self.cos_sin(positions)
        return invert_rotary(x, cos, sin, rotary_dim=self.rotary_dim, is_neox=self.is_neox)
