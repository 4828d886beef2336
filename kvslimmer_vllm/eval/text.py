"""Deterministic natural-language text from CPython's own documentation
(``pydoc_data.topics``, shipped with every CPython), for prompts of a given length."""

from __future__ import annotations

import random


def documentation_text(num_words: int, seed: int = 0) -> str:
    """About ``num_words`` words of documentation topics, chosen by ``seed``."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    rng = random.Random(seed)
    words: list[str] = []
    while len(words) < num_words:
        words.extend(topics[rng.choice(keys)].split())
    return " ".join(words[:num_words])


def documentation_tokens(tokenizer, num_tokens: int, seed: int = 0) -> list[int]:
    """Exactly ``num_tokens`` token ids of documentation text."""
    ids = tokenizer(documentation_text(num_tokens, seed=seed))["input_ids"]
    if len(ids) < num_tokens:  # never for real tokenizers: words >= 1 token each
        raise ValueError(f"text too short for {num_tokens} tokens")
    return ids[:num_tokens]
