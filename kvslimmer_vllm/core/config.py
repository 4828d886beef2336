"""Every knob of KV merging, with its default, its allowed range and its meaning.

One :class:`KVMergeConfig` travels from the command line (``--kv-merge*`` flags or
``--kv-merge-config``) or from ``additional_config={"kv_merge": {...}}`` to every vLLM
process. Values left unset (``None``) are derived by :meth:`KVMergeConfig.resolve` from
the model's context length, so that a round can always be carried out:

* a round starts when a request holds more than ``budget + interval`` physical slots and
  merges exactly ``K = slots - budget`` disjoint pairs of adjacent slots;
* only the mergeable region ``[sink, slots - recent)`` takes part, so it must hold at
  least ``2 K`` slots;
* a prefill chunk of a merging request is capped at ``prefill_chunk`` tokens, so a
  request never holds more than ``budget + interval + prefill_chunk`` slots.

Together these give ``budget >= sink + recent + interval + prefill_chunk``; the derived
defaults satisfy it and an explicit setting that breaks it is rejected with an error
naming the fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# The math's reference constants live beside it (importable without pydantic).
from .merge import DEFAULT_EPS, DEFAULT_GAMMA

#: Sink slots at the start of every request that are never merged (reference: 32).
DEFAULT_SINK = 32
#: Reference merge window: the reference compresses before each 512-token chunk.
DEFAULT_INTERVAL = 512
#: Reference budget of recent tokens kept besides the sink (2048 + 32 sink).
REFERENCE_BUDGET = 2048 + DEFAULT_SINK

#: Methods that ``--kv-merge`` accepts. ``none`` leaves vLLM untouched.
METHODS = ("none", "kvslimmer", "average", "evict", "streaming", "snapkv", "snapmerge")
Method = Literal["none", "kvslimmer", "average", "evict", "streaming", "snapkv", "snapmerge"]

#: When a request's rounds observe its queries (see ``KVMergeConfig.observe``).
OBSERVE_MODES = ("progressive", "prompt-end")
Observe = Literal["progressive", "prompt-end"]
#: Observe mode of each method when neither the server nor the request names one.
#: Measured (kvslimmer-vllm eval --preset observe, README): every merging method keeps
#: far more answers when it compresses after reading the question.
DEFAULT_OBSERVE = {m: "progressive" for m in METHODS} | {
    "kvslimmer": "prompt-end", "average": "prompt-end", "snapkv": "prompt-end",
    "snapmerge": "prompt-end"}
#: SnapKV's observation window (the last prompt tokens) and pooling width.
DEFAULT_WINDOW = 32
DEFAULT_POOL = 7
#: Share of the mergeable slots one sub-round of a prompt-end step may merge away.
PROMPT_END_FRACTION = 0.25

#: Command-line flag of each field that has one (the others live in --kv-merge-config).
FLAG_OF_FIELD = {
    "method": "--kv-merge",
    "budget": "--kv-merge-budget",
    "sink": "--kv-merge-sink",
    "recent": "--kv-merge-recent",
    "interval": "--kv-merge-interval",
    "observe": "--kv-merge-observe",
    "window": "--kv-merge-window",
    "pool": "--kv-merge-pool",
    "prefill_budget": "--kv-merge-prefill-budget",
}


class KVMergeConfigError(ValueError):
    """A KV-merge setting is invalid; the message names the option and the allowed range."""


def option_name(field: str) -> str:
    """The name a user knows a field by: its flag, else its key in --kv-merge-config."""
    return FLAG_OF_FIELD.get(field, f"--kv-merge-config key '{field}'")


class KVMergeConfig(BaseModel):
    """KV-merge settings. ``None`` means "derive it" (see :meth:`resolve`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method = Field(
        "none",
        description="Compression method: 'kvslimmer' (the paper), 'average' (count-weighted "
        "merge of the same pairs), 'evict' (drop the least-attended slots), 'streaming' "
        "(keep sink + recent slots), 'snapkv' (drop the slots the end of the prompt "
        "attends least, pooled; prompt-end by default), 'snapmerge' (keep what snapkv "
        "keeps, merge what it would drop; prompt-end by default); 'none' is unmodified "
        "vLLM.",
    )
    observe: Observe | None = Field(
        None,
        description="When rounds observe queries. 'progressive': rounds run while the "
        "prompt is prefilled, scored by the prompt's own queries (memory bounded by "
        "budget + interval + prefill chunk throughout; the paper's scheme). 'prompt-end': "
        "the prompt is prefilled without rounds (up to prefill_budget), then one step "
        "brings the request to its budget, scored by the attention of the last `window` "
        "prompt tokens (the question), pooled over `pool` slots; decoding then runs the "
        "usual rounds. Default: prompt-end for kvslimmer, average, snapkv and snapmerge, "
        "progressive for evict and streaming.",
    )
    window: int = Field(
        DEFAULT_WINDOW,
        ge=1,
        description="prompt-end: the last prompt tokens whose queries score the slots; "
        "they are never merged.",
    )
    pool: int | None = Field(
        None,
        ge=1,
        description="Max-pool the observation mass over this many neighbouring slots "
        "before scoring (odd; 1 = off). Default: 7 for prompt-end, 1 for progressive.",
    )
    prefill_budget: int | None = Field(
        None,
        ge=4,
        description="prompt-end: most KV slots a request holds while its prompt is "
        "prefilled; longer prompts run progressive rounds to stay under it. Default: no "
        "cap (the whole prompt is held until its compression step).",
    )
    merge_fraction: float | None = Field(
        None,
        gt=0,
        le=0.5,
        description="Largest share of the mergeable slots one pairwise sub-round merges "
        "away; a step that must free more runs several sub-rounds. Default: 0.25 for "
        "prompt-end, 0.5 (one round whenever possible) for progressive.",
    )
    budget: int | None = Field(
        None,
        ge=4,
        description="Physical KV slots a request keeps after a round. Default: "
        "min(2080, max_model_len // 4).",
    )
    sink: int = Field(
        DEFAULT_SINK, ge=0, description="Leading slots of a request that are never merged."
    )
    recent: int | None = Field(
        None,
        ge=0,
        description="Newest slots that are never merged. Default: the prefill chunk, so "
        "the chunk appended last is never merged in the round that follows it.",
    )
    interval: int | None = Field(
        None,
        ge=1,
        description="A round runs once a request holds more than budget + interval "
        "slots. Default: min(512, budget // 4).",
    )
    prefill_chunk: int | None = Field(
        None,
        ge=1,
        description="Largest prefill chunk of a merging request. Default and upper "
        "bound: min(interval, budget - sink - recent - interval).",
    )
    gamma: float = Field(
        DEFAULT_GAMMA, gt=0, description="Positional decay of pair scores, exp(t/gamma)."
    )
    eps: float = Field(
        DEFAULT_EPS,
        gt=0,
        lt=1e-3,
        description="Guard below which the closed-form key weights fall back to counts.",
    )
    rope_aware: bool = Field(
        True,
        description="Merge keys in the un-rotated RoPE frame and re-rotate them to the "
        "merged slot's position; false merges post-RoPE keys directly.",
    )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> KVMergeConfig:
        """Validate a mapping, turning pydantic errors into one-line messages."""
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise KVMergeConfigError(_describe(exc)) from None

    @classmethod
    def from_source(cls, source: str | None, overrides: dict[str, Any]) -> KVMergeConfig:
        """Build from ``--kv-merge-config`` (a YAML/JSON file path or inline JSON) and
        flag overrides (flags win)."""
        values = load_config_source(source) if source else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(values)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    # ----------------------------------------------------------------- derivation
    def resolve(self, max_model_len: int) -> KVMergeConfig:
        """Fill every derived field and check that a round is always possible.

        Raises :class:`KVMergeConfigError` naming the offending options.
        """
        if not self.enabled:
            return self
        budget = self.budget
        if budget is None:
            budget = min(REFERENCE_BUDGET, max_model_len // 4)
        if budget >= max_model_len:
            raise KVMergeConfigError(
                f"{option_name('budget')} must be below the model's context length "
                f"({max_model_len}); got {budget}"
            )
        interval = self.interval if self.interval is not None else min(
            DEFAULT_INTERVAL, max(1, budget // 4)
        )
        room = budget - self.sink - interval  # slots for recent + prefill chunk
        if self.recent is None:
            chunk_bound = min(interval, room // 2)
            recent = chunk_bound
        else:
            recent = self.recent
            chunk_bound = min(interval, room - recent)
        if chunk_bound < 1:
            raise KVMergeConfigError(
                f"{option_name('budget')} ({budget}) must be at least "
                f"{option_name('sink')} ({self.sink}) + {option_name('recent')} "
                f"({recent}) + {option_name('interval')} ({interval}) + 1, so that one "
                "round can free its slots by merging disjoint pairs outside the sink "
                "and recent slots; raise the budget or lower the others"
            )
        chunk = chunk_bound if self.prefill_chunk is None else self.prefill_chunk
        if chunk > chunk_bound:
            raise KVMergeConfigError(
                f"{option_name('prefill_chunk')} must be between 1 and {chunk_bound} "
                f"(min(interval, budget - sink - recent - interval)); got {chunk}"
            )
        if self.pool is not None and self.pool % 2 == 0:
            raise KVMergeConfigError(
                f"{option_name('pool')} must be an odd number of slots >= 1 (1 = off); "
                f"got {self.pool}"
            )
        if self.observe_of(self.method) == "prompt-end" and budget <= self.sink + self.window:
            raise KVMergeConfigError(
                f"{option_name('budget')} ({budget}) must exceed {option_name('sink')} "
                f"({self.sink}) + {option_name('window')} ({self.window}) with "
                "prompt-end observation"
            )
        peak = budget + interval + chunk
        if self.prefill_budget is not None and not peak <= self.prefill_budget < max_model_len:
            raise KVMergeConfigError(
                f"{option_name('prefill_budget')} must be from {peak} (budget + interval "
                f"+ prefill chunk) to {max_model_len - 1} (below the context length); got "
                f"{self.prefill_budget}"
            )
        return self.model_copy(
            update=dict(
                budget=budget, interval=interval, recent=recent, prefill_chunk=chunk
            )
        )

    @property
    def max_physical_slots(self) -> int:
        """Most slots a merging request ever holds (resolved configs only)."""
        self._require_resolved()
        return self.budget + self.interval + self.prefill_chunk

    @property
    def min_budget(self) -> int:
        """Smallest budget a progressive request may ask for with this config's interval,
        sink, recent and prefill chunk (resolved configs only)."""
        self._require_resolved()
        return self.sink + self.recent + self.interval + self.prefill_chunk

    def min_budget_of(self, observe: str) -> int:
        """Smallest budget a request observing with ``observe`` may ask for: a
        prompt-end request keeps its sink and window and merges the rest."""
        if observe == "prompt-end":
            return self.sink + self.window + 1
        return self.min_budget

    def observe_of(self, method: str) -> str:
        """The observe mode of requests using ``method`` (unless they name their own)."""
        return self.observe or DEFAULT_OBSERVE[method]

    def pool_of(self, observe: str) -> int:
        """Pooling width of the rounds of a request observing with ``observe``."""
        if self.pool is not None:
            return self.pool
        return DEFAULT_POOL if observe == "prompt-end" else 1

    def merge_fraction_of(self, observe: str) -> float:
        """Sub-round share of the rounds of a request observing with ``observe``."""
        if self.merge_fraction is not None:
            return self.merge_fraction
        return PROMPT_END_FRACTION if observe == "prompt-end" else 0.5

    @property
    def prefill_target(self) -> int | None:
        """Length a capped prompt-end prefill's progressive rounds bring a request to, so
        it never holds more than ``prefill_budget`` (None without a cap)."""
        if self.prefill_budget is None:
            return None
        self._require_resolved()
        return self.prefill_budget - self.interval - self.prefill_chunk

    def _require_resolved(self) -> None:
        if None in (self.budget, self.interval, self.recent, self.prefill_chunk):
            raise RuntimeError("KVMergeConfig.resolve() must be called first")


def load_config_source(source: str) -> dict[str, Any]:
    """Parse ``--kv-merge-config``: inline JSON, or a YAML/JSON file, optionally
    ``FILE#PROFILE``.

    Keys may be written with dashes or underscores. A file may hold its settings in a
    ``kv_merge`` section beside other sections (the presets in ``configs/`` describe the
    model there too), and named ``profiles`` whose settings override ``kv_merge``.
    """
    text = source.strip()
    profile = None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KVMergeConfigError(f"--kv-merge-config: invalid JSON ({exc})") from None
    else:
        path_text, _, profile = text.partition("#")
        path = Path(path_text).expanduser()
        if not path.is_file():
            raise KVMergeConfigError(
                f"--kv-merge-config: no such file {path_text!r} (give a YAML/JSON file, "
                "FILE#PROFILE or inline JSON)"
            )
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise KVMergeConfigError(
                f"--kv-merge-config: {path} is not valid YAML/JSON ({exc})"
            ) from None
    if not isinstance(data, dict):
        raise KVMergeConfigError("--kv-merge-config must hold a mapping of settings")
    if "kv_merge" in data or "profiles" in data:
        profiles = data.get("profiles") or {}
        settings = dict(data.get("kv_merge") or {})
        if profile:
            if profile not in profiles:
                raise KVMergeConfigError(
                    f"--kv-merge-config: no profile '{profile}' (available: "
                    f"{', '.join(map(str, profiles)) or 'none'})"
                )
            settings.update(profiles[profile])
        data = settings
    elif profile:
        raise KVMergeConfigError(f"--kv-merge-config: '{source}' has no profiles")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "kv_merge"
        name = option_name(field) if field in KVMergeConfig.model_fields else (
            f"--kv-merge-config key '{field}'"
        )
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(KVMergeConfig.model_fields)
            parts.append(f"{name}: unknown setting (allowed: {allowed})")
        else:
            parts.append(f"{name}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)
