"""Calibration windows from texts, from the model itself, and mixes of both (``llmlite.calibration``)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, make_tiny
from transformers import LlamaConfig, LlamaForCausalLM

from llmlite.calibration import (
    SELF,
    cached_generated,
    calibration_set,
    document_start,
    fingerprint,
    generated_windows,
)
from llmlite.data import calibration_windows, load_text, tokenize
from llmlite.errors import LlmliteError


def small_vocab(seed: int, vocab: int = 7) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, **{**TINY, "tie_word_embeddings": False})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model


def test_first_token_follows_the_models_distribution():
    """4,000 draws of the token after ``start`` against the model's softmax, within 4.5 σ each."""
    model = small_vocab(seed=int(torch.randint(0, 10_000, ())))
    probs = torch.softmax(model(torch.tensor([[3]])).logits[0, -1].double(), dim=-1)
    draws = generated_windows(model, 3, 4000, 2, seed=1, progress=False)
    assert (draws[:, 0] == 3).all()
    counts = torch.bincount(draws[:, 1], minlength=probs.numel()).double()
    sigma = (4000 * probs * (1 - probs)).sqrt()
    assert ((counts - 4000 * probs).abs() <= 4.5 * sigma + 1).all(), (counts / 4000, probs)


def test_the_cache_path_samples_what_full_recomputation_samples():
    """Each step's distribution from the KV cache equals a forward over the whole prefix: the same
    seeded draws give the same tokens."""
    model = small_vocab(seed=2, vocab=50)
    got = generated_windows(model, 0, 3, 9, seed=5, progress=False)
    generator = torch.Generator().manual_seed(5)
    want = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(8):
            logits = model(want).logits[:, -1].double()
            want = torch.cat(
                [want, torch.multinomial(torch.softmax(logits, -1).float(), 1, generator=generator)], 1
            )
    assert torch.equal(got, want)


def test_batches_and_seeds():
    model = small_vocab(seed=3, vocab=50)
    a = generated_windows(model, 1, 40, 5, seed=0, progress=False)  # two batches: 32 + 8
    assert a.shape == (40, 5) and a.dtype == torch.long and (a[:, 0] == 1).all()
    assert torch.equal(a, generated_windows(model, 1, 40, 5, seed=0, progress=False))
    assert not torch.equal(a, generated_windows(model, 1, 40, 5, seed=1, progress=False))
    assert generated_windows(model, 1, 1, 1, progress=False).tolist() == [[1]]  # one token: the start


def test_cache_reads_back_and_fingerprints_tell_models_apart(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLITE_CACHE", str(tmp_path))
    model = small_vocab(seed=4, vocab=50)
    first = cached_generated(model, 0, 5, 6, 0, progress=False)
    files = list((tmp_path / "calibration").glob("*.pt"))
    assert len(files) == 1
    torch.save(torch.zeros(5, 6, dtype=torch.long), files[0])  # proves the second call reads the file
    assert cached_generated(model, 0, 5, 6, 0, progress=False).sum() == 0
    assert first.shape == (5, 6)
    before = fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0
    assert fingerprint(model) != before and fingerprint(small_vocab(seed=4, vocab=50)) == before


def test_a_mix_splits_the_samples_and_interleaves_them(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLITE_CACHE", str(tmp_path))
    model = make_tiny(tokenizer)
    mix = calibration_set(f"wikitext2-valid+{SELF}", model, tokenizer, 5, 16, seed=0, progress=False)
    text = calibration_windows(tokenize(tokenizer, load_text("wikitext2-valid")), 3, 16, 0)
    own = generated_windows(model, document_start(tokenizer), 2, 16, 0, progress=False)
    assert torch.equal(mix, torch.stack([text[0], own[0], text[1], own[1], text[2]]))
    only = calibration_set("wikitext2-valid", model, tokenizer, 3, 16, seed=0, progress=False)
    assert torch.equal(only, text)  # one source: exactly what quantize sampled before mixes existed


def test_document_start(tokenizer):
    assert tokenizer.convert_ids_to_tokens(document_start(tokenizer)) == "<|endoftext|>"  # SmolLM2's


@pytest.mark.parametrize("spec", ["wikitext2-valid+", "+self", "self+self"])
def test_bad_mixes_are_refused(tokenizer, spec):
    with pytest.raises(LlmliteError, match="name each source once"):
        calibration_set(spec, None, tokenizer, 8, 16)


def test_fewer_samples_than_sources_is_refused(tokenizer):
    with pytest.raises(LlmliteError, match="fewer than the 2 calibration sources"):
        calibration_set("wikitext2-valid+self", None, tokenizer, 1, 16)
