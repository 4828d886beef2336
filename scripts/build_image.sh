#!/usr/bin/env bash
# Builds a container image of kvslimmer-vllm: `make image-cpu` (CPU image, the default
# model baked in) or `scripts/build_image.sh gpu`.
#
#   scripts/build_image.sh [cpu|gpu]
#
# Engine: docker when a Docker daemon answers, else buildah (installed with apt-get when
# missing; daemonless, chroot isolation, the host's network, buildah's default storage
# driver: overlay here, STORAGE_DRIVER=vfs where overlay mounts are not allowed).
# Base image: the Dockerfile's default (python:3.11-slim for cpu, vllm/vllm-openai for
# gpu). With buildah, when that base is neither present nor pullable (no registry
# access), the cpu build makes a local one instead: a minimal Debian bookworm with
# python3.11 (debootstrap, installed when missing), imported as $LOCAL_BASE.
# Local files for pip inside the build: a directory of wheels (PyTorch's +cpu torch where
# download.pytorch.org is unreachable) and a CA bundle (where a TLS-intercepting proxy
# stands between the build and PyPI) are staged in docker/build-local/ (git-ignored),
# which the install step binds at /build-local, and named by the build args
# PIP_FIND_LINKS and PIP_CERT (both empty for public builds: PyTorch's CPU index and the
# image's own CA certificates).
#
# Environment:
#   IMAGE_TAG         tag of the result (kvslimmer-vllm:cpu / kvslimmer-vllm:gpu)
#   ENGINE            auto | docker | buildah                        (auto)
#   BASE_IMAGE        base image; "local" forces the debootstrapped one (default: the
#                     Dockerfile's default, or the local one when that can't be pulled)
#   LOCAL_BASE        tag of the debootstrapped base     (localhost/kvslimmer-base:bookworm)
#   DEBIAN_MIRROR     mirror for debootstrap             (http://deb.debian.org/debian)
#   WHEELS_DIR        local wheel directory for pip in the build (default: the first
#                     directory of the host pip's find-links that holds a torch wheel;
#                     "none" for none)
#   CA_BUNDLE         CA bundle for pip in the build (default: $PIP_CERT when set; "none")
#   STORAGE_DRIVER    buildah's storage driver (default: buildah's own)
#   PULL_TIMEOUT      seconds to try pulling the default base               (60)
#   DRY_RUN=1         print the decisions and the build command, build nothing
set -euo pipefail
cd "$(dirname "$0")/.."

buildah() { command buildah ${STORAGE_DRIVER:+--storage-driver "$STORAGE_DRIVER"} "$@"; }
say() { echo "build_image: $*" >&2; }
die() { echo "build_image: error: $*" >&2; exit 1; }

KIND=${1:-cpu}
case "$KIND" in
  cpu) DOCKERFILE=docker/Dockerfile.cpu ;;
  gpu) DOCKERFILE=docker/Dockerfile ;;
  *) die "usage: $0 [cpu|gpu] (got '$KIND')" ;;
esac
IMAGE_TAG=${IMAGE_TAG:-kvslimmer-vllm:$KIND}
ENGINE=${ENGINE:-auto}
LOCAL_BASE=${LOCAL_BASE:-localhost/kvslimmer-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PULL_TIMEOUT=${PULL_TIMEOUT:-60}
DRY_RUN=${DRY_RUN:-0}
STAGE=docker/build-local   # build-context directory that RUN --mount binds at /build-local

# The default of `ARG BASE=...` in the Dockerfile.
default_base() { sed -n 's/^ARG BASE=\(.*\)$/\1/p' "$1" | head -n 1; }

# The first find-links directory of this host's pip that holds a torch wheel.
host_wheels_dir() {
  local dirs d
  dirs="${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true)"
  for d in $dirs; do
    d=${d#file://}
    if [ -d "$d" ] && compgen -G "$d/torch-*.whl" >/dev/null; then echo "$d"; return; fi
  done
}

apt_install() {  # apt_install COMMAND PACKAGE...: installs PACKAGEs when COMMAND is missing
  local cmd=$1; shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  [ "$DRY_RUN" = 1 ] && { say "would install $* with apt-get"; return 0; }
  say "$cmd is missing: installing $* with apt-get"
  [ "$(id -u)" = 0 ] || die "installing $* needs root (or install it yourself)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ "$ENGINE" = auto ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
  else
    ENGINE=buildah
  fi
fi
case "$ENGINE" in docker|buildah) ;; *) die "ENGINE must be auto, docker or buildah" ;; esac
say "engine: $ENGINE"
[ "$ENGINE" = buildah ] && apt_install buildah buildah

# --- base image ---------------------------------------------------------------------
DEFAULT_BASE=$(default_base "$DOCKERFILE")
[ -n "$DEFAULT_BASE" ] || die "$DOCKERFILE has no 'ARG BASE=...'"
have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }

