"""Long-context probes, built for a given tokenizer so that each prompt has the asked length in tokens.

- passkey retrieval (Mohtashami & Jaggi, 2023): a five-digit key hidden at a given depth in
  repeated filler sentences;
- needle in a haystack (Kamradt, 2023; the "magic number" needle of RULER): a seven-digit number for
  a named city hidden at a given depth in real text (WikiText-2 raw test);
- perplexity by position: the log-likelihood of each position bucket of long windows of real text.

Depth is the fraction of the haystack before the hidden sentence (0 = at the start, 1 = at the end).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

LENGTHS = (1024, 2048, 4096, 8192)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
BUCKETS = ((0, 512), (512, 1024), (1024, 2048), (2048, 4096), (4096, 8192))
ANSWER_ROOM = 16  # tokens kept free at the end of each length for the answer

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important info there.\n\n"
)
CITIES = ("Lisbon", "Nairobi", "Osaka", "Lima", "Oslo", "Hanoi", "Quito", "Tunis", "Perth", "Riga")


def _fill(tokenizer, haystack: str, budget: int) -> str:
    """The longest prefix of ``haystack`` (repeated as needed) of at most ``budget`` tokens."""
    ids = tokenizer(haystack, add_special_tokens=False)["input_ids"]
    while len(ids) < budget:
        ids = ids + ids
    return tokenizer.decode(ids[: max(budget, 0)])


def _hide(tokenizer, haystack: str, needle: str, prefix: str, suffix: str, length: int, depth: float) -> str:
    fixed = len(tokenizer(prefix + needle + suffix, add_special_tokens=False)["input_ids"])
    budget = length - ANSWER_ROOM - fixed
    if budget < 0:
        raise ValueError(
            f"a length of {length} tokens is too short for the prompt; use at least {fixed + 32}"
        )
    hay = _fill(tokenizer, haystack, budget)
    ids = tokenizer(hay, add_special_tokens=False)["input_ids"]
    cut = tokenizer.decode(ids[: round(depth * len(ids))])
    rest = tokenizer.decode(ids[round(depth * len(ids)) :])
    return prefix + cut + needle + rest + suffix


def _cells(lengths: Sequence[int], depths: Sequence[float], samples: int, seed: int):
    """(rng, length, depth) for each prompt to build, one rng drawing every random choice in order."""
    rng = random.Random(seed)
    return [(rng, n, d) for n in lengths for d in depths for _ in range(samples)]


def passkey_docs(
    tokenizer,
    lengths: Sequence[int] = LENGTHS,
    depths: Sequence[float] = DEPTHS,
    samples: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Passkey prompts: ``prompt`` (ending where the key should follow), ``answer``, length, depth."""
    docs = []
    question = "\n\nWhat is the pass key? The pass key is"
    for rng, length, depth in _cells(lengths, depths, samples, seed):
        key = str(rng.randint(10000, 99999))
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        prompt = _hide(tokenizer, FILLER * 4, needle, PASSKEY_INTRO, question, length, depth)
        docs.append({"prompt": prompt, "answer": key, "length": length, "depth": depth})
    return docs


def needle_docs(
    tokenizer,
    haystack: str,
    lengths: Sequence[int] = LENGTHS,
    depths: Sequence[float] = DEPTHS,
    samples: int = 1,
    seed: int = 0,
) -> list[dict]:
    """Needle-in-a-haystack prompts in ``haystack`` text, each asking for one city's magic number."""
    docs = []
    for rng, length, depth in _cells(lengths, depths, samples, seed):
        city, number = rng.choice(CITIES), str(rng.randint(1000000, 9999999))
        start = rng.randrange(max(len(haystack) - 200_000, 1))
        needle = f" One of the special magic numbers for {city} is: {number}. "
        question = (
            f"\n\nWhat is the special magic number for {city} mentioned in the provided text? "
            f"The special magic number for {city} mentioned in the provided text is"
        )
        prompt = _hide(tokenizer, haystack[start:], needle, "", question, length, depth)
        docs.append({"prompt": prompt, "answer": number, "length": length, "depth": depth})
    return docs


def position_docs(tokenizer, text: str, window: int = 8192, windows: int = 2) -> list[dict]:
    """Per window of ``window`` tokens of ``text``, one doc per position bucket: the text before the
    bucket (``context``), the bucket's text (``continuation``), and its token count."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < window:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    docs = []
    for w in range(min(windows, len(ids) // window)):
        chunk = ids[w * window : (w + 1) * window]
        for lo, hi in BUCKETS:
            if hi > window:
                break
            context = tokenizer.decode(chunk[:lo]) if lo else ""
            docs.append(
                {
                    "context": context,
                    "continuation": tokenizer.decode(chunk[lo:hi]),
                    "bucket": f"{lo}-{hi}",
                    "tokens": hi - lo,
                }
            )
    return docs


def exact_match(generated: str, answer: str) -> float:
    """1.0 when the first number the model wrote is the answer."""
    words = generated.strip().replace(".", " ").replace(",", " ").split()
    return float(bool(words) and words[0] == answer)
