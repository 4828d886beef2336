"""One contract per vLLM internal the adapter depends on.

Each test names the internal and fails with a message saying what moved, so an upgrade
of vLLM shows at once which touch point in kvslimmer_vllm/engine needs attention.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import pickle

import pytest
import vllm

from kvslimmer_vllm.engine.settings import SUPPORTED_VLLM_SERIES, supported_vllm_version


def _params(func) -> list[str]:
    return list(inspect.signature(inspect.unwrap(func)).parameters)


def _source(obj) -> str:
    # vLLM's own code, also when this process has loaded the plugin's wrappers.
    return inspect.getsource(inspect.unwrap(obj))


def test_vllm_release_is_the_pinned_series():
    assert supported_vllm_version(vllm.__version__), (
        f"kvslimmer-vllm is written for vLLM {SUPPORTED_VLLM_SERIES}.x, found "
        f"{vllm.__version__}"
    )


# ---------------------------------------------------------------- plugin (plugin.py)
def test_engine_args_hooks():
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    from kvslimmer_vllm.engine.plugin import register

    register()  # the checks below must hold for vLLM's code behind the wrappers

    assert isinstance(inspect.getattr_static(EngineArgs, "from_cli_args"), classmethod)
    assert "EngineArgs.add_cli_args(parser)" in _source(AsyncEngineArgs.add_cli_args), (
        "AsyncEngineArgs.add_cli_args no longer calls EngineArgs.add_cli_args: "
        "--kv-merge flags would vanish from vllm serve"
    )
    assert "load_general_plugins()" in _source(AsyncEngineArgs.add_cli_args), (
        "general plugins are no longer loaded before the CLI parser is built"
    )
    # from_cli_args drops unknown attributes; the plugin moves the flags into
    # additional_config, which must stay an EngineArgs field pickled with VllmConfig.
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    for name in ("additional_config", "scheduler_cls", "worker_cls", "enable_prefix_caching",
                 "async_scheduling", "attention_backend", "speculative_config",
                 "kv_transfer_config", "kv_cache_dtype", "enable_chunked_prefill",
                 "num_gpu_blocks_override", "kv_offloading_size"):
        assert name in fields, f"EngineArgs.{name} is gone"
    assert "usage_context" in _params(EngineArgs.create_engine_config)


def test_on_cuda_the_engine_args_ask_for_the_v1_runner_eagerly_with_the_custom_backend(
        monkeypatch):
    """vllm.config.VllmConfig.use_v2_model_runner: on CUDA vLLM 0.32 picks the V2 model
    runner by default (the adapter hooks V1's GPUModelRunner) unless VLLM_USE_V2_MODEL_RUNNER
    says otherwise. The plugin's engine-args step, run here as on a CUDA platform (the
    platform object stubbed), must set it to 0, turn CUDA graphs off, select the CUSTOM
    backend the worker registers, name the GPU worker, and refuse another backend."""
    import vllm.platforms
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from kvslimmer_vllm.engine.plugin import GPU_WORKER_CLS, KVMergeConfigError
    from kvslimmer_vllm.engine.plugin import _prepare_engine_args

    src = _source(vllm.config.VllmConfig.use_v2_model_runner.fget)
    assert "envs.VLLM_USE_V2_MODEL_RUNNER" in src, "vLLM no longer reads the env setting"

    class _Cuda:
        device_name = "cuda"

        def is_cpu(self):
            return False

        def is_cuda(self):
            return True

    monkeypatch.setattr(vllm.platforms, "_current_platform", _Cuda())
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    args = EngineArgs(model="m")
    _prepare_engine_args(args)
    assert os.environ["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert args.enforce_eager is True
    assert args.attention_backend == AttentionBackendEnum.CUSTOM
    assert args.worker_cls == GPU_WORKER_CLS
    assert args.enable_prefix_caching is False and args.async_scheduling is False
    other = EngineArgs(model="m", attention_backend="FLASH_ATTN")
    with pytest.raises(KVMergeConfigError, match="--attention-backend"):
        _prepare_engine_args(other)


# ------------------------------------------------------- scheduler (scheduler.py)
def test_scheduler_hooks():
    from vllm.v1.core.sched.scheduler import Scheduler

    assert _params(Scheduler._reserve_prefill_lookahead) == [
        "self", "request", "num_computed_tokens", "num_new_tokens",
    ], "Scheduler._reserve_prefill_lookahead changed: prefill chunks are no longer capped"
    schedule = _source(Scheduler.schedule)
    assert schedule.count("self._reserve_prefill_lookahead(") >= 2, (
        "Scheduler.schedule no longer caps running and waiting prefill chunks through "
        "_reserve_prefill_lookahead"
    )
    assert "self.kv_cache_manager.allocate_slots(" in schedule
    assert "self.kv_cache_manager = KVCacheManager(" in _source(Scheduler.__init__)
    assert "self.kv_cache_manager.free(request)" in _source(Scheduler._free_request_blocks)
    assert "_free_request_blocks(request)" in _source(Scheduler._preempt_request)
    # The plan's unobserved requests are decided once schedule() has counted the step's
    # tokens into num_computed_tokens (MergeBook.observes).
    assert "self._update_after_schedule(" in schedule
    assert "request.num_computed_tokens += num_scheduled_token" in _source(
        Scheduler._update_after_schedule)


def test_kv_cache_manager_hooks():
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

    params = _params(KVCacheManager.allocate_slots)
    assert params[:3] == ["self", "request", "num_new_tokens"]
    for name in ("full_sequence_must_fit", "reserved_blocks", "has_scheduled_reqs"):
        assert name in params, f"KVCacheManager.allocate_slots lost '{name}'"
    body = _source(KVCacheManager.allocate_slots)
    assert "request.num_computed_tokens" in body, (
        "allocate_slots no longer sizes requests by request.num_computed_tokens"
    )
    assert "self.watermark_blocks" in _source(KVCacheManager.__init__)
    for name in ("free", "pop_blocks_for_free"):
        assert _params(getattr(KVCacheManager, name)) == ["self", "request"]
    assert "self.req_to_blocks" in _source(SingleTypeKVCacheManager.__init__)
    assert "free_blocks" in dir(__import__("vllm.v1.core.block_pool", fromlist=["x"]).BlockPool)


def test_scheduler_output_carries_the_plan():
    from vllm.v1.core.sched.output import SchedulerOutput

    from kvslimmer_vllm.engine.plan import PLAN_ATTR, MergeRound, StepPlan

    assert not hasattr(SchedulerOutput, "__slots__")
    out = SchedulerOutput.make_empty()
    plan = StepPlan([MergeRound("a", (1, 2), 200, 40, 1, "kvslimmer")], {"a": 40})
    setattr(out, PLAN_ATTR, plan)
    copy = pickle.loads(pickle.dumps(out))  # how it reaches the worker processes
    assert getattr(copy, PLAN_ATTR) == plan
    assert {"preempted_req_ids", "finished_req_ids", "num_scheduled_tokens"} <= {
        f.name for f in dataclasses.fields(SchedulerOutput)
    }


def test_request_fields():
    from vllm.v1.request import Request, RequestStatus

    assert hasattr(RequestStatus, "PREEMPTED")
    assert "self.num_computed_tokens = 0" in _source(Request.__init__)
    assert callable(Request.is_finished)


# ---------------------------------------------------------------- worker (worker.py)
def test_model_runner_hooks():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert _params(GPUModelRunner._prepare_inputs)[:3] == [
        "self", "scheduler_output", "num_scheduled_tokens",
    ]
    prepare = _source(GPUModelRunner._prepare_inputs)
    for snippet in ("self.seq_lens[:num_reqs] =", "compute_slot_mapping(",
                    "self.positions[:total_num_scheduled_tokens] =",
                    "self.query_start_loc.gpu[: num_reqs + 1]"):
        assert snippet in prepare, f"GPUModelRunner._prepare_inputs lost '{snippet}'"
    metadata = _source(GPUModelRunner._build_attention_metadata)
    assert "seq_lens=self.seq_lens[:num_reqs_padded]" in metadata, (
        "attention metadata no longer reads the runner's seq_lens"
    )
    execute = _source(GPUModelRunner.execute_model)
    assert execute.index("self._update_states(scheduler_output)") < execute.index(
        "self._prepare_inputs(scheduler_output"
    )
    assert "new_block_ids_to_zero" in _source(GPUModelRunner._update_states)
    # The observed rows follow the batch's request order (kv_merge: observed mass).
    from vllm.v1.worker.gpu_input_batch import InputBatch

    assert isinstance(InputBatch.req_ids, property), "InputBatch.req_ids is no longer a property"
    assert "initialize_kv_cache" in dir(GPUModelRunner)


def test_later_pipeline_stages_read_the_runner_buffer():
    """engine/worker.py allocates ``intermediate_tensors`` for a later pipeline stage
    (vLLM's CPU runner skips the dummy run that does it in eager mode): the runner must
    still read that attribute and build it with ``make_empty_intermediate_tensors``."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    gather = _source(GPUModelRunner.sync_and_gather_intermediate_tensors)
    assert "self.intermediate_tensors" in gather, "later stages no longer read the buffer"
    assert "make_empty_intermediate_tensors(" in _source(GPUModelRunner._dummy_run)
    warm = _source(CPUModelRunner.warming_up_model)
    assert "CompilationMode.NONE" in warm and "return" in warm, (
        "the CPU runner's eager warm-up changed: check whether the pipeline buffer shim in "
        "engine/worker.py (_kv_merge_pipeline_buffers) is still needed")


def test_data_parallel_engines_know_their_index():
    """engine/metrics.py writes each DP engine's metrics block at
    ``parallel_config.data_parallel_index`` and labels it like vLLM's own ``engine``."""
    from vllm.config import ParallelConfig

    assert "data_parallel_index" in ParallelConfig.__dataclass_fields__ or hasattr(
        ParallelConfig, "data_parallel_index"), "ParallelConfig lost data_parallel_index"


def test_several_api_servers_build_their_own_config_and_scrape_multiprocess():
    """engine/plugin.py and engine/metrics.py with `--api-server-count N`: the process that
    starts the engines marks itself rank -1 and each API server process builds its engine
    config again (rank 0..N-1), from engine arguments made before plugins load in it
    (they load in ``EngineArgs.__post_init__``), and ``/metrics`` then answers from a
    registry holding prometheus_client's ``MultiProcessCollector`` only."""
    import inspect

    from prometheus_client import multiprocess
    from prometheus_fastapi_instrumentator.instrumentation import (
        PrometheusFastApiInstrumentator,
    )
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.cli import serve
    from vllm.entrypoints.launchers.api_server import entry

    assert "_api_process_rank = -1" in _source(serve.run_multi_api_server)
    assert "_api_process_rank = client_config.get(\"client_index\"" in inspect.getsource(entry)
    assert "create_engine_config(" in _source(entry.build_async_engine_client_from_engine_args)
    assert "load_general_plugins()" in _source(EngineArgs.__post_init__)
    expose = _source(PrometheusFastApiInstrumentator.expose)
    assert "multiprocess.MultiProcessCollector(ephemeral_registry)" in expose
    assert callable(multiprocess.MultiProcessCollector.collect)


def test_block_table_layout():
    from vllm.v1.worker.block_table import BlockTable, MultiGroupBlockTable

    init = _source(BlockTable.__init__)
    assert "self.num_blocks_per_row" in init and "self.block_table =" in init
    assert _params(MultiGroupBlockTable.compute_slot_mapping) == [
        "self", "num_reqs", "query_start_loc", "positions",
    ]


def test_kv_cache_is_sized_from_the_memory_workers_report():
    """KVMergeWorker.determine_available_memory takes the slot state and round scratch
    out of the KV budget: that only holds while the engine core sizes the cache as
    ``available // bytes_per_block`` from what the workers report, and bytes per block
    is the sum of the layers' page sizes (rounded up, never down)."""
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    init = _source(EngineCore._initialize_kv_caches)
    assert "self.model_executor.determine_available_memory()" in init, (
        "the engine core no longer asks the workers how much memory the KV cache may take"
    )
    assert "get_kv_cache_configs(" in init
    assert 'collective_rpc("determine_available_memory")' in _source(
        Executor.determine_available_memory)
    for cls in (CPUWorker, Worker):
        assert "determine_available_memory" in vars(cls), f"{cls.__name__} moved it"
        assert _params(cls.determine_available_memory) == ["self"]
    assert "kv_cache_memory_bytes" in _source(CPUWorker.determine_available_memory)
    assert _params(Worker.get_kv_cache_spec) == ["self"]
    sizing = _source(kv_cache_utils.get_kv_cache_config_from_groups)
    assert "num_blocks = available_memory // bytes_per_block" in sizing, (
        "vLLM no longer sizes the KV cache as available memory // bytes per block: "
        "the state and scratch reservation in worker.py must follow"
    )
    assert "page_size_bytes" in _source(kv_cache_utils._get_kv_cache_bytes_per_block)
    fields = {f.name for f in dataclasses.fields(FullAttentionSpec)}
    assert {"block_size", "num_kv_heads", "head_size", "dtype"} <= fields
    assert isinstance(inspect.getattr_static(FullAttentionSpec, "page_size_bytes"), property)


def test_cpu_worker_builds_the_v1_runner_in_init_device():
    from vllm.v1.worker.cpu_worker import CPUWorker

    body = _source(CPUWorker.init_device)
    assert "self.model_runner = CPUModelRunner(" in body


# ---------------------------------------------------------- attention (attention.py)
def test_attention_backend_interface():
    from vllm.v1.attention.backend import AttentionBackend, AttentionImpl
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from kvslimmer_vllm.engine.attention import KVMergeAttentionBackend

    assert AttentionBackend.__abstractmethods__ == {
        "get_name", "get_impl_cls", "get_builder_cls",
    }
    assert hasattr(AttentionBackend, "supported_kv_cache_layouts")
    assert KVCacheLayout.LBNHC.value == (0, 1, 3, 2, 4)
    assert {"CPU_ATTN", "CUSTOM"} <= set(AttentionBackendEnum.__members__)
    assert "class_path" in _params(register_backend)
    assert _params(AttentionImpl.forward)[:8] == [
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output",
    ]
    assert not KVMergeAttentionBackend.__abstractmethods__


def test_backend_choice_can_be_taken_and_given_back_in_one_process():
    """worker._register_attention_backend / release_attention_backend: several engines
    in one process (merging, then not) each choose their backend afresh."""
    from vllm.v1.attention import selector

    from kvslimmer_vllm.engine.worker import (ATTENTION_BACKEND, _backend_member,
                                              _register_attention_backend,
                                              release_attention_backend)

    member = _backend_member()  # CPU_ATTN on CPU, CUSTOM on CUDA
    original = member.value
    assert hasattr(selector._cached_get_attn_backend, "cache_clear")
    _register_attention_backend()
    try:
        assert member.get_path() == ATTENTION_BACKEND
    finally:
        release_attention_backend()
    assert not member.is_overridden() and member.value == original


def test_cpu_platform_always_selects_cpu_attn():
    from vllm.platforms.cpu import CpuPlatform

    assert "AttentionBackendEnum.CPU_ATTN.get_path()" in _source(
        CpuPlatform.get_attn_backend_cls
    ), "the CPU platform no longer resolves attention through the CPU_ATTN registry entry"


def test_cuda_platform_accepts_the_backend_registered_as_custom(monkeypatch):
    """vllm.platforms.cuda.CudaPlatform.get_attn_backend_cls: on CUDA the worker registers
    its backend as CUSTOM and the plugin selects CUSTOM; vLLM then checks the class's
    validate_configuration for the device, dtype, head size, KV cache dtype and block
    size. Run here on vLLM's own CUDA selection code (its CUDA-only op library stubbed,
    the device an sm_90 GPU): the 8B-class and SmolLM2 configurations must be accepted,
    an fp8 KV cache refused (the plugin refuses it first, naming --kv-cache-dtype)."""
    import sys
    import types

    import torch
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from kvslimmer_vllm.engine.worker import ATTENTION_BACKEND

    monkeypatch.setitem(sys.modules, "vllm._C_stable_libtorch",
                        types.ModuleType("vllm._C_stable_libtorch"))
    monkeypatch.delitem(sys.modules, "vllm.platforms.cuda", raising=False)
    try:
        from vllm.platforms.cuda import CudaPlatform

        monkeypatch.setattr(CudaPlatform, "get_device_capability",
                            classmethod(lambda cls, device_id=0: DeviceCapability(9, 0)))
        member = AttentionBackendEnum.CUSTOM
        before = member.get_path() if member.is_overridden() else None
        register_backend(member, ATTENTION_BACKEND)
        try:
            for head_size in (64, 128):
                for dtype in (torch.bfloat16, torch.float16, torch.float32):
                    config = AttentionSelectorConfig(head_size=head_size, dtype=dtype,
                                                     kv_cache_dtype="auto", block_size=16)
                    assert CudaPlatform.get_attn_backend_cls(member, config) \
                        == ATTENTION_BACKEND, (head_size, dtype)
            fp8 = AttentionSelectorConfig(head_size=128, dtype=torch.bfloat16,
                                          kv_cache_dtype="fp8", block_size=16)
            with pytest.raises(ValueError, match="kv_cache_dtype not supported"):
                CudaPlatform.get_attn_backend_cls(member, fp8)
        finally:
            member.clear_override()
            if before is not None:
                register_backend(member, before)
    finally:
        sys.modules.pop("vllm.platforms.cuda", None)


#: One vLLM RoPE per class the worker accepts (worker.STATIC_ROTARY_CLASSES), plus
#: GPT-J style and partial rotary dims.
ROPES = [
    (True, 64, None),
    (False, 64, None),
    (True, 32, None),
    (True, 64, {"rope_type": "linear", "factor": 4.0}),
    (True, 64, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}),
    (True, 64, {"rope_type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 256}),
    (True, 64, {"rope_type": "ntk", "factor": 2.0}),
    (True, 64, {"rope_type": "dynamic", "factor": 2.0}),
]


def _vllm_rope(is_neox, rotary_dim, scaling):
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    params = {"rope_theta": 10000.0, "rope_type": "default", **(scaling or {})}
    if rotary_dim != 64:
        params["partial_rotary_factor"] = rotary_dim / 64
    with set_current_vllm_config(VllmConfig()):
        return get_rope(64, max_position=1024, is_neox_style=is_neox,
                        rope_parameters=params, dtype=torch.float32)


@pytest.mark.parametrize("is_neox, rotary_dim, scaling", ROPES)
def test_vllm_rotary_equals_core_rotation_from_its_cache(is_neox, rotary_dim, scaling):
    """The worker merges keys with RotarySpec(cos_sin_cache=rotary_emb.cos_sin_cache):
    rotating with it must reproduce vLLM's own RoPE, and un-rotating must invert it."""
    import torch

    from kvslimmer_vllm.core import RotarySpec

    rope = _vllm_rope(is_neox, rotary_dim, scaling)
    assert (rope.rotary_dim, rope.is_neox_style) == (rotary_dim, is_neox)
    positions = torch.arange(0, 1000, 37)
    key = torch.randn(len(positions), 3 * 64)
    _, rotated = rope.forward_native(positions, torch.randn(len(positions), 9 * 64), key.clone())
    spec = RotarySpec(rotary_dim=rope.rotary_dim, is_neox=rope.is_neox_style,
                      cos_sin_cache=rope.cos_sin_cache)
    mine = spec.rotate(key.view(-1, 3, 64), positions)
    torch.testing.assert_close(mine, rotated.view(-1, 3, 64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spec.unrotate(mine, positions), key.view(-1, 3, 64),
                               rtol=1e-4, atol=1e-4)


def test_every_accepted_rotary_class_is_checked_against_vllm():
    """The worker accepts a RoPE by its class name; each accepted class must be one of
    those the test above checks (a class added without a check fails here, and so does
    a vLLM rename: get_rope would build another class)."""
    from kvslimmer_vllm.engine.worker import STATIC_ROTARY_CLASSES

    checked = {type(_vllm_rope(*case)).__name__ for case in ROPES}
    assert set(STATIC_ROTARY_CLASSES) == checked
