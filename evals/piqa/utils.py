"""PIQA validation from the files beside this one (no hub)."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def load_piqa(**_metadata) -> datasets.DatasetDict:
    """The 1,838 validation questions with their labels, as lm-eval's ``piqa`` task reads them."""
    docs = [json.loads(line) for line in (HERE / "valid.jsonl").read_text().splitlines() if line]
    labels = [int(x) for x in (HERE / "valid-labels.lst").read_text().split()]
    if len(docs) != len(labels):
        raise ValueError(f"{HERE}: {len(docs)} questions but {len(labels)} labels; re-copy both files")
    rows = [{**doc, "label": label} for doc, label in zip(docs, labels, strict=True)]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
