"""`make demo` with DEMO_FAST=1 is `chatforge demo --fast`: the whole loop on the tiny model through the real CLI —
prepare the sample, train, evaluate against the base, serve and answer one request with the printed key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_fast_demo_runs_the_loop_end_to_end_and_a_second_run_skips_the_stages(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "chatforge", "demo", "--out", str(out), "--minutes", "0.3", "--check",
               "--port", str(free_port())]
    env = {**os.environ, "DEMO_FAST": "1", "COLUMNS": "200"}
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "check passed" in first.stdout
    assert "API key (shown once" in first.stdout and "curl http://127.0.0.1:" in first.stdout
    metrics = json.loads((out / "run/eval/test/metrics.json").read_text())
    assert metrics["baseline"]["kind"] == "base" and "rougeL" in metrics["deltas"]
    assert metrics["bias"]["total_pairs"] > 0
    assert (out / "run/eval/test/report.html").is_file() and (out / "dataset/card.md").is_file()
    assert metrics["metrics"]["perplexity"] < metrics["baseline"]["metrics"]["perplexity"]  # it learned something

    second = subprocess.run([*command[:-2], "--port", str(free_port())], capture_output=True, text=True, env=env,
                            timeout=600, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage in ("prepare", "train", "eval"):
        assert f"{stage}: skipped" in second.stdout
