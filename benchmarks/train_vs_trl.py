"""chatforge `train` vs TRL `SFTTrainer` on the same model, data, sequence length and batch, side by side.

Run it like this (repo root, after `make install` and `.venv/bin/pip install -c constraints.txt -e ".[bench]"`)::

    .venv/bin/python benchmarks/train_vs_trl.py --tiny                 # tiny random Llama, ~2 min
    .venv/bin/python benchmarks/train_vs_trl.py --steps 6              # default Gemma 3 270M, LoRA r=16, ~20 min
    .venv/bin/python benchmarks/train_vs_trl.py --only chatforge --storage fp32,bf16 --steps 20   # memory + loss curves

`--storage` lists the `train.base_storage` modes to run for chatforge (default: the config's default): fp32
keeps the whole model in fp32, bf16 keeps the frozen base in 16 bits and up-casts per layer (train/lowmem.py).
With fp32 and bf16 both listed, the loss curves of the two runs (same data, seed and steps) are compared step by
step and the largest relative difference is printed.

Each configuration runs in its own child process (so peak RSS is its own), one after the other: chatforge and TRL,
each without and with packing. Both train answers only (TRL's `assistant_only_loss` works here because chatforge's
templates carry `{% generation %}` markers), LoRA r=16 on q/k/v/o, batch 4, max length 256, AdamW, fp32, the
same thread count. Reported per configuration: loss-bearing (trained) tokens/s and token positions/s over the
steps after the warm-up, s/step, peak RSS of the child, and model-FLOPs utilisation (MFU) against a matmul peak
measured in the same run. Model FLOPs per step are counted the same way for both: 4 x body params x positions
(forward + activation gradients; LoRA's own FLOPs are negligible) + 4 x LM-head params x trained tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def body_and_head_params(model: Any) -> tuple[int, int]:
    head = model.get_output_embeddings().weight
    seen, total = set(), 0
    for parameter in model.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total - head.numel(), head.numel()


def run_chatforge(args: argparse.Namespace) -> dict[str, Any]:
    """One chatforge run in this process; the rates over the steps after the warm-up and every step's loss."""
    from chatforge.config import LoraSettings, TrainConfig
    from chatforge.train.loop import train
    from chatforge.train.monitor import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data=args.data, model=args.model, out=str(Path(tmp) / "run"), method="lora",
                          lora=LoraSettings(r=16, alpha=32, dropout=0.0), max_length=args.max_length,
                          packing=args.packing, batch_size=args.batch_size, max_steps=args.steps, lr=1e-4,
                          eval_every=10**6, save_every=10**6, log_every=1, threads=args.threads, schedule="constant",
                          base_storage=args.base_storage or TrainConfig().base_storage,
                          gradient_checkpointing={"on": True, "off": False}.get(args.gradient_checkpointing))
        train(cfg, log=lambda _m: None)
        logged = [m for m in read_metrics(Path(tmp) / "run") if "train/seconds_per_step" in m]
        steps = logged[args.warmup :]
    seconds = sum(m["train/seconds_per_step"] for m in steps)
    trained = sum(m["train/trained_tokens_per_s"] * m["train/seconds_per_step"] for m in steps)
    positions = sum(m["train/positions_per_s"] * m["train/seconds_per_step"] for m in steps)
    return {"seconds": seconds, "steps": len(steps), "trained_tokens": trained, "positions": positions,
            "losses": [m["train/loss"] for m in logged]}


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from chatforge.models.source import load_tokenizer, model_dir

    tokenizer = load_tokenizer(args.model)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir(args.model)), dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(Path(args.data) / "train.jsonl"), split="train")
    dataset = dataset.select_columns(["messages"])
    step_times: list[float] = []
    batch_counts: list[tuple[int, int]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_a: Any, **_k: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *_a: Any, **_k: Any) -> None:
            step_times.append(time.perf_counter() - self.started)

    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, max_length=args.max_length, per_device_train_batch_size=args.batch_size,
                           max_steps=args.steps, learning_rate=1e-4, packing=args.packing, assistant_only_loss=True,
                           logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                           dataloader_num_workers=0, lr_scheduler_type="constant", seed=0)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                    task_type="CAUSAL_LM"),
                             callbacks=[StepTimer()])
        collator = trainer.data_collator

        def counting_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
            batch = collator(features)
            labels = batch["labels"]
            batch_counts.append((int((labels[:, 1:] != -100).sum()), int(labels.numel())))
            return batch

        trainer.data_collator = counting_collator
        trainer.train()
    counted = batch_counts[args.warmup : args.warmup + len(step_times[args.warmup :])]
    return {"seconds": sum(step_times[args.warmup :]), "steps": len(step_times[args.warmup :]),
            "trained_tokens": sum(c[0] for c in counted), "positions": sum(c[1] for c in counted)}


