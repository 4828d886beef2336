"""The C++ CPU ops (kvslimmer_vllm._C) against the engine-free reference in kvslimmer_vllm.core.

paged_attention: every request's output and observation mass must equal
``core.merged_attention(..., visible=causal, return_mass=True)`` over the request's slots, with the
mass scattered to the slots it belongs to, on every instruction set this CPU runs (AVX-512,
AVX2, portable: the `each_isa` fixture switches with ``cpu_isa``). select_pairs and keep_set:
exactly the Python reference's result.
"""

from __future__ import annotations

import math
import os
import platform
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvslimmer_vllm.core import merged_attention
from kvslimmer_vllm.core import select_pairs as select_pairs_ref

_C = pytest.importorskip(
    "kvslimmer_vllm._C",
    reason="C++ extension not built (pip install --no-build-isolation -e .)",
)
OPS = torch.ops.kvslimmer
ALL_ISAS = ("avx512", "avx2", "portable")
HERE = tuple(OPS.cpu_isas())  # what this CPU runs, best first


@pytest.fixture(params=HERE)
def each_isa(request):
    """Runs the test once per instruction set this CPU has, then restores the choice."""
    before = OPS.cpu_isa()
    assert OPS.cpu_isa(request.param) == request.param
    yield request.param
    OPS.cpu_isa(before)


on_every_isa = pytest.mark.usefixtures("each_isa")

# Output tolerances per dtype: inputs are rounded identically, the kernel computes in float32
# like the reference, and the half types differ only by output rounding and summation order.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def make_batch(lens, num_queries, *, hq, hkv, d, block_size, dtype=torch.float32, counts="random",
               seed=0, spare_blocks=3, index_dtype=torch.int32):
    """Random paged batch: scattered, non-monotonic block ids shared by no two requests."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [max(1, -(-length // block_size)) for length in lens]
    total_blocks = sum(blocks_per_req) + spare_blocks
    perm = torch.randperm(total_blocks, generator=gen)
    max_blocks = max(blocks_per_req) + 2
    # Unused table entries hold garbage (-1) that the kernel must never read.
    block_table = torch.full((len(lens), max_blocks), -1, dtype=index_dtype)
    start = 0
    for r, nb in enumerate(blocks_per_req):
        block_table[r, :nb] = perm[start:start + nb].to(index_dtype)
        start += nb
    num_slots = total_blocks * block_size
    kv = torch.randn(num_slots, hkv, 2 * d, generator=gen).to(dtype)
    if counts == "random":
        slot_counts = torch.randint(1, 5, (num_slots,), generator=gen).float()
    elif counts == "thousands":
        slot_counts = torch.randint(1000, 9000, (num_slots,), generator=gen).float()
    else:
        slot_counts = None
    total_tokens = sum(num_queries)
    query = (torch.randn(total_tokens, hq, d, generator=gen) * 2).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(num_queries).cumsum(0).tolist()),
                       dtype=index_dtype)
    seq_lens = torch.tensor(lens, dtype=index_dtype)
    return query, kv, slot_counts, block_table, seq_lens, qsl


def reference(query, kv, counts, block_table, seq_lens, qsl, scale, block_size):
    """Per-request merged_attention (as engine/attention.py calls it), mass scattered to slots."""
    d = query.shape[2]
    hkv = kv.shape[1]
    out = torch.zeros(query.shape, dtype=torch.float32)
    mass = torch.zeros(kv.shape[0], hkv)
    for r in range(seq_lens.numel()):
        q0, q1, length = int(qsl[r]), int(qsl[r + 1]), int(seq_lens[r])
        if q1 <= q0 or length <= 0:
            continue
        nb = -(-length // block_size)
        blocks = block_table[r, :nb].long()
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:length]
        kv_r = kv[slots]
        visible = torch.arange(length - (q1 - q0) + 1, length + 1)
        o, m = merged_attention(
            query[q0:q1], kv_r[..., :d], kv_r[..., d:],
            None if counts is None else counts[slots],
            scale=scale, visible=visible, return_mass=True,
        )
        out[q0:q1] = o.float()
        mass.index_add_(0, slots, m.float())
    return out, mass


def run_and_check(lens, num_queries, *, hq, hkv, d, block_size, dtype=torch.float32,
                  counts="random", seed=0, index_dtype=torch.int32, mass_tol=1e-5, batch=None):
    query, kv, slot_counts, table, seq_lens, qsl = batch or make_batch(
        lens, num_queries, hq=hq, hkv=hkv, d=d, block_size=block_size, dtype=dtype,
        counts=counts, seed=seed, index_dtype=index_dtype)
    scale = d ** -0.5
    initial = torch.rand(kv.shape[0], hkv)
    mass = initial.clone()
    out = OPS.paged_attention(query, kv, slot_counts, table, seq_lens, qsl, scale, block_size,
                              mass)
    ref_out, ref_mass = reference(query, kv, slot_counts, table, seq_lens, qsl, scale, block_size)
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(out.float(), ref_out, **TOL[dtype])
    torch.testing.assert_close(mass - initial, ref_mass, atol=mass_tol, rtol=1e-4)
    # Without a mass tensor the output is the same.
    again = OPS.paged_attention(query, kv, slot_counts, table, seq_lens, qsl, scale, block_size,
                                None)
    torch.testing.assert_close(again, out, atol=0, rtol=0)
    return out, mass - initial


# --------------------------------------------------------------------------------------------
# paged_attention


@on_every_isa
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_mixed_batch(group, d, dtype):
    """Decode rows and prefill chunks of different lengths in one batch, scattered blocks."""
    hkv = 2
    run_and_check(
        lens=[16, 17, 15, 1, 70, 33],
        num_queries=[1, 1, 4, 1, 23, 33],
        hq=group * hkv, hkv=hkv, d=d, block_size=16, dtype=dtype, seed=group * 1000 + d,
    )


@on_every_isa
@pytest.mark.parametrize("block_size", [16, 128])
def test_block_boundaries(block_size):
    bs = block_size
    lens = [bs - 1, bs, bs + 1, 2 * bs, 2 * bs + 1, 1, 3 * bs - 1]
    run_and_check(lens, [1, 1, 1, 2, bs + 1, 1, 5], hq=6, hkv=3, d=64, block_size=bs,
                  seed=bs, index_dtype=torch.int64)


@on_every_isa
def test_single_slot_requests():
    run_and_check([1, 1, 1], [1, 1, 1], hq=8, hkv=1, d=64, block_size=16, seed=5)


@on_every_isa
@pytest.mark.parametrize("counts", ["thousands", None])
def test_counts_thousands_and_none(counts):
    run_and_check([200, 31, 64], [1, 31, 9], hq=9, hkv=3, d=64, block_size=32, counts=counts,
                  seed=7)


@on_every_isa
def test_long_prefill_split_into_chunks():
    """Many query rows per request: several work items share a (request, head); masses add."""
    run_and_check([900, 300], [700, 1], hq=4, hkv=4, d=64, block_size=128, seed=11,
                  mass_tol=1e-4)


@on_every_isa
@pytest.mark.parametrize("threads", [2, 4])
def test_small_decode_batches_split_along_slots(threads):
    """Fewer items than threads: long items are split along their slots and joined exactly."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_and_check([2000], [1], hq=8, hkv=1, d=64, block_size=128, seed=21, mass_tol=5e-5)
        run_and_check([1500, 700], [5, 1], hq=6, hkv=2, d=128, block_size=16, seed=22,
                      dtype=torch.bfloat16, mass_tol=5e-5)
        run_and_check([1030], [3], hq=3, hkv=3, d=20, block_size=32, seed=23, counts=None,
                      mass_tol=5e-5)
    finally:
        torch.set_num_threads(saved)


