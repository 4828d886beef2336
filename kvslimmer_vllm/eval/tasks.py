"""Deterministic long-context tasks, generated locally from a seed.

Every generator takes a tokenizer (lengths are in its tokens), a number of cases, a
target prompt length in tokens and a seed, and returns :class:`Case` objects: chat
messages and the strings a correct answer contains. The same ``(tokenizer, length, seed)``
always gives the same cases, whatever method is evaluated on them.

=============  =========================================================================
``needle``      a 5-digit pass key hidden in repetitive filler (single needle)
``multikey``    four "special magic number for KEY" needles, asked for one of them
``multivalue``  three numbers for the same key at different depths, asked for all
``vartrack``    a chain ``VAR A = n``, ``VAR B = VAR A``, ... spread through the text
                (RULER's variable tracking), asked for every variable holding ``n``
``freqwords``   a list of made-up words with Zipf frequencies, asked for the top three
``docqa``       continue a passage quoted from a long document of CPython's own
                documentation (``pydoc_data.topics``)
=============  =========================================================================

Scores are the fraction of expected strings found in the answer (case-insensitive); the
negative log-likelihood cases (:func:`nll_cases`) are scored by the engine's prompt
log-probabilities instead.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from kvslimmer_vllm.eval.text import documentation_text

#: Classic pass-key filler: neutral, repetitive, and unlike the needle.
PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. "
    "There and back again. "
)
#: Tokens left for the question and the chat template around the haystack.
_QUESTION_ROOM = 80

_PLAIN = re.compile(r"^[A-Za-z][A-Za-z,.;:'()-]*$")
_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "zu", "pi", "do", "fe", "gu")


@dataclass(frozen=True)
class Case:
    """One prompt and what a correct answer contains."""

    messages: list[dict]
    answers: tuple[str, ...]
    depth: float  # where the (first) needle sits, as a fraction of the haystack
    task: str = "needle"
    #: How the assistant's answer starts (RULER-style answer prefix); the model continues it.
    prefix: str = ""

    @property
    def conversation(self) -> list[dict]:
        """The messages, ending with the assistant's answer prefix when there is one."""
        if not self.prefix:
            return self.messages
        return [*self.messages, {"role": "assistant", "content": self.prefix}]

    @property
    def answer(self) -> str:
        return self.answers[0]

    def score(self, text: str) -> float:
        """Fraction of the expected strings that the answer contains."""
        found = text.lower()
        return sum(a.lower() in found for a in self.answers) / len(self.answers)

    def correct(self, text: str) -> bool:
        return self.score(text) == 1.0


@dataclass(frozen=True)
class NLLCase:
    """A document followed by a continuation whose tokens are scored (raw prompt ids)."""

    prompt_ids: list[int]
    num_target: int  # the last ``num_target`` prompt tokens are the continuation


def _words(rng: random.Random, n: int, syllables: int = 3) -> list[str]:
    """``n`` distinct made-up lower-case words."""
    out: list[str] = []
    while len(out) < n:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(syllables))
        if word not in out:
            out.append(word)
    return out


def _haystack(tokenizer, filler: str, num_tokens: int, needles: list[tuple[float, str]]) -> str:
    """About ``num_tokens`` tokens of ``filler`` with each needle inserted at its depth
    (a fraction of the filler), at a sentence boundary."""
    ids = tokenizer(filler)["input_ids"]
    while len(ids) < num_tokens:
        filler += " " + filler
        ids = tokenizer(filler)["input_ids"]
    budget = max(0, num_tokens - sum(len(tokenizer(n)["input_ids"]) for _, n in needles))
    text = tokenizer.decode(ids[:budget])
    cuts = []
    for depth, needle in needles:
        at = int(len(text) * depth)
        stop = text.find(". ", at)
        cuts.append((len(text) if stop < 0 else stop + 2, needle))
    for at, needle in sorted(cuts, key=lambda c: c[0], reverse=True):
        text = text[:at] + needle + " " + text[at:]
    return text


def _doc_filler(seed: int, num_tokens: int) -> str:
    return documentation_text(num_tokens, seed=seed)


def _depths(i: int, num_cases: int) -> float:
    return 0.1 + 0.8 * i / max(1, num_cases - 1)


def _chat(text: str, question: str) -> list[dict]:
    return [{"role": "user", "content": f"{text}\n\n{question}"}]


