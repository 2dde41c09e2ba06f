"""llmlite as an lm-eval model: same scores as lm-eval's own `hf` back end, reachable from `lm_eval`."""

import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import lm_eval
import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from llmlite.api import evaluate
from llmlite.data import load_text
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
    for metric in ("acc,none", "acc_norm,none", "ece,none", "brier,none", "nll,none"):
        assert ours[metric] == pytest.approx(ref[metric], abs=1e-4)
    assert len(ours_ll) == len(ref_ll) == 12
    assert ours_ll == pytest.approx(ref_ll, rel=1e-5)  # float32 sums of ~100 nats: rounding only


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


def _wikitext(model, text_file, max_length=256):
    manager = TaskManager(include_path=str(TASKS_DIR), metadata={"text": str(text_file)})
    out = lm_eval.simple_evaluate(model=model, tasks=["llmlite_wikitext"], task_manager=manager)
    return out["results"]["llmlite_wikitext"]


@pytest.fixture(scope="module")
def short_text(tmp_path_factory, tokenizer):
    """About 700 tokens from the start of WikiText-2 raw test."""
    ids = tokenizer(load_text("wikitext2"), add_special_tokens=False)["input_ids"][:700]
    path = tmp_path_factory.mktemp("text") / "start.txt"
    path.write_text(tokenizer.decode(ids))
    return path


@pytest.mark.slow
def test_rolling_perplexity_equals_lm_eval_hf_backend(bundled_dir, short_text):
    ours = _wikitext(LlmliteLM("smollm2-135m", max_length=256), short_text)
    ref = _wikitext(
        HFLM(pretrained=str(bundled_dir), dtype="float32", device="cpu", max_length=256), short_text
    )
    # hf's float32 log-softmax sums are ~2e-6 off float64 in log-likelihood (ours: 2e-8); x words
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours[metric] == pytest.approx(ref[metric], rel=3e-5)
    assert math.isnan(ref["token_perplexity,none"]) and ours["token_perplexity,none"] > 1


@pytest.mark.slow
def test_papers_token_perplexity_equals_llmlite_eval(short_text):
    lm = LlmliteLM("smollm2-135m", rolling="papers", ppl_window=128)
    ours = _wikitext(lm, short_text)["token_perplexity,none"]
    ref = evaluate(model="smollm2-135m", ppl=str(short_text), ctx=128, progress=False)
    assert ref["windows"] == 5
    assert ours == pytest.approx(ref["perplexity"], rel=1e-6)