@on_every_isa
@pytest.mark.parametrize("d", [20, 36])
def test_head_dim_not_multiple_of_8(d):
    """The portable (non-SIMD) path."""
    run_and_check([40, 5], [9, 1], hq=6, hkv=2, d=d, block_size=16, seed=d)
    run_and_check([40], [3], hq=4, hkv=2, d=d, block_size=16, dtype=torch.bfloat16, seed=d)


@on_every_isa
def test_more_queries_than_slots_see_nothing():
    """Rows with no visible slot get zero output and no mass (reference: visible <= 0)."""
    out, _ = run_and_check([3], [5], hq=3, hkv=1, d=64, block_size=16, seed=2)
    assert out[:2].abs().max() == 0


@on_every_isa
def test_skipped_requests_and_uncovered_rows_are_zero():
    query, kv, counts, table, seq_lens, qsl = make_batch(
        [10, 0, 20], [2, 3, 0], hq=4, hkv=2, d=64, block_size=16, seed=3)
    query = torch.cat([query, torch.randn(4, 4, 64)])  # trailing rows beyond query_start_loc
    mass = torch.zeros(kv.shape[0], 2)
    out = OPS.paged_attention(query, kv, counts, table, seq_lens, qsl, 0.125, 16, mass)
    ref_out, ref_mass = reference(query, kv, counts, table, seq_lens, qsl, 0.125, 16)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-4)
    assert out[2:].abs().max() == 0


