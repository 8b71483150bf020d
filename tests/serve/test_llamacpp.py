"""The llama.cpp paths: `serve RUN --backend llamacpp` exports the run to GGUF by itself (cached by its hash) and
answers like the torch backend; the gateway's upstream backend in front of llama.cpp's own `llama-server` passes
its answers through unchanged. Each skips, saying why, where llama-cpp-python or the llama-server build is
missing (`make test` installs and builds both)."""

from __future__ import annotations

import asyncio
import importlib.util
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chatforge.config import ServeConfig
from chatforge.models import export
from chatforge.models.generate import SamplingSettings
from chatforge.models.llamacpp_build import llama_server_binary
from chatforge.models.source import DEFAULT_MODEL, tokenizer_dir
from chatforge.models.tiny import build_tiny_gemma3
from chatforge.serve.app import create_app
from chatforge.serve.backends import Backend, GenerationInput, TorchBackend, complete, make_backend
from chatforge.serve.store import Store
from tests.models.test_run import prepared_dataset, tiny_run
from tests.serve.conftest import running_server

QUESTION = [{"role": "user", "content": "My router light is red. What should I do?"}]
PROMPT = "My router light is red. What should I do?"


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run on a tiny random Gemma 3 with the default model's real tokenizer (what llama.cpp reads)."""
    root = tmp_path_factory.mktemp("llamacpp")
    base = build_tiny_gemma3(root / "base", tokenizer_dir(DEFAULT_MODEL))
    return tiny_run(prepared_dataset(root, base), base, root / "run", "lora", lr=1e-2)


@pytest.fixture()
def gguf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Exports go to a temp dir (the llama.cpp converter itself stays in the shared cache)."""
    monkeypatch.setattr(export, "cache_root", lambda: tmp_path)
    return tmp_path / "gguf"


def answer(backend: Backend, job: GenerationInput) -> str:
    async def scenario() -> str:
        await backend.start()
        try:
            backend.count_tokens(job)
            return (await complete(backend, job)).text
        finally:
            await backend.close()

    return asyncio.run(scenario())


def test_llamacpp_backend_exports_the_run_once_and_answers_like_torch(gemma_run: Path, gguf_cache: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("the llamacpp extra (llama-cpp-python) is not installed; `make test` installs it")
    cfg = ServeConfig(backend="llamacpp", run=str(gemma_run), gguf_quant="f32")
    greedy = SamplingSettings(max_new_tokens=8)
    for job in (GenerationInput(greedy, prompt=PROMPT), GenerationInput(greedy, messages=QUESTION)):
        torch_text = answer(TorchBackend(cfg.model_copy(update={"backend": "torch"}), run=gemma_run),
                            GenerationInput(greedy, prompt=job.prompt, messages=job.messages))
        assert torch_text, "the tiny run should answer something to compare"
        assert answer(make_backend(cfg), job) == torch_text
    exported = list(gguf_cache.glob("*.gguf"))
    assert len(exported) == 1 and exported[0].name.endswith("-f32.gguf")  # one export, reused by the second start
    made = exported[0].stat().st_mtime_ns
    assert export.cached_gguf(gemma_run, "f32") == exported[0] and exported[0].stat().st_mtime_ns == made


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def llama_server(gemma_run: Path, gguf_cache: Path) -> Iterator[str]:
    binary = llama_server_binary()
    if binary is None:
        pytest.skip("llama-server is not built; `make llama-server` (part of `make test`) builds it")
    gguf = export.cached_gguf(gemma_run, "f32")
    port = free_port()
    process = subprocess.Popen([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", "2",
                                "-t", "1", "-c", "1024"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not come up on {url} (exit code {process.poll()})")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(15)


def test_the_gateway_in_front_of_llama_server_passes_its_answers_through(llama_server: str, tmp_path: Path) -> None:
    body = {"messages": QUESTION, "max_tokens": 8, "temperature": 0}
    bare = httpx.post(llama_server + "/v1/chat/completions", json=body, timeout=60)
    assert bare.status_code == 200
    cfg = ServeConfig(backend="upstream", upstream_url=llama_server + "/v1", db=f"sqlite:///{tmp_path / 'gw.db'}")
    store = Store(cfg.db, pii=cfg.pii)
    with running_server(create_app(cfg, store=store)) as gateway:
        key = store.create_key("gateway-test", ("chat",))[0]
        through = httpx.post(gateway + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                             timeout=60)
    store.close()
    assert through.status_code == 200
    assert through.json()["choices"][0]["message"]["content"] == bare.json()["choices"][0]["message"]["content"]
    assert through.json()["usage"]["completion_tokens"] == bare.json()["usage"]["completion_tokens"]
