"""Kill -9 one of two real `chatforge serve` upstream processes mid-load, behind a gateway; print what clients saw.

Run it like this (repo root, after `make install`)::

    .venv/bin/python benchmarks/failover_kill.py                    # 20 requests, 6 clients, tiny random model
    .venv/bin/python benchmarks/failover_kill.py --requests 60 --clients 8

The same scenario as tests/serve/test_failover.py, with real processes and SIGKILL instead of in-process servers
whose connections are reset (the test's way, since each process takes minutes to start on a busy 2-core box). The
gateway runs in this process. Exit status 1 when a client saw an error that was not a stream already under way on
the killed upstream, or nothing was killed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chatforge.config import ServeConfig  # after the sys.path line: run from a checkout
from chatforge.models.tiny import build_tiny_llama, build_tiny_tokenizer
from chatforge.serve.app import create_app
from chatforge.serve.store import Store
from chatforge.serve.upstream import UpstreamBackend
from tests.serve.conftest import running_server
from tests.serve.test_failover import one_request


def start_upstream(model: str, db: str, tmp: str) -> tuple[str, subprocess.Popen[bytes]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", model, "--db", db, "--port", str(port),
                                "--max-batch", "4"], cwd=tmp, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return f"http://127.0.0.1:{port}", process


def wait_ready(base: str, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(base + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    sys.exit(f"{base} did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description="kill -9 an upstream behind a chatforge gateway mid-load")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatforge-failover-") as tmp:
        model = str(build_tiny_llama(Path(tmp) / "model", build_tiny_tokenizer(Path(tmp) / "tok")))
        upstream_db = f"sqlite:///{Path(tmp) / 'upstreams.db'}"
        upstream_key = Store(upstream_db).create_key("gateway", ("chat",), rpm=None, tpm=None)[0]
        started = time.monotonic()
        upstreams = [start_upstream(model, upstream_db, tmp) for _ in range(2)]
        try:
            for base, process in upstreams:
                wait_ready(base, process)
            print(f"upstreams ready after {time.monotonic() - started:.1f} s", flush=True)
            cfg = ServeConfig(backend="upstream", upstream_health_s=60.0, max_batch=4, request_timeout_s=60.0,
                              db=f"sqlite:///{Path(tmp) / 'gateway.db'}")
            store = Store(cfg.db)
            client_key = store.create_key("client", rpm=None, tpm=None)[0]
            backend = UpstreamBackend(cfg, [base + "/v1" for base, _ in upstreams], api_key=upstream_key)
            victim, victim_process = backend.upstreams[1], upstreams[1][1]
            killed: dict[str, int] = {}

            def kill_when_busy() -> None:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    if victim.inflight >= 2 and backend.outcomes["ok"] >= 3:
                        killed["inflight"] = victim.inflight
                        os.kill(victim_process.pid, signal.SIGKILL)
                        return
                    time.sleep(0.001)

            with running_server(create_app(cfg, store=store, backend=backend)) as gateway:
                killer = threading.Thread(target=kill_when_busy)
                killer.start()
                with ThreadPoolExecutor(args.clients) as clients:
                    results = list(clients.map(lambda n: one_request(gateway, client_key, n), range(args.requests)))
                killer.join()
        finally:
            for _, process in upstreams:
                process.kill()
                process.wait(30)
    errors = [r for r in results if r.error is not None or not r.done]
    unexpected = [r for r in errors if not (r.stream and r.content_chunks >= 1)]
    print(json.dumps({"requests": args.requests, "concurrency": args.clients,
                      "inflight_on_killed": killed.get("inflight"), "client_errors": len(errors),
                      "unexpected_errors": len(unexpected), **dict(sorted(backend.outcomes.items()))}))
    sys.exit(1 if unexpected or not killed else 0)


if __name__ == "__main__":
    main()
