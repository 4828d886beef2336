"""Models this project ships or knows how to fetch."""

from kvslimmer_vllm.models.smollm2 import (
    MODEL_NAME as DEFAULT_MODEL_NAME,
    ModelFetchError,
    fetch_model,
    verify_checkpoint,
)

__all__ = ["DEFAULT_MODEL_NAME", "ModelFetchError", "fetch_model", "verify_checkpoint"]
