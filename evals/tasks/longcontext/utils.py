"""Long-context tasks: passkey retrieval, needle in a haystack, perplexity by position.

The prompts are built for the evaluated model's tokenizer (lm-eval passes the model arguments,
``pretrained`` among them, as task metadata; ``tokenizer`` overrides it; the bundled model's is the
default), so that a "4096-token" prompt is 4,096 tokens for that model. ``--metadata`` options:
``lengths`` (default [1024, 2048, 4096, 8192]), ``depths`` (default [0, 0.25, 0.5, 0.75, 1]),
``samples`` per (length, depth) (default 1), ``seed``, ``text`` (the haystack / long text, default
WikiText-2 raw test) and, for perplexity by position, ``windows`` (default 2).
"""

import datasets

from llmlite.data import load_text
from llmlite.evaluation import longcontext as lc
from llmlite.models import load_tokenizer


def _tokenizer(metadata: dict):
    source = metadata.get("tokenizer") or metadata.get("pretrained")
    return load_tokenizer(source if isinstance(source, str) else "smollm2-135m")


def _probe_options(metadata: dict) -> dict:
    return {
        "lengths": [int(n) for n in metadata.get("lengths", lc.LENGTHS)],
        "depths": [float(d) for d in metadata.get("depths", lc.DEPTHS)],
        "samples": int(metadata.get("samples", 1)),
        "seed": int(metadata.get("seed", 0)),
    }


def load_passkey(**metadata) -> datasets.DatasetDict:
    docs = lc.passkey_docs(_tokenizer(metadata), **_probe_options(metadata))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_needle(**metadata) -> datasets.DatasetDict:
    haystack = load_text(metadata.get("text", "wikitext2"))
    docs = lc.needle_docs(_tokenizer(metadata), haystack, **_probe_options(metadata))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def load_positions(**metadata) -> datasets.DatasetDict:
    text = load_text(metadata.get("text", "wikitext2"))
    docs = lc.position_docs(_tokenizer(metadata), text, windows=int(metadata.get("windows", 2)))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def score_retrieval(doc: dict, results: list) -> dict:
    """Exact match overall and at the doc's length (``em_1024`` … ``em_8192``)."""
    hit = lc.exact_match(results[0], doc["answer"])
    out = {"exact_match": hit}
    if doc["length"] in lc.LENGTHS:
        out[f"em_{doc['length']}"] = hit
    return out


def score_position(doc: dict, results: list) -> dict:
    """The bucket's log-likelihood and token count, for its weighted perplexity ``ppl_LO_HI``."""
    (loglikelihood, _) = results[0]
    return {f"ppl_{doc['bucket'].replace('-', '_')}": (loglikelihood, doc["tokens"])}
