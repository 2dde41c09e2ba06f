"""llmlite as an lm-eval model: same scores as lm-eval's own `hf` back end, reachable from `lm_eval`."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from llmlite.evals.piqa.utils import load_piqa
from llmlite.evaluation.harness import TASKS_DIR, LlmliteLM


def _piqa(model, model_args=None, limit=6):
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["llmlite_piqa"],
        limit=limit,
        log_samples=True,
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
    )
    samples = out["samples"]["llmlite_piqa"]
    logliks = [float(r[0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["filtered_resps"]]
    return out["results"]["llmlite_piqa"], logliks


@pytest.mark.slow
def test_piqa_equals_lm_eval_hf_backend(bundled_dir):
    ours, ours_ll = _piqa(LlmliteLM("smollm2-135m"))
    ref, ref_ll = _piqa("hf", f"pretrained={bundled_dir},dtype=float32,device=cpu")
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[metric] == pytest.approx(ref[metric], abs=1e-4)
    assert len(ours_ll) == len(ref_ll) == 12
    assert ours_ll == pytest.approx(ref_ll, abs=1e-4)


def test_piqa_data_has_every_label():
    docs = load_piqa()["validation"]
    assert len(docs) == 1838
    assert set(docs["label"]) == {0, 1}
    assert docs[0]["goal"].startswith("How do I ready a guinea pig cage")


def test_hook_registers_llmlite_lazily():
    code = (
        "import sys\n"
        "from lm_eval.api.registry import get_model\n"
        "get_model('hf')\n"
        "assert 'llmlite.evaluation.harness' not in sys.modules\n"
        "print(get_model('llmlite').__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "LlmliteLM"


@pytest.mark.slow
def test_lm_eval_cli_runs_llmlite():
    pth = Path(sysconfig.get_path("purelib")) / "llmlite-lm-eval.pth"
    assert pth.exists(), f"{pth} missing: run `make setup` (the editable install leaves it out)"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "llmlite", "--model_args", "pretrained=smollm2-135m"]
    cmd += ["--tasks", "llmlite_piqa", "--include_path", str(TASKS_DIR), "--limit", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "llmlite_piqa" in out.stdout and "acc_norm" in out.stdout
