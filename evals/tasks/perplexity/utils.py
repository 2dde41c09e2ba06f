"""Perplexity of one long text: WikiText-2 raw test (bundled) or any text llmlite reads.

The text is one document, as in the GPTQ/AWQ papers' protocol. ``--metadata`` options: ``text``
(a local ``.txt``/``.jsonl``/``.parquet`` file, or a hub dataset, instead of WikiText-2) and
``max_tokens`` (keep only the start of the text, counted in the tokens of the model's tokenizer,
so that word and byte perplexity divide by the words and bytes actually scored).
"""

import math
import re

import datasets

from llmlite.data import load_text
from llmlite.models import load_tokenizer


def load_text_doc(text: str = "wikitext2", max_tokens: int | None = None, **metadata) -> datasets.DatasetDict:
    """One document: the text read by ``llmlite.data.load_text``, cut to ``max_tokens`` if given."""
    body = load_text(text)
    if max_tokens:
        source = metadata.get("tokenizer") or metadata.get("pretrained")
        tokenizer = load_tokenizer(source if isinstance(source, str) else "smollm2-135m")
        ids = tokenizer(body, add_special_tokens=False)["input_ids"]
        body = tokenizer.decode(ids[: int(max_tokens)])
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": body}])})


def process_results(doc: dict, results: list) -> dict:
    """Per-document sums for lm-eval's weighted perplexities; token counts come from the back end.

    ``--model llmlite`` reports how many tokens it scored; other back ends do not, and their
    token perplexity is NaN (word and byte perplexity do not depend on the tokenizer).
    """
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    nbytes = len(doc["text"].encode("utf-8"))
    tokens = getattr(loglikelihood, "tokens", math.nan)
    return {
        "token_perplexity": (loglikelihood, tokens),
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
