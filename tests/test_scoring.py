"""Packed, batched scoring equals one float64 forward pass per request, lm-eval's definition."""

import pytest
import torch
from conftest import make_tiny

from llmlite.evaluation.scoring import batches, pack, score


@torch.no_grad()
def _reference(model, requests, max_length):
    """Per request: input (context + continuation)[:-1] cut to the last max_length, float64 model."""
    model = model.double()
    out = []
    for context, continuation in requests:
        whole = [*context, *continuation][-(max_length + 1) :]
        logits = model(torch.tensor([whole[:-1]])).logits[0, -len(continuation) :]
        logprobs = logits.log_softmax(-1)
        target = torch.tensor(continuation)
        out.append(
            (float(logprobs[range(len(target)), target].sum()), bool((logits.argmax(-1) == target).all()))
        )
    model.float()
    return out


def _requests(gen, vocab, n_contexts, choices, ctx_len, cont_len):
    def draw(hi):
        return torch.randint(0, vocab, (int(torch.randint(1, hi + 1, (), generator=gen)),), generator=gen)

    reqs = []
    for _ in range(n_contexts):
        context = draw(ctx_len).tolist()
        reqs += [(context, draw(cont_len).tolist()) for _ in range(choices)]
    return reqs


@pytest.mark.parametrize("batch_tokens", [1, 64, 4096])
def test_packed_scores_equal_float64_reference(tokenizer, batch_tokens):
    model = make_tiny(tokenizer, seed=3)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    reqs = _requests(gen, model.config.vocab_size, n_contexts=5, choices=3, ctx_len=12, cont_len=6)
    reqs += [([7], [9])]  # one-token context and continuation
    ours = score(model, reqs, max_length=64, batch_tokens=batch_tokens)
    ref = _reference(model, reqs, max_length=64)
    for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, ref, strict=True):
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_truncated_requests_score_like_lm_eval(tokenizer):
    model = make_tiny(tokenizer, seed=4)
    gen = torch.Generator().manual_seed(5)
    reqs = _requests(gen, model.config.vocab_size, n_contexts=3, choices=2, ctx_len=40, cont_len=10)
    ours = score(model, reqs, max_length=16)
    ref = _reference(model, reqs, max_length=16)
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in ref], abs=1e-4)


def test_greedy_flag_is_true_for_the_models_own_argmax(tokenizer):
    model = make_tiny(tokenizer, seed=6)
    context = [1, 2, 3]
    with torch.no_grad():
        best = int(model(torch.tensor([context])).logits[0, -1].argmax())
    (_, greedy), (_, other) = score(model, [(context, [best]), (context, [(best + 1) % 100])], 32)
    assert greedy and not other


def test_shared_context_is_packed_once_and_batches_respect_the_budget():
    reqs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6]), ([9], [8, 7, 6])]
    rows = pack(reqs, max_length=32)
    assert len(rows) == 2
    shared = next(r for r in rows if len(r.targets) == 2)
    assert shared.tokens == [1, 2, 3, 4]  # context, then branch 0 without its last token; branch 1 is empty
    assert shared.positions == [0, 1, 2, 3]
    assert [t[1] for t in shared.targets] == [[2, 3], [2]]
    assert [len(b) for b in batches(rows, batch_tokens=4)] == [1, 1]
    assert [len(b) for b in batches(rows, batch_tokens=8)] == [2]


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="empty continuation"):
        pack([([1], [])], max_length=8)
    with pytest.raises(ValueError, match="exceeds max_length"):
        pack([([1], list(range(9)))], max_length=8)
    with pytest.raises(ValueError, match="empty context"):
        pack([([], [1])], max_length=8)


@pytest.mark.parametrize("shape", [(5, 49152), (1, 1), (2, 3, 1000)])
def test_in_place_logsumexp_is_torchs_bit_for_bit(shape):
    from llmlite.ops import logsumexp_

    logits = torch.randn(*shape) * 10
    expected = logits.logsumexp(-1)
    got = logsumexp_(logits.clone())
    assert torch.equal(got, expected)
    assert (got.double() - logits.double().logsumexp(-1)).abs().max() < 1e-5
    assert torch.equal(logsumexp_(torch.full((2, 4), float("-inf"))), torch.full((2,), float("-inf")))
