"""`chatforge sweep`: train every combination of a grid of training settings and rank the runs by val loss.

Use it like this::

    # chatforge.yaml: the base run, and the values to try (dotted keys reach nested settings)
    train: {data: ds, max_steps: 200}
    sweep: {lr: [1.0e-4, 3.0e-4], lora.r: [8, 16]}

    chatforge sweep --out sweeps/s1              # 4 trials -> sweeps/s1/leaderboard.md, .json, .png
    chatforge sweep --out sweeps/s1 --resume     # after a crash or a failure: runs only what is not finished
    report = sweep(project.train, project.sweep, Path("sweeps/s1"))

Each trial is `train()` on the base settings with the trial's values merged in, in its own run directory
OUT/trial-<index in grid order>-<hash of its values>/, so a rerun finds its checkpoints and continues from them.
The trials live in an Optuna study (GridSampler) named after OUT, in an RDB storage: OUT/sweep.db (SQLite) by
default, or e.g. `postgresql://user@host/db` to share one sweep between machines (start it on one; on the others run
the same grid with an OUT of the same name and `--resume`). A trial that raises is recorded as failed with its error
and the sweep goes on; `--resume` reruns failed trials and interrupted ones (their process is gone from this machine,
or their heartbeat went stale).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import os
import socket
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from pydantic import BaseModel
from sqlalchemy.engine import make_url

from chatforge.config import ConfigError, TrainConfig, merge_overrides
from chatforge.core.rundir import RunDir
from chatforge.manifest import Manifest
from chatforge.train.leaderboard import describe, write_leaderboard
from chatforge.train.loop import train

Log = Callable[[str], None]
GridValue = str | int | float | bool
HEARTBEAT_S = 60  # a running trial stamps the storage this often (Optuna heartbeat) ...
GRACE_S = 300  # ... and counts as interrupted when its stamp is older than this (its machine died)
MACHINE_SPECIFIC = ("data", "model", "out", "threads")  # may differ between machines that share one sweep


class SweepError(ValueError):
    """The sweep block or the sweep directory is wrong; the message names the key or the directory."""


@dataclass
class SweepReport:
    out_dir: Path
    trials: list[dict[str, Any]]  # leaderboard rows, best first (see `leaderboard_rows`)
    best: dict[str, Any] | None
    skipped: int  # finished before this call
    failed: int
    done: int = 0  # finished during this call


def grid_combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination, the first key varying slowest: {a: [1, 2], b: [x, y]} -> a1 bx, a1 by, a2 bx, a2 by."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def validate_grid(base: TrainConfig, grid: dict[str, Any]) -> dict[str, list[Any]]:
    """The sweep block checked before anything runs, each value in its typed form ('1e-4' -> 0.0001)."""
    if not grid:
        raise SweepError("sweep: nothing to sweep; add e.g. `sweep: {lr: [1.0e-4, 3.0e-4]}` to chatforge.yaml")
    checked: dict[str, list[Any]] = {}
    for key, values in grid.items():
        check_train_key(key)
        if overlap := next((other for other in grid if key.startswith(f"{other}.")), None):
            raise SweepError(f"sweep.{key}: also set by sweep.{overlap}; sweep one or the other")
        if not isinstance(values, list) or not values:
            raise SweepError(f"sweep.{key}: expected a non-empty list of values, e.g. [a, b]; got {values!r}")
        typed: list[Any] = []
        for value in values:
            if value is None:  # merge_overrides treats None as "not given"
                raise SweepError(f"sweep.{key}: null cannot be swept; leave the key out to keep train.{key}")
            try:
                value = setting_value(merge_overrides(base, {key: value}), key)
            except ConfigError as exc:
                raise SweepError(f"sweep.{key}: {value!r} is not a valid value ({exc})") from None
            if any(identity(value) == identity(seen) for seen in typed):
                raise SweepError(f"sweep.{key}: {value!r} is listed twice")
            typed.append(value)
        checked[key] = typed
    return checked


def check_train_key(key: str) -> None:
    """Raise SweepError unless `key` ('lr', 'lora.r') names a training setting the sweep may vary."""
    model: type[BaseModel] = TrainConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f"; did you mean {'.'.join([*parts[:depth], close[0]])}?" if close else ""
            raise SweepError(f"sweep.{key}: not a train setting{hint}")
        annotation = fields[part].annotation
        if depth < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise SweepError(f"sweep.{key}: train.{'.'.join(parts[:depth + 1])} has no sub-settings")
            model = annotation
    if key == "out":
        raise SweepError("sweep.out: every trial gets its own run directory under the sweep's --out")


def setting_value(cfg: BaseModel, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def identity(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def grid_value(value: Any) -> GridValue:
    """What Optuna stores for a value: scalars as they are, lists and mappings as JSON text."""
    return value if isinstance(value, (str, int, float, bool)) else identity(value)


def params_key(params: dict[str, Any]) -> str:
    """Eight hex digits that name a combination of values (part of its run directory's name)."""
    return hashlib.sha1(identity(params).encode()).hexdigest()[:8]


def sweep(base: TrainConfig, grid: dict[str, list[Any]], out: Path, storage: str | None = None, resume: bool = False,
          log: Log = print) -> SweepReport:
    """Run the sweep; writes OUT/ (trial run dirs, sweep.db, leaderboard.*, manifest.json). See the module docstring."""
    grid = validate_grid(base, grid)
    out.mkdir(parents=True, exist_ok=True)
    storage_url = storage or f"sqlite:///{(out / 'sweep.db').resolve()}"
    backend = rdb_storage(storage_url)
    study = open_study(backend, f"chatforge-sweep-{out.resolve().name}", grid, base, resume)
    manifest = Manifest.start("sweep", config={"base": base.model_dump(mode="json"), "grid": grid,
                                               "storage": shown_url(storage_url), "study": study.study_name})
    n_grid = len(grid_combinations(grid))
    log(f"sweep {study.study_name}: {n_grid} combinations of {', '.join(grid)}; storage {shown_url(storage_url)}")
    finished_before = {identity(row["params"]) for row in leaderboard_rows(study, grid) if row["state"] == "complete"}
    attempted_here: set[int] = set()  # grid points tried in this call: a failure is recorded, retried on --resume
    try:
        for _round in range(n_grid + 1):  # GridSampler may stop a round early when only retries are left
            fail_interrupted(study, backend, log)
            pending = queue_pending(study, n_grid, attempted_here)
            if not pending:
                break
            log(f"{pending} trials to run, {len(finished_before)} finished before")
            with optuna_quiet():
                study.optimize(partial(run_trial, base=base, grid=grid, out=out, log=log), n_trials=pending,
                               catch=(Exception,), gc_after_trial=True,
                               callbacks=[lambda _study, trial: attempted_here.add(trial.system_attrs["grid_id"])])
    finally:  # also after Ctrl-C: the leaderboard shows what is finished so far
        rows = leaderboard_rows(study, grid)
        counts = outcome_counts(rows, finished_before)
        best = rows[0] if rows and rows[0]["state"] == "complete" else None
        write_leaderboard(out, rows, counts)
        manifest.counts = {"combinations": n_grid, **counts}
        manifest.outputs = {"leaderboard": "leaderboard.md", "rows": "leaderboard.json", "plot": "leaderboard.png",
                            "best_run_dir": best and best["run_dir"]}
        manifest.write(out)
    log("sweep done: " + ", ".join(f"{n} {what}" for what, n in counts.items() if n or what in ("done", "failed"))
        + (f"; best: trial {best['trial']} ({describe(best['params'])})" if best else ""))
    return SweepReport(out, rows, best, counts["skipped"], counts["failed"], counts["done"])


def run_trial(trial: optuna.Trial, base: TrainConfig, grid: dict[str, list[Any]], out: Path, log: Log) -> float:
    """Optuna's objective: train() the grid point GridSampler chose; its best val loss (inf: none) is the value."""
    params = {key: decode(values, trial.suggest_categorical(key, [grid_value(v) for v in values]))
              for key, values in grid.items()}
    index = grid_combinations(grid).index(params)
    host, earlier = socket.gethostname(), trial.user_attrs  # a retry carries its failed attempt's run dir
    run_dir = Path(earlier["run_dir"]) if earlier.get("host") == host else out / f"trial-{index}-{params_key(params)}"
    for name, value in {"host": host, "pid": os.getpid(), "run_dir": str(run_dir)}.items():
        trial.set_user_attr(name, value)
    log(f"trial {index}: {describe(params)} -> {run_dir}")
    try:  # an interrupted trial's rerun continues from its newest checkpoint
        cfg = merge_overrides(base, {**params, "out": str(run_dir)})
        resume = RunDir(run_dir).has_checkpoints()
        report = train(cfg, resume=resume, log=lambda message: log(f"  trial {index}: {message}"))
    except Exception as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        detail = "" if isinstance(exc, (ValueError, OSError)) else "\n" + traceback.format_exc()  # a bug: show where
        log(f"trial {index} failed: {type(exc).__name__}: {exc}{detail}")
        raise
    trial.set_user_attr("steps", report.steps)
    trial.set_user_attr("stopped_early", report.stopped_early)
    best = report.best_val_loss
    return best if best is not None and math.isfinite(best) else math.inf  # no val loss ranks last


@contextmanager
def optuna_quiet() -> Iterator[None]:
    """Optuna at ERROR level inside optimize(), where it would repeat our failure lines with its own trial numbers."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def decode(values: list[Any], stored: GridValue) -> Any:
    return next(value for value in values if grid_value(value) == stored)


def shown_url(url: str) -> str:
    """The storage URL without its password, for logs, errors and the manifest."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL: show it, but nothing before an '@'
        return url if "@" not in url else "***@" + url.split("@")[-1]


def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `url`, with heartbeats so a trial whose machine died can be told from a running one."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna; they have been stable since 2.x
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except Exception as exc:  # a malformed URL, a missing database driver, a server that does not answer
        hint = "; install its driver (PostgreSQL: pip install psycopg2-binary)" if isinstance(exc, ImportError) else ""
        raise SweepError(f"storage {shown_url(url)}: cannot open it: {type(exc).__name__}: {exc}{hint}") from None


def open_study(storage: optuna.storages.RDBStorage, name: str, grid: dict[str, list[Any]], base: TrainConfig,
               resume: bool) -> optuna.Study:
    """The sweep's study, created on first use; refuses to mix runs of another grid or other base settings."""
    search_space = {key: [grid_value(value) for value in values] for key, values in grid.items()}
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True,
                                sampler=optuna.samplers.GridSampler(search_space))
    where = f"study {name!r} in {shown_url(storage.url)}"
    if study.trials and not resume:
        raise SweepError(f"{where} already holds {len(study.trials)} trials; pass --resume to continue that sweep "
                         "or choose another --out")
    settings = {k: v for k, v in base.model_dump(mode="json").items() if k not in MACHINE_SPECIFIC}
    if not study.trials:
        study.set_user_attr("grid", search_space)
        study.set_user_attr("base", settings)
    elif study.user_attrs.get("grid") != search_space:
        raise SweepError(f"{where} ran another sweep block ({study.user_attrs.get('grid')}); restore it or choose "
                         "another --out for the new grid")
    elif (recorded := study.user_attrs.get("base", {})) != settings:
        changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
        raise SweepError(f"{where} ran with other train settings ({', '.join(f'train.{k}' for k in changed)} "
                         "changed); restore them or choose another --out")
    return study