def passkey_cases(tokenizer, num_cases: int, num_tokens: int, seed: int = 0) -> list[Case]:
    """Single-needle retrieval: a 5-digit pass key hidden at depths spread evenly from
    10% to 90% of about ``num_tokens`` tokens of filler, asked for at the end."""
    rng = random.Random(seed)
    filler_ids = tokenizer(PASSKEY_FILLER * (num_tokens // 10 + 1))["input_ids"]
    filler_ids = filler_ids[: max(0, num_tokens - 60)]
    cases = []
    for i in range(num_cases):
        key = str(rng.randint(10000, 99999))
        depth = _depths(i, num_cases)
        cut = int(len(filler_ids) * depth)
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        text = tokenizer.decode(filler_ids[:cut]) + needle + tokenizer.decode(filler_ids[cut:])
        question = "\n\nWhat is the pass key? Answer with the number only."
        cases.append(Case([{"role": "user", "content": text + question}], (key,), depth,
                          prefix="The pass key is"))
    return cases


def multikey_cases(tokenizer, num_cases: int, num_tokens: int, seed: int = 0) -> list[Case]:
    """Four keys, each with its own 7-digit number, in documentation text; one is asked."""
    rng = random.Random(f"multikey-{seed}")
    cases = []
    for i in range(num_cases):
        keys = _words(rng, 4)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
        asked = rng.randrange(4)
        depth = _depths(i, num_cases)
        others = [d for d in (0.15, 0.4, 0.65, 0.9) if abs(d - depth) > 0.1][:3]
        depths = others[:asked] + [depth] + others[asked:]
        needles = [(d, f"The special magic number for {k} is {v}.")
                   for d, k, v in zip(depths, keys, values)]
        text = _haystack(tokenizer, _doc_filler(seed * 1000 + i, num_tokens),
                         num_tokens - _QUESTION_ROOM, needles)
        question = (f"What is the special magic number for {keys[asked]} mentioned in the "
                    "text above? Answer with the number only.")
        cases.append(Case(_chat(text, question), (values[asked],), depth, "multikey",
                          f"The special magic number for {keys[asked]} is"))
    return cases


def multivalue_cases(tokenizer, num_cases: int, num_tokens: int, seed: int = 0) -> list[Case]:
    """Three numbers for one key at depths around the case's depth; all are asked."""
    rng = random.Random(f"multivalue-{seed}")
    cases = []
    for i in range(num_cases):
        (key,) = _words(rng, 1)
        values = [str(rng.randint(1_000_000, 9_999_999)) for _ in range(3)]
        depth = _depths(i, num_cases)
        depths = [min(0.95, max(0.05, depth + off)) for off in (-0.05, 0.0, 0.05)]
        needles = [(d, f"One of the special magic numbers for {key} is {v}.")
                   for d, v in zip(depths, values)]
        text = _haystack(tokenizer, _doc_filler(seed * 1000 + i, num_tokens),
                         num_tokens - _QUESTION_ROOM, needles)
        question = (f"What are all the special magic numbers for {key} mentioned in the "
                    "text above? List the numbers only.")
        cases.append(Case(_chat(text, question), tuple(values), depth, "multivalue",
                          f"The special magic numbers for {key} are:"))
    return cases


def vartrack_cases(tokenizer, num_cases: int, num_tokens: int, seed: int = 0) -> list[Case]:
    """``VAR X1 = n. VAR X2 = VAR X1. ...`` (four links) from the case's depth onwards."""
    rng = random.Random(f"vartrack-{seed}")
    cases = []
    for i in range(num_cases):
        names = [w.upper() for w in _words(rng, 4, syllables=2)]
        value = str(rng.randint(10000, 99999))
        depth = _depths(i, num_cases) * 0.7
        chain = [f"VAR {names[0]} = {value}."] + [
            f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])
        ]
        needles = [(depth + j * (0.95 - depth) / len(chain), s) for j, s in enumerate(chain)]
        text = _haystack(tokenizer, _doc_filler(seed * 1000 + i, num_tokens),
                         num_tokens - _QUESTION_ROOM, needles)
        question = (f"Which variables in the text above are assigned the value {value}, "
                    "directly or through other variables? List their names only.")
        cases.append(Case(_chat(text, question), tuple(names), depth, "vartrack",
                          f"The variables assigned the value {value} are:"))
    return cases


