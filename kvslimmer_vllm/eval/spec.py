"""What an evaluation sweeps: context lengths, budgets, methods, tasks (pydantic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvslimmer_vllm.core.config import DEFAULT_OBSERVE, METHODS, OBSERVE_MODES
from kvslimmer_vllm.eval.tasks import ALL_TASKS

#: Compressing methods (``none`` = full KV is always run, as the reference).
EVAL_METHODS = tuple(m for m in METHODS if m != "none")


def variant_label(method: str, observe: str) -> str:
    """How results name a method run with an observe mode: the method's name alone when
    it is the method's default mode, else ``method/observe``."""
    return method if observe == DEFAULT_OBSERVE[method] else f"{method}/{observe}"


def parse_variant(label: str) -> tuple[str, str]:
    """``(method, observe)`` of a :func:`variant_label`."""
    method, _, observe = label.partition("/")
    return method, observe or DEFAULT_OBSERVE[method]


class EvalSpecError(ValueError):
    """An evaluation setting is invalid; the message names the flag or key and the range."""


class EvalSpec(BaseModel):
    """One evaluation sweep. Budgets below 1 are fractions of each prompt's length in
    tokens, budgets of 1 or more are token counts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lengths: list[int] = Field([1024, 2048], min_length=1,
                               description="Prompt lengths in tokens.")
    budgets: list[float] = Field([0.5, 0.25], min_length=1,
                                 description="KV budgets: fractions (< 1) or tokens (>= 1).")
    methods: list[str] = Field(list(EVAL_METHODS), min_length=1,
                               description="Compressing methods compared with full KV; "
                               "METHOD/MODE runs a method under one observe mode only.")
    observe: list[str] = Field(
        ["default"], min_length=1,
        description="Observe modes each method runs with: progressive, prompt-end, or "
        "default (each method's own: prompt-end for snapkv, progressive otherwise).")
    tasks: list[str] = Field(list(ALL_TASKS), min_length=1, description="Tasks to run.")
    cases: int = Field(3, ge=1, le=1000, description="Cases per task and length.")
    seed: int = Field(0, ge=0, description="Seed of the generated cases.")
    max_tokens: int = Field(24, ge=1, le=1024, description="Tokens generated per answer.")
    interval: int = Field(64, ge=1, description="--kv-merge-interval of the engine.")
    sink: int = Field(32, ge=0, description="--kv-merge-sink of the engine.")
    nll_tokens: int = Field(64, ge=1, le=1024, description="Continuation tokens scored by NLL.")
    calibration: float = Field(0.6, ge=0.0, le=1.0,
                               description="Full-KV score a cell needs to enter the summary.")
    skip_uncalibrated: bool = Field(
        True, description="Run the compressing methods only on (task, length) cells where "
        "full KV reaches the calibration score (the cells the summary uses).")

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v: list[int]) -> list[int]:
        if any(n < 256 or n > 1 << 20 for n in v):
            raise ValueError(f"lengths must be from 256 to 1048576 tokens; got {v}")
        return sorted(set(v))

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        if any(b <= 0 or (b >= 1 and b != int(b)) for b in v):
            raise ValueError(f"budgets must be fractions in (0, 1) or whole token counts; got {v}")
        return sorted(set(v), reverse=True)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m.partition("/")[0] not in EVAL_METHODS
               or m.partition("/")[2] not in ("", *OBSERVE_MODES)]
        if bad:
            raise ValueError(f"unknown methods {bad} (allowed: {', '.join(EVAL_METHODS)}, "
                             "each optionally as METHOD/progressive or METHOD/prompt-end)")
        return list(dict.fromkeys(v))

    @field_validator("observe")
    @classmethod
    def _observe(cls, v: list[str]) -> list[str]:
        allowed = ("default", *OBSERVE_MODES)
        bad = [o for o in v if o not in allowed]
        if bad:
            raise ValueError(f"unknown observe modes {bad} (allowed: {', '.join(allowed)})")
        return list(dict.fromkeys(v))

    @property
    def variants(self) -> list[str]:
        """Every (method, observe mode) the sweep runs, as :func:`variant_label` s."""
        labels = [variant_label(*parse_variant(m)) if "/" in m else
                  variant_label(m, DEFAULT_OBSERVE[m] if o == "default" else o)
                  for m in self.methods for o in self.observe]
        return list(dict.fromkeys(labels))

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in ALL_TASKS]
        if bad:
            raise ValueError(f"unknown tasks {bad} (allowed: {', '.join(ALL_TASKS)})")
        return [t for t in ALL_TASKS if t in v]

    def budget_tokens(self, budget: float, prompt_len: int) -> int:
        return int(budget) if budget >= 1 else max(1, round(budget * prompt_len))

    @staticmethod
    def budget_label(budget: float) -> str:
        return str(int(budget)) if budget >= 1 else f"{budget:.0%}"


#: Named sweeps. ``quick`` is the CI smoke run; ``default`` fits about 20 minutes on two
#: CPU cores with SmolLM2-135M; ``gpu`` is for 8B-class models at 8K-32K on one GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(lengths=[512], budgets=[0.5], cases=1, max_tokens=16, interval=32,
                  nll_tokens=32, skip_uncalibrated=False),
    # Every method in its default observe mode, 8 cases per task and length (needles
    # at 8 depths from 10% to 90%): ~13 minutes on a 2-core machine (README).
    "default": dict(lengths=[1024, 1536], budgets=[0.5, 0.25], cases=8),
    # The merging and evicting methods under both observe modes, snapkv, snapmerge and
    # streaming in their own, on the tasks SmolLM2-135M can do at this length (the default
    # preset measures NLL, of every method in its default mode).
    "observe": dict(lengths=[1024], budgets=[0.5, 0.25], cases=8,
                    tasks=["needle", "multikey"],
                    methods=["kvslimmer", "average", "evict", "snapkv/prompt-end",
                             "snapmerge/prompt-end", "streaming/progressive"],
                    observe=["progressive", "prompt-end"]),
    "gpu": dict(lengths=[8192, 16384, 32768], budgets=[0.5, 0.25, 0.125], cases=10,
                max_tokens=48, interval=512, sink=32),
}


def load_spec(preset: str = "default", path: str | None = None,
              overrides: dict[str, Any] | None = None) -> EvalSpec:
    """A preset, updated by a YAML/JSON file, updated by command-line overrides."""
    if preset not in PRESETS:
        raise EvalSpecError(f"--preset must be one of {', '.join(PRESETS)}; got {preset!r}")
    values = dict(PRESETS[preset])
    if path:
        import yaml

        file = Path(path)
        if not file.is_file():
            raise EvalSpecError(f"--config: no such file '{path}'")
        data = yaml.safe_load(file.read_text()) or {}
        if not isinstance(data, dict):
            raise EvalSpecError(f"--config: {path} must hold a mapping of settings")
        values.update({str(k).replace("-", "_"): v for k, v in data.items()})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return EvalSpec.model_validate(values)
    except ValidationError as exc:
        raise EvalSpecError("; ".join(
            f"--{'.'.join(map(str, e['loc'])).replace('_', '-') or 'config'}: {e['msg']}"
            for e in exc.errors()
        )) from None
