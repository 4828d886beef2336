#!/usr/bin/env bash
# Serves the default model (SmolLM2-135M-Instruct) through vLLM's OpenAI-compatible
# server with KV merging on, and prints a ready-to-paste request once it is up.
#
#   HOST=127.0.0.1 PORT=8000     where to listen
#   KV_MERGE_BUDGET=1024         slots each request keeps after a merge round
#   extra arguments              passed to `vllm serve` (e.g. --kv-merge-interval 128)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
BUDGET=${KV_MERGE_BUDGET:-1024}
NAME=SmolLM2-135M-Instruct

MODEL_DIR=$("$VENV/bin/kvslimmer-vllm" fetch-model | tail -n 1)
if "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  DEVICE_FLAGS=(--dtype bfloat16)
else
  # float32 and eager mode are right and fast enough on CPU; vLLM reserves this share
  # of the CPU node's memory.
  DEVICE_FLAGS=(--dtype float32 --enforce-eager --gpu-memory-utilization "${CPU_MEMORY_FRACTION:-0.5}")
fi

# Announce the server once it answers /health.
"$VENV/bin/python" - "$HOST" "$PORT" "$NAME" <<'PY' &
import sys, time, urllib.request
host, port, name = sys.argv[1:]
for _ in range(1800):
    try:
        urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2)
        break
    except OSError:
        time.sleep(1)
else:
    sys.exit(0)
print(f"""
kvslimmer-vllm: serving {name} with --kv-merge kvslimmer on http://{host}:{port}
Try:
  curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 32, "temperature": 0}}'
  curl -s http://{host}:{port}/metrics | grep kv_merge
""", flush=True)
PY

exec "$VENV/bin/vllm" serve "$MODEL_DIR" --served-model-name "$NAME" \
  --host "$HOST" --port "$PORT" --max-model-len 8192 "${DEVICE_FLAGS[@]}" \
  --kv-merge kvslimmer --kv-merge-budget "$BUDGET" "$@"
