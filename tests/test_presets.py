"""The model presets in configs/: they load, validate, resolve for their model's context
length, and describe the model's architecture correctly where its config is at hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kvslimmer_vllm.core.config import KVMergeConfig, KVMergeConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))


def test_every_expected_model_has_a_preset():
    names = {p.stem for p in PRESETS}
    assert {"llama-3.1-8b-instruct", "mistral-7b-instruct-v0.3", "qwen2-7b-instruct",
            "smollm2-135m-instruct"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_and_its_profiles_resolve(preset):
    data = yaml.safe_load(preset.read_text())
    context = data["model"]["max_position_embeddings"]
    sources = [str(preset)] + [f"{preset}#{name}" for name in data.get("profiles", {})]
    for source in sources:
        config = KVMergeConfig.from_source(source, {}).resolve(context)
        assert config.method == "kvslimmer"
        assert config.max_physical_slots < context
    with pytest.raises(KVMergeConfigError, match="no profile 'nope'"):
        KVMergeConfig.from_source(f"{preset}#nope", {})


def test_smollm2_preset_matches_the_checkpoint(model_dir):
    """Catches: the default model's preset (layers, heads, head dim, RoPE) drifting from
    the checkpoint `fetch-model` builds."""
    facts = yaml.safe_load((CONFIGS / "smollm2-135m-instruct.yaml").read_text())["model"]
    _check_facts(facts, json.loads(Path(model_dir, "config.json").read_text()))


@pytest.mark.parametrize("preset, repo", [
    ("llama-3.1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    ("mistral-7b-instruct-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"),
    ("qwen2-7b-instruct", "Qwen/Qwen2-7B-Instruct"),
])
def test_preset_matches_a_local_config(preset, repo):
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, "config.json")
    if not isinstance(path, str):
        pytest.skip(f"{repo} is not in the local Hugging Face cache")
    facts = yaml.safe_load((CONFIGS / f"{preset}.yaml").read_text())["model"]
    _check_facts(facts, json.loads(Path(path).read_text()))


def _check_facts(facts: dict, hf: dict) -> None:
    assert facts["architecture"] in hf["architectures"]
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings"):
        assert facts[key] == hf[key], key
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    assert facts["head_dim"] == head_dim
    assert facts["rotary"] in ("neox", "gptj")
