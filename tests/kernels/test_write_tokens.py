"""Writing a step's new tokens: ``core.paged.write_tokens`` (the contract, checked by hand
here) against the C++ op (CPU) and the Triton kernel (CUDA, or Triton's interpreter on CPU).

Every case starts from caches and state full of recognisable values (merged counts, old
positions, Hessians and masses), so a write that touches the wrong slot, misses one, or
leaves a slot's old state behind shows. Cases: key and value as strided views of one fused
qkv tensor (what vLLM passes), padding tokens (negative slot ids) anywhere, no state,
a padded cache row, float32 / float16 / bfloat16, zero tokens, and bad arguments.
"""

from __future__ import annotations

import pytest
import torch

from helpers import triton_kernel_modules
from kvslimmer_vllm import kernels
from kvslimmer_vllm.core.paged import write_tokens as write_tokens_ref

(rk,) = triton_kernel_modules("round")
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
try:  # the Triton and reference cases run without the C++ extension (a bare GPU machine)
    import kvslimmer_vllm._C  # noqa: F401
    CPP = torch.ops.kvslimmer
except ImportError:
    CPP = None


def _case(tokens, num_slots, heads, dim, dtype, *, pad_at=(), padded_cache=False, seed=0,
          device="cpu"):
    """(kv, key, value, slots, positions, state): key and value are views of one
    ``[T, (Hq + 2 Hkv) D]`` qkv tensor; ``pad_at`` tokens get slot -1."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * dim + (4 if padded_cache else 0)
    kv = (torch.randn(num_slots, heads, width, generator=gen) * 3).to(dtype)[..., :2 * dim]
    hq = 2 * heads
    qkv = torch.randn(tokens, (hq + 2 * heads) * dim, generator=gen).to(dtype)
    key = qkv[:, hq * dim:(hq + heads) * dim].view(tokens, heads, dim)
    value = qkv[:, (hq + heads) * dim:].view(tokens, heads, dim)
    slots = torch.randperm(num_slots, generator=gen)[:tokens]
    for t in pad_at:
        slots[t] = -1
    positions = torch.randint(0, 10_000, (tokens,), generator=gen)
    state = (torch.full((num_slots,), 7.0),                     # merged counts
             torch.randint(0, 10_000, (num_slots,), generator=gen),
             torch.rand(num_slots, heads, generator=gen) + 0.5,  # Hessians
             torch.rand(num_slots, heads, generator=gen) + 0.5)  # masses
    move = lambda t: t.to(device)  # noqa: E731
    return (move(kv), move(key), move(value), move(slots), move(positions),
            tuple(move(t) for t in state))


def _clone(case):
    kv, key, value, slots, positions, state = case
    return kv.clone(), key, value, slots, positions, tuple(t.clone() for t in state)


def _impls(name):
    if name == "cpp" and CPP is None:
        pytest.skip("C++ extension not built")
    return {
        "reference": (write_tokens_ref, torch.device("cpu")),
        "cpp": (CPP.write_tokens if CPP is not None else None, torch.device("cpu")),
        "triton": (rk.write_tokens, TRITON_DEVICE),
        "dispatch": (kernels.write_tokens, torch.device("cpu")),
    }[name]


def test_reference_writes_rows_and_resets_state():
    """The contract by hand: written slots hold (key, value) and count 1 / their position /
    NaN / 0; the padding token and every other slot stay exactly as they were."""
    kv, key, value, slots, positions, state = _case(5, 20, 2, 4, torch.float32, pad_at=(2,))
    before = _clone((kv, key, value, slots, positions, state))
    write_tokens_ref(kv, key, value, slots, positions, *state)
    counts, spos, hess, mass = state
    for t in range(5):
        s = int(slots[t])
        if s < 0:
            continue
        assert torch.equal(kv[s, :, :4], key[t]) and torch.equal(kv[s, :, 4:], value[t])
        assert counts[s] == 1.0 and spos[s] == positions[t]
        assert bool(hess[s].isnan().all()) and bool((mass[s] == 0).all())
    others = torch.ones(20, dtype=torch.bool)
    others[slots[slots >= 0]] = False
    assert int(others.sum()) == 16
    assert torch.equal(kv[others], before[0][others])
    for new, old in zip(state, before[5]):
        assert torch.equal(new[others], old[others])


@pytest.mark.parametrize("impl", ["cpp", "triton", "dispatch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("tokens,num_slots,heads,dim,pad_at,padded_cache", [
    (1, 1, 1, 2, (), False),                # one token, one slot
    (8, 64, 3, 64, (), False),              # a decode batch, SmolLM2's shape
    (37, 300, 8, 16, (0, 36), True),        # padding at both ends, padded cache rows
    (70, 128, 2, 40, (5, 6, 7, 64), False),  # more tokens than one program/task block
    (4, 16, 1, 8, (0, 1, 2, 3), False),     # nothing but padding
])
@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_matches_reference(impl, dtype, tokens, num_slots, heads, dim, pad_at, padded_cache,
                           with_state):
    write, device = _impls(impl)
    case = _case(tokens, num_slots, heads, dim, dtype, pad_at=pad_at,
                 padded_cache=padded_cache, seed=tokens + dim, device=device)
    ours, theirs = _clone(case), _clone(case)
    ours_state = ours[5] if with_state else ()
    write(*ours[:5], *ours_state)
    write_tokens_ref(*[t.cpu() for t in theirs[:5]],
                     *([t.cpu() for t in theirs[5]] if with_state else ()))
    assert torch.equal(ours[0].cpu(), theirs[0].cpu())  # copies: bit-exact
    if with_state:
        for new, want in zip(ours[5], theirs[5]):
            assert torch.equal(new.cpu().nan_to_num(-1.0), want.cpu().nan_to_num(-1.0))
    else:
        for new, old in zip(ours[5], case[5]):  # state untouched
            assert torch.equal(new.cpu(), old.cpu())


@pytest.mark.parametrize("impl", ["cpp", "triton"])
def test_keys_with_a_strided_last_dim(impl):
    """Keys and values whose head dim is not contiguous (a transposed view) are copied
    first, not misread."""
    write, device = _impls(impl)
    kv, key, value, slots, positions, state = _case(6, 32, 2, 8, torch.float32, pad_at=(1,),
                                                    device=device)
    key_t = key.transpose(1, 2).contiguous().transpose(1, 2)  # same values, stride(2) != 1
    assert key_t.stride(2) != 1
    want = kv.clone().cpu()
    write_tokens_ref(want, key.cpu(), value.cpu(), slots.cpu(), positions.cpu())
    write(kv, key_t, value, slots, positions, *state)
    assert torch.equal(kv.cpu(), want)


@pytest.mark.parametrize("impl", ["reference", "cpp", "triton"])
def test_no_tokens_writes_nothing(impl):
    write, device = _impls(impl)
    kv, key, value, slots, positions, state = _case(0, 16, 2, 8, torch.float32, device=device)
    before = _clone((kv, key, value, slots, positions, state))
    write(kv, key, value, slots, positions, *state)
    assert torch.equal(kv, before[0])
    assert all(torch.equal(a, b) for a, b in zip(state, before[5]))


def test_dispatch_converts_keys_of_another_dtype():
    """A cache in another dtype than the keys (the reference path): values rounded to the
    cache's dtype, state reset as usual."""
    kv, key, value, slots, positions, state = _case(6, 32, 2, 8, torch.float32, pad_at=(3,))
    kv16 = kv.to(torch.bfloat16)
    kernels.write_tokens(kv16, key, value, slots, positions, *state)
    written = slots[slots >= 0]
    assert torch.equal(kv16[written, :, :8], key[slots >= 0].to(torch.bfloat16))
    assert bool((state[0][written] == 1).all())


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.__setitem__(1, a[1][:, :1]), "key and value must be"),
    (lambda a: a.__setitem__(2, a[2].to(torch.float64)), "value must be|dtype"),
    (lambda a: a.__setitem__(4, a[4][:2]), "positions"),
    (lambda a: a.__setitem__(5, None), "all or none"),
    (lambda a: a.__setitem__(5, a[5][:3]), "counts"),
    (lambda a: a.__setitem__(8, a[8][:5]), "mass must be"),
    (lambda a: a.__setitem__(0, a[0].reshape(16, 2, 2, 8)), "kv must be"),
])
def test_bad_arguments_name_the_argument(impl, mutate, message):
    write, device = _impls(impl)
    kv, key, value, slots, positions, state = _case(4, 16, 2, 8, torch.float32, device=device)
    args = [kv, key, value, slots, positions, *state]
    mutate(args)
    before = kv.clone()
    with pytest.raises((ValueError, RuntimeError), match=message):
        write(*args)
    assert torch.equal(kv, before)  # checked before anything is written


def test_reference_refuses_part_of_the_state_before_writing():
    kv, key, value, slots, positions, state = _case(4, 16, 2, 8, torch.float32)
    before = kv.clone()
    with pytest.raises(ValueError, match="all or none"):
        write_tokens_ref(kv, key, value, slots, positions, state[0], None, *state[2:])
    assert torch.equal(kv, before)


def test_cpp_rejects_a_slot_outside_the_cache_before_writing():
    _impls("cpp")
    kv, key, value, slots, positions, state = _case(4, 16, 2, 8, torch.float32)
    slots[3] = 16
    before = kv.clone()
    with pytest.raises(ValueError, match="slot id 16 of token 3 outside the cache's 16 slots"):
        CPP.write_tokens(kv, key, value, slots, positions, *state)
    assert torch.equal(kv, before)
