#!/usr/bin/env bash
# Runs a built CPU image and checks that it serves with KV merging: `make image-cpu-check`.
#
#   scripts/check_image.sh [IMAGE]            (default kvslimmer-vllm:cpu)
#
# Starts the image (docker when a daemon answers, else `buildah run` with chroot
# isolation and the host's network) with KV_MERGE=kvslimmer and the image's merge budget,
# waits for /health, sends a chat completion and a prompt longer than budget + interval
# (so that merge rounds run), and requires vllm:kv_merge_rounds_total > 0 on /metrics.
# The container is stopped and removed on every exit (trap). Prints the time from start
# to /health and to the first answer. Exit 0: all checks passed.
#
# Environment:
#   ENGINE          auto | docker | buildah                                  (auto)
#   PORT            port the server listens on (host network / published)   (18000)
#   HEALTH_TIMEOUT  seconds to wait for /health                              (900)
#   LONG_PROMPT_TOKENS  rough length of the long prompt                      (2000)
#   LOG             the server's output                 (/tmp/kvslimmer-image-check.log)
#   STORAGE_DRIVER  buildah's storage driver (default: buildah's own, overlay here)
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${1:-${IMAGE_TAG:-kvslimmer-vllm:cpu}}
ENGINE=${ENGINE:-auto}
PORT=${PORT:-18000}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-900}
LONG_PROMPT_TOKENS=${LONG_PROMPT_TOKENS:-2000}
LOG=${LOG:-/tmp/kvslimmer-image-check.log}
URL=http://127.0.0.1:$PORT
NAME=kvslimmer-image-check-$$

