"""Reference attention over a cache whose slots may stand for several merged tokens.

A slot ``j`` that stands for ``c_j`` original tokens holds the *mean* of their values, and
attention adds ``log(c_j)`` to its logit::

    logit_j = scale * q . k_j + log(c_j)
    P_j     = softmax_j(logit_j)
    out     = sum_j P_j v_j

With every count equal to 1 this is ordinary attention. A slot with integer count ``c`` behaves
exactly like ``c`` copies of an unmerged slot with the same key and value.
"""

from __future__ import annotations

import torch

__all__ = ["merged_attention"]


def merged_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    counts: torch.Tensor | None,
    *,
    scale: float,
    visible: torch.Tensor | None = None,
    return_mass: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one request's queries over its (possibly merged) KV slots, for one layer.

    Args:
        query: ``[T, Hq, D]`` float queries (post-RoPE). ``Hq = G * Hkv``; query head ``h`` reads
            KV head ``h // G`` (grouped-query attention).
        keys: ``[N, Hkv, D]`` float keys, post-RoPE, one row per physical slot.
        values: ``[N, Hkv, D]`` float values; a merged slot holds the mean of its tokens' values.
        counts: ``[N]`` positive float counts of original tokens per slot (1 = unmerged), or
            ``None`` for all ones. The bias ``log(count)`` is added to every head's logit.
        scale: logit scale, usually ``1 / sqrt(D)``.
        visible: optional ``[T]`` integer tensor; query ``t`` attends to slots ``[0, visible[t])``
            only (the causal mask in physical-slot order). ``None`` lets every query see all ``N``
            slots. A query with ``visible[t] == 0`` gets a zero output and contributes no mass.
        return_mass: also return the observation mass.

    Returns:
        ``out``: ``[T, Hq, D]`` in ``query.dtype``. With ``return_mass``, also ``mass``:
        ``[N, Hkv]`` in the compute dtype, ``mass[j, h] = sum_t sum_g P_j(t, g) / G`` over the ``T``
        queries and the ``G`` query heads ``g`` of KV head ``h`` (``P`` includes the count bias).
        Each head's mass sums to the number of queries that see at least one slot.

    Computation is float32 (float64 if the query is float64), one batched matmul per KV head
    for logits and one for outputs. Memory is ``O(Hq * T * N)``; callers with long prefills can
    split the queries into chunks (masses of chunks add up).
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_slots, num_kv_heads, _ = keys.shape
    if keys.shape[2] != head_dim or values.shape != keys.shape:
        raise ValueError(
            f"shape mismatch: query {tuple(query.shape)}, keys {tuple(keys.shape)}, "
            f"values {tuple(values.shape)}"
        )
    if num_q_heads % num_kv_heads:
        raise ValueError(f"Hq={num_q_heads} is not a multiple of Hkv={num_kv_heads}")
    if counts is not None and counts.shape != (num_slots,):
        raise ValueError(f"counts must have shape [{num_slots}], got {tuple(counts.shape)}")
    if visible is not None and visible.shape != (num_tokens,):
        raise ValueError(f"visible must have shape [{num_tokens}], got {tuple(visible.shape)}")
    group = num_q_heads // num_kv_heads
    dtype = torch.promote_types(query.dtype, torch.float32)

    # [T, Hkv*G, D] -> [Hkv, G*T, D]: all query rows that read one KV head form one batch entry.
    q = (query.to(dtype) * scale).view(num_tokens, num_kv_heads, group, head_dim)
    q = q.permute(1, 2, 0, 3).reshape(num_kv_heads, group * num_tokens, head_dim)
    k = keys.to(dtype).permute(1, 2, 0)  # [Hkv, D, N]
    v = values.to(dtype).permute(1, 0, 2)  # [Hkv, N, D]

    logits = torch.bmm(q, k)  # [Hkv, G*T, N]
    if counts is not None:
        logits += counts.to(device=logits.device, dtype=dtype).log()
    logits = logits.view(num_kv_heads, group, num_tokens, num_slots)
    if visible is not None:
        visible = visible.to(logits.device)
        slot_ids = torch.arange(num_slots, device=logits.device)
        hidden = slot_ids[None, :] >= visible[:, None]  # [T, N]
        logits.masked_fill_(hidden, float("-inf"))
    probs = logits.softmax(dim=-1)
    if visible is not None:
        # Rows that see no slot are all -inf and softmax to NaN; define them as zero.
        probs.masked_fill_((visible <= 0)[:, None], 0.0)
    probs = probs.view(num_kv_heads, group * num_tokens, num_slots)

    out = torch.bmm(probs, v)  # [Hkv, G*T, D]
    out = out.view(num_kv_heads, group, num_tokens, head_dim).permute(2, 0, 1, 3)
    out = out.reshape(num_tokens, num_q_heads, head_dim).to(query.dtype)
    if not return_mass:
        return out
    mass = probs.sum(dim=1).transpose(0, 1) / group  # [N, Hkv]
    return out, mass
