"""The `llamaserver` backend: llama.cpp's own C++ `llama-server`, started by chatforge as a child process on
loopback, with the gateway in front of it through the upstream backend.

Use it like this::

    backend = LlamaServerBackend(ServeConfig(backend="llamaserver", run="runs/r1"))   # exports RUN to GGUF (cached)
    backend = LlamaServerBackend(ServeConfig(backend="llamaserver", run="smollm2-135m-instruct"))  # a packaged GGUF
    await backend.start()              # starts llama-server --parallel max_batch, waits for GET /health
    async for delta in backend.stream(job): ...
    await backend.close()              # stops the child

    chatforge serve RUN --backend llamaserver

Why: on a CPU, llama.cpp's quantised kernels decode several times faster than torch's fp32 ones, and llama-server
batches requests continuously across its slots (`--parallel`). chatforge keeps everything the gateway does (keys,
OAuth, rate limits, safeguards, PII-redacted logs and feedback, metrics): only the decoding moves to llama.cpp.
The binary is built once from the sources that llama-cpp-python vendors (`make llama-server`, or
`python -m chatforge.models.llamacpp_build`); a run is exported with llama.cpp's converter (`serve.gguf_quant`,
q8_0 by default) and cached by the hash of its weights, as for the `llamacpp` backend. The child listens on a free
loopback port only, its log goes to a file beside the GGUF cache, and it dies with the gateway.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from chatforge.config import ServeConfig
from chatforge.device import resolve_device
from chatforge.models.export import ExportError, gguf_to_serve
from chatforge.models.llamacpp_build import llama_server_binary
from chatforge.models.run import find_run
from chatforge.serve.upstream import UpstreamBackend

log = logging.getLogger("chatforge.serve")

START_TIMEOUT_S = 300.0  # loading a GGUF is seconds; a cold page cache on a busy machine can take minutes
CONTEXT_TOKENS = 8192  # llama-server's unified KV cache, shared by all slots (-c with --kv-unified)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None  # loaded before any fork


def choose_backend(cfg: ServeConfig) -> ServeConfig:
    """`serve.backend: auto` made concrete: llamaserver on a CPU when llama-server is built and the model is (or
    converts to) a GGUF; else torch. The export happens here (cached), so a model llama.cpp's converter cannot read
    falls back to the torch engine with a warning instead of failing to serve."""
    as_torch = cfg.model_copy(update={"backend": "torch"})
    reason = _why_not_llamaserver(cfg)
    if reason is None:
        try:
            gguf = gguf_to_serve(cfg.run, cfg.gguf, cfg.gguf_quant)
        except (ExportError, ValueError, FileNotFoundError, RuntimeError) as exc:
            reason = f"its GGUF export failed: {str(exc).splitlines()[0]}"
        else:
            log.info("serve.backend auto: llamaserver on %s", gguf)
            return cfg.model_copy(update={"backend": "llamaserver", "gguf": str(gguf)})
    log.warning("serve.backend auto: the torch engine, because %s", reason)
    return as_torch


def _why_not_llamaserver(cfg: ServeConfig) -> str | None:
    if not cfg.run and not cfg.gguf:
        return "no run is named"
    if cfg.quantize != "none":
        return f"serve.quantize {cfg.quantize} is a torch-engine option"
    device = resolve_device(cfg.device)
    if device.type != "cpu":
        return f"the device is {device} (llama-server here is a CPU build)"
    if llama_server_binary() is None:
        return "llama-server is not built (`make llama-server` builds it)"
    run = find_run(cfg.run) if cfg.run and not cfg.gguf else None
    if run is not None and run.kind == "ensemble":
        return "a probability ensemble is several models"
    return None


def _die_with_parent() -> None:
    """In the child before exec: on Linux, SIGTERM when the thread that started it dies, so a gateway killed
    without closing its backend (kill -9, a crash) leaves no llama-server behind (seen: tests that timed out)."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LlamaServerBackend(UpstreamBackend):
    """A `llama-server` child on loopback behind the upstream backend; see the module docstring."""

    def __init__(self, cfg: ServeConfig, binary: Path | None = None) -> None:
        self.port = free_loopback_port()
        model_id = Path(cfg.run).name if cfg.run else Path(str(cfg.gguf)).stem
        super().__init__(cfg, f"http://127.0.0.1:{self.port}/v1", api_key=None, model=model_id)
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    def command(self, gguf: Path, binary: Path) -> list[str]:
        """llama-server's command line: the gateway's batch size as slots, its threads, a unified KV cache."""
        threads = self.cfg.threads or os.cpu_count() or 1
        return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
                "--parallel", str(self.cfg.max_batch), "--kv-unified", "-c", str(CONTEXT_TOKENS),
                "--threads", str(threads), "--threads-http", "2", "--alias", self.model_id, "--jinja",
                "--no-webui", "--timeout", str(int(self.cfg.request_timeout_s) + 5)]

    async def start(self) -> None:
        binary = self.binary or llama_server_binary()
        if binary is None:
            raise RuntimeError("serve.backend llamaserver needs llama.cpp's llama-server: build it once with "
                               "`make llama-server` (or python -m chatforge.models.llamacpp_build, ~10 min)")
        gguf = await asyncio.to_thread(gguf_to_serve, self.cfg.run, self.cfg.gguf, self.cfg.gguf_quant)
        log_file = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)
        self.log_path = Path(log_file.name)
        self.process = subprocess.Popen(self.command(gguf, binary), stdout=log_file, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        log_file.close()
        await asyncio.to_thread(self._wait_until_healthy)
        try:
            await super().start()
            self.context_length = CONTEXT_TOKENS
        except BaseException:
            self._stop_process()
            raise

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._stop_process()

    def ready(self) -> bool:
        return self.process is not None and self.process.poll() is None and super().ready()

    def _wait_until_healthy(self) -> None:
        url = f"http://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self.process.poll() if self.process else -1
            if code is not None:
                raise RuntimeError(f"llama-server exited with code {code} while loading; its log: {self._log_tail()}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            time.sleep(0.2)
        self._stop_process()
        raise RuntimeError(f"llama-server was not healthy within {START_TIMEOUT_S:.0f} s; its log: {self._log_tail()}")

    def _log_tail(self, lines: int = 8) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        tail = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        return f"{self.log_path}: " + " | ".join(tail)

    def _stop_process(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
