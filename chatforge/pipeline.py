"""`chatforge run`: prepare -> train -> eval from one project file, skipping stages whose inputs and config are
unchanged; and `chatforge lineage`: the chain from source files to a run's evals, read back from the manifests.

Use it like this::

    outcomes = run_project(ProjectConfig.load(Path("chatforge.yaml")), base_dir=Path("."), force={"eval"})
    [(o.stage, o.skipped, o.reason) for o in outcomes]
    print("\\n".join(lineage_lines(Path("chatforge-out/run"))))

A stage is current when its output directory holds a manifest.json whose `config` equals the config it would run
with now and whose recorded inputs (paths and sha256) are exactly the files it would read now, unchanged. Paths in
the project file are relative to the file's directory. train.data defaults to data.out and train.out to
chatforge-out/run, so a project file can be as short as `data: {sources: [tickets.csv]}`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatforge.config import ProjectConfig, TrainConfig
from chatforge.core.rundir import RunDir
from chatforge.manifest import MANIFEST_NAME, sha256_file

Log = Callable[[str], None]
STAGES = ("prepare", "train", "eval")
DEFAULT_RUN_DIR = "chatforge-out/run"


class PipelineError(ValueError):
    """The project file cannot run as written (no sources, a stage failed its inputs, ...)."""


@dataclass
class StageOutcome:
    stage: str
    out_dir: Path
    skipped: bool
    reason: str


def run_project(
    project: ProjectConfig, base_dir: Path = Path("."), force: set[str] | None = None, log: Log = print
) -> list[StageOutcome]:
    """Run prepare, train and eval in order (see the module docstring); returns what each stage did."""
    # lazy: the stages pull in torch, transformers, accelerate and peft (import measured at 30 s vs 0.9 s for this
    # module alone on the loaded 2-core dev machine), which `chatforge lineage` (lineage_lines below) never needs
    from chatforge.data.prepare import expand_inputs, prepare
    from chatforge.evaluate.run_eval import evaluate_run
    from chatforge.train.loop import train

    force = set(force or ())
    unknown = force - set(STAGES)
    if unknown:
        raise PipelineError(f"--force {sorted(unknown)}: unknown stage; choose from {list(STAGES)}")
    if not project.data.sources:
        raise PipelineError("data.sources is empty: list the files or folders to prepare in the project file")
    sources = [_resolve(base_dir, s) for s in project.data.sources]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise PipelineError(f"data.sources: {', '.join(missing)} not found")
    dataset_dir = _resolve(base_dir, project.data.out)
    train_cfg = _train_config(project.train, base_dir, dataset_dir)
    run_dir = Path(train_cfg.out or DEFAULT_RUN_DIR)
    outcomes: list[StageOutcome] = []

    def stage(name: str, out_dir: Path, config: dict[str, Any], inputs: list[Path], work: Callable[[], None]) -> None:
        current, why = is_current(out_dir, config, inputs)
        if current and name not in force:
            log(f"{name}: skipped, {why} ({out_dir})")
            outcomes.append(StageOutcome(name, out_dir, True, why))
            return
        reason = "forced" if current else why
        log(f"{name}: running ({reason})")
        work()
        outcomes.append(StageOutcome(name, out_dir, False, reason))

    prepare_inputs = expand_inputs(sources)
    stage("prepare", dataset_dir, project.prepare.model_dump(mode="json"), prepare_inputs,
          lambda: prepare(sources, dataset_dir, project.prepare, log=log))

    train_inputs = [dataset_dir / "train.jsonl", dataset_dir / "val.jsonl"]

    def do_train() -> None:
        if run_dir.exists():  # a run of other data or config: set it aside rather than mix checkpoints
            aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            run_dir.rename(aside)
            log(f"train: the previous run is kept in {aside}")
        train(train_cfg, log=log)

    stage("train", run_dir, train_cfg.model_dump(mode="json"), [p for p in train_inputs if p.exists()], do_train)

    eval_cfg = project.eval.model_copy(update={"data": str(dataset_dir) if project.eval.data is None
                                               else str(_resolve(base_dir, project.eval.data))})
    eval_dir = RunDir(run_dir).eval_dir(eval_cfg.name or eval_cfg.split)
    eval_inputs = [Path(eval_cfg.data) / f"{eval_cfg.split}.jsonl", RunDir(run_dir).manifest_file]
    stage("eval", eval_dir, eval_cfg.model_dump(mode="json"), eval_inputs,
          lambda: evaluate_run(run_dir, eval_cfg, log=log))
    return outcomes


def _resolve(base_dir: Path, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else base_dir / candidate


def _train_config(train_cfg: TrainConfig, base_dir: Path, dataset_dir: Path) -> TrainConfig:
    """train: with data defaulting to the prepared dataset and paths made relative to the project file."""
    data = _resolve(base_dir, train_cfg.data) if train_cfg.data else dataset_dir
    out = _resolve(base_dir, train_cfg.out or DEFAULT_RUN_DIR)
    model = train_cfg.model
    if model and not Path(model).is_absolute() and (base_dir / model).exists():
        model = str(base_dir / model)
    return train_cfg.model_copy(update={"data": str(data), "out": str(out), "model": model})


def is_current(out_dir: Path, config: dict[str, Any], inputs: list[Path]) -> tuple[bool, str]:
    """(True, why) when out_dir/manifest.json says the stage ran with this config on exactly these files."""
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return False, "no previous output"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if _normalised(manifest.get("config")) != _normalised(config):
        return False, "config changed"
    recorded = {str(Path(i["path"]).resolve()): i.get("sha256") for i in manifest.get("inputs", [])}
    wanted = {str(p.resolve()) for p in inputs}
    if wanted - recorded.keys():
        return False, "inputs changed (new files)"
    if recorded.keys() - wanted:
        return False, "inputs changed (files removed)"
    for path in wanted:
        if not Path(path).is_file() or sha256_file(Path(path)) != recorded[path]:
            return False, f"input changed: {Path(path).name}"
    return True, "inputs and config unchanged"


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def lineage_lines(run_dir: Path) -> list[str]:
    """The chain behind a run, one indented line per link: sources -> dataset -> run -> evals -> exports."""
    run = RunDir(run_dir)
    manifest = _read(run.manifest_file)
    if manifest is None:
        raise PipelineError(f"{run_dir}: no {MANIFEST_NAME}; is this a finished chatforge run?")
    lines = [f"run {run_dir.resolve()}  ({manifest.get('stage')}, started {manifest.get('started_at')})"]
    lineage = manifest.get("lineage") or {}
    base = lineage.get("base_model")
    if base:
        lines.append(f"  base model {base if isinstance(base, str) else json.dumps(base)}")
    dataset_dir = lineage.get("dataset_dir") or manifest.get("config", {}).get("data")
    if dataset_dir:
        data_manifest = _read(Path(dataset_dir) / MANIFEST_NAME)
        recorded = lineage.get("dataset_manifest_sha256")
        now = sha256_file(Path(dataset_dir) / MANIFEST_NAME) if data_manifest is not None else None
        state = "" if recorded in (None, now) else "  [changed since training]"
        lines.append(f"  <- dataset {dataset_dir}{state}")
        for source in (data_manifest or {}).get("inputs", []):
            lines.append(f"     <- source {source['path']}  sha256 {source['sha256'][:12]}  ({source.get('format', '?')})")
    for member in lineage.get("members", []):
        lines.append(f"  <- member run {member.get('run')}")
    for eval_manifest in run.eval_manifests():
        evaluated = _read(eval_manifest) or {}
        lines.append(f"  -> eval {eval_manifest.parent}  (started {evaluated.get('started_at')}, "
                     f"{evaluated.get('counts', {}).get('evaluated', '?')} conversations)")
    for export_manifest in run.export_manifests():
        exported = _read(export_manifest) or {}
        lines.append(f"  -> export {export_manifest.parent}  ({exported.get('format', '?')})")
    return lines


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
