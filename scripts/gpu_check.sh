#!/usr/bin/env bash
# The end-to-end subset on a CUDA machine: installs the CUDA build of vLLM, fetches the
# default model and runs the tests that exercise the engine path (offline engine,
# vllm serve over HTTP, paged state vs the core math, vLLM contracts).
#
#   scripts/gpu_check.sh [extra pytest args]
# Output goes to stdout and, if $OUT is set, to $OUT/gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi -L
KVSLIMMER_TARGET=gpu scripts/install.sh
.venv/bin/kvslimmer-vllm fetch-model
log=${OUT:-/tmp}/gpu_check.log
set -o pipefail
.venv/bin/python -m pytest -ra \
  tests/core tests/engine/test_contracts.py tests/engine/test_slots.py \
  tests/engine/test_offline.py tests/engine/test_server.py "$@" 2>&1 | tee "$log"
