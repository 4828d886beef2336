"""RoPE in vLLM's convention: complex-number reference, exact inverse, and RoPE-aware merging."""

import math

import pytest
import torch

from kvslimmer_vllm.core import (
    RotarySpec,
    apply_rotary,
    build_cos_sin_cache,
    default_inv_freq,
    invert_rotary,
    linear_scaled_inv_freq,
    merge_round,
    rope_cos_sin,
)

HEAD_DIM = 64
STYLES = [pytest.param(True, id="neox"), pytest.param(False, id="gptj")]
ROTARY_DIMS = [pytest.param(64, id="full"), pytest.param(32, id="partial")]


def _complex_rotate(x, positions, inv_freq, rotary_dim, is_neox, mscale=1.0):
    """Independent reference: pairs as complex numbers times ``mscale * exp(i * p * inv_freq)``."""
    x = x.double()
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox:
        z = torch.complex(rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :])
    else:
        z = torch.complex(rot[..., 0::2], rot[..., 1::2])
    angles = positions.double()[:, None] * inv_freq.double()[None, :]
    z = z * (mscale * torch.polar(torch.ones_like(angles), angles))[:, None, :]
    if is_neox:
        rotated = torch.cat((z.real, z.imag), dim=-1)
    else:
        rotated = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1)


def _specs(rotary_dim, is_neox):
    """RotarySpecs with plain, linearly scaled, and YaRN-like (mscale != 1) frequencies,
    each with the inv_freq and mscale that the complex reference needs."""
    plain = default_inv_freq(rotary_dim, 10000.0, torch.float64)
    linear = linear_scaled_inv_freq(rotary_dim, 10000.0, 4.0, torch.float64)
    ramp = torch.linspace(1.0, 0.25, rotary_dim // 2, dtype=torch.float64)
    yarn = default_inv_freq(rotary_dim, 500000.0, torch.float64) * ramp
    cache = build_cos_sin_cache(yarn.float(), 4096, mscale=1.3)
    return [
        (RotarySpec(rotary_dim, is_neox, inv_freq=plain), plain, 1.0),
        (RotarySpec(rotary_dim, is_neox, inv_freq=linear), linear, 1.0),
        (RotarySpec(rotary_dim, is_neox, cos_sin_cache=cache), yarn.float(), 1.3),
    ]


@pytest.mark.parametrize("is_neox", STYLES)
@pytest.mark.parametrize("rotary_dim", ROTARY_DIMS)
def test_apply_rotary_matches_complex_reference(is_neox, rotary_dim):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, HEAD_DIM, generator=gen, dtype=torch.float64)
    positions = torch.tensor([0, 1, 7, 100, 2047, 4095])
    for spec, inv_freq, mscale in _specs(rotary_dim, is_neox):
        expected = _complex_rotate(x, positions, inv_freq, rotary_dim, is_neox, mscale)
        torch.testing.assert_close(spec.rotate(x, positions), expected, atol=1e-4, rtol=1e-4)
    # float64 end to end is exact to round-off.
    cos, sin = rope_cos_sin(positions, _specs(rotary_dim, is_neox)[0][1])
    out = apply_rotary(x, cos, sin, rotary_dim=rotary_dim, is_neox=is_neox)
    expected = _complex_rotate(x, positions, _specs(rotary_dim, is_neox)[0][1], rotary_dim, is_neox)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out[..., rotary_dim:], x[..., rotary_dim:], atol=0, rtol=0)


@pytest.mark.parametrize("is_neox", STYLES)
@pytest.mark.parametrize("rotary_dim", ROTARY_DIMS)
def test_invert_undoes_apply(is_neox, rotary_dim):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, HEAD_DIM, generator=gen)
    positions = torch.tensor([3, 9, 511, 1000, 4000])
    for spec, _, _ in _specs(rotary_dim, is_neox):
        cos, sin = spec.cos_sin(positions)
        rotated = apply_rotary(x, cos, sin, rotary_dim=rotary_dim, is_neox=is_neox)
        back = invert_rotary(rotated, cos, sin, rotary_dim=rotary_dim, is_neox=is_neox)
        torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
        back = spec.unrotate(spec.rotate(x, positions), positions)
        torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)


def test_vllm_neox_formula_by_hand():
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # x1 = [1, 2], x2 = [3, 4]
    cos = torch.tensor([[0.6, 0.0]])
    sin = torch.tensor([[0.8, 1.0]])
    y = apply_rotary(x, cos, sin, rotary_dim=4, is_neox=True)
    # y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin
    expected = torch.tensor([[[0.6 - 2.4, -4.0, 1.8 + 0.8, 2.0]]])
    torch.testing.assert_close(y, expected)
    y = apply_rotary(x, cos, sin, rotary_dim=4, is_neox=False)  # pairs (1, 2), (3, 4)
    expected = torch.tensor([[[0.6 - 1.6, 1.2 + 0.8, -4.0, 3.0]]])
    torch.testing.assert_close(y, expected)


