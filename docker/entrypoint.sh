#!/usr/bin/env bash
# Starts `vllm serve` with KV merging from environment variables; arguments given to
# `docker run` are appended to the vllm serve command line.
#   MODEL             model name or path; "default" = the baked-in SmolLM2-135M-Instruct
#   KV_MERGE          kvslimmer (default) or none
#   KV_MERGE_BUDGET   --kv-merge-budget (empty: the built-in default)
#   KV_MERGE_CONFIG   --kv-merge-config, e.g. configs/llama-3.1-8b-instruct.yaml#32k
#   PORT              port to listen on (all interfaces inside the container)
#   VLLM_EXTRA_ARGS   more vllm serve flags, split on spaces
set -euo pipefail
cd "$(dirname "$0")/.."

model=${MODEL:-default}
served=()
if [ "$model" = default ]; then
  model=$(kvslimmer-vllm fetch-model | tail -n 1)
  served=(--served-model-name SmolLM2-135M-Instruct)
fi
args=(serve "$model" "${served[@]}" --host 0.0.0.0 --port "${PORT:-8000}"
      --kv-merge "${KV_MERGE:-kvslimmer}")
[ -n "${KV_MERGE_BUDGET:-}" ] && args+=(--kv-merge-budget "$KV_MERGE_BUDGET")
[ -n "${KV_MERGE_CONFIG:-}" ] && args+=(--kv-merge-config "$KV_MERGE_CONFIG")
# shellcheck disable=SC2206  # VLLM_EXTRA_ARGS is a space-separated flag list on purpose
extra=(${VLLM_EXTRA_ARGS:-})
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' vllm "${args[@]}" "${extra[@]}" "$@"; echo
  exit 0
fi
exec vllm "${args[@]}" "${extra[@]}" "$@"