def freqwords_cases(tokenizer, num_cases: int, num_tokens: int, seed: int = 0) -> list[Case]:
    """Made-up words repeated with Zipf frequencies, shuffled; the top three are asked."""
    rng = random.Random(f"freqwords-{seed}")
    cases = []
    for i in range(num_cases):
        vocab = _words(rng, 40)
        harmonic = sum(1 / r for r in range(1, len(vocab) + 1))
        total, target = num_tokens, num_tokens - _QUESTION_ROOM
        for _ in range(3):  # scale the word count until the list has the target length
            counts = [max(1, int(total / (r * harmonic))) for r in range(1, len(vocab) + 1)]
            words = [w for w, c in zip(vocab, counts) for _ in range(c)]
            rng.shuffle(words)
            total = int(total * target / len(tokenizer(" ".join(words))["input_ids"]))
        question = ("What are the three most frequently appearing words in the list above? "
                    "Answer with the three words only.")
        cases.append(Case(_chat(" ".join(words), question), tuple(vocab[:3]), 0.0,
                          "freqwords", "The three most frequently appearing words are:"))
    return cases


def docqa_cases(tokenizer, num_cases: int, num_tokens: int, seed: int = 0) -> list[Case]:
    """A passage of a long documentation text is quoted by its first eight words; the
    answer must continue it with the next five (scored by how many of them, in order,
    the answer reproduces: see :meth:`DocCase.score`)."""
    cases = []
    for i in range(num_cases):
        ids = tokenizer(_doc_filler(seed * 1000 + i, num_tokens))["input_ids"]
        text = tokenizer.decode(ids[: num_tokens - _QUESTION_ROOM - 40])
        words = text.split()
        depth = _depths(i, num_cases)
        first = int(len(words) * depth)
        # From the depth onwards (wrapping around): 13 plain words, the quoted eight found
        # once in the document and ending in a letter.
        start = next(
            (s for s in [*range(first, len(words) - 13), *range(0, first)]
             if all(_PLAIN.match(w) for w in words[s:s + 13])
             and words[s + 7][-1].isalpha()
             and text.count(" ".join(words[s:s + 8])) == 1),
            None,
        )
        if start is None:
            raise ValueError(f"docqa: no quotable passage in {num_tokens} tokens (seed {seed})")
        quote = " ".join(words[start:start + 8])
        question = (f'In the documentation above, find the passage that begins "{quote}" '
                    "and write the five words that follow it.")
        cases.append(DocCase(_chat(text, question), tuple(words[start + 8:start + 13]),
                             depth, "docqa", f"The passage reads: {quote}"))
    return cases


@dataclass(frozen=True)
class DocCase(Case):
    def score(self, text: str) -> float:
        """Longest prefix of the expected words that the answer reproduces contiguously,
        over 5 (punctuation and case ignored)."""
        got = _norm_words(text)
        for j in range(len(self.answers), 0, -1):
            want = _norm_words(" ".join(self.answers[:j]))
            if any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1)):
                return j / len(self.answers)
        return 0.0


def _norm_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9_]+", text.lower())


def nll_cases(tokenizer, num_cases: int, num_tokens: int, seed: int = 0,
              num_target: int = 64) -> list[NLLCase]:
    """``num_tokens`` tokens of documentation text followed by its next ``num_target``
    tokens; the continuation's NLL is read from the prompt log-probabilities."""
    cases = []
    for i in range(num_cases):
        ids = tokenizer(_doc_filler(seed * 1000 + 500 + i, num_tokens + num_target))[
            "input_ids"
        ]
        cases.append(NLLCase(ids[: num_tokens + num_target], num_target))
    return cases


#: Generation tasks by name, in report order.
TASKS: dict[str, Callable[..., list[Case]]] = {
    "needle": passkey_cases,
    "multikey": multikey_cases,
    "multivalue": multivalue_cases,
    "vartrack": vartrack_cases,
    "freqwords": freqwords_cases,
    "docqa": docqa_cases,
}
#: Scores that are not generation tasks (reported beside them).
NLL_TASK, AGREEMENT_TASK = "nll", "agreement"
ALL_TASKS = (*TASKS, NLL_TASK, AGREEMENT_TASK)
