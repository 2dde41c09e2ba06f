"""Pruning and quantization in one pass (``llmlite prune --bits``): GPTQ under a sparsity mask
against the float64 reference of the joint procedure (``reference.gptq(..., keep=)``), exact zeros
in the dequantized weights and in the saved checkpoint read back, N:M after quantization, and the
options' refusals. The tiny random Llama only (``conftest.make_tiny``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import reference as ref
import torch
from conftest import make_tiny

from llmlite.errors import LlmliteError
from llmlite.pruning import PruneConfig, PruneSettings, prune_model, pruned_count, sparsegpt, wanda
from llmlite.quant.gptq import gptq
from llmlite.quant.grid import fake_quantize
from llmlite.quant.linear import QuantLinear


def _data(seed: int, rows: int, cols: int, tokens: int = 400):
    """A weight and the Hessian of correlated inputs with columns of different scales (float64)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, cols, generator=g, dtype=torch.float64
    )
    x += 0.5 * torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    x *= torch.exp(0.5 * torch.randn(cols, generator=g, dtype=torch.float64))
    return w, x, 2 * x.T @ x / tokens


def _random_mask(seed: int, shape, kept: float = 0.5) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < kept


# --- the core: GPTQ under a mask -----------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(
    "rows,cols,group_size,act_order",
    [(12, 200, 64, False), (12, 200, 64, True), (12, 200, -1, False), (1, 90, 32, False), (1, 90, 128, True)],
)
def test_gptq_under_a_mask_matches_the_joint_reference(bits, sym, rows, cols, group_size, act_order):
    """Edge shapes: 200 and 90 in-features leave a short last group; one row; a dead input."""
    w, _, h = _data(bits + cols + rows, rows, cols)
    h[:, 7] = h[7, :] = 0  # a dead input column
    keep = _random_mask(bits, (rows, cols))
    got = gptq(w, h, bits, group_size, sym, act_order, damp=0.01, block_size=64, keep=keep)
    codes, scales, zeros = ref.gptq(w.numpy(), h.numpy(), bits, group_size, sym, act_order, keep=keep.numpy())
    np.testing.assert_array_equal(got.weight.codes.double().numpy(), codes)
    g = got.weight.g_idx.long()
    np.testing.assert_array_equal(got.weight.scale[:, g].double().numpy(), scales)
    np.testing.assert_array_equal(got.weight.zero[:, g].double().numpy(), zeros)
    deq = got.weight.dequantize(torch.float64)
    assert (deq[~keep] == 0).all()  # every pruned weight exactly 0: its code is the zero-point
    codes = got.weight.codes.long()
    zero = got.weight.zero.long()[:, g]
    assert torch.equal(codes[~keep], zero[~keep])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):  # and so in any storage
        assert (got.weight.dequantize(dtype)[~keep] == 0).all()


@pytest.mark.parametrize("group_size,act_order", [(64, False), (32, True), (-1, False)])
def test_a_mask_of_all_kept_is_plain_gptq_bit_for_bit(group_size, act_order):
    w, _, h = _data(3, 16, 160)
    w, h = w.float(), h.float()
    plain = gptq(w, h, 4, group_size, False, act_order, refit=True)
    masked = gptq(
        w, h, 4, group_size, False, act_order, refit=True, keep=torch.ones(16, 160, dtype=torch.bool)
    )
    assert torch.equal(plain.weight.codes, masked.weight.codes)
    assert torch.equal(plain.weight.scale, masked.weight.scale)
    assert torch.equal(plain.weight.zero, masked.weight.zero)
    assert plain.loss == masked.loss
    with pytest.raises(ValueError, match="keep has shape"):
        gptq(w, h, 4, keep=torch.ones(16, 159, dtype=torch.bool))


