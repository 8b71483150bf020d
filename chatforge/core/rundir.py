"""A run directory's layout, owned in one place: every stage finds a run's files through `RunDir`.

Use it like this::

    run = RunDir(Path("runs/r1"))
    run.model_dir                   # runs/r1/model: the adapter or full model, loadable without chatforge
    run.write_train_config(cfg)     # runs/r1/config.yaml ({"train": cfg}), as train writes it before the first step
    cfg = run.train_config()        # TrainConfig back from config.yaml (an ensemble: its first member's)
    run.eval_dir("test")            # runs/r1/eval/test/
    run.export_dir("gguf")          # runs/r1/exports/gguf/ (the record of an export)

What a run holds (names as on disk since the first release; nothing else in chatforge spells them)::

    RUN/config.yaml            the resolved `train:` settings      RUN/chat_template.jinja  the exact template
    RUN/model/                 adapter or full model + tokenizer   RUN/manifest.json        lineage, counts
    RUN/checkpoints/step-N/    resumable state (train.checkpoints) RUN/checkpoints/best/    the best val loss
    RUN/metrics.jsonl          one line of scalars per log step    RUN/tb/                  TensorBoard events
    RUN/eval/NAME/             one evaluation (metrics.json, ...)  RUN/exports/NAME/        one export's record
    RUN/ensemble.json          an ensemble's members and weights   RUN/tokenizer/           an ensemble's tokenizer

`train_config` raises `RunDirError` naming the file when config.yaml is missing, is not YAML, or does not match
`TrainConfig`; `train_config_or_none` is for the runs that have none (a weight-averaged `ensemble --soup`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import ValidationError

from chatforge.config import TrainConfig
from chatforge.manifest import MANIFEST_NAME


class RunDirError(ValueError):
    """A run directory's file is missing or unreadable; the message names the file and what to do."""


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory (see the module docstring); `RunDir(path)` touches nothing on disk."""

    path: Path

    MODEL_DIR: ClassVar[str] = "model"
    CONFIG_FILE: ClassVar[str] = "config.yaml"
    TEMPLATE_FILE: ClassVar[str] = "chat_template.jinja"
    CHECKPOINTS_DIR: ClassVar[str] = "checkpoints"
    BEST_CHECKPOINT: ClassVar[str] = "best"
    METRICS_FILE: ClassVar[str] = "metrics.jsonl"
    TENSORBOARD_DIR: ClassVar[str] = "tb"
    EVAL_DIR: ClassVar[str] = "eval"
    EVAL_METRICS_FILE: ClassVar[str] = "metrics.json"
    EXPORTS_DIR: ClassVar[str] = "exports"
    ENSEMBLE_FILE: ClassVar[str] = "ensemble.json"
    ENSEMBLE_TOKENIZER_DIR: ClassVar[str] = "tokenizer"
    TRAIN_SECTION: ClassVar[str] = "train"

    def __init__(self, path: Path | str) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def model_dir(self) -> Path:
        return self.path / self.MODEL_DIR

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG_FILE

    @property
    def template_file(self) -> Path:
        return self.path / self.TEMPLATE_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS_DIR

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints_dir / self.BEST_CHECKPOINT

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD_DIR

    @property
    def manifest_file(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def ensemble_file(self) -> Path:
        return self.path / self.ENSEMBLE_FILE

    @property
    def ensemble_tokenizer_dir(self) -> Path:
        return self.path / self.ENSEMBLE_TOKENIZER_DIR

    @property
    def evals_dir(self) -> Path:
        return self.path / self.EVAL_DIR

    @property
    def exports_dir(self) -> Path:
        return self.path / self.EXPORTS_DIR

    def eval_dir(self, name: str) -> Path:
        """RUN/eval/NAME/: where `chatforge eval --name NAME` (default: the split) writes."""
        return self.evals_dir / name

    def export_dir(self, name: str) -> Path:
        """RUN/exports/NAME/: the record (manifest.json) of one `chatforge export`."""
        return self.exports_dir / name

    def eval_metrics_files(self) -> list[Path]:
        """Every RUN/eval/NAME/metrics.json, oldest first (by modification time, then path)."""
        found = self.evals_dir.glob(f"*/{self.EVAL_METRICS_FILE}")
        return sorted(found, key=lambda path: (path.stat().st_mtime, str(path)))

    def eval_manifests(self) -> list[Path]:
        """RUN/eval/*/manifest.json, by name."""
        return sorted(self.evals_dir.glob(f"*/{MANIFEST_NAME}"))

    def export_manifests(self) -> list[Path]:
        """RUN/exports/*/manifest.json, by name."""
        return sorted(self.exports_dir.glob(f"*/{MANIFEST_NAME}"))

    @classmethod
    def is_eval_dir(cls, directory: Path) -> bool:
        """True for a RUN/eval/NAME/ directory (its parent is named like the runs' eval folder)."""
        return directory.parent.name == cls.EVAL_DIR

    def is_ensemble(self) -> bool:
        return self.ensemble_file.is_file()

    def has_model(self) -> bool:
        return self.model_dir.is_dir()

    def has_checkpoints(self) -> bool:
        return self.checkpoints_dir.is_dir()

    def write_train_config(self, cfg: TrainConfig) -> Path:
        """Write RUN/config.yaml: the resolved settings under `train:` (what `train_config` reads back)."""
        self.config_file.write_text(yaml.safe_dump({self.TRAIN_SECTION: cfg.model_dump(mode="json")}, sort_keys=False))
        return self.config_file

    def train_config(self) -> TrainConfig:
        """The TrainConfig the run was trained with (an ensemble: its first member's); RunDirError naming the file
        when config.yaml is missing or invalid."""
        config = self.train_config_or_none()
        if config is None:
            raise RunDirError(f"{self.config_file}: missing; is {self.path} a run written by `chatforge train`?")
        return config

    def train_config_or_none(self) -> TrainConfig | None:
        """Like `train_config`, but None for a run without config.yaml (a weight-averaged soup has none)."""
        path = self.config_file
        if not path.is_file() and self.is_ensemble():
            path = RunDir(self.ensemble_spec()["members"][0]["run"]).config_file
        if not path.is_file():
            return None
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:  # one line: the file, the line, the problem
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise RunDirError(f"{where}: not valid YAML ({problem}); restore it from the run's "
                              f"{MANIFEST_NAME} `config`") from exc
        if not isinstance(document, dict) or not isinstance(document.get(self.TRAIN_SECTION), dict):
            raise RunDirError(f"{path}: expected a `{self.TRAIN_SECTION}:` section with the run's settings")
        try:
            return TrainConfig.model_validate(document[self.TRAIN_SECTION])
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise RunDirError(f"{path}: {self.TRAIN_SECTION}: {problems}") from exc

    def write_ensemble_spec(self, spec: dict[str, Any]) -> Path:
        """Write RUN/ensemble.json (see `ensemble_spec`)."""
        self.ensemble_file.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
        return self.ensemble_file

    def ensemble_spec(self) -> dict[str, Any]:
        """RUN/ensemble.json: {"method": "probability_average", "members": [{"run": abs dir, "weight": w}, ...]}."""
        spec_path = self.ensemble_file
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        members = spec.get("members")
        if not isinstance(members, list) or not members:
            raise ValueError(f"{spec_path}: no members; expected a list of {{'run': dir, 'weight': number}}")
        for member in members:
            if not Path(member["run"]).is_dir():
                raise FileNotFoundError(f"{spec_path}: member run {member['run']} does not exist; "
                                        "was it moved or deleted?")
        return spec
