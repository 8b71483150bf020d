"""`serve --backend llamaserver`: chatforge starts llama.cpp's `llama-server` on the run exported to GGUF, puts the
gateway in front of it, and stops it again; a missing or crashing binary is a clear error. The served answers equal
the torch backend's greedy answers on the tiny run. Skips, saying why, where llama-server is not built (`make
test` builds it)."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from types import SimpleNamespace
from pathlib import Path

import httpx
import pytest

from chatforge.config import ServeConfig
from chatforge.models import export
from chatforge.models.generate import SamplingSettings
from chatforge.models.llamacpp_build import llama_server_binary
from chatforge.serve import llamaserver
from chatforge.serve.app import create_app
from chatforge.serve.backends import GenerationInput, TorchBackend, complete, make_backend
from chatforge.serve.llamaserver import LlamaServerBackend
from chatforge.serve.store import Store
from tests.serve.conftest import running_server
from tests.serve.test_llamacpp import QUESTION, answer, gemma_run, gguf_cache  # noqa: F401 (fixtures)


def needs_llama_server() -> Path:
    binary = llama_server_binary()
    if binary is None:
        pytest.skip("llama-server is not built; `make llama-server` (part of `make test`) builds it")
    return binary


def test_llamaserver_backend_answers_like_torch_through_the_gateway_and_stops_its_child(
        gemma_run: Path, gguf_cache: Path, tmp_path: Path) -> None:  # noqa: F811
    needs_llama_server()
    cfg = ServeConfig(backend="llamaserver", run=str(gemma_run), gguf_quant="f32", threads=1, max_batch=2,
                      db=f"sqlite:///{tmp_path / 'gw.db'}")
    torch_text = answer(TorchBackend(cfg.model_copy(update={"backend": "torch"}), run=gemma_run),
                        GenerationInput(SamplingSettings(max_new_tokens=8), messages=QUESTION))
    assert torch_text, "the tiny run should answer something to compare"
    export.cached_gguf(gemma_run, "f32")  # exported before the app starts: uvicorn's start-up wait is short
    store = Store(cfg.db, pii=cfg.pii)
    application = create_app(cfg, store=store)
    with running_server(application) as gateway:
        key = store.create_key("llamaserver-test", ("chat",))[0]
        body = {"model": gemma_run.name, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
        replies = [httpx.post(gateway + "/v1/chat/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {key}"}) for _ in range(2)]
        backend = application.state.serve.backend
        child = backend.process
        assert isinstance(backend, LlamaServerBackend) and child.poll() is None
    store.close()
    for reply in replies:
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == torch_text
        assert reply.json()["model"] == gemma_run.name
    assert child.poll() is not None, "the gateway's shutdown must stop llama-server"
    assert len(list(gguf_cache.glob("*-f32.gguf"))) == 1  # exported once, cached


def test_llamaserver_backend_batches_concurrent_requests(gemma_run: Path, gguf_cache: Path) -> None:  # noqa: F811
    needs_llama_server()
    cfg = ServeConfig(backend="llamaserver", run=str(gemma_run), gguf_quant="f32", threads=1, max_batch=4)
    greedy = SamplingSettings(max_new_tokens=8)

    async def scenario() -> list[str]:
        backend = make_backend(cfg)
        await backend.start()
        try:
            done = await asyncio.gather(*(complete(backend, GenerationInput(greedy, messages=QUESTION))
                                          for _ in range(4)))
            return [c.text for c in done]
        finally:
            await backend.close()

    texts = asyncio.run(scenario())
    assert len(texts) == 4 and len(set(texts)) == 1 and texts[0]


def test_a_missing_llama_server_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(llamaserver, "llama_server_binary", lambda: None)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(RuntimeError, match="make llama-server"):
        asyncio.run(LlamaServerBackend(ServeConfig(backend="llamaserver", gguf=str(gguf))).start())


def test_a_crashing_llama_server_is_reported_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'error: unknown model architecture: nonsense' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    backend = LlamaServerBackend(ServeConfig(backend="llamaserver", gguf=str(gguf)), binary=fake)
    with pytest.raises(RuntimeError, match="exited with code 3.*unknown model architecture"):
        asyncio.run(backend.start())


def test_serving_something_that_is_neither_a_run_nor_a_gguf_says_what_to_do(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="export it"):
        export.gguf_to_serve(str(hf_dir), None)
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        export.gguf_to_serve(None, str(tmp_path / "missing.gguf"))


def test_auto_serves_a_run_through_llama_server_when_it_is_built(gemma_run: Path, gguf_cache: Path) -> None:  # noqa: F811
    needs_llama_server()
    cfg = ServeConfig(run=str(gemma_run), gguf_quant="f32")
    assert cfg.backend == "auto"
    chosen = llamaserver.choose_backend(cfg)
    assert chosen.backend == "llamaserver" and chosen.gguf and chosen.gguf.endswith("-f32.gguf")
    assert isinstance(make_backend(cfg), LlamaServerBackend)


def test_auto_falls_back_to_torch_and_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    run = str(tmp_path / "some-run")
    monkeypatch.setattr(llamaserver, "llama_server_binary", lambda: None)
    assert llamaserver.choose_backend(ServeConfig(run=run)).backend == "torch"
    assert "not built" in caplog.text
    assert llamaserver.choose_backend(ServeConfig(run=run, quantize="int8")).backend == "torch"
    assert "torch-engine option" in caplog.text

    def failing_export(*_args: object) -> Path:
        raise export.ExportError("GGUF conversion of some-run failed: unknown architecture Foo\nmore lines")

    monkeypatch.setattr(llamaserver, "llama_server_binary", lambda: tmp_path / "llama-server")
    monkeypatch.setattr(llamaserver, "find_run", lambda _run: SimpleNamespace(kind="adapter"))
    monkeypatch.setattr(llamaserver, "gguf_to_serve", failing_export)
    assert llamaserver.choose_backend(ServeConfig(run=run)).backend == "torch"
    assert "GGUF export failed: GGUF conversion of some-run failed: unknown architecture Foo" in caplog.text


def test_llama_server_dies_with_a_gateway_that_is_killed(tmp_path: Path) -> None:
    """A gateway killed with SIGKILL (no close) must not leave its llama-server running."""
    pid_file = tmp_path / "child.pid"
    fake = tmp_path / "llama-server"
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 120\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    script = (f"import asyncio; from pathlib import Path; from chatforge.config import ServeConfig; "
              f"from chatforge.serve.llamaserver import LlamaServerBackend; "
              f"asyncio.run(LlamaServerBackend(ServeConfig(backend='llamaserver', gguf='{gguf}'), "
              f"binary=Path('{fake}')).start())")
    gateway = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline and gateway.poll() is None, "the fake llama-server never started"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(gateway.pid, signal.SIGKILL)
        gateway.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]:
            assert time.monotonic() < deadline, "llama-server outlived its killed gateway"
            time.sleep(0.1)
    finally:
        if gateway.poll() is None:
            gateway.kill()
