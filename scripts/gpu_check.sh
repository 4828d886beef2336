#!/usr/bin/env bash
# Everything that needs a CUDA machine, from one script: installs the CUDA build of vLLM,
# fetches the default model, then
#   1. the kernel tests natively (Triton kernels vs core/, dispatch),
#   2. the engine subset (offline engine, vllm serve over HTTP, reliability, paged state vs
#      the core math, vLLM contracts) and the quick quality evaluation,
#   3. the GPU attention benchmark (Triton vs vLLM's unified attention) and the merge-round
#      benchmark (layer-batched vs per layer, 8B-class shapes),
#   4. with two or more GPUs: tensor parallelism (greedy tokens of TP=2 equal TP=1).
#
#   scripts/gpu_check.sh [extra pytest args]
# Output goes to stdout and, if $OUT is set, to $OUT/gpu_check.log, $OUT/gpu_attention.md
# and $OUT/merge_round/merge_round.md.
# On a bare CUDA machine (no vLLM, no network) use scripts/device_check.sh instead.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi -L
KVSLIMMER_TARGET=gpu scripts/install.sh
.venv/bin/kvslimmer-vllm fetch-model
out=${OUT:-/tmp}
log=$out/gpu_check.log
status=0
.venv/bin/python -m pytest -ra tests/kernels tests/core "$@" 2>&1 | tee "$log" || status=1
.venv/bin/python -m pytest -ra \
  tests/engine/test_contracts.py tests/engine/test_slots.py tests/engine/test_offline.py \
  tests/engine/test_server.py tests/engine/test_reliability.py tests/eval/test_eval_cli.py \
  "$@" 2>&1 | tee -a "$log" || status=1
.venv/bin/python benchmarks/gpu_attention.py --out "$out/gpu_attention.md" 2>&1 | tee -a "$log" || status=1
.venv/bin/python benchmarks/merge_round.py --out "$out/merge_round" 2>&1 | tee -a "$log" || status=1
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  KVSLIMMER_TP_TEST=2 .venv/bin/python -m pytest -ra tests/engine/test_tensor_parallel.py \
    tests/engine/test_data_parallel.py \
    tests/engine/test_pipeline_parallel.py "$@" 2>&1 | tee -a "$log" || status=1
else
  echo "gpu_check: one GPU: tensor-, data- and pipeline-parallel checks skipped (need two)" \
    | tee -a "$log"
fi
exit $status
