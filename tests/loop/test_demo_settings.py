"""The demo's plan: the recipe's steps with the time budget as a guard, SmolLM2 by default, and a free port when
the default one is taken."""

from __future__ import annotations

import socket
from pathlib import Path

from chatforge.cli.loop import free_port_near
from chatforge.config import ProjectConfig
from chatforge.demo import DEMO_STEPS, FAQ_FILE, demo_settings


def test_full_demo_fine_tunes_smollm2_for_the_recipes_steps_with_the_budget_as_a_guard(tmp_path: Path) -> None:
    settings = demo_settings(tmp_path, fast=False, train_minutes=15.0, max_steps=DEMO_STEPS)
    project = ProjectConfig.model_validate(settings)
    assert project.train.model == "smollm2-135m-instruct" and project.train.method == "lora"
    assert project.train.max_steps == DEMO_STEPS and project.train.max_minutes == 15.0
    assert project.data.sources[0] == str(FAQ_FILE)


def test_a_taken_port_gives_a_free_one(capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = free_port_near("127.0.0.1", port)
    assert other != port and other > 0
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
    assert free_port_near("127.0.0.1", free_port) == free_port