@on_every_isa
@pytest.mark.parametrize("lens,num_queries,hkv,observed", [
    # prefill chunks (tall items) beside decodes, every other request observed
    ([600, 300, 200, 50], [1, 64, 1, 10], 2, [False, True, False, True]),
    # few items: the long decodes split along their slots (flash-decoding parts)
    ([900, 700], [1, 1], 1, [False, True]),
    ([900, 700], [1, 1], 1, [True, False]),
    ([120, 80], [40, 1], 3, [False, False]),
])
def test_only_observed_requests_add_mass(lens, num_queries, hkv, observed):
    """``observed``: the other requests' rows add nothing to the mass (their slots keep
    what they held), the observed ones add exactly the reference's, and every output is
    the same as with mass for all."""
    from kvslimmer_vllm.core import paged

    query, kv, counts, table, seq_lens, qsl = make_batch(
        lens, num_queries, hq=3 * hkv, hkv=hkv, d=64, block_size=16, seed=len(lens) + hkv)
    flags = torch.tensor(observed)
    initial = torch.rand(kv.shape[0], hkv)
    mass, ref_mass, all_mass = initial.clone(), initial.clone(), initial.clone()
    out = OPS.paged_attention(query, kv, counts, table, seq_lens, qsl, 0.125, 16, mass, flags)
    ref_out = paged.paged_attention(query, kv, counts, table, seq_lens, qsl, 0.125, 16,
                                    ref_mass, flags)
    every = OPS.paged_attention(query, kv, counts, table, seq_lens, qsl, 0.125, 16, all_mass)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    assert torch.equal(out, every)
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-4)
    for r, length in enumerate(lens):
        slots = (table[r, :-(-length // 16)].long()[:, None] * 16
                 + torch.arange(16)).flatten()[:length]
        if observed[r]:
            torch.testing.assert_close(mass[slots], all_mass[slots], atol=1e-6, rtol=1e-5)
            assert bool((mass[slots] > initial[slots]).any())
        else:
            assert torch.equal(mass[slots], initial[slots])


def test_observed_must_name_every_request():
    query, kv, counts, table, seq_lens, qsl = make_batch([40, 5], [9, 1], hq=2, hkv=1, d=64,
                                                         block_size=16)
    mass = torch.zeros(kv.shape[0], 1)
    for bad in (torch.tensor([True]), torch.tensor([1, 0])):
        with pytest.raises(ValueError, match="observed must be bool \\[2\\]"):
            OPS.paged_attention(query, kv, counts, table, seq_lens, qsl, 0.1, 16, mass, bad)


@on_every_isa
def test_random_batches():
    """Random shapes, block sizes (1 included), dtypes, counts and prefill/decode mixes."""
    rng = random.Random(9)
    for trial in range(40):
        block_size = rng.choice([1, 8, 16, 32, 128])
        hkv = rng.choice([1, 2, 3])
        group = rng.choice([1, 2, 3, 5, 8])
        d = rng.choice([8, 24, 64, 128])
        lens = [rng.randint(1, 300) for _ in range(rng.randint(1, 5))]
        num_queries = [rng.choice([1, 1, rng.randint(1, length)]) for length in lens]
        run_and_check(
            lens, num_queries, hq=group * hkv, hkv=hkv, d=d, block_size=block_size,
            dtype=rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
            counts=rng.choice(["random", "thousands", None]), seed=trial,
            index_dtype=rng.choice([torch.int32, torch.int64]), mass_tol=5e-5,
        )


@on_every_isa
def test_merged_identical_keys_are_lossless():
    """Two slots with equal keys merged into one slot of count 2 (mean value) change nothing."""
    gen = torch.Generator().manual_seed(4)
    d, bs = 64, 16
    keys = torch.randn(12, 1, d, generator=gen)
    keys[5] = keys[4]
    values = torch.randn(12, 1, d, generator=gen)
    kv_full = torch.cat([keys, values], -1)
    kv_merged = torch.cat([kv_full[:4], kv_full[4:5], kv_full[6:]])
    kv_merged[4, :, d:] = (values[4] + values[5]) / 2
    counts = torch.ones(11)
    counts[4] = 2
    query = torch.randn(1, 2, d, generator=gen)
    table = torch.zeros(1, 1, dtype=torch.int32)

    def pad(x):
        return torch.cat([x, torch.zeros(bs - x.shape[0], *x.shape[1:])])

    full = OPS.paged_attention(query, pad(kv_full), None, table, torch.tensor([12]),
                               torch.tensor([0, 1]), d ** -0.5, bs, None)
    merged = OPS.paged_attention(query, pad(kv_merged), torch.cat([counts, torch.ones(5)]),
                                 table, torch.tensor([11]), torch.tensor([0, 1]), d ** -0.5,
                                 bs, None)
    torch.testing.assert_close(merged, full, atol=1e-5, rtol=1e-5)


@on_every_isa
def test_strided_query_and_kv_views():
    """A query slice of a wider buffer and a slot-major view of an LBNHC cache are read as is."""
    query, kv, counts, table, seq_lens, qsl = make_batch(
        [40, 17], [5, 1], hq=6, hkv=3, d=64, block_size=16, seed=6)
    wide = torch.randn(query.shape[0], 8, 64)
    wide[:, 1:7] = query
    cache = kv.view(-1, 16, 3, 128).transpose(1, 2)  # [B, H, N, C] stored B, N, H, C
    slot_major = cache.transpose(1, 2).reshape(-1, 3, 128)
    out = OPS.paged_attention(wide[:, 1:7], slot_major, counts, table, seq_lens, qsl, 0.125, 16,
                              None)
    ref_out, _ = reference(query, kv, counts, table, seq_lens, qsl, 0.125, 16)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])


@on_every_isa
def test_deterministic_and_thread_count_independent():
    args = make_batch([300, 129, 64, 1000], [1, 40, 64, 300], hq=8, hkv=2, d=64, block_size=32,
                      seed=8)
    query, kv = args[0], args[1]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            mass = torch.zeros(kv.shape[0], 2)
            out = OPS.paged_attention(*args, 0.125, 32, mass)
            results.append((out, mass))
    finally:
        torch.set_num_threads(threads)
    (out0, mass0), (out1, mass1), (out2, mass2) = results
    assert torch.equal(out0, out1) and torch.equal(mass0, mass1)  # same threads: bitwise
    # Other thread counts cut the work differently: equal up to float summation order.
    torch.testing.assert_close(out0, out2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass0, mass2, atol=1e-5, rtol=1e-5)
    del query


@on_every_isa
@pytest.mark.parametrize("hq,hkv,d,dtype,lens,num_queries", [
    # G = 3: items of 16 positions = 48 rows (three row vectors), causal tails inside items.
    (9, 3, 64, torch.float32, [700, 90], [300, 90]),
    # G = 5, D = 128, bf16: whole prompts (row i sees i + 1 slots), masks in every vector.
    (10, 2, 128, torch.bfloat16, [260], [260]),
    # G = 1, D = 80 (a multiple of 16 that is not one of 64), fp16.
    (4, 4, 80, torch.float16, [64, 129], [64, 100]),
    # Short prompts, many rows per item (G = 8: 320 rows, 20 row vectors).
    (8, 1, 64, torch.float32, [40], [40]),
    # D = 72 and 40: multiples of 8 but not 16, so AVX-512 hands them to AVX2 / portable.
    (6, 2, 72, torch.float32, [150], [120]),
    (6, 3, 40, torch.float32, [150], [120]),
])
def test_tall_prefill_items(hq, hkv, d, dtype, lens, num_queries):
    """Prefill chunks tall enough for the AVX-512 lanes-over-rows items, with counts and mass."""
    run_and_check(lens, num_queries, hq=hq, hkv=hkv, d=d, block_size=16, dtype=dtype,
                  seed=hq * d, mass_tol=5e-5)