make_local_base() {
  [ "$KIND" = cpu ] || die "no local base for the $KIND image (it needs $DEFAULT_BASE)"
  if [ "$DRY_RUN" != 1 ] && have_image "$LOCAL_BASE"; then
    say "local base $LOCAL_BASE exists"; return
  fi
  apt_install debootstrap debootstrap
  [ "$DRY_RUN" = 1 ] && { say "would debootstrap bookworm into $LOCAL_BASE"; return; }
  say "making the local base $LOCAL_BASE: debootstrap bookworm + python3.11 ($DEBIAN_MIRROR)"
  local start ctr mnt
  start=$(date +%s)
  ctr=$(buildah from scratch)
  # shellcheck disable=SC2064  # expand now: the trap must remove this container
  trap "buildah umount '$ctr' >/dev/null 2>&1; buildah rm '$ctr' >/dev/null 2>&1" EXIT
  mnt=$(buildah mount "$ctr")
  debootstrap --variant=minbase \
    --include=ca-certificates,python3,python3-venv,python3-dev \
    bookworm "$mnt" "$DEBIAN_MIRROR" >/dev/null
  # as in Debian's own images: updates and security updates for what the build installs
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n%s\n' "$DEBIAN_MIRROR" \
    "$DEBIAN_MIRROR" 'deb http://deb.debian.org/debian-security bookworm-security main' \
    > "$mnt/etc/apt/sources.list"
  chroot "$mnt" apt-get clean
  rm -rf "$mnt"/var/lib/apt/lists/* "$mnt"/var/cache/apt/*.bin "$mnt"/tmp/* \
    "$mnt"/var/log/*.log "$mnt"/var/log/apt/*
  buildah umount "$ctr" >/dev/null
  buildah config --env LANG=C.UTF-8 --env PYTHONUNBUFFERED=1 --cmd python3 \
    --label org.opencontainers.image.description="debootstrap bookworm minbase + python3.11" \
    "$ctr"
  buildah commit --quiet --rm "$ctr" "$LOCAL_BASE" >/dev/null
  trap - EXIT
  say "local base $LOCAL_BASE made in $(( $(date +%s) - start )) s"
}

BASE=${BASE_IMAGE:-}
if [ "$BASE" = local ]; then
  make_local_base; BASE=$LOCAL_BASE
elif [ -z "$BASE" ]; then
  BASE=$DEFAULT_BASE
  if [ "$ENGINE" = buildah ] && [ "$DRY_RUN" != 1 ] && ! have_image "$BASE"; then
    say "trying to pull $BASE (${PULL_TIMEOUT} s at most)"
    if ! timeout "$PULL_TIMEOUT" buildah pull --quiet "docker.io/$BASE" >/dev/null 2>&1; then
      say "$BASE cannot be pulled here: using a local base"
      make_local_base; BASE=$LOCAL_BASE
    fi
  fi
fi
say "base: $BASE"

# --- local files for pip: wheels, CA bundle -----------------------------------------------
WHEELS_DIR=${WHEELS_DIR:-$(host_wheels_dir)}
[ "$WHEELS_DIR" = none ] && WHEELS_DIR=
CA_BUNDLE=${CA_BUNDLE:-${PIP_CERT:-}}
[ "$CA_BUNDLE" = none ] && CA_BUNDLE=
FIND_LINKS= CERT=
cleanup_stage() { find "$STAGE" -mindepth 1 ! -name .gitignore -delete 2>/dev/null || true; }
if [ "$DRY_RUN" != 1 ]; then
  mkdir -p "$STAGE"; cleanup_stage
  printf '*\n!.gitignore\n' > "$STAGE/.gitignore"
  trap cleanup_stage EXIT
fi
if [ -n "$WHEELS_DIR" ]; then
  [ -d "$WHEELS_DIR" ] || die "WHEELS_DIR $WHEELS_DIR is not a directory"
  say "wheels: $WHEELS_DIR (PIP_FIND_LINKS=/build-local/wheels in the build)"
  if [ "$DRY_RUN" != 1 ]; then
    mkdir -p "$STAGE/wheels"
    cp -al "$WHEELS_DIR"/. "$STAGE/wheels"/ 2>/dev/null || cp -a "$WHEELS_DIR"/. "$STAGE/wheels"/
  fi
  FIND_LINKS=/build-local/wheels
else
  say "wheels: none (pip uses PyPI and the Dockerfile's public indexes)"
fi
if [ -n "$CA_BUNDLE" ]; then
  [ -f "$CA_BUNDLE" ] || die "CA_BUNDLE $CA_BUNDLE is not a file"
  say "CA bundle: $CA_BUNDLE (PIP_CERT=/build-local/ca-certificates.crt in the build)"
  [ "$DRY_RUN" = 1 ] || cp "$CA_BUNDLE" "$STAGE/ca-certificates.crt"
  CERT=/build-local/ca-certificates.crt
fi

# --- build ----------------------------------------------------------------------------
args=(-f "$DOCKERFILE" -t "$IMAGE_TAG" --build-arg "BASE=$BASE"
      --build-arg "PIP_FIND_LINKS=$FIND_LINKS" --build-arg "PIP_CERT=$CERT")
# With local wheels (torch+cpu among them), PyTorch's index is not needed (nor reachable).
[ -n "$FIND_LINKS" ] && args+=(--build-arg "PIP_EXTRA_INDEX_URL=")
if [ "$ENGINE" = buildah ]; then
  # docker format: OCI images have no HEALTHCHECK
  cmd=(buildah bud --isolation chroot --network host --layers=false --format docker
       "${args[@]}" .)
else
  cmd=(docker build "${args[@]}" .)
fi
echo "build_image: ${cmd[*]}" >&2
[ "$DRY_RUN" = 1 ] && exit 0
start=$(date +%s)
"${cmd[@]}"
secs=$(( $(date +%s) - start ))
if [ "$ENGINE" = buildah ]; then
  size=$(buildah images --format '{{.Size}}' "$IMAGE_TAG" | head -n 1)
else
  size=$(docker image inspect --format '{{.Size}}' "$IMAGE_TAG")
fi
say "built $IMAGE_TAG in $secs s (size: $size)"
