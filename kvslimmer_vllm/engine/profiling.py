"""Where engine time goes, printed every N steps when ``KVSLIMMER_PROFILE_EVERY=N``.

The worker reports attention (inside the merging attention backend), merge rounds and
the rest of ``execute_model``; the scheduler reports ``schedule()`` and
``update_from_output()``. Off (no timing at all) unless the variable is set.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import torch

ENV = "KVSLIMMER_PROFILE_EVERY"
logger = logging.getLogger("vllm.kvslimmer.profile")


def profile_every() -> int:
    value = os.environ.get(ENV, "").strip()
    if not value:
        return 0
    try:
        every = int(value)
    except ValueError:
        raise ValueError(f"{ENV} must be a positive integer, got {value!r}") from None
    if every < 1:
        raise ValueError(f"{ENV} must be a positive integer, got {every}")
    return every


class StepProfile:
    """Sums seconds per part over steps and logs the per-step average every N steps."""

    def __init__(self, where: str, every: int, device: torch.device | None = None) -> None:
        self.where, self.every = where, every
        self.sync = device is not None and device.type == "cuda"
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.steps = 0

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds

    def step_done(self, total_part: str | None = None) -> None:
        self.steps += 1
        if self.steps < self.every:
            return
        per_step = {k: 1000 * v / self.steps for k, v in self.seconds.items()}
        if total_part is not None and total_part in per_step:
            total = per_step[total_part]
            parts = ", ".join(
                f"{k} {v:.1f} ms ({100 * v / total:.0f}%)"
                for k, v in per_step.items() if k != total_part
            )
            other = total - sum(v for k, v in per_step.items() if k != total_part)
            text = f"{total_part} {total:.1f} ms/step: {parts}, other {other:.1f} ms"
        else:
            text = ", ".join(f"{k} {v:.1f} ms/step" for k, v in per_step.items())
        logger.info("kv-merge profile (%s, last %d steps): %s", self.where, self.steps, text)
        self.seconds.clear()
        self.steps = 0


def make_profile(where: str, device: torch.device | None = None) -> StepProfile | None:
    every = profile_every()
    return StepProfile(where, every, device) if every else None
