"""PIQA validation from the files beside this one (no hub), scored with calibration metrics."""

import json
import math
from pathlib import Path

import datasets
import numpy as np

from llmlite.evaluation.calibration import brier, choice_probabilities, ece

HERE = Path(__file__).parent


def load_piqa(**_metadata) -> datasets.DatasetDict:
    """The 1,838 validation questions with their labels, as lm-eval's ``piqa`` task reads them."""
    docs = [json.loads(line) for line in (HERE / "valid.jsonl").read_text().splitlines() if line]
    labels = [int(x) for x in (HERE / "valid-labels.lst").read_text().split()]
    if len(docs) != len(labels):
        raise ValueError(f"{HERE}: {len(docs)} questions but {len(labels)} labels; re-copy both files")
    rows = [{**doc, "label": label} for doc, label in zip(docs, labels, strict=True)]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def process_results(doc: dict, results: list) -> dict:
    """lm-eval's ``acc`` and ``acc_norm`` (same formulas), plus calibration of the choice probabilities.

    The probability of each choice is the softmax of the choices' log-likelihoods; ``ece`` (15 bins)
    and the reliability diagram use the top choice's probability and whether it is right, ``brier``
    and ``nll`` the probability given to the right answer.
    """
    lls = [ll for ll, _ in results]
    choices = [doc["sol1"], doc["sol2"]]
    gold = doc["label"]
    lengths = np.array([float(len(c)) for c in choices])
    probs = choice_probabilities(lls)
    pick = int(np.argmax(lls))
    return {
        "acc": float(pick == gold),
        "acc_norm": float(int(np.argmax(np.array(lls) / lengths)) == gold),
        "ece": (probs[pick], float(pick == gold)),
        "brier": brier(probs, gold),
        "nll": -math.log(max(probs[gold], 1e-300)),
    }


def ece_15(items: list) -> float:
    """Aggregate (confidence, correct) pairs into the expected calibration error, 15 bins."""
    confidence, correct = zip(*items, strict=True) if items else ((), ())
    return ece(confidence, correct)
