"""`chatforge train`: fine-tune a base model on a prepared dataset, with LoRA or fully.

Use it like this::

    report = train(TrainConfig(data="data/ds", out="runs/r1", method="lora", max_steps=200))
    RunDir(report.run_dir).model_dir   # AutoModelForCausalLM / PeftModel load it without chatforge

The same command runs on several processes under `torchrun --nproc_per_node N -m chatforge train ...` or
`accelerate launch` (DDP through accelerate; gloo on CPU). Every process builds the same deterministic batch plan
and takes every N-th batch; the loss of a step is the mean over all its trained tokens on all processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from chatforge.config import TrainConfig
from chatforge.core.examples import Example, collate, mask_summary, tokenize_records
from chatforge.core.loss import CausalLMLoss
from chatforge.core.records import read_jsonl
from chatforge.core.rundir import RunDir
from chatforge.device import resolve_device, training_dtype
from chatforge.manifest import Manifest
from chatforge.models.source import load_tokenizer, model_dir
from chatforge.models.templates import template_token_ids
from chatforge.models.tokens import pad_token_id
from chatforge.train.batches import pack_examples, plan_batches
from chatforge.train.checkpoints import (
    WEIGHTS,
    latest_checkpoint,
    load_checkpoint,
    load_trainable_state,
    save_best,
    save_checkpoint,
)
from chatforge.train.estimate import estimate_run
from chatforge.train.export import export_run, write_run_files
from chatforge.train.model import apply_lora, load_training_model
from chatforge.train.monitor import EarlyStopper, RunMonitor

Log = Callable[[str], None]


class TrainError(ValueError):
    """A user-facing problem with the training inputs (missing dataset, empty split, ...)."""


@dataclass
class TrainReport:
    run_dir: Path
    steps: int
    best_val_loss: float | None
    stopped_early: bool
    estimate: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    planned_steps: int = 0
    stopped_by: str | None = None  # "time budget" | "early stopping" | None (all planned steps done)


@dataclass
class StepPlan:
    """All micro-batches of the run for this process, in order, with the global trained-token count per step."""

    micro_batches: list[list[list[int]]]
    step_tokens: list[int]  # trained tokens of each optimizer step, summed over all processes
    micro_per_step: int


def read_split(data_dir: Path, name: str, limit: int | None) -> list[dict[str, Any]]:
    path = data_dir / f"{name}.jsonl"
    if not path.exists():
        raise TrainError(f"{path}: missing; is {data_dir} a dataset written by `chatforge prepare`?")
    records = list(read_jsonl(path))
    return records[:limit] if limit else records


def make_plan(examples: list[Example], cfg: TrainConfig, rank: int, world: int) -> StepPlan:
    """Micro-batches for `rank`, epoch after epoch (deterministic in the seed), for `cfg.max_steps` optimizer steps
    or, without it, `cfg.epochs` epochs."""
    micro_per_step = cfg.grad_accum
    packed_rows = pack_examples(examples, cfg.max_length) if cfg.packing else None
    micro: list[list[list[int]]] = []
    step_tokens: list[int] = []
    total_steps, epoch = cfg.max_steps, 0
    while total_steps is None or len(step_tokens) < total_steps:
        batches = plan_batches(examples, cfg.batch_size, cfg.max_length, cfg.packing, cfg.seed, epoch, packed_rows)
        per_rank = len(batches) // world
        if per_rank == 0:
            raise TrainError(f"{len(batches)} batches cannot feed {world} processes; lower batch_size")
        usable = per_rank // micro_per_step * micro_per_step
        if usable == 0:
            raise TrainError(f"{per_rank} batches per process < grad_accum {micro_per_step}; lower grad_accum")
        if total_steps is None:
            total_steps = max(1, math.ceil(cfg.epochs * (usable // micro_per_step)))
        for start in range(0, usable, micro_per_step):
            if len(step_tokens) == total_steps:
                break
            step_batches = [batches[(start + k) * world + r] for k in range(micro_per_step) for r in range(world)]
            step_tokens.append(sum(examples[i].trained_tokens for b in step_batches for row in b for i in row))
            micro.extend(batches[(start + k) * world + rank] for k in range(micro_per_step))
        epoch += 1
    return StepPlan(micro, step_tokens, micro_per_step)


def make_optimizer(cfg: TrainConfig, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kinds = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop, "sgd": torch.optim.SGD}
    extra = {"momentum": 0.9} if cfg.optimizer == "sgd" else {}
    return kinds[cfg.optimizer](parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[cfg.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)


def evaluate_loss(
    loss_model: Any, examples: list[Example], batches: list[list[list[int]]], cfg: TrainConfig, pad_id: int, accelerator: Any
) -> dict[str, float]:
    """Val loss, perplexity and token accuracy over `batches` of val examples (sharded over processes, summed)."""
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    loss_model = accelerator.unwrap_model(loss_model)  # no DDP forward: processes may hold different batch counts
    loss_model.eval()
    with torch.no_grad():
        for batch in mine:
            tensors = {k: v.to(accelerator.device) for k, v in collate(batch, examples, pad_id, cfg.packing).items()}
            loss_sum, n_tokens, n_correct = loss_model(**tensors)
            totals += torch.stack([loss_sum.double(), n_tokens.double(), n_correct.double()])
    loss_model.train()
    totals = accelerator.reduce(totals, reduction="sum")
    loss = float(totals[0] / totals[1].clamp(min=1))
    return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0)), "val/token_accuracy": float(totals[2] / totals[1].clamp(min=1))}


def train(cfg: TrainConfig, resume: bool = False, dry_run: bool = False, log: Log = print) -> TrainReport:
    """Run the train stage; writes RUN/ (model, checkpoints, metrics, tb, manifest). See the module docstring."""
    if not cfg.data or not cfg.out:
        raise TrainError("train needs a dataset (--data or train.data) and a run directory (--out or train.out)")
    data_dir, run_dir = Path(cfg.data), Path(cfg.out)
    run = RunDir(run_dir)
    if run.has_checkpoints() and not resume and not dry_run:
        raise TrainError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)  # the one device policy (chatforge.device)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and training_dtype(device) == torch.bfloat16)
    if device.type == "cuda" and ":" in cfg.device:  # cuda:N asked for; "auto"/"cuda" leave it to accelerate (one GPU per rank under torchrun)
        torch.cuda.set_device(device)
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=device.type == "cpu")
    is_main = accelerator.is_main_process
    say = log if is_main else (lambda _msg: None)
    torch.manual_seed(cfg.seed)
    manifest = Manifest.start("train", config=cfg.model_dump(mode="json"))

    tokenizer = load_tokenizer(cfg.model, cfg.chat_template)
    pad_id = pad_token_id(tokenizer)
    train_records = read_split(data_dir, "train", cfg.max_train_examples)
    train_examples = tokenize_records(train_records, tokenizer, cfg.train_on, cfg.max_length)
    val_examples = tokenize_records(read_split(data_dir, "val", cfg.max_val_examples), tokenizer, cfg.train_on, cfg.max_length)
    if not train_examples:
        raise TrainError(f"{data_dir}/train.jsonl: none of its {len(train_records)} conversations has a token to train "
                         f"on (train_on {cfg.train_on}, max_length {cfg.max_length}): are the answers cut off by "
                         f"max_length? `chatforge inspect {data_dir}` shows what the chat template renders")
    say(mask_summary(train_examples))
    plan = make_plan(train_examples, cfg, accelerator.process_index, accelerator.num_processes)
    total_steps = len(plan.step_tokens)
    val_batches = plan_batches(val_examples, cfg.batch_size, cfg.max_length, cfg.packing, cfg.seed, epoch=0)
    base_location = model_dir(cfg.model)
    say(f"base model {base_location}; {len(train_examples)} train / {len(val_examples)} val examples; {total_steps} steps")

    model = load_training_model(base_location, cfg, tokenizer)  # base_storage: the frozen base in 16 bits
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.method == "lora":
        model = apply_lora(model, cfg.lora, template_token_ids(tokenizer) if cfg.lora.train_template_tokens else None)
    estimate = estimate_run(model, train_examples, plan.micro_batches, plan.step_tokens, cfg, accelerator.num_processes)
    say(estimate["summary"])
    if dry_run:
        return TrainReport(run_dir, 0, None, False, estimate)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, trainable)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    loss_model = CausalLMLoss(model, cfg.loss_chunk)
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = run.checkpoints_dir
    state: dict[str, Any] = {"cursor": 0, "best_val_loss": None, "bad_evals": 0, "tokens_seen": 0}
    start_step = 0
    if resume and (latest := latest_checkpoint(checkpoints)) is not None:
        state = load_checkpoint(latest, model, optimizer, scheduler)
        start_step = state.pop("step")
        say(f"resumed from {latest.name} (step {start_step})")
    elif resume:
        say(f"nothing to resume in {checkpoints}; starting fresh")
    if is_main:
        write_run_files(run_dir, cfg, tokenizer, base_location)
    accelerator.wait_for_everyone()

    monitor = RunMonitor(run_dir, total_steps, start_step, enabled=is_main)
    histogram_every = cfg.histogram_every or max(1, total_steps // 5)  # None: about five per run, however short
    stopper = EarlyStopper(cfg.early_stopping.patience, cfg.early_stopping.min_delta, state["best_val_loss"], state["bad_evals"])
    world = accelerator.num_processes
    step, stopped_early, last_eval_step, stopped_by = start_step, False, None, None
    training_seconds = 0.0  # steps and evaluations, for max_minutes
    # Rates count step time only (not evaluation or checkpoint writing), over the steps since the last log line.
    window = {"seconds": 0.0, "tokens": 0, "positions": 0, "steps": 0}

    def log_train_step(step: int, train_loss: float, grad_norm: Any) -> None:
        """Train scalars of `step`, with rates over the steps since the last log line."""
        elapsed = max(window["seconds"], 1e-9)
        values = {"train/loss": train_loss, "train/lr": scheduler.get_last_lr()[0],
                  "train/seconds_per_step": elapsed / max(1, window["steps"]),
                  "train/trained_tokens_per_s": window["tokens"] / elapsed,
                  "train/positions_per_s": window["positions"] * world / elapsed}
        if grad_norm is not None:
            values["train/grad_norm"] = float(grad_norm)
        monitor.scalars(step, values)
        window.update(seconds=0.0, tokens=0, positions=0, steps=0)

    loss_model.train()
    while step < total_steps and not stopped_early:
        step_started = time.perf_counter()
        step_loss = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for k in range(plan.micro_per_step):
            batch = plan.micro_batches[step * plan.micro_per_step + k]
            tensors = {name: t.to(accelerator.device) for name, t in collate(batch, train_examples, pad_id, cfg.packing).items()}
            last_micro = k == plan.micro_per_step - 1
            with nullcontext() if last_micro else accelerator.no_sync(loss_model):
                with accelerator.autocast():
                    loss_sum, n_tokens, _ = loss_model(**tensors)
                # DDP averages gradients over processes, so scale by world: the step's gradient is the token mean.
                accelerator.backward(loss_sum * world / max(1, plan.step_tokens[step]))
            step_loss += torch.stack([loss_sum.detach().double(), n_tokens.double()])
            window["positions"] += int(tensors["input_ids"].numel())
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.grad_clip) if cfg.grad_clip else None
        step += 1
        if is_main and step % histogram_every == 0:
            monitor.histograms(step, model)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = accelerator.reduce(step_loss, reduction="sum")
        window["tokens"] += int(step_loss[1])
        window["steps"] += 1
        window["seconds"] += time.perf_counter() - step_started
        state["tokens_seen"] += int(step_loss[1])
        train_loss = float(step_loss[0] / step_loss[1].clamp(min=1))
        # The time budget is checked before this step's logging and validation, so a budget stop still logs its
        # last step and validates it: metrics.jsonl and the report's curve are never empty.
        out_of_time = bool(cfg.max_minutes) and step < total_steps and _all_agree(
            accelerator, training_seconds + time.perf_counter() - step_started > (cfg.max_minutes or 0) * 60)
        last_step = step == total_steps or out_of_time
        logged = False
        if step % cfg.log_every == 0 or last_step:
            log_train_step(step, train_loss, grad_norm)
            logged = True
        monitor.show(step, f"loss {train_loss:.3f}", step % cfg.log_every == 0)
        if val_examples and (step % cfg.eval_every == 0 or last_step):
            metrics = evaluate_loss(loss_model, val_examples, val_batches, cfg, pad_id, accelerator)
            last_eval_step = step
            improved, stopped_early = stopper.update(metrics["val/loss"])
            monitor.scalars(step, metrics)
            say(f"step {step}: val loss {metrics['val/loss']:.4f} ppl {metrics['val/perplexity']:.2f} "
                f"acc {metrics['val/token_accuracy']:.3f}{' (best)' if improved else ''}")
            if improved and is_main:
                save_best(checkpoints, model, {"step": step, **metrics})
            if stopped_early:
                stopped_by = "early stopping"
                say(f"early stopping: no val-loss improvement > {cfg.early_stopping.min_delta} in "
                    f"{stopper.bad_evals} evaluations")
                if not logged:
                    log_train_step(step, train_loss, grad_norm)
        training_seconds += time.perf_counter() - step_started
        if out_of_time and not stopped_early:
            stopped_by, stopped_early = "time budget", True
            say(f"TIME BUDGET: {cfg.max_minutes:g} min of training used at step {step} of {total_steps} planned; "
                f"stopping with the best checkpoint so far (raise max_minutes for the full plan)")
        if step % cfg.save_every == 0 or step == total_steps or stopped_early:
            state |= {"cursor": step * plan.micro_per_step, "best_val_loss": stopper.best, "bad_evals": stopper.bad_evals}
            if is_main:
                save_checkpoint(checkpoints, step, model, optimizer, scheduler, state, cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
    monitor.close()
    if run.best_checkpoint.exists():
        load_trainable_state(model, run.best_checkpoint / WEIGHTS)
    final = {"steps": step, "planned_steps": total_steps, "stopped_by": stopped_by, "tokens_seen": state["tokens_seen"],
             "last_eval_step": last_eval_step}
    if is_main:
        manifest.extra["estimate"] = {k: v for k, v in estimate.items() if k != "summary"}
        export_run(run_dir, accelerator.unwrap_model(loss_model).model, tokenizer, cfg, base_location, manifest, final, stopper.best)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainReport(run_dir, step, stopper.best, stopped_early, estimate, final, total_steps, stopped_by)



def _all_agree(accelerator: Any, flag: bool) -> bool:
    """True when `flag` is true on any process, so every process stops at the same step."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="max").item())