def child_main(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = run_chatforge(args) if args.child == "chatforge" else run_trl(args)
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def prepare_data(model: str | None, out: Path, max_length: int) -> str:
    from chatforge.config import FitConfig, PrepareConfig
    from chatforge.data.prepare import prepare
    from chatforge.demo import demo_inputs

    prepare(demo_inputs(), out, PrepareConfig(fit=FitConfig(model=model, max_tokens=max_length)))
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description="chatforge train vs TRL SFTTrainer")
    parser.add_argument("--model", default=None, help="base model (default: Gemma 3 270M)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random Llama built on the fly")
    parser.add_argument("--data", default=None, help="prepared dataset (default: the chatterbot sample)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rates")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", choices=["chatforge", "trl"], help="run one side only")
    parser.add_argument("--storage", default=None, help="chatforge train.base_storage modes, comma-separated "
                        "(fp32, bf16, fp16; default: the config default)")
    parser.add_argument("--packing-modes", default="off,on", help="which of off,on to run")
    parser.add_argument("--gradient-checkpointing", choices=["default", "on", "off"], default="default",
                        help="chatforge train.gradient_checkpointing (default: the config's, on for LoRA)")
    parser.add_argument("--base-storage", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["chatforge", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--packing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    import torch

    from chatforge.train.estimate import measure_matmul_flops

    tmp = Path(tempfile.mkdtemp(prefix="cf-bench-"))
    if args.tiny:
        from tests.tiny_models import build_tiny_llama, build_tiny_tokenizer

        tokenizer_dir = build_tiny_tokenizer(tmp / "tok")
        args.model = str(build_tiny_llama(tmp / "model", tokenizer_dir, hidden=256, layers=4))
    data = args.data or prepare_data(args.model, tmp / "data", args.max_length)
    from transformers import AutoModelForCausalLM

    from chatforge.models.source import model_dir

    body, head = body_and_head_params(AutoModelForCausalLM.from_pretrained(str(model_dir(args.model))))
    torch.set_num_threads(args.threads)
    peak = measure_matmul_flops(size=2048)
    print(f"model {args.model or 'gemma3-270m (default)'}: {body / 1e6:.1f}M body + {head / 1e6:.1f}M head params; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s on {args.threads} threads; {args.steps} steps, {args.warmup} warm-up")
    from chatforge.config import TrainConfig

    storages = (args.storage or TrainConfig().base_storage).split(",")
    packings = [mode == "on" for mode in args.packing_modes.split(",")]
    runs = [("chatforge", storage) for storage in storages] + [("trl", None)]
    results = {}
    for child, storage in [run for run in runs if args.only in (None, run[0])]:
        for packing in packings:
            name = f"{child}{f' {storage}' if storage else ''}{' packed' if packing else ''}"
            command = [sys.executable, __file__, "--child", child, "--data", data, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--max-length",
                       str(args.max_length), "--threads", str(args.threads)]
            command += ["--model", args.model] if args.model else []
            command += ["--packing"] if packing else []
            command += ["--base-storage", storage] if storage else []
            command += ["--gradient-checkpointing", args.gradient_checkpointing]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{name}: FAILED\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
                continue
            r = json.loads(line[len("RESULT "):])
            flops = 4 * body * r["positions"] + 4 * head * r["trained_tokens"]
            r |= {"trained_tok_s": r["trained_tokens"] / r["seconds"], "positions_s": r["positions"] / r["seconds"],
                  "s_step": r["seconds"] / max(1, r["steps"]), "mfu": flops / r["seconds"] / peak}
            results[name] = r
            print(f"{name:<24} trained tok/s {r['trained_tok_s']:8.1f}  positions/s {r['positions_s']:8.1f}  "
                  f"s/step {r['s_step']:6.2f}  peak RSS {r['peak_rss_mb'] / 1024:5.2f} GiB  MFU {r['mfu']:.1%}", flush=True)
    for storage in storages:
        for suffix in (" packed" if packing else "" for packing in packings):
            ours, theirs = f"chatforge {storage}{suffix}", f"trl{suffix}"
            if ours in results and theirs in results:
                a, b = results[ours], results[theirs]
                print(f"{ours} / {theirs}: trained tok/s x{a['trained_tok_s'] / b['trained_tok_s']:.2f}, "
                      f"peak RSS x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}")
    for suffix in (" packed" if packing else "" for packing in packings):
        reference, low = results.get(f"chatforge fp32{suffix}"), results.get(f"chatforge bf16{suffix}")
        if reference and low:
            worst = max(abs(a - b) / abs(a) for a, b in zip(reference["losses"], low["losses"]))
            print(f"loss curve{suffix}, bf16 storage vs fp32 over {len(reference['losses'])} steps: largest relative "
                  f"difference {worst:.3%}\n  fp32 {[round(x, 4) for x in reference['losses']]}\n"
                  f"  bf16 {[round(x, 4) for x in low['losses']]}")


if __name__ == "__main__":
    main()
