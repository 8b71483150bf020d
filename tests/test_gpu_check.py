"""scripts/gpu_check.sh in its CPU dry mode: it prints the whole plan (train, eval, torch engine, vLLM and the
gateway in front of it) and every chatforge command in it parses, `--device` included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "MODELS": "gemma3-270m",
                   "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_dry_run_prints_the_plan_and_every_command_parses(tmp_path: Path) -> None:
    done = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "+ chatforge train " in out and "--device cuda" in out
    assert "+ chatforge eval " in out and "+ chatforge export " in out and "--hf" in out
    assert "vllm.entrypoints.openai.api_server" in out and "--backend upstream" in out
    assert "benchmarks/serve_load.py" in out and "load test gemma3-270m vLLM behind the chatforge gateway" in out
    assert "plan parses" in out and "load client compiles" in out


def test_dry_run_fails_on_a_flag_that_does_not_exist(tmp_path: Path) -> None:
    done = dry_run(tmp_path, TRAIN_ARGS="--no-such-flag 3")
    assert done.returncode == 1
    assert "does not parse: chatforge train" in done.stdout and "no-such-flag" in done.stdout
