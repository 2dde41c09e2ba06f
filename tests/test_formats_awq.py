"""AWQ GEMM (issue 25, item 2): the codec against hand-packed words and AutoAWQ's own packing loop
(reimplemented below), round trips over edge shapes, regrouping of short last groups, refusals, and
``export`` / ``quantize --format awq`` folders that load back bit-exactly (and in transformers +
GPTQModel where GPTQModel is installed)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import llmlite
from llmlite.cli import main
from llmlite.errors import LlmliteError
from llmlite.models import load_model
from llmlite.quant.formats import AWQ, AWQ_ORDER, awq_refusal, pack_awq, regroup, unpack_awq
from llmlite.quant.grid import QuantizedWeight, group_index
from llmlite.quant.layouts import common_group_size
from llmlite.quant.rtn import rtn


def autoawq_pack(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ's ``WQLinear_GEMM.from_linear`` packing loop: ``intweight`` ``[in, out]`` →
    uint32 ``[in, out/8]``, word ``col`` holding column ``col·8 + order_map[i]`` at bits ``4i``."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]].astype(np.uint32) << np.uint32(i * 4)
    return qweight


def random_weight(out: int, cols: int, group: int, bits: int = 4, zero_low: int = 0) -> QuantizedWeight:
    g_idx = group_index(cols, group)
    groups = int(g_idx.max()) + 1
    return QuantizedWeight(
        codes=torch.randint(0, 2**bits, (out, cols), dtype=torch.uint8),
        scale=(torch.rand(out, groups) + 0.01).half().float(),
        zero=torch.randint(zero_low, 2**bits, (out, groups), dtype=torch.uint8),
        g_idx=g_idx,
        bits=bits,
    )


def test_hand_packed_word():
    """Columns 0..7 hold 1..8; nibble j holds column AWQ_ORDER[j]: 1, 3, 5, 7, 2, 4, 6, 8."""
    word = pack_awq(torch.arange(1, 9).view(1, 8))
    assert word.shape == (1, 1) and word.numpy().view(np.uint32)[0, 0] == 0x86427531
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    two = pack_awq(torch.tensor([[15, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0]]))
    assert two.numpy().view(np.uint32).tolist() == [[0x0000000F, 0x00090000]]  # column 9: nibble 4


@pytest.mark.parametrize("n,m", [(1, 8), (3, 16), (64, 40), (7, 200)])
def test_pack_matches_autoawq_and_round_trips(n, m):
    values = torch.randint(0, 16, (n, m), dtype=torch.uint8)
    words = pack_awq(values)
    assert words.dtype == torch.int32 and words.shape == (n, m // 8)
    assert np.array_equal(words.numpy().view(np.uint32), autoawq_pack(values.numpy()))
    assert torch.equal(unpack_awq(words), values)


@pytest.mark.parametrize(
    "out,cols,group", [(8, 128, 128), (24, 96, 32), (16, 200, 8), (40, 72, -1), (8, 1, -1), (200, 64, 16)]
)
def test_codec_round_trips_every_edge_shape(out, cols, group):
    """One group, per-channel, a single column, out at the minimum of 8, zero-points 0..15."""
    weight, bias = random_weight(out, cols, group), torch.randn(out).half()
    assert awq_refusal(weight) is None
    tensors = AWQ.write(weight, bias)
    groups = weight.scale.shape[1]
    assert tensors["qweight"].shape == (cols, out // 8) and tensors["qzeros"].shape == (groups, out // 8)
    assert tensors["scales"].dtype == torch.float16 and tensors["scales"].shape == (groups, out)
    back = AWQ.read(tensors, 4)
    for name in ("codes", "scale", "zero", "g_idx"):
        assert torch.equal(getattr(back, name).long(), getattr(weight, name).long()), name
    layout = AWQ.layout(cols, out, 4, group, bias=True)
    assert {k: (v.shape, v.dtype) for k, v in layout.items()} == {
        k: (v.shape, v.dtype) for k, v in tensors.items()
    }


def test_zero_points_are_stored_as_they_are():
    weight = rtn(torch.randn(16, 64), 4, 32, sym=True)  # symmetric: every zero 8, stored 8 (not 7)
    assert torch.all(unpack_awq(AWQ.write(weight, None)["qzeros"]) == 8)


@pytest.mark.parametrize(
    "weight,why",
    [
        (random_weight(16, 64, 32, bits=3), "4-bit weights; this one is 3-bit"),
        (random_weight(12, 64, 32), "output channels by 8; this weight has 12"),
        (random_weight(16, 72, 32), "no g_idx"),  # a short last group
        (random_weight(8, 64, 32), None),
    ],
)
def test_what_awq_gemm_refuses(weight, why):
    got = awq_refusal(weight)
    assert got is None if why is None else why in got


def test_act_order_g_idx_and_v1_wrapped_zeros_are_refused():
    weight = random_weight(8, 64, 32)
    weight.g_idx = weight.g_idx[torch.randperm(64)]
    assert "no g_idx" in awq_refusal(weight)
    weight = random_weight(8, 64, 32)
    weight.zero[0, 0] = 16  # a GPTQ v1 file's stored 15 read back
    assert "zero-point of 16" in awq_refusal(weight)


def test_regroup_carries_a_short_last_group_exactly():
    """576 columns at group 128 (4.5 groups) are nine groups of 64 with the same numbers."""
    weight = rtn(torch.randn(16, 576), 4, 128, sym=False)
    assert common_group_size([weight, rtn(torch.randn(8, 1536), 4, 128, sym=False)]) == 64
    assert common_group_size([rtn(torch.randn(8, 96), 4, -1, True)] * 2) == -1
    regrouped = regroup(weight, 64)
    assert regrouped.scale.shape == (16, 9) and awq_refusal(regrouped) is None
    assert torch.equal(regrouped.dequantize(), weight.dequantize())
    assert torch.equal(AWQ.read(AWQ.write(regrouped, None), 4).dequantize(), weight.dequantize())
    with pytest.raises(ValueError, match="straddle"):
        regroup(weight, 96)  # columns 96..191 span groups 0 and 1


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_dir):
    """The tiny model quantized once (RTN 4-bit g32 asymmetric) and as a 3-bit checkpoint."""
    root = tmp_path_factory.mktemp("awq")
    options = dict(model=str(tiny_dir), method="rtn", group_size=32, sym=False, progress=False)
    llmlite.quantize(**options, output=str(root / "ckpt"))
    llmlite.quantize(**{**options, "bits": 3}, output=str(root / "ckpt3"))
    return root


def logits(folder, ids):
    model, _ = load_model(str(folder), backend="torch")
    with torch.no_grad():
        return model(ids).logits


def test_export_loads_back_bit_exactly(checkpoints, tmp_path, capsys):
    """The tiny model's widths (96, 200) at group 32 are written at group 8, exactly."""
    ckpt = checkpoints / "ckpt"
    result = llmlite.export(model=str(ckpt), format="awq", output=str(tmp_path / "api"))
    assert (result.format, result.weight_type) == ("awq", "int4 g8 (regrouped from g32)")
    assert main(["export", str(ckpt), "--format", "awq", "--output", str(tmp_path / "cli")]) == 0
    assert "awq, int4 g8" in capsys.readouterr().out
    api, cli = (load_file(tmp_path / f / "model.safetensors") for f in ("api", "cli"))
    assert api.keys() == cli.keys() and all(torch.equal(api[k], cli[k]) for k in api)
    assert api["model.layers.1.mlp.down_proj.qweight"].shape == (200, 96 // 8)
    qc = json.loads((tmp_path / "api" / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "version", "bits", "group_size", "zero_point")} == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 8, "zero_point": True,
    }  # fmt: skip
    assert qc["modules_to_not_convert"] == ["lm_head"] and qc["meta"]["method"] == "rtn"
    assert (tmp_path / "api" / "llmlite.json").is_file()
    ids = torch.randint(0, 1000, (2, 13))
    assert torch.equal(logits(tmp_path / "api", ids), logits(ckpt, ids))
    again = llmlite.export(model=str(tmp_path / "api"), format="gptq", output=str(tmp_path / "gptq"))
    assert again.weight_type == "int4 g8"  # AWQ -> GPTQ: the same numbers on the grid it was read with
    assert torch.equal(logits(tmp_path / "gptq", ids), logits(ckpt, ids))


