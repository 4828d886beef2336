"""Worker side of paged KV merging (runs in each vLLM worker process).

``--kv-merge`` switches vLLM's ``worker_cls`` to :class:`KVMergeCPUWorker` or
:class:`KVMergeGPUWorker`. They register the merging attention backend before the
model is built and extend vLLM's (V1) model runner with :class:`KVMergeRunnerMixin`:

* when vLLM asks how much memory the KV cache may take (``determine_available_memory``):
  take the per-slot side state and the worst-case memory of a merge round out of that
  budget, so KV cache, state and rounds together fit what vLLM would have given the KV
  cache alone;
* after the KV cache exists: allocate the per-slot side state, bind it to every
  attention layer, find each layer's rotary embedding;
* before each step's forward: run the step's merge rounds (compact each request in
  place) and truncate the request's block-table row to its post-round blocks;
* when the step's inputs are prepared: turn slot mappings and attention sequence
  lengths into physical ones (RoPE positions stay logical).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from vllm.utils.math_utils import cdiv

from kvslimmer_vllm.core.rope import RotarySpec
from kvslimmer_vllm.engine import metrics
from kvslimmer_vllm.engine.profiling import make_profile
from kvslimmer_vllm.engine.attention import slot_major
from kvslimmer_vllm.engine.plan import PLAN_ATTR, MergeRound
from kvslimmer_vllm.engine.settings import merge_config_from_vllm
from kvslimmer_vllm.engine.memory import (
    batch_elements_within,
    batch_limit,
    blocks_within,
    costliest_path,
    round_reserve_bytes,
)
from kvslimmer_vllm.engine.slots import (
    PROFILE_ATTR,
    SLOT_BINDING,
    TRACE_ATTR,
    LayerCache,
    SlotState,
    apply_round,
    gather,
    reset_mass,
    slot_ids,
    state_bytes_per_slot,
)
from kvslimmer_vllm.core.config import METHODS
from kvslimmer_vllm.methods import MergeMethod, get_method

logger = logging.getLogger("vllm.kvslimmer.worker")

ATTENTION_BACKEND = "kvslimmer_vllm.engine.attention.KVMergeAttentionBackend"

#: vLLM rotary embeddings that rotate by a fixed ``cos_sin_cache[position]`` lookup, the
#: form RoPE-aware merging can invert and re-apply.
STATIC_ROTARY_CLASSES = frozenset({
    "RotaryEmbedding",
    "LinearScalingRotaryEmbedding",
    "Llama3RotaryEmbedding",
    "YaRNScalingRotaryEmbedding",
    "NTKScalingRotaryEmbedding",
    "DynamicNTKScalingRotaryEmbedding",
})


def layer_rotary(model: torch.nn.Module, layer_name: str) -> RotarySpec | None:
    """The RoPE of the attention layer ``layer_name`` (``...self_attn.attn``), read from
    its parent module's ``rotary_emb``; None if it has none."""
    parent = layer_name.rsplit(".", 1)[0]
    try:
        rotary = getattr(model.get_submodule(parent), "rotary_emb", None)
    except AttributeError:
        return None
    if rotary is None:
        return None
    kind = type(rotary).__name__
    if kind not in STATIC_ROTARY_CLASSES or not hasattr(rotary, "cos_sin_cache"):
        raise NotImplementedError(
            f"RoPE-aware merging does not support {kind} (layer {layer_name}); set "
            "'rope_aware: false' in --kv-merge-config to merge post-RoPE keys"
        )
    return RotarySpec(
        rotary_dim=rotary.rotary_dim,
        is_neox=rotary.is_neox_style,
        cos_sin_cache=rotary.cos_sin_cache,
    )