@pytest.mark.parametrize("sym", [True, False])
def test_the_refit_keeps_pruned_weights_at_zero(sym):
    """The refit changes scales, never codes: (z − z)·s stays 0 whatever s becomes."""
    w, _, h = _data(4, 16, 128)
    keep = _random_mask(4, (16, 128), 0.4)
    out = gptq(w.float(), h.float(), 4, 32, sym, True, refit=True, keep=keep)
    assert (out.weight.dequantize()[~keep] == 0).all()


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_the_pruned_weights_error_is_spread_and_two_passes_beat_one(seed):
    """GPTQ under the mask on the unpruned weight is SparseGPT's joint prune + quantize: far less
    output error than zeroing the pruned weights and rounding the rest to nearest. SparseGPT's float
    update first, then GPTQ under the same mask (what ``prune --bits`` runs) makes the same updates
    in exact arithmetic (the pruned weights' errors sum to the same), but each group's grid is set
    from kept weights already moved by the update of the whole group: less error again."""
    w, x, h = _data(seed, 32, 128, tokens=1024)
    keep = _random_mask(seed, (32, 128))

    def error(w_hat):
        return float(((w_hat - w) @ x.T).norm())

    joint = gptq(w, h, 4, 32, True, False, keep=keep).weight.dequantize(torch.float64)
    rtn = fake_quantize(w * keep, 4, 32, True)
    assert error(joint) < 0.7 * error(rtn)
    pruned = sparsegpt(w, h, keep=keep).weight
    two_pass = gptq(pruned, h, 4, 32, True, False, keep=keep).weight.dequantize(torch.float64)
    assert error(two_pass) < error(joint)
    assert error(pruned) < error(two_pass) < 1.1 * error(pruned)  # 4-bit adds little to the pruning


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_n_of_m_then_4_bit_keeps_at_most_n_non_zeros_and_every_pruned_zero(pattern, method):
    """The masks keep exactly N of every M; after quantization every pruned weight is 0 and a kept
    one may round to 0 too, so a group holds at most N non-zeros (and most hold exactly N)."""
    n, m = pattern
    w, x, h = _data(8, 24, 192)
    if method == "sparsegpt":
        result = sparsegpt(w, h, pattern=pattern)
        pruned, keep = result.weight, result.keep
    else:
        pruned = wanda(w, x.norm(dim=0), pattern=pattern)
        keep = pruned != 0
    assert (keep.reshape(24, -1, m).sum(-1) == n).all()
    q = gptq(pruned, h, 4, 64, True, True, keep=keep).weight.dequantize(torch.float64)
    assert (q[~keep] == 0).all()
    non_zero = (q != 0).reshape(24, -1, m).sum(-1)
    assert (non_zero <= n).all() and float((non_zero == n).float().mean()) > 0.95


# --- the walk on a tiny Llama ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,sparsity,pattern,sym",
    [("sparsegpt", 0.5, None, True), ("wanda", None, (2, 4), False), ("magnitude", 0.3, None, True)],
)
def test_prune_model_with_bits_quantizes_every_decoder_linear(tokenizer, method, sparsity, pattern, sym):
    model = make_tiny(tokenizer)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    calibration = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    walk = {"true_sequential": method == "wanda"}
    settings = PruneSettings(method, sparsity or 0.5, pattern, bits=4, group_size=64, sym=sym, **walk)
    report = prune_model(model, settings, calibration, progress=False)
    # magnitude too: GPTQ needs the Hessian
    assert report.path == ("llama-staged" if walk["true_sequential"] else "one-pass")
    assert len(report.modules) == 14
    for record in report.modules:
        module = model.model.get_submodule(record.name)
        assert isinstance(module, QuantLinear) and module.bits == 4
        weight = module.dequantize()
        if pattern:
            n, m = pattern
            assert ((weight != 0).reshape(weight.shape[0], -1, m).sum(-1) <= n).all()
            assert record.pruned == 0.5
        else:  # the masks' exact counts, per linear (Wanda would round per row)
            numel = weight.numel()
            assert record.pruned == pytest.approx(pruned_count(numel, settings.sparsity) / numel, abs=1e-6)
        zeros = float((weight == 0).float().mean())
        assert record.sparsity == zeros >= record.pruned  # a kept weight may quantize to zero
        assert record.output_error is not None and record.output_error < 1
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert report.to_dict()["pruned"] == pytest.approx(settings.target, abs=1e-3)


