"""Test helpers: offline vLLM engines, `vllm serve` servers and deterministic prompts.

Engines are expensive on CPU (about 20-40 s to start), so tests share them per module.
Every engine runs float32, eager, with a small KV cache on CPU.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from kvslimmer_vllm.eval.text import documentation_text as long_text
from kvslimmer_vllm.eval.text import documentation_tokens as token_prompt

__all__ = ["MERGE", "TINY_VOCAB", "Server", "engine_args", "free_port", "long_text",
           "merging_server_via_entrypoint", "offline_llm", "random_tokens", "token_prompt",
           "triton_kernel_modules"]

VENV_BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
#: Fraction of the CPU node's memory vLLM may reserve per engine (tests run <= 2 at once).
CPU_MEMORY_FRACTION = "0.3"


#: Vocabulary of conftest.tiny_llama.
TINY_VOCAB = 512


def random_tokens(length: int, seed: int) -> list[int]:
    """A reproducible prompt of token ids for the tokenizer-less tiny model."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, TINY_VOCAB) for _ in range(length)]


def engine_args(model_dir: str, **overrides) -> dict:
    args = dict(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=4096,
        block_size=128,
        gpu_memory_utilization=float(CPU_MEMORY_FRACTION),
        seed=0,
    )
    args.update(overrides)
    return args


@contextmanager
def offline_llm(model_dir: str, **overrides):
    """A `vllm.LLM`, shut down (with its processes) when the block ends.

    A single-rank engine runs its core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING
    =0``): the same scheduler, KV manager and worker as in a separate process, 15-20 s
    less to start (no second interpreter importing torch and vLLM), and its scheduler is
    reachable from the test (``llm.llm_engine.engine_core.engine_core.scheduler``). The
    plugin resets what a merging engine changed in the process before a plain one is
    configured (``plugin._merging_off_in_this_process``)."""
    from vllm import LLM

    args = engine_args(model_dir, **overrides)
    inproc = args.get("tensor_parallel_size", 1) == 1
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    if inproc:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = LLM(**args)
    finally:
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on loopback (``vllm serve``, or any command that starts one)."""

    def __init__(self, cmd: list[str], *, port: int, log_path: Path, env=None,
                 api_key: str | None = None, name: str = "smol"):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.api_key, self.name = api_key, name
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    @classmethod
    def vllm(cls, model_dir: str, *flags: str, log_path: Path, name: str = "smol",
             env: dict | None = None):
        """`vllm serve` as a user starts it, float32 and eager on CPU."""
        port = free_port()
        cmd = [
            str(VENV_BIN / "vllm"), "serve", model_dir,
            "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
            "--gpu-memory-utilization", CPU_MEMORY_FRACTION, "--seed", "0",
            *flags,
        ]
        return cls(cmd, port=port, log_path=log_path, name=name, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vllm serve not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **self.auth},
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)

    def metrics(self) -> dict[str, float]:
        """Prometheus samples by name (labels dropped; values of one name summed)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            samples[name] = samples.get(name, 0.0) + float(value)
        return samples

    def wait_idle(self, timeout: float = 300) -> dict[str, float]:
        """The metrics once no request runs or waits (a hang guard, not a timing check:
        gauges follow the engine's steps, a response can arrive before them)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = m.get("vllm:num_requests_running", 0) == 0 and m.get(
                "vllm:num_requests_waiting", 0) == 0
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class MERGE:
    """Settings of the session's shared merging server (conftest.merge_server)."""

    BUDGET, INTERVAL, NUM_BLOCKS, BLOCK_SIZE = 256, 128, 48, 128
    #: Progressive: the capacity test counts on memory bounded during prefill.
    OBSERVE = "progressive"
    CACHE_SLOTS = NUM_BLOCKS * BLOCK_SIZE
    API_KEY = "kvslimmer-test-key"
    NAME = "SmolLM2-135M-Instruct"  # what the entrypoint serves MODEL=default as


def merging_server_via_entrypoint(model_dir: str, *, log_path: Path) -> Server:
    """docker/entrypoint.sh as the CPU image runs it (MODEL=default: the baked-in
    checkpoint), with the test settings of :class:`MERGE` and an API key."""
    port = free_port()
    extra = (f"--dtype float32 --enforce-eager --max-model-len 4096 --seed 0 "
             f"--gpu-memory-utilization {CPU_MEMORY_FRACTION} "
             f"--kv-merge-interval {MERGE.INTERVAL} --kv-merge-observe {MERGE.OBSERVE} "
             f"--num-gpu-blocks-override {MERGE.NUM_BLOCKS} --api-key {MERGE.API_KEY}")
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "MODEL": "default",
           "PORT": str(port), "KV_MERGE_BUDGET": str(MERGE.BUDGET),
           "VLLM_EXTRA_ARGS": extra}
    return Server([str(ROOT / "docker" / "entrypoint.sh")], port=port, env=env,
                  log_path=log_path, api_key=MERGE.API_KEY, name=MERGE.NAME)


def triton_kernel_modules(*names: str):
    """The modules ``kvslimmer_vllm.triton_kernels.<name>``, built for the GPU when CUDA is
    present and for Triton's CPU interpreter otherwise.

    triton.jit reads TRITON_INTERPRET when a kernel is defined, so it is set while the
    modules are imported (re-running any imported earlier without it, in the order given,
    so a module that imports another sees the rebuilt one), then restored so the rest of the
    test session and its subprocesses (vLLM engines) do not inherit it; interpreted kernels
    do not read it again. Triton itself is imported first, as vLLM would in any test module,
    so its own library is built the same way whatever the test order.
    """
    import importlib

    import torch
    import triton  # noqa: F401 - deliberately before TRITON_INTERPRET is set

    interpret = not torch.cuda.is_available()
    saved = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        modules = []
        for name in names:
            module = importlib.import_module(f"kvslimmer_vllm.triton_kernels.{name}")
            if interpret and not module.is_interpreted():
                module = importlib.reload(module)
            modules.append(module)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return modules


def peak_allocated_bytes(fn) -> int:
    """Most bytes of CPU tensors that ``fn()`` holds allocated at once beyond what existed
    before it (torch's memory profiler: every tensor allocation and free, in order)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        fn()
    held = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            held += size
        elif action == Action.DESTROY:
            held -= size
        peak = max(peak, held)
    return peak