@on_every_isa
def test_hidden_slots_with_huge_logits_stay_hidden():
    """A later key aligned with every query (logits ~ +300) must not leak into the rows that
    cannot see it, nor push their softmax into underflow; visible huge logits still dominate."""
    gen = torch.Generator().manual_seed(31)
    d, bs, length = 64, 16, 96
    query, kv, counts, table, seq_lens, qsl = make_batch(
        [length], [length], hq=6, hkv=2, d=d, block_size=bs, seed=31)
    direction = torch.randn(d, generator=gen)
    query[:] = direction * 2 + 0.1 * torch.randn(query.shape, generator=gen)
    slots = (table[0, : length // bs].long()[:, None] * bs + torch.arange(bs)).flatten()
    kv[slots[70], :, :d] = direction * 20  # seen only by rows 70..95
    run_and_check([length], [length], hq=6, hkv=2, d=d, block_size=bs, seed=31,
                  mass_tol=5e-5, batch=(query, kv, counts, table, seq_lens, qsl))


def test_isa_choice_follows_the_cpu_flags():
    """The best ISA the CPU reports is the default; others are refused with their name."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if platform.machine() not in ("x86_64", "AMD64") or not flags:
        pytest.skip("x86-64 Linux only")
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    expected = (("avx512",) if avx512 else ()) + (("avx2",) if avx2 else ()) + ("portable",)
    assert HERE == expected
    before = OPS.cpu_isa()
    try:
        assert OPS.cpu_isa("auto") == expected[0]
        for isa in ALL_ISAS:
            if isa in HERE:
                assert OPS.cpu_isa(isa) == isa
            else:
                with pytest.raises(RuntimeError, match=f"cpu_isa={isa}: this CPU cannot run it"):
                    OPS.cpu_isa(isa)
        with pytest.raises(RuntimeError, match="must be one of auto, avx512, avx2, portable; "
                                               "got 'sse9'"):
            OPS.cpu_isa("sse9")
    finally:
        OPS.cpu_isa(before)


@pytest.mark.parametrize("value,expected", [("portable", "portable"), ("", None),
                                            ("AVX512", "error")])
def test_isa_environment_variable(value, expected):
    """KVSLIMMER_CPU_ISA pins the ISA for a process; a bad value is an error naming it."""
    code = "import torch, kvslimmer_vllm._C; print(torch.ops.kvslimmer.cpu_isa())"
    env = {**os.environ, "KVSLIMMER_CPU_ISA": value}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    if expected == "error":
        assert proc.returncode != 0
        assert "KVSLIMMER_CPU_ISA must be one of auto, avx512, avx2, portable; got 'AVX512'" \
            in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == (expected or HERE[0])


def test_baseline_code_uses_no_avx():
    """The .so must load and run on any x86-64 CPU: only the functions of the avx2_isa /
    avx512_isa copies may hold AVX instructions (VEX/EVEX: v-prefixed, ymm/zmm), and the
    AVX-512 copy really uses zmm registers."""
    if platform.machine() != "x86_64" or shutil.which("objdump") is None:
        pytest.skip("needs x86-64 and objdump")
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__],
                             capture_output=True, text=True, check=True).stdout
    function, offenders, zmm_in_avx512 = "", {}, 0
    for line in listing.splitlines():
        if line.endswith(">:") and " <" in line:
            function = line.split(" <", 1)[1][:-2]
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].strip().endswith(":"):
            continue
        instruction = parts[1]
        vector = instruction.startswith("v") or "%ymm" in instruction or "%zmm" in instruction
        if "avx512_isa::" in function:
            zmm_in_avx512 += "%zmm" in instruction
        elif vector and "avx2_isa::" not in function:
            offenders.setdefault(function, instruction)
    assert not offenders, f"AVX instructions in baseline code: {list(offenders.items())[:5]}"
    assert zmm_in_avx512 > 100


def test_schema_mutation_and_fake_tensor_registration():
    """The schema declares the in-place mass; the Meta kernel serves fake tensors."""
    query, kv, counts, table, seq_lens, qsl = make_batch([40, 17], [5, 1], hq=6, hkv=3, d=64,
                                                         block_size=16)
    mass = torch.zeros(kv.shape[0], 3)
    for args in ((query, kv, counts, table, seq_lens, qsl, 0.125, 16, mass),
                 (query, kv, None, table, seq_lens, qsl, 0.125, 16, None)):
        torch.library.opcheck(OPS.paged_attention.default, args)
    meta = OPS.paged_attention(*(t.to("meta") for t in (query, kv, counts, table, seq_lens, qsl)),
                               0.125, 16, None)
    assert meta.shape == query.shape and meta.device.type == "meta"


def test_argument_errors():
    query, kv, counts, table, seq_lens, qsl = make_batch([20], [2], hq=4, hkv=2, d=64,
                                                         block_size=16)
    with pytest.raises(RuntimeError, match="differs from query dtype"):
        OPS.paged_attention(query, kv.half(), counts, table, seq_lens, qsl, 0.1, 16, None)
    with pytest.raises(RuntimeError, match="multiple of Hkv"):
        OPS.paged_attention(query[:, :3], kv, counts, table, seq_lens, qsl, 0.1, 16, None)
    bad = table.clone()
    bad[0, 1] = 10_000
    with pytest.raises(RuntimeError, match="outside the cache"):
        OPS.paged_attention(query, kv, counts, bad, seq_lens, qsl, 0.1, 16, None)
    with pytest.raises(RuntimeError, match="needs 2 blocks"):
        OPS.paged_attention(query, kv, counts, table[:, :1], seq_lens, qsl, 0.1, 16, None)
    with pytest.raises(RuntimeError, match="mass must have shape"):
        OPS.paged_attention(query, kv, counts, table, seq_lens, qsl, 0.1, 16, torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="counts must have shape"):
        OPS.paged_attention(query, kv, counts[:-1], table, seq_lens, qsl, 0.1, 16, None)


# --------------------------------------------------------------------------------------------
# select_pairs


def _check_same(scores, k):
    expected = select_pairs_ref(scores, k)
    got = OPS.select_pairs(scores, k)
    assert got.dtype == torch.int64 and got.device == scores.device
    assert torch.equal(got, expected), (scores.tolist(), k, got.tolist(), expected.tolist())


def _adversarial(n, rng):
    patterns = [
        [0.0] * n,
        [1.0] * n,
        [float(i) for i in range(n)],
        [float(n - i) for i in range(n)],
        [float(i % 2) for i in range(n)],
        [float((i + 1) % 2) for i in range(n)],
        [float(i % 3) for i in range(n)],
        [(-0.0 if i % 2 else 0.0) for i in range(n)],
        [float(rng.choice([-2, 0, 2])) for _ in range(n)],
        [float(abs(i - n // 2)) for i in range(n)],
        [rng.choice([1e300, -1e300, 1.0]) for _ in range(n)],
        [math.ldexp(1.0, rng.randint(-60, 60)) for _ in range(n)],
    ]
    return patterns


def test_select_pairs_random_and_ties_match_reference():
    rng = random.Random(0)
    for trial in range(600):
        num_slots = rng.randint(1, 40)
        n = num_slots - 1
        if trial % 3 == 0:
            values = [float(rng.randint(0, 3)) for _ in range(n)]  # many ties
        elif trial % 3 == 1:
            values = [rng.random() for _ in range(n)]
        else:
            values = [rng.gauss(0, 1) for _ in range(n)]
        scores = torch.tensor(values, dtype=torch.float64)
        for k in {0, min(1, num_slots // 2), num_slots // 2, rng.randint(0, num_slots // 2)}:
            _check_same(scores, k)


def test_select_pairs_adversarial_patterns():
    rng = random.Random(1)
    for num_slots in (2, 3, 4, 5, 8, 9, 16, 33):
        for values in _adversarial(num_slots - 1, rng):
            scores = torch.tensor(values, dtype=torch.float64)
            for k in range(num_slots // 2 + 1):  # includes k = 0, k = 1 and M = 2k exactly
                _check_same(scores, k)


def test_select_pairs_large_and_float32():
    gen = torch.Generator().manual_seed(2)
    for num_slots, k in ((4097, 1024), (1000, 500), (2001, 1000)):
        scores = torch.rand(num_slots - 1, generator=gen, dtype=torch.float64)
        _check_same(scores, k)
        _check_same(torch.randint(0, 4, (num_slots - 1,), generator=gen).double(), k)
    _check_same(torch.rand(300, generator=gen).float(), 100)  # float32 input: widened first
    _check_same(torch.empty(0, dtype=torch.float64), 0)  # M = 1


def test_select_pairs_rows_are_independent_choices():
    """[L, M - 1] scores: row l gets the 1-D choice of row l (rows in parallel), with ties,
    adversarial rows and k up to M / 2; the reference stacks its rows the same way."""
    rng = random.Random(3)
    gen = torch.Generator().manual_seed(3)
    rows = [torch.rand(64, generator=gen, dtype=torch.float64) for _ in range(5)]
    rows += [torch.tensor(v, dtype=torch.float64) for v in _adversarial(64, rng)]
    scores = torch.stack(rows)
    for k in (0, 1, 17, 32):
        got = OPS.select_pairs(scores, k)
        assert got.shape == (len(rows), k) and got.dtype == torch.int64
        assert torch.equal(got, select_pairs_ref(scores, k))
        for row, picked in zip(scores, got):
            assert torch.equal(picked, OPS.select_pairs(row, k))
    assert torch.equal(OPS.select_pairs(scores[:5].float(), 5),
                       select_pairs_ref(scores[:5].float(), 5))
    with pytest.raises(ValueError, match="cannot choose k=33"):
        OPS.select_pairs(scores, 33)
    bad = scores.clone()
    bad[7, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        OPS.select_pairs(bad, 1)
    with pytest.raises(ValueError, match="1-D tensor \\(or 2-D"):
        OPS.select_pairs(scores[None], 1)


@pytest.mark.parametrize(
    "values,k,pattern",
    [
        ([1.0, 2.0, 3.0], 3, "cannot choose k=3 non-overlapping pairs among M=4 slots"),
        ([1.0, 2.0], 2, r"need 0 <= 2k <= M"),
        ([1.0, 2.0], -1, "cannot choose k=-1"),
        ([], 1, "among M=1 slots"),
        ([1.0, float("nan")], 1, "pair scores must be finite"),
        ([float("inf"), 1.0], 0, "pair scores must be finite"),
    ],
)
def test_select_pairs_errors_match_reference(values, k, pattern):
    scores = torch.tensor(values, dtype=torch.float64)
    with pytest.raises(ValueError, match=pattern) as ours:
        OPS.select_pairs(scores, k)
    with pytest.raises(ValueError) as theirs:
        select_pairs_ref(scores, k)
    assert str(theirs.value) in str(ours.value)


# --------------------------------------------------------------------------------------------
# value_spread


def _spread_ref(values, alpha):
    from kvslimmer_vllm.core.stats import value_spread

    return value_spread(values, alpha)


def _alpha(shape, gen, dtype, kind="random"):
    layers, rows, heads = shape
    if kind == "random":
        mass = torch.rand(shape, generator=gen, dtype=torch.float64) ** 4
    elif kind == "one-hot":  # all mass on one slot per head
        mass = torch.zeros(shape, dtype=torch.float64)
        mass[:, torch.randint(0, rows, (1,), generator=gen).item()] = 1.0
    elif kind == "zero":  # normalize_mass gives uniform alpha then; here the raw zeros
        mass = torch.zeros(shape, dtype=torch.float64)
    else:
        raise ValueError(kind)
    total = mass.sum(dim=1, keepdim=True)
    return torch.where(total > 0, mass / total.clamp_min(1e-300), mass).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layers,rows,heads,dim", [
    (1, 1, 1, 1), (1, 7, 3, 64), (30, 878, 3, 64), (2, 5, 8, 128), (4, 33, 2, 80), (3, 2, 5, 3),
])
@pytest.mark.parametrize("kind", ["random", "one-hot", "zero"])
@on_every_isa
def test_value_spread_matches_reference(dtype, layers, rows, heads, dim, kind):
    """Random and adversarial shapes (one slot, one head, odd head dims) and mass (all on one
    slot, none), on a strided view of gathered [L, M, H, 2D] keys/values as the engine
    passes it."""
    gen = torch.Generator().manual_seed(rows * 7 + dim)
    kv = torch.randn(layers, rows, heads, 2 * dim, generator=gen, dtype=torch.float64) * 3
    values = kv[..., dim:].to(dtype)  # not contiguous: rows 2D apart
    alpha = _alpha((layers, rows, heads), gen, dtype, kind)
    got = OPS.value_spread(values, alpha)
    want = _spread_ref(values, alpha)
    assert got.dtype == dtype and got.shape == (layers, rows, heads)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(got, want, **tol)


@on_every_isa
def test_value_spread_large_values_and_contiguous_input():
    """Values of 1e4 (the mean of large rows must not lose the small ones' spread) and a
    contiguous input."""
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(2, 300, 3, 64, generator=gen) * 1e4
    values[:, ::5] += 1e-2
    alpha = _alpha((2, 300, 3), gen, torch.float32)
    torch.testing.assert_close(OPS.value_spread(values, alpha), _spread_ref(values, alpha),
                               rtol=1e-5, atol=1e-1)
    exact = _spread_ref(values.double(), alpha.double())
    torch.testing.assert_close(OPS.value_spread(values.double(), alpha.double()), exact,
                               rtol=1e-12, atol=1e-8)


@pytest.mark.parametrize("values,alpha,pattern", [
    (torch.zeros(2, 3, 4), torch.zeros(2, 3), "values \\[L, M, H, D\\] and alpha"),
    (torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 3), "disagree on"),
    (torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, dtype=torch.float64), "same dtype"),
    (torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16), torch.zeros(1, 2, 3,
                                                                dtype=torch.bfloat16),
     "float32 or float64"),
])
def test_value_spread_errors_name_the_problem(values, alpha, pattern):
    with pytest.raises(ValueError, match=pattern):
        OPS.value_spread(values, alpha)


# --------------------------------------------------------------------------------------------
# merge_pairs


def _pairs_case(layers, slots, heads, dim, k, dtype, gen, weights="random"):
    kv = (torch.randn(layers, slots, heads, 2 * dim, generator=gen, dtype=torch.float64) * 3
          ).to(dtype)
    left = torch.stack([torch.randperm(slots - 1, generator=gen)[:k].sort().values
                        for _ in range(layers)]) if k else torch.zeros(layers, 0,
                                                                      dtype=torch.int64)
    if weights == "random":
        a = torch.rand(layers, k, heads, generator=gen, dtype=torch.float64)
    elif weights == "edges":  # all weight on one key, alternating
        a = (torch.arange(layers * k * heads) % 2).double().view(layers, k, heads)
    else:
        raise ValueError(weights)
    c_i = torch.randint(1, 5000, (layers, k), generator=gen).double()
    c_j = torch.randint(1, 5000, (layers, k), generator=gen).double()
    delta = torch.randint(-3, 2000, (layers, k), generator=gen)
    compute = torch.promote_types(dtype, torch.float32)
    return kv, left, a.to(compute), c_i.to(compute), c_j.to(compute), delta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("layers,slots,heads,dim,k", [
    (1, 2, 1, 2, 1), (1, 7, 3, 64, 3), (30, 300, 3, 64, 120), (2, 40, 8, 128, 20),
    (3, 33, 2, 80, 0), (4, 50, 5, 6, 25),
])
@pytest.mark.parametrize("rope", ["neox", "gptj", "partial", "scaled", "none"])
@pytest.mark.parametrize("weights", ["random", "edges"])
def test_merge_pairs_matches_reference(dtype, layers, slots, heads, dim, k, rope, weights):
    """Random and adversarial shapes (two slots, every slot in a pair, no pairs, odd head
    dims), the RoPE layouts (neox, GPT-J, partial rotary dims, a cache scaled as YaRN's
    mscale scales it) and none, weights of 0 / 1, counts in the thousands, negative
    shifts; keys and values as strided views of one [L, N, H, 2D] buffer, as the engine
    gathers them; RoPE angles from a vLLM-layout cos_sin_cache."""
    from kvslimmer_vllm.core.merge import merge_pairs
    from kvslimmer_vllm.core.rope import RotarySpec, build_cos_sin_cache, default_inv_freq

    gen = torch.Generator().manual_seed(slots * 31 + dim)
    kv, left, a, c_i, c_j, delta = _pairs_case(layers, slots, heads, dim, k, dtype, gen,
                                               weights)
    keys, values = kv[..., :dim], kv[..., dim:]
    rotary_dim = dim if rope != "partial" else max(2, dim // 2 - (dim // 2) % 2)
    rotary = None
    if rope != "none":
        cache = build_cos_sin_cache(default_inv_freq(rotary_dim, 10000.0), 2048).to(dtype)
        rotary = RotarySpec(rotary_dim, rope != "gptj",
                            cos_sin_cache=cache * 1.3 if rope == "scaled" else cache)
    want = merge_pairs(keys, values, left, a, c_i, c_j, rotary, delta)
    got = OPS.merge_pairs(keys, values, left, a, c_i, c_j,
                          rotary.cos_sin_cache if rotary else None, delta if rotary else None,
                          rotary_dim if rotary else 0, rope != "gptj")
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-12,
                                                                          atol=1e-10)
    for g, w in zip(got, want):
        assert g.dtype == dtype and g.shape == (layers, k, heads, dim)
        torch.testing.assert_close(g, w, **tol)
    merged_keys, merged_values = got
    if k:  # one [L, k, H, 2D] buffer: each head's key, then its value
        assert merged_values.data_ptr() == merged_keys.data_ptr() + dim * kv.element_size()
        assert merged_keys.stride() == merged_values.stride() == (k * heads * 2 * dim,
                                                                  heads * 2 * dim, 2 * dim, 1)


def test_merge_pairs_contiguous_inputs_and_identical_pairs():
    """Contiguous keys/values work too; a pair of identical slots merges to itself."""
    gen = torch.Generator().manual_seed(9)
    keys = torch.randn(2, 10, 3, 16, generator=gen)
    keys[:, 5] = keys[:, 4]
    values = keys.clone()
    left = torch.tensor([[4], [4]])
    a = torch.rand(2, 1, 3, generator=gen)
    ones = torch.ones(2, 1)
    merged_keys, merged_values = OPS.merge_pairs(keys, values, left, a, ones, 3 * ones,
                                                 None, None, 0, True)
    torch.testing.assert_close(merged_keys[:, 0], keys[:, 4])
    torch.testing.assert_close(merged_values[:, 0], values[:, 4])


def _pair_args(**change):
    args = dict(keys=torch.zeros(2, 6, 3, 4), values=torch.zeros(2, 6, 3, 4),
                left=torch.tensor([[0, 2], [1, 3]]), a=torch.zeros(2, 2, 3),
                c_left=torch.ones(2, 2), c_right=torch.ones(2, 2), cos_sin=None, delta=None,
                rotary_dim=0, is_neox=True)
    args.update(change)
    return list(args.values())


SHIFTS = torch.tensor([[1, 2], [3, -7]])


@pytest.mark.parametrize("change,pattern", [
    (dict(values=torch.zeros(2, 6, 3, 5)), "keys and values \\[L, N, H, D\\] of one shape"),
    (dict(left=torch.tensor([[0, 5], [1, 3]])), "left slot 5 has no right neighbour"),
    (dict(left=torch.tensor([[0, -1], [1, 3]])), "left slot -1"),
    (dict(left=torch.tensor([[0, 2]])), "left must be int64 \\[L, k\\] with L = 2"),
    (dict(left=torch.tensor([[0.0, 2.0], [1.0, 3.0]])), "left must be int64"),
    (dict(a=torch.zeros(2, 2, 2)), "a must have shape \\[2, 2, 3\\]"),
    (dict(c_left=torch.ones(2, 3)), "c_left and c_right must have left's shape"),
    (dict(a=torch.zeros(2, 2, 3, dtype=torch.float64)), "must have the keys' dtype"),
    (dict(keys=torch.zeros(2, 6, 3, 4, dtype=torch.bfloat16),
          values=torch.zeros(2, 6, 3, 4, dtype=torch.bfloat16)), "float32 or float64 keys"),
    (dict(cos_sin=torch.ones(8, 4)), "give both cos_sin and delta, or neither"),
    (dict(cos_sin=torch.ones(8, 4), delta=SHIFTS, rotary_dim=6),
     "rotary_dim must be even and in \\(0, 4\\]"),
    (dict(cos_sin=torch.ones(8, 2), delta=SHIFTS, rotary_dim=4), "cos_sin must be \\[P, 4\\]"),
    (dict(cos_sin=torch.ones(8, 4, dtype=torch.float64), delta=SHIFTS, rotary_dim=4),
     "cos_sin must have the keys' dtype"),
    (dict(cos_sin=torch.ones(8, 4), delta=SHIFTS.float(), rotary_dim=4),
     "delta must be int64 of left's shape"),
    (dict(cos_sin=torch.ones(8, 4), delta=torch.tensor([[1, 2], [3, 8]]), rotary_dim=4),
     "delta 8 is outside the 8 rows of cos_sin"),
])
def test_merge_pairs_errors_name_the_problem(change, pattern):
    with pytest.raises(ValueError, match=pattern):
        OPS.merge_pairs(*_pair_args(**change))


# --------------------------------------------------------------------------------------------
# compact_rows


def _compact_case(layers, num_slots, heads, dim, n_in, freed, width, dtype, gen,
                  padded=False):
    """Caches of a request whose n_in slots (shuffled ids) keep n_in - freed rows: kept
    input slots in order, as a round's source is."""
    shape = (num_slots, heads, 2 * dim + (5 if padded else 0))
    caches = [(torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
              [..., :2 * dim] for _ in range(layers)]
    slots = torch.randperm(num_slots, generator=gen)[:n_in]
    n = n_in - freed
    source = torch.stack([torch.randperm(n_in, generator=gen)[:n].sort().values
                          for _ in range(layers)])
    merged_slots = torch.stack([torch.randperm(n, generator=gen)[:width]
                                for _ in range(layers)])
    merged = torch.randn(layers, width, heads, 2 * dim, generator=gen).to(dtype)
    return caches, slots, source, merged_slots, merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64])
@pytest.mark.parametrize("layers,num_slots,heads,dim,n_in,freed,width", [
    (1, 4, 1, 1, 2, 1, 1), (3, 256, 3, 64, 200, 50, 50), (30, 512, 3, 64, 300, 0, 0),
    (2, 64, 8, 128, 64, 63, 1), (4, 100, 2, 5, 37, 10, 7),
])
@pytest.mark.parametrize("layout", ["dense", "padded-rows", "strided-merged"])
def test_compact_rows_matches_reference(dtype, layers, num_slots, heads, dim, n_in, freed,
                                        width, layout):
    """The caches after the op equal the reference's bit for bit, every start; slots
    outside the request never change."""
    from kvslimmer_vllm.core.paged import compact_rows

    gen = torch.Generator().manual_seed(num_slots + dim)
    caches, slots, source, merged_slots, merged = _compact_case(
        layers, num_slots, heads, dim, n_in, freed, width, dtype, gen,
        padded=layout == "padded-rows")
    if layout == "strided-merged":
        merged_keys, merged_values = merged[..., :dim], merged[..., dim:]
    else:
        merged_keys, merged_values = merged[..., :dim].contiguous(), merged[..., dim:].contiguous()
    n = source.shape[1]
    for start in sorted({0, n // 2, n}):
        ours = [c.clone() for c in caches]
        theirs = [c.clone() for c in caches]
        args = (slots, source, start, merged_slots, merged_keys, merged_values)
        OPS.compact_rows(ours, *args)
        compact_rows(theirs, *args)
        outside = torch.ones(num_slots, dtype=torch.bool)
        outside[slots] = False
        for before, got, want in zip(caches, ours, theirs):
            assert torch.equal(got, want)
            assert torch.equal(got[outside], before[outside])


def _compact_args(**change):
    gen = torch.Generator().manual_seed(0)
    caches, slots, source, merged_slots, merged = _compact_case(2, 32, 2, 4, 10, 3, 2,
                                                                torch.float32, gen)
    args = dict(kvs=caches, slots=slots, source=source, start=0, merged_slots=merged_slots,
                merged_keys=merged[..., :4], merged_values=merged[..., 4:])
    args.update(change)
    return args


@pytest.mark.parametrize("change,pattern", [
    (dict(kvs=[]), "at least one layer's cache"),
    (dict(kvs=[torch.zeros(32, 2, 8), torch.zeros(32, 2, 8, dtype=torch.float64)]),
     "every cache must have the first's shape"),
    (dict(kvs=[torch.zeros(32, 2, 7)] * 2), "each cache must be \\[S, H, 2D\\]"),
    (dict(slots=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 99])), "slot id 99 outside"),
    (dict(source=torch.tensor([[0, 1, 2, 3, 4, 5, 7], [0, 0, 2, 3, 4, 5, 6]])),
     "source\\[1, 1\\] = 0 must be in \\[1, 10\\)"),
    (dict(source=torch.zeros(3, 7, dtype=torch.int64)),
     "source must be int64 \\[L, n\\] with L = 2"),
    (dict(start=8), "start must be in \\[0, 7\\]"),
    (dict(merged_slots=torch.tensor([[0, 7], [1, 2]])), "merged_slots\\[0, 1\\] = 7 outside"),
    (dict(merged_keys=torch.zeros(2, 2, 2, 3)), "merged_keys and merged_values must be"),
    (dict(merged_keys=torch.zeros(2, 2, 2, 4, dtype=torch.float64)),
     "must have the caches' dtype"),
])
def test_compact_rows_errors_leave_the_caches_untouched(change, pattern):
    args = _compact_args(**change)
    before = [c.clone() for c in args["kvs"]]
    with pytest.raises(ValueError, match=pattern):
        OPS.compact_rows(*args.values())
    for cache, saved in zip(args["kvs"], before):
        assert torch.equal(cache, saved)


# --------------------------------------------------------------------------------------------
# keep_set


def _check_keep(scores, k):
    from kvslimmer_vllm.core.merge import keep_set as keep_set_ref

    got = OPS.keep_set(scores, k)
    assert got.dtype == torch.bool and got.shape == scores.shape
    assert torch.equal(got, keep_set_ref(scores, k)), (scores.tolist(), k)


def test_keep_set_random_and_ties_match_reference():
    """Rows of random, integer-tied, Gaussian and negative scores; every k from 0 to M - 1
    on small rows, a spread of k on larger ones."""
    gen = torch.Generator().manual_seed(4)
    for m in (1, 2, 3, 5, 8, 13, 40):
        rows = torch.stack([torch.rand(m, generator=gen, dtype=torch.float64),
                            torch.randint(0, 3, (m,), generator=gen).double(),
                            torch.randn(m, generator=gen, dtype=torch.float64)])
        for k in range(m):
            _check_keep(rows, k)
    for m in (257, 1000, 3000):
        rows = torch.stack([torch.rand(m, generator=gen, dtype=torch.float64),
                            torch.randint(0, 5, (m,), generator=gen).double()])
        for k in (1, m // 8, m // 2, 3 * m // 4, m - 1):
            _check_keep(rows, k)


def test_keep_set_adversarial_rows():
    """All tied (the later slots kept), sorted either way, alternating, a run of the
    lowest scores at one end, signed zeros, huge and tiny magnitudes, infinities and
    NaN (ordered last, as torch.sort orders it)."""
    rng = random.Random(5)
    m = 33
    rows = [torch.tensor(v, dtype=torch.float64) for v in _adversarial(m, rng)]
    rows.append(torch.tensor([float("inf") if i % 4 else -float("inf") for i in range(m)],
                             dtype=torch.float64))
    nan = torch.rand(m, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    nan[::5] = float("nan")
    rows.append(nan)
    scores = torch.stack(rows)
    for k in range(m):
        _check_keep(scores, k)
    _check_keep(scores.float(), 9)  # float32 input: widened first
    _check_keep(torch.empty(2, 0, dtype=torch.float64), 0)


def test_keep_set_errors_name_the_problem():
    scores = torch.rand(2, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot free k=10 of 10 slots"):
        OPS.keep_set(scores, 10)
    with pytest.raises(ValueError, match="cannot free k=-1"):
        OPS.keep_set(scores, -1)
    with pytest.raises(ValueError, match="scores must be \\[L, M\\]"):
        OPS.keep_set(scores[0], 1)

