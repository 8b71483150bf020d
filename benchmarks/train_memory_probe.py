"""Where a chatforge LoRA run's memory goes: RSS after each phase of a hand-run training step (Gemma 3 270M default).

Run it like this (repo root; DATA is a prepared dataset, e.g. the one benchmarks/train_vs_trl.py prepares)::

    PYTHONPATH=. .venv/bin/python benchmarks/train_memory_probe.py DATA --packing --steps 2
    PYTHONPATH=. .venv/bin/python benchmarks/train_memory_probe.py DATA --packing --storage fp32 --no-checkpointing

Prints VmRSS, VmHWM (the peak so far) and its anonymous / file-backed parts from /proc/self/status (Linux) after
the imports, the tokenizer, the model load, LoRA, and each step's forward (the LM-head loss computes its gradient
there), backward and optimizer step. One torch thread; batch 4 x 256 as in train_vs_trl.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def report(phase: str) -> None:
    fields = {}
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 2**20
    print(f"{phase:<32} RSS {fields['VmRSS']:.2f}  peak {fields['VmHWM']:.2f}  anon {fields['RssAnon']:.2f}  "
          f"file {fields['RssFile']:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="prepared dataset dir (train.jsonl)")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--storage", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    report("start")
    import torch  # the imports are phases of the measurement

    torch.set_num_threads(1)
    report("import torch")
    import peft  # noqa: F401
    import transformers  # noqa: F401

    report("import transformers, peft")
    from chatforge.config import LoraSettings, TrainConfig
    from chatforge.core.examples import collate, tokenize_records
    from chatforge.core.loss import CausalLMLoss
    from chatforge.models.source import load_tokenizer, model_dir
    from chatforge.models.tokens import pad_token_id
    from chatforge.train.loop import make_plan, read_split
    from chatforge.train.model import apply_lora, load_training_model

    cfg = TrainConfig(data=args.data, lora=LoraSettings(r=16, alpha=32, dropout=0.0), max_length=256,
                      packing=args.packing, batch_size=4, base_storage=args.storage,
                      gradient_checkpointing=False if args.no_checkpointing else None)
    tokenizer = load_tokenizer(None)
    report("tokenizer")
    examples = tokenize_records(read_split(Path(args.data), "train", None), tokenizer, cfg.train_on, cfg.max_length)
    plan = make_plan(examples, cfg, 0, 1)
    model = load_training_model(model_dir(None), cfg, tokenizer)
    report("model loaded")
    model = apply_lora(model, cfg.lora)
    report("LoRA")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_model = CausalLMLoss(model)
    loss_model.train()
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        loss_sum, n_tokens, _ = loss_model(**collate(plan.micro_batches[step - 1], examples, pad_token_id(tokenizer),
                                                     args.packing))
        report(f"step {step} forward")
        (loss_sum / n_tokens).backward()
        report(f"step {step} backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report(f"step {step} loss {loss_sum.item() / int(n_tokens):.4f} {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