def test_quantize_format_awq_writes_the_export_in_one_step(checkpoints, tiny_dir, tmp_path):
    options = dict(model=str(tiny_dir), method="rtn", group_size=32, sym=False, progress=False)
    llmlite.quantize(**options, format="awq", output=str(tmp_path / "one"))
    llmlite.export(model=str(checkpoints / "ckpt"), format="awq", output=str(tmp_path / "two"))
    one, two = (load_file(tmp_path / f / "model.safetensors") for f in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_what_awq_cannot_carry_is_refused_before_writing(checkpoints, tiny_dir, tmp_path):
    with pytest.raises(LlmliteError, match=r"--format awq cannot hold .*3-bit: use --format gptq$"):
        llmlite.export(model=str(checkpoints / "ckpt3"), format="awq", output=str(tmp_path / "x"))
    options = dict(model=str(tiny_dir), method="rtn", progress=False, output=str(tmp_path / "y"))
    with pytest.raises(LlmliteError, match="--format awq holds 4-bit weights, not 8-bit: use --bits 4, or"):
        llmlite.quantize(**options, bits=8, format="awq")
    with pytest.raises(LlmliteError, match="keep lm_head in float"):
        llmlite.quantize(**options, quantize_head=True, format="awq")
    assert list(tmp_path.iterdir()) == []


def test_an_awq_folder_of_another_version_is_refused(checkpoints, tmp_path):
    llmlite.export(model=str(checkpoints / "ckpt"), format="awq", output=str(tmp_path / "awq"))
    config_file = tmp_path / "awq" / "config.json"
    config = json.loads(config_file.read_text())
    for change, message in (({"version": "gemv"}, "AWQ version 'gemv'"), ({"bits": 8}, "bits 8 unsupported")):
        config_file.write_text(
            json.dumps({**config, "quantization_config": {**config["quantization_config"], **change}})
        )
        with pytest.raises(LlmliteError, match=message):
            load_model(str(tmp_path / "awq"))


@pytest.fixture(scope="module")
def whole_groups(tmp_path_factory, tokenizer):
    """A tiny Llama whose widths (128, 256) are whole groups of 32, quantized at 4-bit g32 asym:
    no regrouping, a group size GPTQModel's kernels take (16, 32, 64, 128 or per-channel)."""
    root = tmp_path_factory.mktemp("whole")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "float")
    tokenizer.save_pretrained(root / "float")
    options = dict(model=str(root / "float"), method="rtn", group_size=32, sym=False, progress=False)
    llmlite.quantize(**options, format="awq", output=str(root / "awq"))
    return root / "awq"


@pytest.mark.slow  # GPTQModel compiles its CPU kernel on first use (about 2 minutes)
@pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None,
    reason="transformers 5 reads AWQ through GPTQModel, which pins a newer torch than CI's: not installed",
)
def test_transformers_with_gptqmodel_reads_the_export(whole_groups):
    """transformers + GPTQModel dequantize the folder to llmlite's weights exactly (float16, their
    compute dtype); the logits agree to float16 rounding."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(whole_groups, dtype=torch.float16, device_map="cpu")
    ours, _ = load_model(str(whole_groups), backend="torch")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        q = theirs.get_submodule(name)
        weight = dequantize_gemm(q.qweight, q.qzeros, q.scales, 4, q.group_size).T
        assert torch.equal(weight, ours.get_submodule(name).dequantize(torch.float16))
    ids = torch.randint(0, 1000, (1, 13))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs.eval()(ids).logits.float()
    assert (a - b).abs().max() <= 4e-3 * a.abs().max()
