"""Serve fixtures: a tiny trained run, and chatforge apps running for real under uvicorn on loopback ports.

Use them like this::

    def test_x(server: RunningServer) -> None:
        key = server.new_key("alice")                       # a real key in the server's store
        httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=...)

    with running_server(create_app(cfg, store, backend)) as url: ...      # any other app, for one test

`GatedModel` wraps a model so each forward step waits for a threading.Event (and optionally sleeps): tests use it
to hold the engine busy (a full queue) or to slow decoding down (a disconnect mid-stream).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from chatforge.config import ServeConfig
from chatforge.models.run import LoadedRun, _cache_keyword, load_run
from chatforge.serve.app import create_app
from chatforge.serve.backends import TorchBackend
from chatforge.serve.server import uvicorn_config
from chatforge.serve.store import Store


@dataclass
class RunningServer:
    url: str
    app: Any
    store: Store
    backend: TorchBackend
    model_id: str

    def new_key(self, name: str, scopes: tuple[str, ...] = ("chat", "feedback"), rpm: int | None = None,
                tpm: int | None = None) -> str:
        return self.store.create_key(name, scopes, rpm=rpm, tpm=tpm)[0]


@contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a thread; yield its base URL; stop it afterwards."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    state = getattr(getattr(app, "state", None), "serve", None)
    if state is not None:  # a chatforge serve app: the limits `chatforge serve` runs it with
        config = uvicorn_config(app, state.cfg, lifespan="on")
    else:
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def serve_config(run: Path, db: Path, **changes: Any) -> ServeConfig:
    """Settings for tests: short answers, small queue, the given sqlite file."""
    settings: dict[str, Any] = {"run": str(run), "db": f"sqlite:///{db}", "max_batch": 8, "max_queue": 16,
                                "request_timeout_s": 30.0, "default_max_tokens": 16, "max_body_bytes": 64 * 1024}
    settings.update(changes)
    return ServeConfig(**settings)


@contextmanager
def started_server(loaded: LoadedRun, run: Path, db: Path, model_id: str | None = None,
                   **changes: Any) -> Iterator[RunningServer]:
    cfg = serve_config(run, db, **changes)
    store = Store(cfg.db, pii=cfg.pii)
    backend = TorchBackend(cfg, loaded=loaded, model_id=model_id)
    app = create_app(cfg, store=store, backend=backend)
    with running_server(app) as url:
        yield RunningServer(url, app, store, backend, backend.model_id)
    store.close()


class GatedModel(nn.Module):
    """`inner`, but every forward waits for `gate` to be set and then sleeps `delay_s` (a slow or held engine)."""

    def __init__(self, inner: nn.Module, gate: threading.Event, delay_s: float = 0.0) -> None:
        super().__init__()
        self.inner = inner
        self.gate = gate
        self.delay_s = delay_s
        self.config = inner.config

    def forward(self, input_ids: torch.Tensor, cache: Any = None, **kwargs: Any) -> Any:
        self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.inner(input_ids=input_ids, **{_cache_keyword(self.inner): cache}, **kwargs)


def gated(loaded: LoadedRun, gate: threading.Event, delay_s: float = 0.0, stop_tokens: bool = True) -> LoadedRun:
    """A copy of `loaded` whose model waits for `gate`; without stop tokens it always decodes to max_tokens."""
    return replace(loaded, model=GatedModel(loaded.model, gate, delay_s),
                   stop_token_ids=loaded.stop_token_ids if stop_tokens else [])


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A real (3-step LoRA) run on the tiny model: what `chatforge serve RUN` serves."""
    from tests.models.test_run import prepared_dataset, tiny_run

    root = tmp_path_factory.mktemp("serve-run")
    return tiny_run(prepared_dataset(root, tiny_model_dir), tiny_model_dir, root / "r1", "lora", lr=1e-2)


@pytest.fixture(scope="session")
def served_model(serve_run: Path) -> LoadedRun:
    torch.manual_seed(0)
    return load_run(serve_run)


@pytest.fixture(scope="session")
def server(served_model: LoadedRun, serve_run: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The main server: the tiny run behind the torch engine, a sqlite store, shared by the API and page tests."""
    with started_server(served_model, serve_run, tmp_path_factory.mktemp("serve-db") / "chatforge.db") as running:
        yield running
