"""Tensor parallelism: each rank merges its own KV heads under one global plan (the
scheduler's rounds, and slot selection scores summed over ranks), so greedy tokens with
``tensor_parallel_size=2`` equal the single-rank run.

The tiny random-weight Llama of conftest (8 query / 4 KV heads) keeps it fast.
On CPU it runs when vLLM's CPU backend starts two ranks here; ``scripts/gpu_check.sh`` runs
it on machines with two GPUs (``KVSLIMMER_TP_TEST=2``).
"""

from __future__ import annotations

import os

import pytest

from kvslimmer_vllm.engine.plugin import engine_kwargs
from helpers import offline_llm, random_tokens


def _greedy(model, tp, prompts, settings, **extra):
    """Greedy tokens and merge stats of each prompt, run with the per-request settings of
    the same index."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    with offline_llm(model, tensor_parallel_size=tp, skip_tokenizer_init=True,
                     max_model_len=2048, num_gpu_blocks_override=64, **extra,
                     **engine_kwargs(budget=192, interval=32, observe="progressive")) as llm:
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            [SamplingParams(temperature=0.0, max_tokens=48, min_tokens=48, ignore_eos=True,
                            detokenize=False, extra_args=xargs)
             for xargs in settings],
            use_tqdm=False,
        )
    return ([list(o.outputs[0].token_ids) for o in outputs],
            [o.kv_transfer_params["kv_merge"] for o in outputs])


@pytest.fixture
def two_ranks(monkeypatch):
    """Two ranks fit here: two GPUs, or CPU cores split between the ranks (vLLM's CPU
    backend binds each rank's threads to its own cores; with one NUMA node it must be
    told which, through VLLM_CPU_OMP_THREADS_BIND)."""
    import torch

    if torch.cuda.is_available():
        if torch.cuda.device_count() < 2:
            pytest.skip("tensor parallelism needs two GPUs")
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("tensor parallelism on CPU needs two cores")
    half = len(cores) // 2
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores[:half])) + "|"
                       + ",".join(map(str, cores[half:2 * half])))


@pytest.mark.skipif(os.environ.get("KVSLIMMER_TP_TEST", "2") == "0",
                    reason="KVSLIMMER_TP_TEST=0")
def test_two_ranks_give_the_single_rank_tokens(tiny_llama, two_ranks):
    """Catches: ranks choosing different slots (scores not summed over ranks), ranks
    running different rounds, or a rank merging heads it does not hold -- with rounds
    during prefill (progressive) and with one step after the prompt scored by the
    question's window, pooled (prompt-end), in the same batch; and SnapMerge, whose
    protected sub-rounds run as one C++ call on one rank but in lock step from Python
    with a score sum per sub-round on two."""
    lengths = (300, 700, 1100)
    prompts = [random_tokens(n, seed=3 + i) for i, n in enumerate(lengths)] * 3
    settings = ([{"kv_merge_observe": "progressive"}] * len(lengths)
                + [{"kv_merge_observe": "prompt-end"}] * len(lengths)
                + [{"kv_merge_method": "snapmerge"}] * len(lengths))
    single, s1 = _greedy(tiny_llama, 1, prompts, settings)
    double, s2 = _greedy(tiny_llama, 2, prompts, settings)  # fails without the score sum
    assert all(s["rounds"] >= 3 for s in s1[:len(lengths)])
    # prompt-end: the compression step, then decode rounds (48 tokens, interval 32)
    assert all(s["rounds"] >= 2 for s in s1[len(lengths):])
    assert [s["method"] for s in s1[2 * len(lengths):]] == ["snapmerge"] * len(lengths)
    assert s1 == s2
    assert double == single
    # The modes did differ: the same prompt merged in another way gives other tokens.
    assert single[:len(lengths)] != single[len(lengths):2 * len(lengths)]
    assert single[len(lengths):2 * len(lengths)] != single[2 * len(lengths):]
