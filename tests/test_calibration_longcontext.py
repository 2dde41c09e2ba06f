"""Calibration metrics against numpy references; long-context prompts; efficiency counted from shapes."""

import math

import numpy as np
import pytest
import torch
from conftest import TINY, make_tiny

from llmlite.evaluation import longcontext as lc
from llmlite.evaluation.calibration import brier, choice_probabilities, ece, reliability
from llmlite.evaluation.efficiency import LatencySettings, latency, macs_per_token
from llmlite.evaluation.perplexity import next_token_confidence


def _ece_numpy(conf, correct, bins=15):
    conf, correct = np.asarray(conf, float), np.asarray(correct, float)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=False), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return total


def test_ece_equals_numpy_reference_on_random_predictions():
    rng = np.random.default_rng()
    conf = rng.uniform(0, 1, 1000)
    conf[:3] = [0.0, 1.0, 14 / 15]  # edges: both ends and a bin boundary
    correct = (rng.uniform(0, 1, 1000) < conf**2).astype(float)
    assert ece(conf.tolist(), correct.tolist()) == pytest.approx(_ece_numpy(conf, correct), abs=1e-12)


def test_ece_of_perfect_and_of_worst_predictions():
    assert ece([1.0, 1.0], [1, 1]) == 0.0
    assert ece([1.0, 1.0], [0, 0]) == 1.0
    assert math.isnan(ece([], []))
    bins = reliability([0.99, 0.5], [1, 0])
    assert bins[14][2] == 1 and bins[7][2] == 1 and sum(n for *_, n in bins) == 2


def test_choice_probabilities_and_brier_against_numpy():
    lls = np.random.default_rng().normal(-30, 10, 4)
    ref = np.exp(lls - lls.max()) / np.exp(lls - lls.max()).sum()
    probs = choice_probabilities(lls.tolist())
    assert probs == pytest.approx(ref.tolist(), abs=1e-12)
    assert brier(probs, 2) == pytest.approx(float(((ref - np.eye(4)[2]) ** 2).sum()), abs=1e-12)
    assert choice_probabilities([-1e4, 0.0]) == pytest.approx([0.0, 1.0])  # no underflow error


def test_next_token_confidence_equals_float64_reference(tokenizer):
    model = make_tiny(tokenizer, seed=11)
    windows = torch.randint(0, model.config.vocab_size, (2, 33))
    got = next_token_confidence(model, windows, progress=False)
    with torch.no_grad():
        logp = model.double()(windows).logits[:, :-1].log_softmax(-1)
    model.float()
    targets = windows[:, 1:]
    assert got["confidence"] == pytest.approx(logp.max(-1).values.exp().flatten().float(), abs=1e-5)
    assert torch.equal(got["correct"], (logp.argmax(-1) == targets).flatten())
    ref_nll = -logp.gather(-1, targets[..., None])[..., 0].flatten()
    assert got["nll"].double() == pytest.approx(ref_nll, abs=1e-4)


@pytest.mark.parametrize("length", [256, 300])
def test_passkey_prompts_have_the_asked_length_and_depth(tokenizer, length):
    docs = lc.passkey_docs(tokenizer, lengths=[length], depths=[0.0, 0.5, 1.0], samples=2, seed=1)
    assert len(docs) == 6
    for doc in docs:
        n = len(tokenizer(doc["prompt"], add_special_tokens=False)["input_ids"])
        assert length - lc.ANSWER_ROOM - 8 <= n <= length - lc.ANSWER_ROOM + 8
        assert doc["prompt"].count(doc["answer"]) == 2 and doc["prompt"].endswith("The pass key is")
        needle = doc["prompt"].index(" The pass key is")
        needle_len = len(f" The pass key is {doc['answer']}. Remember it. {doc['answer']} is the pass key. ")
        hay_start, hay_end = (
            len(lc.PASSKEY_INTRO),
            len(doc["prompt"]) - len("\n\nWhat is the pass key? The pass key is"),
        )
        where = (needle - hay_start) / (hay_end - needle_len - hay_start)
        assert abs(where - doc["depth"]) < 0.05
    assert len({d["answer"] for d in docs}) > 1


def test_needle_hides_a_number_in_real_text(tokenizer):
    from llmlite.data import load_text

    docs = lc.needle_docs(tokenizer, load_text("wikitext2"), lengths=[512], depths=[0.25], samples=3)
    for doc in docs:
        assert doc["prompt"].count(doc["answer"]) == 1
        assert "special magic number" in doc["prompt"].split(doc["answer"])[0][-80:]


def test_exact_match_reads_the_first_number():
    assert lc.exact_match(" 71432. Remember it.", "71432") == 1.0
    assert lc.exact_match(" 71433", "71432") == 0.0
    assert lc.exact_match("", "71432") == 0.0


def test_position_docs_cover_the_buckets(tokenizer):
    from llmlite.data import load_text

    docs = lc.position_docs(tokenizer, load_text("wikitext2"), window=2048, windows=1)
    assert [d["bucket"] for d in docs] == ["0-512", "512-1024", "1024-2048"]
    assert docs[0]["context"] == "" and docs[1]["tokens"] == 512
    with pytest.raises(ValueError, match="fewer than one window"):
        lc.position_docs(tokenizer, "too short", window=2048)


def test_macs_per_token_counted_by_hand(tokenizer):
    model = make_tiny(tokenizer)
    h, i, layers, heads, kv = (
        TINY[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
        )
    )
    d = h // heads
    per_layer = h * h * 2 + h * kv * d * 2 + 3 * h * i
    head = h * model.config.vocab_size
    got = macs_per_token(model, context=100)
    assert got["linear"] == layers * per_layer + head
    assert got["attention"] == 2 * layers * heads * d * 100


def test_latency_reports_every_batch_without_energy_here(tokenizer):
    model = make_tiny(tokenizer)
    out = latency(model, LatencySettings(prompt_tokens=8, decode_tokens=3, batch_sizes=(1, 2), repeats=2))
    assert [b["batch"] for b in out["batches"]] == [1, 2]
    for b in out["batches"]:
        assert b["prefill"]["p50_ms"] > 0 and b["decode"]["p90_ms"] >= b["decode"]["p50_ms"]
    assert out["threads"] == torch.get_num_threads() and out["dtype"] == "float32"
    assert out["energy"] in ("RAPL", "NVML", "not available")
    with pytest.raises(ValueError, match="batch sizes"):
        latency(model, LatencySettings(batch_sizes=()))
