"""Log-likelihoods of continuations, computed the way lm-eval's ``hf`` back end defines them, faster.

lm-eval runs one forward pass per (context, continuation) request, and projects every position onto
the vocabulary. Here the requests that share a context are packed into one row: the context once,
then each continuation in its own branch that sees the context and itself but not its siblings (a
tree attention mask, with each branch's positions restarting after the context). Rows are batched by
length under a token budget, and only the positions that predict a continuation token go through the
output head. The numbers are the same sums of the same log-probabilities; only float rounding differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmlite.ops import logsumexp_

Request = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)
_HEAD_CHUNK = 512


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branch: list[int] = field(default_factory=list)  # -1: shared context; b: the b-th continuation
    # (request index, indices of the predicting tokens in this row, target tokens)
    targets: list[tuple[int, list[int], list[int]]] = field(default_factory=list)


def _truncate(context: Sequence[int], continuation: Sequence[int], max_length: int) -> list[int]:
    """The context lm-eval keeps: input (context + continuation)[:-1] cut to the last ``max_length``."""
    if not continuation:
        raise ValueError("empty continuation: there is nothing to score")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length {max_length}")
    whole = [*context, *continuation][-(max_length + 1) :]
    return whole[: len(whole) - len(continuation)]


def pack(requests: Sequence[Request], max_length: int, row_tokens: int | None = None) -> list[_Row]:
    """Group ``requests`` by their (truncated) context into rows of at most ``row_tokens`` tokens."""
    row_tokens = row_tokens or 2 * max_length
    groups: dict[tuple[int, ...], list[int]] = {}
    contexts = []
    for i, (context, continuation) in enumerate(requests):
        ctx = tuple(_truncate(context, continuation, max_length))
        if not ctx:
            raise ValueError("empty context: give at least one token (lm-eval uses the EOT token)")
        contexts.append(ctx)
        groups.setdefault(ctx, []).append(i)
    rows = []
    for ctx, members in groups.items():
        row = None
        for i in members:
            cont = list(requests[i][1])
            if row is None or len(row.tokens) + len(cont) - 1 > row_tokens:
                row = _Row(list(ctx), list(range(len(ctx))), [-1] * len(ctx))
                rows.append(row)
            b = len(row.targets)
            start = len(row.tokens)
            row.tokens += cont[:-1]
            row.positions += range(len(ctx), len(ctx) + len(cont) - 1)
            row.branch += [b] * (len(cont) - 1)
            row.targets.append((i, [len(ctx) - 1, *range(start, start + len(cont) - 1)], cont))
    return rows


def tree_mask(rows: Sequence[_Row], length: int, dtype: torch.dtype) -> Tensor:
    """Additive attention mask ``[b, 1, length, length]``: causal, and branches blind to each other."""
    allowed = torch.zeros(len(rows), length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for r, row in enumerate(rows):
        n = len(row.tokens)
        branch = torch.tensor(row.branch)
        same = (branch[:, None] == branch[None, :]) | (branch[None, :] == -1)
        allowed[r, :n, :n] = same & causal[:n, :n]
        allowed[r, n:, n:] = torch.eye(length - n, dtype=torch.bool)  # padding sees itself only
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def batches(rows: Sequence[_Row], batch_tokens: int, max_rows: int | None = None) -> list[list[_Row]]:
    """Rows sorted longest first, cut into batches whose padded size stays within ``batch_tokens``."""
    out: list[list[_Row]] = []
    for row in sorted(rows, key=lambda r: -len(r.tokens)):
        current = out[-1] if out else None
        width = len(current[0].tokens) if current else 0  # longest first: the first row sets the width
        if current and (len(current) + 1) * width <= batch_tokens and len(current) < (max_rows or 1 << 30):
            current.append(row)
        else:
            out.append([row])
    return out


@torch.no_grad()
def score_batch(model: nn.Module, rows: Sequence[_Row]) -> list[tuple[int, float, bool]]:
    """(request index, summed log-probability, whether every target is the argmax) per request."""
    device = next(model.parameters()).device
    length = max(len(r.tokens) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    pos = torch.zeros(len(rows), length, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row.tokens)] = torch.tensor(row.tokens)
        pos[r, : len(row.tokens)] = torch.tensor(row.positions)
    packed = any(len(row.targets) > 1 for row in rows)
    kwargs: dict = {"position_ids": pos.to(device)}
    if packed:
        kwargs["attention_mask"] = tree_mask(rows, length, model.dtype).to(device)
    elif len(rows) > 1:  # plain right padding: the model builds its causal mask from this
        lengths = torch.tensor([len(r.tokens) for r in rows])
        kwargs["attention_mask"] = (torch.arange(length)[None] < lengths[:, None]).long().to(device)
    flat_rows = torch.tensor([r for r, row in enumerate(rows) for _, idx, _ in row.targets for _ in idx])
    flat_cols = torch.tensor([c for row in rows for _, idx, _ in row.targets for c in idx])
    targets = torch.tensor([t for row in rows for _, _, cont in row.targets for t in cont])
    logprob, greedy = _target_logprobs(model, ids.to(device), kwargs, flat_rows, flat_cols, targets)
    out, k = [], 0
    for row in rows:
        for i, _, cont in row.targets:
            n = len(cont)
            out.append((i, float(logprob[k : k + n].sum()), bool(greedy[k : k + n].all())))
            k += n
    return out


def _target_logprobs(
    model, ids, kwargs, rows: Tensor, cols: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor]:
    """log p(target) (float64) and argmax == target at the given (row, col) positions."""
    head = model.get_output_embeddings()
    body = getattr(model, "base_model", None)
    direct = head is None or body is None or body is model
    direct = direct or getattr(model.config, "final_logit_softcapping", None) or hasattr(model, "logit_scale")
    if direct:
        hidden = model(ids, **kwargs).logits[rows, cols]
        project = nn.Identity()
    else:
        hidden = body(ids, **kwargs).last_hidden_state[rows, cols]
        project = head
    logprob = torch.empty(len(targets), dtype=torch.float64)
    greedy = torch.empty(len(targets), dtype=torch.bool)
    targets = targets.to(hidden.device)
    for s in range(0, len(targets), _HEAD_CHUNK):
        logits = project(hidden[s : s + _HEAD_CHUNK]).float()  # ours to overwrite
        t = targets[s : s + _HEAD_CHUNK]
        picked = logits.gather(1, t[:, None])[:, 0]
        top, arg = logits.max(1)  # the first maximum, as argmax
        greedy[s : s + len(t)] = (arg == t).cpu()
        logprob[s : s + len(t)] = (picked - logsumexp_(logits, top)).double().cpu()
    return logprob, greedy


def score(
    model: nn.Module,
    requests: Sequence[Request],
    max_length: int,
    batch_tokens: int = 512,
    max_rows: int | None = None,
    progress=None,
) -> list[tuple[float, bool]]:
    """lm-eval's ``(log-likelihood, is_greedy)`` for each (context, continuation) token request."""
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for batch in batches(pack(requests, max_length), batch_tokens, max_rows):
        for i, logprob, greedy in score_batch(model, batch):
            results[i] = (logprob, greedy)
        if progress is not None:
            progress.update(sum(len(r.targets) for r in batch))
    return results  # type: ignore[return-value]


