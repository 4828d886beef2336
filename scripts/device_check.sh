#!/usr/bin/env bash
# Device check for a bare CUDA machine: python3 (3.12) with torch, triton, pytest,
# hypothesis, pyyaml and numpy only: no vLLM, no pydantic, no network, no model weights, the
# repository not installed (its root goes on PYTHONPATH here). Under 8 minutes on one GPU:
#   1. tests/core and tests/kernels natively (what needs vLLM, pydantic or the C++ op skips),
#   2. Triton paged attention (log-count bias, observation mass) vs PyTorch SDPA at
#      8B-class shapes (Hq 32, Hkv 8, D 128, bf16), decode and a 512-row prefill chunk,
#      4K-32K slots: median times, ratios, max abs error,
#   3. one merge round as the engine runs it on a paged cache (gather, core.merge_rounds,
#      write-back), 16K slots to 8K and to 2K, for 1 and 32 layers: PyTorch ops vs the
#      Triton round kernels (triton_kernels/round.py), side by side, caches compared,
#      and each round's peak CUDA allocation against the engine's reservation for it,
#   4. SnapMerge's gathered round, 8K slots to 2K over 32 layers: every layer's protected
#      sub-rounds in lock step (kernels/lockstep.py) vs one layer after another,
#   5. an eviction of that request over 32 layers: in place from a staged copy of the rows
#      that move (the engine's CUDA path for evict, snapkv, streaming) vs gathered.
# Without CUDA the same runs on CPU, Triton under its interpreter, at small shapes (a smoke
# test of this script, said so in its output).
#
#   scripts/device_check.sh [--bench-only | --tests-only] [--tests-timeout-s S]
#                           [--bench-budget-s S]
# $PYTHON (default python3) runs it. Output goes to stdout and to $OUT (default: a new
# temporary folder): $OUT/device_check.md (the tables) and $OUT/device_check.log.
# Exits non-zero when a test fails or a kernel disagrees with its reference.
# scripts/gpu_check.sh is the full check for a CUDA machine with internet (installs vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export DEVICE_CHECK_COMMAND="scripts/device_check.sh${*:+ $*}"
out=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")}
mkdir -p "$out"
echo "[device_check] output folder: $out" | tee "$out/device_check.log"
"${PYTHON:-python3}" scripts/device_check.py --out "$out" "$@" 2>&1 \
  | tee -a "$out/device_check.log"
