"""What every stage writes into its output directory: `manifest.json`, the lineage of a result.

Use it like this::

    manifest = Manifest.start("prepare", config=cfg.model_dump())
    manifest.add_input(path)                         # hashes the file
    with manifest.timed("dedup"):
        ...
    manifest.counts["read"] = 1234
    manifest.write(out_dir)                          # out_dir/manifest.json

`read_manifest(dir)` reads one back; later stages record the hash of the manifest they consumed so a run's chain
(source files -> dataset -> run -> evals) can be followed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
TRACKED_PACKAGES = (
    "chatforge", "torch", "transformers", "tokenizers", "peft", "datasets", "accelerate", "datasketch", "gguf",
    "pydantic", "numpy",
)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a result (missing ones are left out)."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class Manifest:
    """The record of one stage run; fill it while the stage works, then `write` it."""

    stage: str
    config: dict[str, Any]
    started_at: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    _t0: float = field(default_factory=time.perf_counter, repr=False)

    @classmethod
    def start(cls, stage: str, config: dict[str, Any]) -> Manifest:
        return cls(stage=stage, config=config, started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def add_input(self, path: Path, **details: Any) -> None:
        """Record an input file with its size and sha256 (plus any details such as the detected format)."""
        self.inputs.append({"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path), **details})

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        """Time a step; repeated steps add up."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings_s[step] = round(self.timings_s.get(step, 0.0) + time.perf_counter() - t0, 4)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "started_at": self.started_at,
            "inputs": self.inputs,
            "config": self.config,
            "versions": package_versions(),
            "counts": self.counts,
            "outputs": self.outputs,
            "timings_s": {**self.timings_s, "total": round(time.perf_counter() - self._t0, 4)},
            **self.extra,
        }

    def write(self, out_dir: Path) -> Path:
        """Write out_dir/manifest.json atomically (temp file + rename) and return its path."""
        path = out_dir / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read directory/manifest.json; a clear error if the directory is not a chatforge stage output."""
    path = directory / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {MANIFEST_NAME}; is this a chatforge output directory?")
    return json.loads(path.read_text(encoding="utf-8"))
