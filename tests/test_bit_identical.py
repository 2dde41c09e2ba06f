"""RTN and GPTQ produce the same bits as before the architecture step (issue 23): hashes of every
quantized tensor of a cut-down run on the bundled model (its first 4 layers, 8 calibration windows
of 128 tokens, seed 0, one thread), recorded before the refactor. Float sums in GPTQ depend on the
BLAS path, so its hashes are kept per CPU capability; a machine without a recorded hash skips them
and says so (``python tests/test_bit_identical.py`` prints this machine's)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from llmlite.data import calibration_windows, load_text, tokenize
from llmlite.models import load_model
from llmlite.quant.driver import QuantSettings, quantize_model
from llmlite.quant.linear import QuantLinear

# The settings ``llmlite quantize`` resolves for each (default, --method rtn, --no-v2 --no-refit)
SETTINGS = {
    "rtn": QuantSettings(method="rtn", act_order=True),
    "gptq": QuantSettings(method="gptq", act_order=True, v2_alpha=0.25, v2_windows=16, refit=True),
    "gptq-plain": QuantSettings(method="gptq", act_order=True),
}
# name@capability -> sha256 of the quantized tensors, recorded at 9b3717a
RECORDED = {
    "rtn": "984523702c867b9951a9b98b83ac054ab19bf5c4f2522930a629fb085121355e",
    "gptq@GenuineIntel-AVX512": "4a0f2fd30f30f732ba7fe340b36bcf11274c59bfc4177d66f23e815466af9800",
    "gptq-plain@GenuineIntel-AVX512": "245d5836b8e2efabe956b0c7ab1eff2fcc2586f3d2865ea658cc2f3d0f08940e",
}


def quantized_hash(name: str) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load_model("smollm2-135m")
        model.model.layers = model.model.layers[:4]
        model.config.num_hidden_layers = 4
        windows = None
        if SETTINGS[name].method == "gptq":
            windows = calibration_windows(tokenize(tokenizer, load_text("wikitext2-valid")), 8, 128, 0)
        quantize_model(model, SETTINGS[name], windows, progress=False)
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256()
    for module_name, module in sorted(model.named_modules(), key=lambda m: m[0]):
        if isinstance(module, QuantLinear):
            for key, tensor in sorted(module.state_dict().items()):
                digest.update(f"{module_name}.{key}".encode())
                digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def key(name: str) -> str:
    """RTN's arithmetic is elementwise and exact anywhere; GPTQ's sums follow the CPU's BLAS path."""
    if name == "rtn":
        return name
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    vendor = next((line.split(":")[1].strip() for line in lines if line.startswith("vendor_id")), "cpu")
    return f"{name}@{vendor}-{torch.backends.cpu.get_cpu_capability()}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_quantized_tensors_are_bit_identical_to_before(name, bundled_dir):
    if key(name) not in RECORDED:
        pytest.skip(f"no hash recorded for {key(name)}; recorded: {', '.join(RECORDED)}")
    assert quantized_hash(name) == RECORDED[key(name)]


if __name__ == "__main__":
    for name in SETTINGS:
        print(f'    "{key(name)}": "{quantized_hash(name)}",')
