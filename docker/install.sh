#!/usr/bin/env bash
# The install step of both images (docker/Dockerfile.cpu, docker/Dockerfile): the same
# scripts/install.sh as `make`, then, with BAKE_MODEL=1, the default model into
# $KVSLIMMER_MODEL_CACHE. Empty PIP_FIND_LINKS / PIP_CERT / PIP_EXTRA_INDEX_URL build
# args are unset, not passed to pip as empty values. Leaves no pip cache in the image.
set -euo pipefail
cd "$(dirname "$0")/.."
for var in PIP_FIND_LINKS PIP_CERT PIP_EXTRA_INDEX_URL; do
  [ -n "${!var:-}" ] || unset "$var"
done
export PIP_NO_CACHE_DIR=1
[ -n "${PIP_FIND_LINKS:-}" ] && echo "docker/install.sh: pip finds wheels in $PIP_FIND_LINKS"
scripts/install.sh
if [ "${BAKE_MODEL:-0}" = 1 ]; then
  if [ "${VENV:-none}" = none ]; then fetch=kvslimmer-vllm; else fetch=$VENV/bin/kvslimmer-vllm; fi
  echo "docker/install.sh: baking the default model into ${KVSLIMMER_MODEL_CACHE:-~/.cache}"
  "$fetch" fetch-model
fi
rm -rf /root/.cache/pip /tmp/*
