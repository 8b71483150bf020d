"""The one device policy: `--device` on every model-loading command reaches the loader (train, eval, rate, serve,
export, ensemble), `auto` picks CUDA > MPS > CPU, a missing device is one clear line, and one pad-id rule."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import chatforge.device
import chatforge.models.export  # noqa: F401  (imported so that the spy below reaches every module's resolve_device)
import chatforge.serve.backends  # noqa: F401
import chatforge.train.estimate  # noqa: F401
import chatforge.train.loop  # noqa: F401
from chatforge.cli import app
from chatforge.config import ServeConfig
from chatforge.device import DeviceError, inference_dtype, resolve_device, training_dtype
from chatforge.models.tokens import pad_token_id
from tests.models.test_run import prepared_dataset, tiny_run

ASKED = "cuda:7"  # a device this CPU machine lacks: only the spy below lets the commands go on (on the CPU)
runner = CliRunner()


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(chatforge.device, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(chatforge.device, "_mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="2 CUDA GPU"):
        resolve_device("cuda:2")


def test_missing_or_malformed_device_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(chatforge.device, "_mps_available", lambda: False)
    with pytest.raises(DeviceError, match="device cuda: no CUDA GPU is visible.*use --device auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="device mps: Apple MPS is not available"):
        resolve_device("mps")
    with pytest.raises(DeviceError, match="device 'gpu0': expected auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu0")


def test_dtypes_bf16_on_gpus_that_have_it_fp32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert training_dtype(cpu) == inference_dtype(cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert training_dtype(gpu) == inference_dtype(gpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert training_dtype(gpu) == torch.float32 and inference_dtype(gpu) == torch.float16


def test_one_pad_id_rule() -> None:
    assert pad_token_id(SimpleNamespace(pad_token_id=3, eos_token_id=1)) == 3
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=1)) == 1
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


def test_no_module_picks_a_device_or_pad_id_by_itself() -> None:
    """The policy has one owner: no other module asks torch for CUDA to choose a device or restates the pad rule."""
    root = Path(__file__).resolve().parents[1] / "chatforge"
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name != "device.py":
            assert '"cuda" if torch.cuda.is_available()' not in text, path
            assert "cpu=not torch.cuda.is_available()" not in text, path
        if path.name != "tokens.py":
            assert "pad_token_id if" not in text and "def _pad_id" not in text, path


@pytest.fixture()
def device_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every module's `resolve_device` records what it was asked for and answers the CPU."""
    asked: list[str] = []

    def spy(spec: Any = "auto") -> torch.device:
        asked.append(str(spec))
        return torch.device("cpu")

    policy = chatforge.device.resolve_device
    for module in list(sys.modules.values()):
        if module is not None and module.__name__.startswith("chatforge") and \
                getattr(module, "resolve_device", None) is policy:
            monkeypatch.setattr(module, "resolve_device", spy)
    return asked


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("device")
    dataset = prepared_dataset(root, tiny_model_dir)
    first = tiny_run(dataset, tiny_model_dir, root / "r1", "lora", seed=0)
    second = tiny_run(dataset, tiny_model_dir, root / "r2", "lora", seed=1)
    return dataset, first, second


def invoke(*args: str) -> Any:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_train_passes_device(device_spy: list[str], two_runs: tuple[Path, Path, Path], tiny_model_dir: Path,
                             tmp_path: Path) -> None:
    dataset, _, _ = two_runs
    invoke("train", "--data", dataset, "--model", tiny_model_dir, "--out", tmp_path / "run", "--max-steps", "1",
           "--dry-run", "--device", ASKED)
    assert device_spy and set(device_spy) == {ASKED}


def test_eval_passes_device_to_the_run_and_the_baseline(device_spy: list[str], two_runs: tuple[Path, Path, Path]) -> None:
    _, run, _ = two_runs
    invoke("eval", run, "--device", ASKED, "--max-examples", "2", "--max-new-tokens", "2", "--no-bias", "--name", "dev")
    assert device_spy == [ASKED, ASKED]  # the run, then its base model as the baseline


def test_rate_passes_device(device_spy: list[str], two_runs: tuple[Path, Path, Path], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    dataset, first, second = two_runs
    monkeypatch.setattr("chatforge.evaluate.rating_app.serve_rating", lambda *a, **k: None)
    invoke("rate", first, second, "--data", dataset, "--max-items", "1", "--db", f"sqlite:///{tmp_path / 'r.db'}",
           "--device", ASKED)
    assert device_spy == [ASKED, ASKED]


def test_serve_passes_device_to_the_torch_backend(device_spy: list[str], two_runs: tuple[Path, Path, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from chatforge.serve.backends import make_backend

    _, run, _ = two_runs
    served: list[ServeConfig] = []
    monkeypatch.setattr("chatforge.cli.serve.serve_run", lambda run, cfg, **k: served.append(cfg))
    invoke("serve", run, "--backend", "torch", "--device", ASKED)
    assert served[0].device == ASKED and device_spy == [ASKED]
    backend = make_backend(served[0])
    asyncio.run(backend.start())
    try:
        assert device_spy == [ASKED, ASKED]
    finally:
        asyncio.run(backend.close())


def test_export_passes_device(device_spy: list[str], two_runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, run, _ = two_runs
    invoke("export", run, "--hf", tmp_path / "hf", "--device", ASKED)
    assert device_spy == [ASKED]


def test_ensemble_soup_passes_device(device_spy: list[str], two_runs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, first, second = two_runs
    invoke("ensemble", first, second, "--soup", "--out", tmp_path / "soup", "--device", ASKED)
    assert device_spy == [ASKED, ASKED]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "eval", "rate", "serve", "export", "ensemble"])
def test_every_model_command_refuses_a_missing_gpu_in_one_line(
    command: str, two_runs: tuple[Path, Path, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    dataset, first, second = two_runs
    args = {
        "train": ["train", "--data", dataset, "--model", tiny_model_dir, "--out", tmp_path / "run", "--dry-run"],
        "eval": ["eval", first, "--max-examples", "1", "--no-bias"],
        "rate": ["rate", first, second, "--data", dataset, "--db", f"sqlite:///{tmp_path / 'r.db'}"],
        "serve": ["serve", first],
        "export": ["export", first, "--hf", tmp_path / "hf"],
        "ensemble": ["ensemble", first, second, "--soup", "--out", tmp_path / "soup"],
    }[command]
    result = runner.invoke(app, [str(a) for a in args] + ["--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "no CUDA GPU is visible" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "soup").exists() and not (tmp_path / "hf").exists()
