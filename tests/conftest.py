"""Session fixtures: the default model and its tokenizer (helpers live in helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_dir() -> str:
    from kvslimmer_vllm.models import fetch_model

    return str(fetch_model())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
