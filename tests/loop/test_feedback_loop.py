"""One full turn of the loop on the tiny model: run the project, serve the run, a user corrects an answer through
the API, the feedback export becomes a data source, `chatforge run` again — and the correction is training data."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import yaml

from chatforge.config import ProjectConfig, ServeConfig
from chatforge.pipeline import run_project
from chatforge.serve.app import create_app
from chatforge.serve.feedback import export_feedback
from chatforge.serve.store import Store
from tests.loop.test_pipeline import project_file
from tests.serve.conftest import running_server

CORRECTION = "Unplug the purple router for ten seconds, then plug it back in."


def test_feedback_with_a_correction_reaches_the_next_training_set(tmp_path: Path, tiny_model_dir: Path) -> None:
    path = project_file(tmp_path, tiny_model_dir)
    first = run_project(ProjectConfig.load(path), base_dir=tmp_path, log=lambda _m: None)
    run_dir = next(o.out_dir for o in first if o.stage == "train")

    store = Store(f"sqlite:///{tmp_path / 'chatforge.db'}")
    key = store.create_key("tester", ("chat", "feedback"))[0]
    cfg = ServeConfig(backend="torch", run=str(run_dir), db=f"sqlite:///{tmp_path / 'chatforge.db'}", default_max_tokens=8)
    headers = {"Authorization": f"Bearer {key}"}
    with running_server(create_app(cfg, store)) as url:
        answer = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=60, json={
            "model": "chatforge", "messages": [{"role": "user", "content": "My purple router blinks. What now?"}],
            "max_tokens": 8}).json()
        rated = httpx.post(f"{url}/v1/feedback", headers=headers, timeout=30, json={
            "completion_id": answer["id"], "rating": -1, "correction": CORRECTION})
        assert rated.status_code == 200, rated.text

    exported = export_feedback(store, tmp_path / "feedback.jsonl")
    assert exported.exported_corrected == 1
    settings = yaml.safe_load(path.read_text())
    settings["data"]["sources"].append("feedback.jsonl")  # the one config change that closes the loop
    path.write_text(yaml.safe_dump(settings))

    second = {o.stage: o for o in run_project(ProjectConfig.load(path), base_dir=tmp_path, log=lambda _m: None)}
    assert not second["prepare"].skipped and not second["train"].skipped
    dataset = second["prepare"].out_dir
    rows = [json.loads(line) for split in ("train", "val", "test")
            for line in (dataset / f"{split}.jsonl").read_text().splitlines()]
    corrected = [r for r in rows if r["messages"][-1]["content"] == CORRECTION]
    assert len(corrected) == 1
    assert corrected[0]["messages"][0]["content"] == "My purple router blinks. What now?"
    train_manifest = json.loads((second["train"].out_dir / "manifest.json").read_text())
    assert train_manifest["lineage"]["dataset_dir"] == str(dataset.resolve())
