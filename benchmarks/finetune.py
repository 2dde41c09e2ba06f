"""Fine-tuning throughput and peak memory: llmlite against plain peft + transformers `Trainer`.

    .venv/bin/python benchmarks/finetune.py [--steps N] [--seqlen L] [--batch-size B] [--rounds R]

For each base (full fine-tuning, LoRA, QLoRA, LoRA on a GPTQ 4-bit checkpoint) it runs llmlite's
`finetune` and a plain peft + `Trainer` script with the same model, tokens, rank, optimizer,
schedule, clipping and batch, each in a fresh process (peak RSS is per process), one after the
other, and writes docs/benchmarks/finetune.md. Throughput counts the steps after the first. With
``--rounds R`` every configuration runs R times, alternating with its baseline (this machine's speed
drifts by tens of percent over minutes), and the table gives the medians.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # not put on sys.path: its kernels/ would shadow a package

BASES = ("full", "lora", "qlora", "lora-gptq")
GPTQ = ROOT / "runs" / "gptq-w4g128"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _text_file(folder: Path) -> str:
    from llmlite.data import load_text

    path = folder / "wiki-valid.txt"
    path.write_text(load_text("wikitext2-valid")[:400_000])
    return str(path)


def run_llmlite(base: str, a, data: str, out: Path, tokens: list[int]) -> dict:
    import llmlite
    import llmlite.training.train as loop

    def counting_collate(batch, pad_id):
        tokens.append(sum(len(e.input_ids) for e in batch))
        return collate(batch, pad_id)

    collate, loop.collate = loop.collate, counting_collate
    stamps: list[float] = []
    model = str(GPTQ) if base == "lora-gptq" else "smollm2-135m"
    method = {"lora-gptq": "lora"}.get(base, base)
    r = llmlite.finetune(
        model=model, data=data, method=method, rank=16, alpha=32, seqlen=a.seqlen, batch_size=a.batch_size,
        max_steps=a.steps, lr=2e-4, eval_split=0.0, save_steps=10**6, log_steps=1, output=str(out),
        progress=False, on_step=lambda step: stamps.append(time.perf_counter()),
    )  # fmt: skip
    return {"stamps": stamps, "trainable": r.trainable_params}


def run_trainer(base: str, a, data: str, out: Path, tokens: list[int], grouped: bool = False) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from llmlite.models import load_model, load_tokenizer, resolve_model
    from llmlite.training.data import load_examples

    folder = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    examples, _ = load_examples(data, tokenizer, a.seqlen)  # the same token sequences as llmlite's
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
            for e in examples]  # fmt: skip
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def collator(features):
        tokens.append(sum(len(f["input_ids"]) for f in features))
        return pad(features)

    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    if base == "qlora":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif base == "lora-gptq":  # transformers cannot load GPTQ without gptqmodel: llmlite's loader
        from peft.tuners.lora.gptq import GPTQLoraLinear

        from llmlite.quant.linear import QuantLinear

        model, _ = load_model(str(GPTQ))
        config._register_custom_module({QuantLinear: GPTQLoraLinear})
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if base != "full":
        model = get_peft_model(model, config)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=a.batch_size, max_steps=a.steps, learning_rate=2e-4,
        lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused",  # the Trainer's default on torch >= 2.8, as llmlite's
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
        disable_tqdm=True, remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if grouped else "random",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Stamp()])
    trainer.train()
    return {"stamps": stamps, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def one(base: str, impl: str, data: str, a) -> None:
    """Run one configuration in this process and print its figures as JSON."""
    from llmlite.memory import rss_peak_bytes

    tokens: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        source = _text_file(Path(tmp)) if data == "text" else "piqa-instruct"
        if impl == "llmlite":
            r = run_llmlite(base, a, source, Path(tmp) / "out", tokens)
        else:
            r = run_trainer(base, a, source, Path(tmp) / "out", tokens, grouped=impl == "trainer-grouped")
    stamps = r["stamps"]
    measured = sum(tokens[1 : len(stamps)])  # the batches of steps 2..N (one batch per step)
    print(json.dumps({
        "base": base, "impl": impl, "data": data, "tokens_per_second": measured / (stamps[-1] - stamps[0]),
        "seconds_per_step": (stamps[-1] - stamps[0]) / (len(stamps) - 1), "peak_rss_bytes": rss_peak_bytes(),
        "trainable_params": r["trainable"], "tokens_measured": measured,
    }))  # fmt: skip


JOBS = [(base, "text", ("trainer", "llmlite")) for base in BASES] + [
    ("lora", "instruction", ("trainer", "trainer-grouped", "llmlite"))
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="runs of each configuration, alternated")
    p.add_argument("--jobs", default="all", help="comma-separated BASE:DATA (e.g. lora:text), or all")
    p.add_argument("--one", nargs=3, metavar=("BASE", "IMPL", "DATA"), help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks" / "finetune.md"))
    a = p.parse_args()
    if a.one:
        return one(*a.one, a)
    jobs = [j for j in JOBS if a.jobs == "all" or f"{j[0]}:{j[1]}" in a.jobs.split(",")]
    if any(base == "lora-gptq" for base, _, _ in jobs) and not (GPTQ / "config.json").exists():
        subprocess.run(
            [sys.executable, "-m", "llmlite.cli", "quantize", "--output", str(GPTQ), "--quiet"], check=True
        )
    rows = []
    for round_ in range(1, a.rounds + 1):
        for base, data, impls in jobs:
            for impl in impls:
                cmd = [sys.executable, __file__, "--one", base, impl, data, "--steps", str(a.steps),
                       "--seqlen", str(a.seqlen), "--batch-size", str(a.batch_size)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                rows.append({**json.loads(out.strip().splitlines()[-1]), "round": round_})
                print(rows[-1], flush=True)
    write(rows, a)


def write(rows: list[dict], a) -> None:
    from statistics import median

    from llmlite.runinfo import environment

    env = environment()
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault((r["base"], r["data"], r["impl"]), []).append(r)

    def mid(key, field):
        return median(r[field] for r in runs[key])

    rounds = f" --rounds {a.rounds}" if a.rounds > 1 else ""
    lines = [
        "# Fine-tuning: throughput and peak memory against peft + transformers `Trainer`",
        "",
        "Generated by `.venv/bin/python benchmarks/finetune.py "
        f"--steps {a.steps} --seqlen {a.seqlen} --batch-size {a.batch_size}{rounds}`.",
        "",
        f"Machine: {env.get('cpu')}, {env.get('threads')} threads; torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, peft {_version('peft')}, "
        f"bitsandbytes {_version('bitsandbytes')}.",
        "",
        "Settings, the same on both sides: the bundled SmolLM2-135M-Instruct in float32; batch "
        f"{a.batch_size}; {a.steps} optimizer steps, throughput over steps 2 to {a.steps} in real (unpadded) "
        "tokens per second; AdamW 2e-4 (torch's fused kernel), cosine schedule, clipping 1.0; LoRA rank 16, "
        "alpha 32, dropout 0 on every attention and MLP projection; no gradient checkpointing, evaluation "
        "or checkpoints. Each run in a fresh process; peak RSS includes loading the model. "
        + (
            f"Every configuration ran {a.rounds} times, alternating with its baseline; the figures are "
            "medians and the last column gives each round's speed-up."
            if a.rounds > 1
            else "One run each, one after the other."
        ),
        "",
        f"- text: WikiText-2 validation packed into {a.seqlen}-token sequences.",
        "- instruction: PIQA validation as prompt/response rows (`piqa-instruct`) in the chat template, "
        "loss on the responses; the Trainer pads each batch to its longest row (`DataCollatorForSeq2Seq`), "
        "randomly ordered or with `train_sampling_strategy='group_by_length'`; llmlite groups by length "
        "by default.",
        "",
        "| base | data | baseline | baseline tokens/s | llmlite tokens/s | speed-up | baseline peak RSS "
        "| llmlite peak RSS | memory ratio | speed-up per round |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for base, data, impl in runs:
        if impl == "llmlite":
            continue
        t, m = (base, data, impl), (base, data, "llmlite")
        name = "Trainer, grouped by length" if impl == "trainer-grouped" else "Trainer"
        speed = mid(m, "tokens_per_second") / mid(t, "tokens_per_second")
        memory = mid(m, "peak_rss_bytes") / mid(t, "peak_rss_bytes")
        per_round = ", ".join(
            f"{x['tokens_per_second'] / y['tokens_per_second']:.2f}x"
            for x, y in zip(runs[m], runs[t], strict=True)
        )
        tps = mid(t, "tokens_per_second"), mid(m, "tokens_per_second")
        gib = mid(t, "peak_rss_bytes") / 2**30, mid(m, "peak_rss_bytes") / 2**30
        lines.append(
            f"| {base} | {data} | {name} | {tps[0]:.0f} | {tps[1]:.0f} | {speed:.2f}x | {gib[0]:.2f} GiB "
            f"| {gib[1]:.2f} GiB | {memory:.2f}x | {per_round} |"
        )
    notes = Path(a.output).read_text().split("\n## Reading the table")[1:] if Path(a.output).exists() else []
    if notes:  # keep the hand-written analysis below the generated table
        lines += ["", "## Reading the table" + notes[0].rstrip("\n")]
    Path(a.output).write_text("\n".join(lines) + "\n")
    Path(a.output).with_suffix(".json").write_text(json.dumps({"settings": vars(a), "rows": rows}, indent=1))
    print("\n".join(lines))


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    main()