buildah() { command buildah ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"} "$@"; }
say() { echo "image-check: $*" >&2; }
fail() {
  echo "image-check: FAILED: $*" >&2
  if [ -s "$LOG" ]; then echo "image-check: last lines of $LOG:" >&2; tail -n 25 "$LOG" >&2; fi
  exit 1
}

if [ "$ENGINE" = auto ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker
  else ENGINE=buildah; fi
fi
command -v "$ENGINE" >/dev/null 2>&1 || fail "$ENGINE is not installed (make image-cpu installs it)"
command -v curl >/dev/null 2>&1 || fail "curl is not installed"
if curl -fsS -o /dev/null --max-time 2 "$URL/health" 2>/dev/null; then
  fail "something already answers on port $PORT (set PORT=...)"
fi

ctr= pgid=
stop() {
  local rc=$?
  if [ "$ENGINE" = docker ] && [ -n "$ctr" ]; then
    say "stopping container $NAME"
    docker stop -t 20 "$NAME" >/dev/null 2>&1 || true
    docker rm -f "$NAME" >/dev/null 2>&1 || true
  elif [ -n "$pgid" ]; then
    say "stopping the server (process group $pgid) and removing $NAME"
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 1 40); do
      kill -0 -- "-$pgid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    wait 2>/dev/null || true
  fi
  if [ "$ENGINE" = buildah ] && [ -n "$ctr" ]; then
    buildah rm "$ctr" >/dev/null 2>&1 || true
  fi
  if [ -n "$pgid" ] && kill -0 -- "-$pgid" 2>/dev/null; then
    echo "image-check: WARNING: processes of group $pgid are still running" >&2; rc=1
  fi
  exit "$rc"
}
trap stop EXIT
trap 'exit 130' INT TERM

say "image $IMAGE, engine $ENGINE, port $PORT, server log $LOG"
if [ "$ENGINE" = docker ]; then
  docker image inspect "$IMAGE" >/dev/null 2>&1 || fail "no image $IMAGE (run make image-cpu)"
else
  buildah inspect --type image "$IMAGE" >/dev/null 2>&1 || fail "no image $IMAGE (run make image-cpu)"
fi

start=$(date +%s.%N)
if [ "$ENGINE" = docker ]; then
  ctr=$(docker run -d --name "$NAME" -p "127.0.0.1:$PORT:$PORT" -e PORT="$PORT" \
        -e KV_MERGE=kvslimmer "$IMAGE")
  (docker logs -f "$NAME" >"$LOG" 2>&1 &)
  alive() { [ "$(docker inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null)" = true ]; }
else
  ctr=$(buildah from --quiet --name "$NAME" "$IMAGE")
  buildah config --env PORT="$PORT" --env KV_MERGE=kvslimmer "$ctr"
  # The image's ENTRYPOINT, relative to its WORKDIR, as `docker run` would start it.
  # In a session of its own: the whole process group is stopped on exit.
  setsid buildah ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"} run \
    --isolation chroot --network host "$ctr" -- docker/entrypoint.sh >"$LOG" 2>&1 </dev/null &
  pgid=$!
  alive() { kill -0 "$pgid" 2>/dev/null; }
fi
elapsed() { python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$start"; }

say "waiting for $URL/health (${HEALTH_TIMEOUT} s at most)"
deadline=$(( $(date +%s) + HEALTH_TIMEOUT ))
until curl -fsS -o /dev/null --max-time 5 "$URL/health" 2>/dev/null; do
  alive || fail "the server exited before /health answered"
  [ "$(date +%s)" -lt "$deadline" ] || fail "/health did not answer within $HEALTH_TIMEOUT s"
  sleep 2
done
t_health=$(elapsed)
say "healthy after $t_health s"

post() {  # post PATH JSON -> response body (fails on HTTP errors)
  curl -fsS --max-time 600 -H 'Content-Type: application/json' -d "$2" "$URL$1" \
    || fail "POST $1 failed"
}
model=$(curl -fsS "$URL/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])') \
  || fail "GET /v1/models failed"
answer=$(post /v1/chat/completions "{\"model\": \"$model\", \"max_tokens\": 24, \"temperature\": 0,
  \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}")
t_answer=$(elapsed)
text=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["choices"][0]["message"]["content"])' "$answer") \
  || fail "unexpected chat completion: $answer"
say "first answer after $t_answer s ($model): $(echo "$text" | tr '\n' ' ' | cut -c1-80)"
[ -n "$text" ] || fail "empty chat completion"

rounds() {
  curl -fsS "$URL/metrics" | python3 -c '
import sys
total = 0.0
for line in sys.stdin:
    if line.startswith("vllm:kv_merge_rounds_total"):
        total += float(line.split()[-1])
print(int(total))'
}
before=$(rounds) || fail "GET /metrics failed"
long=$(python3 - "$LONG_PROMPT_TOKENS" "$model" <<'PY'
import json, sys
n, model = int(sys.argv[1]), sys.argv[2]
facts = [f"Fact {i}: the crate numbered {i} holds {i * 7 % 97} red marbles and "
         f"{i * 13 % 89} blue ones." for i in range(n // 24 + 1)]
prompt = " ".join(facts) + " How many red marbles does crate 3 hold?"
print(json.dumps({"model": model, "max_tokens": 16, "temperature": 0,
                  "messages": [{"role": "user", "content": prompt}]}))
PY
)
say "sending a long prompt (~$LONG_PROMPT_TOKENS tokens)"
reply=$(post /v1/chat/completions "$long")
prompt_tokens=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["usage"]["prompt_tokens"])' "$reply") \
  || fail "unexpected reply to the long prompt: $(echo "$reply" | cut -c1-300)"
after=$(rounds) || fail "GET /metrics failed"
say "long prompt: $prompt_tokens prompt tokens; vllm:kv_merge_rounds_total $before -> $after"
[ "$after" -gt 0 ] && [ "$after" -gt "$before" ] \
  || fail "no merge rounds ran (vllm:kv_merge_rounds_total $before -> $after)"
say "OK: $IMAGE served with KV merging (healthy after $t_health s, first answer after $t_answer s)"