class Scored(float):
    """A summed log-likelihood that also carries the number of tokens it scored."""

    tokens: int

    def __new__(cls, value: float, tokens: int) -> Scored:
        obj = super().__new__(cls, value)
        obj.tokens = tokens
        return obj


def rolling_windows(
    tokens: Sequence[int], max_length: int, protocol: str, prefix: int, max_windows: int | None = None
) -> list[Request]:
    """The (context, continuation) requests that score a long text.

    ``lm-eval``: every token, the first predicted from ``prefix`` (lm-eval's rolling windows).
    ``papers``: non-overlapping windows of ``max_length``, each token after a window's first one (the
    GPTQ/AWQ protocol of ``llmlite eval``); the tail shorter than a window is dropped.
    """
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    if protocol == "papers":
        n = len(tokens) // max_length
        starts = range(0, n * max_length, max_length)
        windows = [(tokens[s : s + 1], tokens[s + 1 : s + max_length]) for s in starts]
    elif protocol == "lm-eval":
        rolling = get_rolling_token_windows(list(tokens), prefix, max_length, context_len=1)
        windows = [make_disjoint_window(w) for w in rolling]
    else:
        raise ValueError(f"unknown rolling protocol {protocol!r}: use 'lm-eval' or 'papers'")
    return [(list(c), list(t)) for c, t in windows[:max_windows]]
