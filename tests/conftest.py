"""Session fixtures: the default model, its tokenizer, a tiny random-weight Llama and the
two shared servers (merging and unmodified; helpers live in helpers.py); fixed seeds for
every test.

Property tests run derandomized (the same examples on every run, no example database,
no deadline), so a clean run's pass/fail result does not depend on chance or speed. Set
``KVSLIMMER_HYPOTHESIS=explore`` to draw fresh random examples locally.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, settings

from helpers import TINY_VOCAB

# No per-example deadline and no "too slow" health check: both depend on the machine's
# speed (and on what else runs on it), not on the code.
_MACHINE_INDEPENDENT = dict(deadline=None, print_blob=True,
                            suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, database=None, **_MACHINE_INDEPENDENT)
settings.register_profile("explore", derandomize=False, **_MACHINE_INDEPENDENT)
settings.load_profile(os.environ.get("KVSLIMMER_HYPOTHESIS", "ci"))

# vLLM's CPU engine leaves one core to its front-end process by default; the test
# servers' and engines' front ends mostly wait, so their engines get every core (as the
# eval's offline backend does). An explicit setting is kept.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Tests that draw from Python's or torch's global generators get the same draws
    whatever ran before them."""
    import torch

    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def model_dir() -> str:
    from kvslimmer_vllm.models import fetch_model

    return str(fetch_model())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny random-weight Llama (2 layers, 8 query / 4 KV heads of 32 dims, a 512-token
    vocabulary, no tokenizer) for engine plumbing tests: block accounting, preemption,
    isolation and determinism show in its greedy tokens at a fraction of the real model's
    cost. Prompts for it come from ``helpers.random_tokens``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
        initializer_range=0.08, torch_dtype="float32",
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="session")
def _servers(model_dir, tmp_path_factory):
    """The session's two servers, started side by side (each spends most of its start-up
    importing, one core each): the merging one and the unmodified one."""
    from helpers import MERGE, Server, merging_server_via_entrypoint

    logs = tmp_path_factory.mktemp("logs")
    servers = {}
    try:
        servers["merge"] = merging_server_via_entrypoint(
            model_dir, log_path=logs / "merge_server.log")
        servers["base"] = Server.vllm(model_dir, "--num-gpu-blocks-override",
                                      str(MERGE.NUM_BLOCKS), log_path=logs / "base_server.log")
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="session")
def merge_server(_servers):
    """The one merging server of the session (tests/engine/test_server.py,
    test_stress.py, test_docker.py, test_serve_bench.py): the CPU image's entrypoint
    serving the baked-in default model with ``--kv-merge kvslimmer``, budget 256, interval
    128, a KV cache of 48 blocks of 128 slots and an API key. Tests read counters as
    differences."""
    _servers["merge"].wait_ready()
    return _servers["merge"]


@pytest.fixture(scope="session")
def base_server(_servers):
    """The session's unmodified server (the plugin installed, merging off), with the
    merging server's KV cache (48 blocks of 128 slots): the capacity comparison
    (tests/engine/test_server.py) and the serving benchmark's smoke run
    (tests/test_serve_bench.py)."""
    _servers["base"].wait_ready()
    return _servers["base"]