def _tensor_parallel_sum():
    """Under tensor parallelism each rank holds some KV heads and scores slots by its own
    heads; the sum over ranks (over the CPU group, in the fixed order every rank runs
    rounds and layers in) is the score a single rank would compute. None without TP."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return None

    def reduce(scores: torch.Tensor) -> torch.Tensor:
        total = scores.to("cpu", torch.float64, copy=True)
        torch.distributed.all_reduce(total, group=group.cpu_group)
        return total.to(scores.device)

    return reduce


class KVMergeRunnerMixin:
    """Added to vLLM's model runner class by :func:`install_runner_mixin`."""

    def _kv_merge_init(self, rank: int) -> None:
        self.kv_merge_config = merge_config_from_vllm(self.vllm_config)
        self._kv_merge_methods: dict[str, MergeMethod] = {}
        self._kv_merge_layers: list[LayerCache] = []
        self._kv_merge_state: SlotState | None = None
        self._kv_merge_num_merged: dict[str, int] = {}
        self._kv_merge_unobserved: frozenset[str] = frozenset()
        self._kv_merge_trace_layer: int | None = None
        self._kv_merge_trace: list[dict] = []
        self._kv_merge_metrics = (
            metrics.WorkerMetricsWriter.attach(self.vllm_config) if rank == 0 else None
        )
        self._kv_merge_profile = make_profile(f"worker {rank}", self.device)
        self._kv_merge_score_reduce = _tensor_parallel_sum()

    def _kv_merge_method(self, name: str) -> MergeMethod:
        """The method a round asks for (each request may pick its own)."""
        method = self._kv_merge_methods.get(name)
        if method is None:
            method = get_method(self.kv_merge_config.model_copy(update={"method": name}))
            method.score_reduce = self._kv_merge_score_reduce
            self._kv_merge_methods[name] = method
        return method

    # --------------------------------------------------------------- KV cache setup
    def kv_merge_memory_plan(self, available: int) -> dict[str, int | str]:
        """How a KV budget of ``available`` bytes is shared: the most blocks whose KV
        and per-slot state, plus the worst-case memory of a merge round
        (``engine.slots.round_reserve_bytes``), fit in it (``engine.slots.blocks_within``);
        ``kv_budget`` is what vLLM is told the KV cache may take, so that it sizes exactly
        ``num_blocks`` blocks."""
        specs = list(self.get_kv_cache_spec().values())
        if not specs:
            raise RuntimeError("kv-merge: the model has no attention layer with a KV cache")
        first = specs[0]
        shapes = {(s.block_size, s.num_kv_heads, s.head_size, s.dtype) for s in specs}
        if len(shapes) != 1:
            raise RuntimeError(
                "kv-merge needs every attention layer to have the same KV shape (block "
                f"size, KV heads, head size, dtype); found {sorted(map(str, shapes))}"
            )
        num_layers = len(specs)
        kv_per_block = sum(s.page_size_bytes for s in specs)
        state_per_block = num_layers * first.block_size * state_bytes_per_slot(
            first.num_kv_heads)
        # A round takes at most a whole request: max_model_len slots, in batches of
        # layers capped by a share of the budget, on the costliest path (in place, staged
        # or gathered) of every method a request may ask for on these caches.
        self._kv_merge_max_batch = batch_elements_within(available, first.dtype,
                                                         batch_limit(self.device))
        probe = torch.empty(0, dtype=first.dtype, device=self.device)
        path = costliest_path(self._kv_merge_method(name).round_path(probe)
                              for name in METHODS if name != "none")
        scratch = round_reserve_bytes(num_layers, self.max_model_len, first.num_kv_heads,
                                      first.head_size, first.dtype, path,
                                      self._kv_merge_max_batch)
        num_blocks = blocks_within(available, kv_per_block, state_per_block, scratch)
        return {
            "available": available, "num_blocks": num_blocks,
            "kv_bytes_per_block": kv_per_block, "state_bytes_per_block": state_per_block,
            "state": num_blocks * state_per_block, "scratch": scratch,
            "round_path": path,
            "kv_budget": num_blocks * kv_per_block,
            "unmodified_num_blocks": available // kv_per_block,
        }

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs) -> None:
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        self._kv_merge_pipeline_buffers()
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise RuntimeError(f"kv-merge needs one KV cache group, found {len(groups)}")
        spec = groups[0].kv_cache_spec
        self._kv_merge_block_size = spec.block_size
        names = list(groups[0].layer_names)
        state = SlotState(
            num_layers=len(names),
            num_slots=kv_cache_config.num_blocks * spec.block_size,
            num_kv_heads=spec.num_kv_heads,
            device=self.device,
        )
        state.max_batch_elements = getattr(self, "_kv_merge_max_batch",
                                           batch_limit(self.device))
        context = self.compilation_config.static_forward_context
        model = self.get_model()
        rope_aware = self.kv_merge_config.rope_aware
        layers = []
        shared: dict[tuple, RotarySpec] = {}  # layers with one RoPE merge as one batch
        for index, name in enumerate(names):
            attn = context[name]
            setattr(attn, SLOT_BINDING, (state, index))
            setattr(attn, PROFILE_ATTR, self._kv_merge_profile)
            rotary = layer_rotary(model, name) if rope_aware else None
            if rotary is not None:
                key = (rotary.cos_sin_cache.data_ptr(), rotary.rotary_dim, rotary.is_neox)
                rotary = shared.setdefault(key, rotary)
            layers.append(LayerCache(index, slot_major(attn.kv_cache), rotary))
        if rope_aware and all(layer.rotary is None for layer in layers):
            raise NotImplementedError(
                "the model has no rotary embedding to merge keys in; set "
                "'rope_aware: false' in --kv-merge-config"
            )
        self._kv_merge_layers, self._kv_merge_state = layers, state
        self._kv_merge_layer_names = names
        logger.info(
            "kv-merge: side state for %d layers x %d slots (%d blocks, %.1f MiB)",
            len(names), state.num_slots, kv_cache_config.num_blocks, state.nbytes / 2**20,
        )

    def _kv_merge_pipeline_buffers(self) -> None:
        """A later pipeline stage receives the previous stage's hidden states into
        ``intermediate_tensors``, which vLLM allocates in its warm-up/dummy run. vLLM
        0.32's CPU runner skips that run in eager mode (``warming_up_model`` returns early
        without compilation), so stage 2 fails its first step with an AssertionError in
        ``sync_and_gather_intermediate_tensors``; allocate the buffer here, as the dummy run
        would."""
        from vllm.distributed.parallel_state import get_pp_group

        if get_pp_group().is_first_rank or self.intermediate_tensors is not None:
            return
        self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
            batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)

    # ---------------------------------------------------------------- every step
    def execute_model(self, scheduler_output, *args, **kwargs):
        started = time.perf_counter()
        plan = getattr(scheduler_output, PLAN_ATTR, None)
        merge_seconds = None
        if plan is not None and plan.rounds:
            for merge in plan.rounds:
                before = self._kv_merge_trace_gather(merge.block_ids, merge.num_slots)
                apply_round(
                    merge, self._kv_merge_layers, self._kv_merge_state,
                    self._kv_merge_method(merge.method), self._kv_merge_block_size,
                )
                if before is not None:
                    after = self._kv_merge_trace_gather(
                        merge.block_ids, merge.num_slots_after
                    )
                    self._kv_merge_trace.append({
                        "kind": "round", "req_id": merge.req_id,
                        "num_slots": merge.num_slots, "num_merge": merge.num_merge,
                        "round_index": merge.round_index,
                        "before": before, "after": after,
                    })
                self._kv_merge_truncate(merge)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            merge_seconds = time.perf_counter() - started
        for start in plan.observe if plan is not None else ():
            reset_mass(self._kv_merge_state, start.block_ids, start.num_slots,
                       self._kv_merge_block_size)
        self._kv_merge_num_merged = plan.num_merged if plan is not None else {}
        self._kv_merge_unobserved = plan.unobserved if plan is not None else frozenset()
        output = super().execute_model(scheduler_output, *args, **kwargs)
        elapsed = time.perf_counter() - started
        if self._kv_merge_metrics is not None:
            self._kv_merge_metrics.record_step(merge_seconds, elapsed)
        if (profile := self._kv_merge_profile) is not None:
            profile.add("merge", merge_seconds or 0.0)
            profile.add("execute_model", profile.now() - started)
            profile.step_done(total_part="execute_model")
        return output

    # ------------------------------------------------------- diagnostics (tests)
    def kv_merge_set_trace(self, layer_index: int | None) -> None:
        """Record every merge round's slots (before and after) and every attention
        call of one layer, for :meth:`kv_merge_pop_trace`; None stops recording."""
        for layer in self._kv_merge_layers:
            attn = self.compilation_config.static_forward_context[
                self._kv_merge_layer_names[layer.index]
            ]
            setattr(attn, TRACE_ATTR, self._kv_merge_trace if layer.index == layer_index
                    else None)
        self._kv_merge_trace_layer = layer_index

    def kv_merge_pop_trace(self) -> list[dict]:
        """The recorded calls, tensors as nested lists (they cross process boundaries)."""
        records = [
            {k: _plain(v) for k, v in record.items()} for record in self._kv_merge_trace
        ]
        self._kv_merge_trace.clear()
        return records

    def _kv_merge_trace_gather(self, block_ids, num_slots: int):
        if self._kv_merge_trace_layer is None:
            return None
        layer = self._kv_merge_layers[self._kv_merge_trace_layer]
        slots = slot_ids(block_ids, num_slots, self._kv_merge_block_size, self.device)
        return vars(gather(layer, self._kv_merge_state, slots))

    def _kv_merge_truncate(self, merge: MergeRound) -> None:
        """Drop the blocks the scheduler freed from the request's block list and row."""
        keep = cdiv(merge.num_slots_after, self._kv_merge_block_size)
        req_state = self.requests.get(merge.req_id)
        if req_state is not None:
            block_ids = req_state.block_ids[0]
            if tuple(block_ids) != merge.block_ids:
                raise RuntimeError(
                    f"kv-merge: request {merge.req_id} holds blocks {block_ids} on the "
                    f"worker but {list(merge.block_ids)} in the scheduler"
                )
            del block_ids[keep:]
        row = self.input_batch.req_id_to_index.get(merge.req_id)
        if row is not None:
            table = self.input_batch.block_table[0]
            held = table.num_blocks_per_row[row]
            table.block_table.np[row, keep:held] = 0
            table.num_blocks_per_row[row] = keep

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        if self._kv_merge_state is not None:
            self._kv_merge_state.set_observed(self._kv_merge_observed_rows())
        merged = self._kv_merge_num_merged
        if not merged:
            return result
        num_reqs = self.input_batch.num_reqs
        offsets = np.zeros(num_reqs, dtype=np.int64)
        for req_id, num in merged.items():
            row = self.input_batch.req_id_to_index.get(req_id)
            if row is not None and row < num_reqs:
                offsets[row] = num
        if not offsets.any():
            return result
        num_tokens = int(num_scheduled_tokens.sum())
        device = self.seq_lens.device
        offsets_t = torch.from_numpy(offsets).to(device)
        # Attention reads the physical slots ...
        self.seq_lens[:num_reqs] -= offsets_t.to(self.seq_lens.dtype)
        # ... and new KV goes to physical slots, while RoPE keeps logical positions.
        rows = torch.from_numpy(
            np.repeat(np.arange(num_reqs), num_scheduled_tokens[:num_reqs])
        ).to(device)
        physical = self.positions[:num_tokens] - offsets_t[rows].to(self.positions.dtype)
        self.input_batch.block_table.compute_slot_mapping(
            num_reqs, self.query_start_loc.gpu[: num_reqs + 1], physical
        )
        return result

    def _kv_merge_observed_rows(self) -> list[bool] | None:
        """This step's requests (batch rows) whose queries add to the observation mass;
        None when all do."""
        unobserved = self._kv_merge_unobserved
        if not unobserved:
            return None
        req_ids = self.input_batch.req_ids[: self.input_batch.num_reqs]
        return [rid not in unobserved for rid in req_ids]


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def install_runner_mixin(runner, rank: int) -> None:
    """Extend an existing vLLM model runner with :class:`KVMergeRunnerMixin`."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(runner, GPUModelRunner):
        raise RuntimeError(
            f"kv-merge needs vLLM's V1 model runner, found {type(runner).__name__} "
            "(set VLLM_USE_V2_MODEL_RUNNER=0)"
        )
    base = type(runner)
    runner.__class__ = type(f"KVMerge{base.__name__}", (KVMergeRunnerMixin, base), {})
    runner._kv_merge_init(rank)


def _backend_member():
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    # The CPU platform always selects CPU_ATTN; on CUDA the engine is configured to
    # select CUSTOM (see plugin.py).
    return (AttentionBackendEnum.CPU_ATTN if current_platform.is_cpu()
            else AttentionBackendEnum.CUSTOM)


def _forget_selected_backends() -> None:
    """vLLM caches its backend choice per process; another engine in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) must choose again."""
    from vllm.v1.attention import selector

    selector._cached_get_attn_backend.cache_clear()


def _register_attention_backend() -> None:
    from vllm.v1.attention.backends.registry import register_backend

    register_backend(_backend_member(), ATTENTION_BACKEND)
    _forget_selected_backends()


def release_attention_backend() -> None:
    """Give CPU_ATTN / CUSTOM back to vLLM if a merging engine of this process took it."""
    member = _backend_member()
    if member.is_overridden() and member.get_path() == ATTENTION_BACKEND:
        member.clear_override()
        _forget_selected_backends()


def _worker_class(base: type) -> type:
    class KVMergeWorker(base):
        def __init__(self, *args, **kwargs) -> None:
            _register_attention_backend()
            super().__init__(*args, **kwargs)

        def init_device(self) -> None:
            super().init_device()
            install_runner_mixin(self.model_runner, self.rank)

        def determine_available_memory(self) -> int:
            """vLLM sizes the KV cache as ``available // bytes_per_block``: report the
            budget less the round scratch and the blocks' slot state, so that KV cache,
            state and scratch together fit in what the KV cache alone would get."""
            available = super().determine_available_memory()
            plan = self.model_runner.kv_merge_memory_plan(available)
            override = self.cache_config.num_gpu_blocks_override
            if override is not None:
                # The block count is given; vLLM checks only that the budget is positive.
                logger.info(
                    "kv-merge: --num-gpu-blocks-override %d decides the KV block count (the "
                    "budget of %d bytes would hold %d with merging, %d without)", override,
                    available, plan["num_blocks"], plan["unmodified_num_blocks"])
                return available
            if plan["num_blocks"] < 1:
                raise RuntimeError(
                    f"kv-merge: the KV cache budget ({available} bytes) cannot hold the "
                    f"merge rounds' working memory ({plan['scratch']} bytes) and one KV "
                    f"block with its slot state ({plan['kv_bytes_per_block']} + "
                    f"{plan['state_bytes_per_block']} bytes); give the KV cache more "
                    "memory (--gpu-memory-utilization, --kv-cache-memory-bytes or "
                    "VLLM_CPU_KVCACHE_SPACE) or lower --max-model-len"
                )
            logger.info(
                "kv-merge: of the KV cache budget of %d bytes, reserved %d for slot state "
                "and %d for merge rounds (%s): %d KV blocks (%d without merging)",
                available, plan["state"], plan["scratch"],
                plan["round_path"], plan["num_blocks"],
                plan["unmodified_num_blocks"],
            )
            return plan["kv_budget"]

        # Reached through vLLM's collective_rpc (diagnostics and tests).
        def kv_merge_set_trace(self, layer_index: int | None) -> None:
            self.model_runner.kv_merge_set_trace(layer_index)

        def kv_merge_pop_trace(self) -> list[dict]:
            return self.model_runner.kv_merge_pop_trace()

    KVMergeWorker.__name__ = KVMergeWorker.__qualname__ = f"KVMerge{base.__name__}"
    return KVMergeWorker


def __getattr__(name: str):
    # Resolved lazily: each platform's worker module imports only on that platform.
    if name == "KVMergeCPUWorker":
        from vllm.v1.worker.cpu_worker import CPUWorker

        cls = _worker_class(CPUWorker)
    elif name == "KVMergeGPUWorker":
        from vllm.v1.worker.gpu_worker import Worker

        cls = _worker_class(Worker)
    else:
        raise AttributeError(name)
    globals()[name] = cls
    return cls
