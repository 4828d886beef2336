"""Deterministic long-context tasks, generated locally from a seed."""

from __future__ import annotations

import random
from dataclasses import dataclass

#: Classic pass-key filler: neutral, repetitive, and unlike the needle.
PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again. "
)


@dataclass(frozen=True)
class Case:
    messages: list[dict]
    answer: str
    depth: float  # where the needle sits, as a fraction of the filler

    def correct(self, text: str) -> bool:
        return self.answer in text


def passkey_cases(tokenizer, num_cases: int, num_tokens: int, seed: int = 0) -> list[Case]:
    """Single-needle retrieval: a 5-digit pass key hidden at depths spread evenly from
    10% to 90% of about ``num_tokens`` tokens of filler, asked for at the end."""
    rng = random.Random(seed)
    filler_ids = tokenizer(PASSKEY_FILLER * (num_tokens // 10 + 1))["input_ids"]
    filler_ids = filler_ids[: max(0, num_tokens - 60)]
    cases = []
    for i in range(num_cases):
        key = str(rng.randint(10000, 99999))
        depth = 0.1 + 0.8 * i / max(1, num_cases - 1)
        cut = int(len(filler_ids) * depth)
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        text = tokenizer.decode(filler_ids[:cut]) + needle + tokenizer.decode(filler_ids[cut:])
        question = "\n\nWhat is the pass key? Answer with the number only."
        cases.append(Case([{"role": "user", "content": text + question}], key, depth))
    return cases