# --- the checkpoint ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"method": "wanda", "pattern": "2:4", "bits": 4},
        {"method": "sparsegpt", "sparsity": 0.5, "bits": 4, "group_size": 32, "sym": False},
        {"method": "magnitude", "sparsity": 0.5, "bits": 4, "sym": False, "format": "awq"},
        {"method": "sparsegpt", "pattern": "2:4", "bits": 8, "format": "compressed-tensors"},
    ],
)
def test_the_checkpoint_holds_exact_zeros_read_back_by_llmlite(tiny_dir, tmp_path, options):
    import llmlite
    from llmlite.models import load_model

    out = tmp_path / "pq"
    result = llmlite.prune(
        model=str(tiny_dir), samples=4, seqlen=32, output=str(out), progress=False, **options
    )
    record = json.loads((out / "llmlite.json").read_text())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == options.get("format", "gptq")  # each layout's own name
    assert qc["meta"]["pruning"]["method"] == options["method"]
    loaded, _ = load_model(str(out))
    for entry in record["report"]["modules"]:
        ours = result.model.model.get_submodule(entry["name"]).dequantize()
        back = loaded.model.get_submodule(entry["name"])
        assert isinstance(back, QuantLinear)
        back = back.dequantize()
        assert torch.equal(back == 0, ours == 0)  # every zero, pruned or rounded, read back as 0
        assert torch.equal(back, ours)
        assert float((back == 0).float().mean()) == entry["sparsity"] >= entry["pruned"]
        if "pattern" in options:
            assert ((back != 0).reshape(back.shape[0], -1, 4).sum(-1) <= 2).all()
            assert entry["pruned"] == 0.5
        else:
            assert entry["pruned"] == pytest.approx(0.5, abs=0.5 / back.shape[1])
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]])).logits).all()


# --- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,message",
    [
        ({"group_size": 64}, "--group-size sets how the kept weights are quantized; add --bits"),
        ({"sym": False}, "--asym sets how the kept weights"),
        ({"act_order": False}, "--no-act-order sets"),
        ({"format": "awq"}, "--format sets"),
        ({"bits": 5}, "5-bit weights are not supported"),
        ({"bits": 3, "format": "awq"}, "--format awq holds 4-bit weights, not 3-bit"),
        ({"bits": 2, "format": "compressed-tensors"}, "--format compressed-tensors holds 4 or 8-bit"),
        ({"bits": 4, "format": "gguf"}, "--format gguf cannot hold a pruned asymmetric group exactly"),
        ({"bits": 4, "group_size": 0}, "group size 0 is invalid"),
    ],
)
def test_quantization_refusals(options, message):
    with pytest.raises(LlmliteError, match=message):
        PruneConfig(**options).validate()


def test_settings_and_quantization_config():
    settings = PruneConfig(method="wanda", pattern="2:4", bits=4, sym=False).validate().settings()
    assert (settings.bits, settings.group_size, settings.sym, settings.act_order) == (4, 128, False, True)
    assert PruneConfig().validate().settings().bits is None
    qc = PruneConfig(pattern="2:4", bits=4).validate().quantization_config()
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"]) == ("gptq", 4, 128, True)
    assert qc["meta"]["pruning"] == {"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}


def test_prune_reads_calibration_through_the_shared_source(tiny_dir, tmp_path, monkeypatch):
    """``calibration_set`` as quantize uses it (mixes joined by '+'); each source an input the
    output must not replace."""
    import llmlite
    import llmlite.pruning.api as api

    seen = []

    def spy(spec, model, tokenizer, samples, seqlen, seed, progress):
        seen.append((spec, samples, seqlen, seed))
        return real(spec, model, tokenizer, samples, seqlen, seed, progress)

    real = api.calibration_set
    monkeypatch.setattr(api, "calibration_set", spy)
    text = "The quick brown fox jumps over the lazy dog. " * 200
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "b.txt").write_text(text.upper())
    spec = f"{tmp_path / 'a.txt'}+{tmp_path / 'texts' / 'b.txt'}"
    llmlite.prune(model=str(tiny_dir), method="wanda", calibration=spec, samples=3, seqlen=16, progress=False)
    assert seen == [(spec, 3, 16, 0)]
    with pytest.raises(LlmliteError, match="contains --calibration"):
        llmlite.prune(
            model=str(tiny_dir),
            method="wanda",
            calibration=spec,
            output=str(tmp_path / "texts"),
            overwrite=True,
        )
    assert (tmp_path / "texts" / "b.txt").exists()