def test_cache_and_inv_freq_specs_agree():
    inv_freq = default_inv_freq(32, 10000.0)
    cache = build_cos_sin_cache(inv_freq, 1024)
    assert cache.shape == (1024, 32)
    positions = torch.tensor([0, 5, 1023])
    from_freq = RotarySpec(32, True, inv_freq=inv_freq).cos_sin(positions)
    from_cache = RotarySpec(32, True, cos_sin_cache=cache).cos_sin(positions)
    for a, b in zip(from_freq, from_cache):
        assert a.shape == (3, 16)
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(
        linear_scaled_inv_freq(32, 10000.0, 8.0), default_inv_freq(32, 10000.0) / 8.0
    )


def test_rotary_spec_validation():
    inv_freq = default_inv_freq(16, 10000.0)
    with pytest.raises(ValueError, match="exactly one"):
        RotarySpec(16, True)
    with pytest.raises(ValueError, match="exactly one"):
        RotarySpec(16, True, inv_freq=inv_freq, cos_sin_cache=build_cos_sin_cache(inv_freq, 8))
    with pytest.raises(ValueError, match="inv_freq"):
        RotarySpec(32, True, inv_freq=inv_freq)
    with pytest.raises(ValueError, match="even"):
        RotarySpec(15, True, inv_freq=inv_freq)
    with pytest.raises(ValueError, match="cos_sin_cache"):
        RotarySpec(32, True, cos_sin_cache=build_cos_sin_cache(inv_freq, 8))
    cos, sin = rope_cos_sin(torch.arange(2), inv_freq)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary(torch.zeros(2, 1, 8), cos, sin, rotary_dim=16, is_neox=True)


@pytest.mark.parametrize("is_neox", STYLES)
@pytest.mark.parametrize("rotary_dim", ROTARY_DIMS)
def test_keys_of_one_unrotated_key_merge_into_it_at_the_later_position(is_neox, rotary_dim):
    gen = torch.Generator().manual_seed(2)
    kv_heads, sink, recent, p = 2, 2, 2, 1500
    n = sink + 2 + recent
    positions = torch.arange(p - sink, p - sink + n)  # the pair sits at positions p and p + 1
    base = torch.randn(1, kv_heads, HEAD_DIM, generator=gen)
    for spec, _, _ in _specs(rotary_dim, is_neox):
        keys = spec.rotate(torch.randn(n, kv_heads, HEAD_DIM, generator=gen), positions)
        keys[sink : sink + 2] = spec.rotate(base.expand(2, -1, -1), positions[sink : sink + 2])
        result = merge_round(
            keys,
            torch.randn(n, kv_heads, HEAD_DIM, generator=gen),
            torch.tensor([1.0, 1.0, 9.0, 30.0, 1.0, 1.0]),
            positions,
            torch.rand(n, kv_heads, generator=gen),
            torch.rand(n, kv_heads, generator=gen),
            sink=sink,
            recent=recent,
            k=1,
            round_idx=2,
            gamma=4096 / math.log(512),
            eps=1e-6,
            rotary=spec,
        )
        assert result.pairs.tolist() == [sink]
        assert result.positions[sink] == p + 1
        expected = spec.rotate(base, torch.tensor([p + 1]))[0]
        torch.testing.assert_close(result.keys[sink], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("is_neox", STYLES)
@pytest.mark.parametrize("rotary_dim", ROTARY_DIMS)
def test_shift_is_the_unrotate_rotate_round_trip(is_neox, rotary_dim):
    """shift(x, delta) = rotate(unrotate(x, p), p + delta), also for a cache with an mscale
    (YaRN), negative and zero shifts, and far positions."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 3, HEAD_DIM, generator=g)
    positions = torch.tensor([0, 3, 100, 4000, 8000, 17])
    delta = torch.tensor([0, 1, 250, 4191, -7999, -17])
    inv_freq = default_inv_freq(rotary_dim, 500000.0)
    specs = [
        RotarySpec(rotary_dim, is_neox, inv_freq=inv_freq),
        RotarySpec(rotary_dim, is_neox, cos_sin_cache=build_cos_sin_cache(
            inv_freq, 8192, mscale=1.3)),
    ]
    for spec in specs:
        want = spec.rotate(spec.unrotate(x, positions), positions + delta)
        torch.testing.assert_close(spec.shift(x, delta), want, atol=2e-5, rtol=1e-4)