def queue_pending(study: optuna.Study, n_grid: int, attempted_here: set[int]) -> int:
    """Queue a retry of every grid point that failed before this call; count the trials left to run."""
    by_grid: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        by_grid.setdefault(trial.system_attrs.get("grid_id", -1), []).append(trial)
    pending = 0
    for grid_id in range(n_grid):
        attempts = by_grid.get(grid_id, [])
        states = {trial.state for trial in attempts}
        if TrialState.COMPLETE in states or TrialState.RUNNING in states or grid_id in attempted_here:
            continue  # finished, running elsewhere, or failed in this call (recorded; --resume retries it)
        if TrialState.FAIL in states and TrialState.WAITING not in states:
            failed = attempts[-1]  # the retry keeps the grid point (GridSampler counts it there) and the run dir
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=failed.params, distributions=failed.distributions,
                system_attrs={k: failed.system_attrs[k] for k in ("grid_id", "search_space")},
                user_attrs={"retry_of": failed.number, **{k: failed.user_attrs[k] for k in ("host", "run_dir")
                                                          if k in failed.user_attrs}}))
        pending += 1
    return pending


def fail_interrupted(study: optuna.Study, storage: optuna.storages.RDBStorage, log: Log) -> None:
    """Mark RUNNING trials as failed when their process is gone from this machine or their heartbeat is stale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    # a sampler-free handle: GridSampler's after_trial may stop a study, which only works inside optimize()
    plain = optuna.load_study(study_name=study.study_name, storage=storage,
                              sampler=optuna.samplers.RandomSampler())
    for trial in plain.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get("pid")
        if trial.user_attrs.get("host") == host and pid is not None and not process_alive(pid):
            plain.tell(trial.number, state=TrialState.FAIL)
            run_dir = Path(trial.user_attrs.get("run_dir", "?"))
            log(f"{run_dir.name} was interrupted (process {pid} is gone); rerunning it")


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (not this process: it runs one trial at a time, not that one)."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return pid != os.getpid()


def leaderboard_rows(study: optuna.Study, grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """One row per combination: its finished trial, else its latest attempt; finished ones first, by val loss."""
    attempts: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        if set(trial.params) == set(grid):
            params = {key: decode(grid[key], trial.params[key]) for key in grid}
            attempts.setdefault(identity(params), []).append(trial)
    rows = []
    for index, params in enumerate(grid_combinations(grid)):
        tried = attempts.get(identity(params), [])
        complete = [trial for trial in tried if trial.state == TrialState.COMPLETE]
        chosen = (complete or tried or [None])[-1]
        row: dict[str, Any] = {"trial": index, "params": params, "state": "pending", "best_val_loss": None,
                               "steps": None, "stopped_early": None, "run_dir": None, "seconds": None,
                               "error": None, "attempts": len(tried), "optuna_trial": None}
        if chosen is not None:
            attrs, value = chosen.user_attrs, chosen.value
            row |= {"state": {TrialState.COMPLETE: "complete", TrialState.FAIL: "failed"}.get(chosen.state, "running"),
                    "best_val_loss": value if value is not None and math.isfinite(value) else None,
                    "steps": attrs.get("steps"), "stopped_early": attrs.get("stopped_early"),
                    "run_dir": attrs.get("run_dir"), "optuna_trial": chosen.number,
                    "seconds": round(chosen.duration.total_seconds(), 1) if chosen.duration else None}
            if chosen.state == TrialState.FAIL:
                row["error"] = attrs.get("error", "interrupted")
        rows.append(row)
    order = {"complete": 0, "running": 1, "failed": 2, "pending": 3}
    rows.sort(key=lambda r: (order[r["state"]], r["best_val_loss"] is None, r["best_val_loss"] or 0.0, r["trial"]))
    return rows


def outcome_counts(rows: list[dict[str, Any]], finished_before: set[str]) -> dict[str, int]:
    """Where each combination stands: skipped (finished before), done (now), failed, running (elsewhere), pending."""
    counts = {"skipped": 0, "done": 0, "failed": 0, "running": 0, "pending": 0}
    for row in rows:
        if row["state"] == "complete":
            counts["skipped" if identity(row["params"]) in finished_before else "done"] += 1
        else:
            counts[row["state"]] += 1
    return counts
