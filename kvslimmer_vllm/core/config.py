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
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: Sink slots at the start of every request that are never merged (reference: 32).
DEFAULT_SINK = 32
#: Reference merge window: the reference compresses before each 512-token chunk.
DEFAULT_INTERVAL = 512
#: Reference budget of recent tokens kept besides the sink (2048 + 32 sink).
REFERENCE_BUDGET = 2048 + DEFAULT_SINK
#: Positional decay of the pair score, ``exp(t / gamma)`` (reference: 4096 / ln 512).
DEFAULT_GAMMA = 4096.0 / math.log(512.0)
#: Guard of the closed-form key weights and of ``d`` recovery (reference: 1e-21).
DEFAULT_EPS = 1e-21

#: Methods that ``--kv-merge`` accepts. ``none`` leaves vLLM untouched.
METHODS = ("none", "kvslimmer", "average", "evict", "streaming")
Method = Literal["none", "kvslimmer", "average", "evict", "streaming"]

#: Command-line flag of each field that has one (the others live in --kv-merge-config).
FLAG_OF_FIELD = {
    "method": "--kv-merge",
    "budget": "--kv-merge-budget",
    "sink": "--kv-merge-sink",
    "recent": "--kv-merge-recent",
    "interval": "--kv-merge-interval",
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
        "(keep sink + recent slots); 'none' is unmodified vLLM.",
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
        """Smallest budget a request may ask for with this config's interval, sink,
        recent and prefill chunk (resolved configs only)."""
        self._require_resolved()
        return self.sink + self.recent + self.interval + self.prefill_chunk

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
