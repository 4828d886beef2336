"""Session fixtures: the default model, its tokenizer and the shared merging server
(helpers live in helpers.py); fixed seeds for every test.

Property tests run derandomized (the same examples on every run, no example database,
no deadline), so a clean run's pass/fail result does not depend on chance or speed. Set
``KVSLIMMER_HYPOTHESIS=explore`` to draw fresh random examples locally.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, settings

# No per-example deadline and no "too slow" health check: both depend on the machine's
# speed (and on what else runs on it), not on the code.
_MACHINE_INDEPENDENT = dict(deadline=None, print_blob=True,
                            suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, database=None, **_MACHINE_INDEPENDENT)
settings.register_profile("explore", derandomize=False, **_MACHINE_INDEPENDENT)
settings.load_profile(os.environ.get("KVSLIMMER_HYPOTHESIS", "ci"))


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
def merge_server(model_dir, tmp_path_factory):
    """The one merging server of the session (tests/engine/test_server.py,
    test_stress.py, test_docker.py): the CPU image's entrypoint serving the baked-in
    default model with ``--kv-merge kvslimmer``, budget 256, interval 128, a KV cache of
    48 blocks of 128 slots and an API key. Tests read counters as differences."""
    from helpers import merging_server_via_entrypoint

    log = tmp_path_factory.mktemp("logs") / "merge_server.log"
    server = merging_server_via_entrypoint(model_dir, log_path=log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
