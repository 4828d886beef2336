"""merged_attention against plain attention, token duplication and explicit probabilities."""

import math

import pytest
import torch
import torch.nn.functional as F

from kvslimmer_vllm.core import merged_attention


def _random_case(seed, tokens=5, slots=11, kv_heads=2, group=3, dim=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(tokens, kv_heads * group, dim, generator=gen, dtype=dtype)
    keys = torch.randn(slots, kv_heads, dim, generator=gen, dtype=dtype)
    values = torch.randn(slots, kv_heads, dim, generator=gen, dtype=dtype)
    return query, keys, values


def _explicit_probs(query, keys, counts, scale, visible):
    """P[t, hq, n] by a per-head loop, straight from the definition."""
    tokens, q_heads, _ = query.shape
    slots, kv_heads, _ = keys.shape
    group = q_heads // kv_heads
    probs = torch.zeros(tokens, q_heads, slots, dtype=torch.float64)
    for hq in range(q_heads):
        logits = scale * query[:, hq].double() @ keys[:, hq // group].double().T
        logits += counts.double().log()
        for t in range(tokens):
            n = int(visible[t])
            probs[t, hq, :n] = logits[t, :n].softmax(-1)
    return probs


@pytest.mark.parametrize("use_visible", [False, True])
def test_unit_counts_equal_sdpa_with_gqa(use_visible):
    query, keys, values = _random_case(0)
    slots, group = keys.shape[0], query.shape[1] // keys.shape[1]
    scale = 1 / math.sqrt(query.shape[-1])
    visible = torch.tensor([7, 8, 9, 10, 11]) if use_visible else None

    for counts in (None, torch.ones(slots)):
        out = merged_attention(query, keys, values, counts, scale=scale, visible=visible)
        mask = None
        if use_visible:
            mask = torch.arange(slots)[None, :] < visible[:, None]
        expected = F.scaled_dot_product_attention(
            query.transpose(0, 1),
            keys.repeat_interleave(group, dim=1).transpose(0, 1),
            values.repeat_interleave(group, dim=1).transpose(0, 1),
            attn_mask=mask,
            scale=scale,
        ).transpose(0, 1)
        assert out.shape == query.shape and out.dtype == query.dtype
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_mass_matches_explicit_probabilities_and_sums_to_tokens():
    query, keys, values = _random_case(1)
    slots, kv_heads = keys.shape[:2]
    group = query.shape[1] // kv_heads
    counts = torch.rand(slots, generator=torch.Generator().manual_seed(2)) * 9 + 1
    visible = torch.tensor([3, 11, 6, 0, 11])
    out, mass = merged_attention(
        query, keys, values, counts, scale=0.3, visible=visible, return_mass=True
    )

    probs = _explicit_probs(query, keys, counts, 0.3, visible)  # [T, Hq, N]
    expected = probs.view(query.shape[0], kv_heads, group, slots).sum(dim=(0, 2)).T / group
    assert mass.shape == (slots, kv_heads)
    torch.testing.assert_close(mass.double(), expected, atol=1e-5, rtol=1e-5)
    # Query 3 sees nothing: zero output, no mass; the other four queries add up to 4 per head.
    assert torch.all(out[3] == 0)
    torch.testing.assert_close(mass.sum(dim=0), torch.full((kv_heads,), 4.0), atol=1e-5, rtol=0)


def test_mass_sums_to_token_count_without_mask():
    query, keys, values = _random_case(3, tokens=7)
    _, mass = merged_attention(query, keys, values, None, scale=0.2, return_mass=True)
    expected = torch.full((keys.shape[1],), 7.0)
    torch.testing.assert_close(mass.sum(dim=0), expected, atol=1e-5, rtol=0)


def test_count_bias_equals_duplicated_slots():
    query, keys, values = _random_case(4, dtype=torch.float64)
    counts = torch.tensor([1, 3, 1, 7, 2, 1, 1, 5, 1, 1, 4], dtype=torch.float64)
    scale = 0.25
    out, mass = merged_attention(query, keys, values, counts, scale=scale, return_mass=True)

    repeats = counts.long()
    dup_out, dup_mass = merged_attention(
        query,
        keys.repeat_interleave(repeats, dim=0),
        values.repeat_interleave(repeats, dim=0),
        None,
        scale=scale,
        return_mass=True,
    )
    torch.testing.assert_close(out, dup_out, atol=1e-12, rtol=1e-12)
    owner = torch.arange(len(counts)).repeat_interleave(repeats)
    summed = torch.zeros_like(mass).index_add_(0, owner, dup_mass)
    torch.testing.assert_close(mass, summed, atol=1e-12, rtol=1e-12)


def test_low_precision_query_keeps_dtype():
    query, keys, values = _random_case(5)
    out = merged_attention(query.bfloat16(), keys.bfloat16(), values.bfloat16(), None, scale=0.3)
    assert out.dtype == torch.bfloat16
    reference = merged_attention(query, keys, values, None, scale=0.3)
    torch.testing.assert_close(out.float(), reference, atol=5e-2, rtol=5e-2)


def test_rejects_bad_head_grouping():
    query = torch.randn(2, 5, 4)
    keys = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="multiple"):
        merged_attention(query, keys, keys, None, scale=1.0)
