"""What a training run reports: metrics.jsonl, TensorBoard events, a progress display, and early stopping.

Use it like this::

    monitor = RunMonitor(run_dir, total_steps=200, start_step=0, enabled=is_main_process)
    monitor.scalars(step, {"train/loss": 2.1, "train/lr": 2e-4})
    monitor.histograms(step, model)                   # trained weights and their gradients
    stopper = EarlyStopper(patience=3, min_delta=0.0)
    if stopper.update(val_loss): ...                  # True when the run should stop

On resume the monitor drops metrics.jsonl lines past the checkpoint's step and TensorBoard purges its events past
that step, so a resumed run's logs read as if it had never been interrupted.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from chatforge.core.rundir import RunDir


class EarlyStopper:
    """Counts evaluations without an improvement of at least min_delta in val loss."""

    def __init__(self, patience: int | None, min_delta: float, best: float | None = None, bad_evals: int = 0) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best = best
        self.bad_evals = bad_evals

    def update(self, val_loss: float) -> tuple[bool, bool]:
        """Record one evaluation; returns (improved, should_stop)."""
        improved = self.best is None or val_loss < self.best - self.min_delta
        if improved:
            self.best = val_loss
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        return improved, self.patience is not None and self.bad_evals >= self.patience


class RunMonitor:
    """Writes metrics.jsonl and TensorBoard events (main process only) and shows progress."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.metrics_path = RunDir(run_dir).metrics_file
        self.writer = None
        self.progress = None
        self.t0 = time.perf_counter()
        self.start_step = start_step
        if not enabled:
            return
        self._truncate_metrics(start_step)
        if tensorboard:
            # lazy: tensorboard is an optional extra (train) and slow to import; tensorboard=False runs without it
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(RunDir(run_dir).tensorboard_dir),
                                        purge_step=start_step + 1 if start_step else None)
        if sys.stdout.isatty():
            self.progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def _truncate_metrics(self, start_step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log scalars to metrics.jsonl (one line) and TensorBoard."""
        if not self.enabled:
            return
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in values.items()}}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def histograms(self, step: int, model: nn.Module) -> None:
        """Histograms of every trained weight and its gradient (call after backward, before zero_grad)."""
        if not self.enabled or self.writer is None:
            return
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                self.writer.add_histogram(f"weights/{name}", parameter.detach().float().cpu(), step)
                if parameter.grad is not None:
                    self.writer.add_histogram(f"grads/{name}", parameter.grad.detach().float().cpu(), step)

    def show(self, step: int, status: str, log_line: bool) -> None:
        """Advance the progress bar; without a terminal, print a plain line when `log_line`."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)
        elif log_line:
            elapsed = time.perf_counter() - self.t0
            done = max(1, step - self.start_step)
            eta = elapsed / done * (self.total_steps - step)
            print(f"step {step}/{self.total_steps} {status} eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl of a run as a list of dicts."""
    path = RunDir(run_dir).metrics_file
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
