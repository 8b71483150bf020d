"""`chatforge serve | keys | feedback`: the API in front of a run, its keys, and the feedback that flows back."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import uvicorn
from rich.markup import escape
from rich.table import Table

from chatforge.cli.common import app, console, fail, load_project
from chatforge.cli.options import ConfigOptions, config_option, field_option
from chatforge.config import ConfigError, ServeConfig, merge_overrides
from chatforge.serve.keys import printable
from chatforge.serve.server import uvicorn_config

# Imported inside the functions that need them: serve.app and device import torch (+8-10 s wall, 3 s CPU at
# startup), serve.store and serve.feedback SQLAlchemy (+1.4-2 s wall); see cli/stages.py.

keys_app = typer.Typer(no_args_is_help=True, help="API keys: create (shown once), list, revoke.")
feedback_app = typer.Typer(no_args_is_help=True, help="Rated production conversations -> the next training set.")
app.add_typer(keys_app, name="keys")
app.add_typer(feedback_app, name="feedback")

DbOption = config_option(ServeConfig, "db", note="(default serve.db)")
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="project file (default ./chatforge.yaml)")]


def _serve_config(config: Path | None, overrides: dict[str, Any]) -> ServeConfig:
    return merge_overrides(load_project(config).serve, overrides)


def _store(cfg: ServeConfig) -> Any:
    from chatforge.serve.store import Store  # lazy: SQLAlchemy

    return Store(cfg.db, pii=cfg.pii, auth_cache_s=cfg.key_cache_s)


SERVE_OPTIONS = ConfigOptions(ServeConfig, [
    field_option("host"), field_option("port"), field_option("db"), field_option("backend"),
    field_option("upstream_url"), field_option("upstreams", "--upstream", note="(repeat --upstream for several)"),
    field_option("gguf"), field_option("gguf_quant"), field_option("quantize"), field_option("threads"),
    field_option("max_batch"), field_option("max_queue"),
    field_option("api_docs"), field_option("device"),
])


@app.command("serve")
@SERVE_OPTIONS.add_to
def serve_command(
    run: Annotated[str | None, typer.Argument(help="run dir (adapter, full, ensemble) or base model; default serve.run")] = None,
    config: ConfigOption = None,
    **options: Any,
) -> None:
    """Serve a run behind an OpenAI-compatible API with keys, rate limits, /metrics, feedback and a chat page."""
    try:
        cfg = _serve_config(config, {"run": run, **SERVE_OPTIONS.overrides(options)})
        if cfg.backend in ("torch", "auto"):
            from chatforge.device import resolve_device  # lazy: torch

            resolve_device(cfg.device)  # a device this machine lacks: one line now, not a traceback at startup
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    if not cfg.run and not cfg.gguf and cfg.backend in ("torch", "auto"):
        fail("serve needs a run: chatforge serve RUN (or serve.run in the project file)")
    serve_run(cfg.run or "", cfg)


def serve_run(run: str, cfg: ServeConfig, demo_key: bool = False, check: bool = False) -> None:
    """Serve `run` under uvicorn until Ctrl-C. `demo_key` makes and prints a fresh key with usage examples;
    `check` answers one chat request with it and stops (what CI runs)."""
    from chatforge.serve.app import create_app  # lazy: torch
    from chatforge.serve.store import StoreError  # lazy: SQLAlchemy

    cfg = cfg.model_copy(update={"run": run})
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the JSON access lines of chatforge.serve.access
    try:
        store = _store(cfg)
        secret = store.create_key(f"demo-{int(time.time())}", scopes=("chat", "feedback", "admin"))[0] if demo_key else None
        application = create_app(cfg, store)  # backend auto: picks llamaserver or torch here (GGUF export, cached)
    except (StoreError, FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    chosen = getattr(application.state.serve.backend, "cfg", cfg).backend
    console.print(f"backend: {chosen}" + (" (llama.cpp's llama-server, started by chatforge)" if chosen == "llamaserver"
                                          else ""), highlight=False)
    server = uvicorn.Server(uvicorn_config(application, cfg, host=cfg.host, port=cfg.port))
    base = f"http://{cfg.host}:{cfg.port}"
    if secret:
        print_usage(base, secret)
    if not check:
        console.print(f"[bold green]serving[/] {escape(run)} at {base}  (chat page {base}/ · Ctrl-C stops)", highlight=False)
        server.run()
        return
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        answer = _one_request(server, base, secret or "")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    console.print(f"[bold green]check passed:[/] the server answered {answer!r}", highlight=False)


def print_usage(base: str, secret: str) -> None:
    """The new key (shown once) and copy-paste examples for curl and the openai client."""
    console.rule("serving")
    console.print(f"API key (shown once, stored hashed): [bold]{secret}[/]", highlight=False)
    console.print(f"chat page: {base}/   (paste the key there)", highlight=False)
    body = json.dumps({"model": "chatforge", "messages": [{"role": "user", "content": "Hello, who are you?"}]})
    console.print(f"curl {base}/v1/chat/completions -H 'Authorization: Bearer {secret}' "
                  f"-H 'Content-Type: application/json' -d '{body}'", highlight=False, markup=False, soft_wrap=True)
    console.print(f'python -c "from openai import OpenAI; c = OpenAI(base_url=\'{base}/v1\', api_key=\'{secret}\'); '
                  "print(c.chat.completions.create(model='chatforge', messages=[{'role': 'user', 'content': 'Hi'}])"
                  '.choices[0].message.content)"', highlight=False, markup=False, soft_wrap=True)


def _one_request(server: Any, base: str, secret: str) -> str:
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline:
            fail("the server did not start within 120 s")
        time.sleep(0.1)
    response = httpx.post(f"{base}/v1/chat/completions", timeout=300,
                          headers={"Authorization": f"Bearer {secret}"},
                          json={"model": "chatforge", "messages": [{"role": "user", "content": "Hello, who are you?"}],
                                "max_tokens": 32, "temperature": 0})
    if response.status_code != 200:
        fail(f"check failed: the server answered {response.status_code}: {response.text[:300]}")
    return str(response.json()["choices"][0]["message"]["content"])


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="who or what the key is for")],
    scopes: Annotated[str, typer.Option(help="comma-separated: chat, feedback, admin")] = "chat,feedback",
    rpm: Annotated[int | None, typer.Option(help="requests per minute (0 = unlimited)")] = 60,
    tpm: Annotated[int | None, typer.Option(help="tokens per minute (0 = unlimited)")] = 20000,
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Create a key and print it once; only a salted hash is stored."""
    try:
        store = _store(_serve_config(config, {"db": db}))
        secret, key = store.create_key(name, [s.strip() for s in scopes.split(",") if s.strip()], rpm or None, tpm or None)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    console.print(f"key {key.id} ({escape(printable(key.name))}; scopes {', '.join(sorted(key.scopes))}; rpm {key.rpm or '∞'}, "
                  f"tpm {key.tpm or '∞'})", highlight=False)
    console.print("the secret below is shown once; store it now:", highlight=False)
    console.print(secret, highlight=False, markup=False)


@keys_app.command("list")
def keys_list(db: DbOption = None, config: ConfigOption = None) -> None:
    """List keys (ids, names, scopes, limits, revoked); never the secrets."""
    try:
        keys = _store(_serve_config(config, {"db": db})).list_keys()
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    table = Table("id", "name", "scopes", "rpm", "tpm", "created", "revoked")
    for key in keys:
        table.add_row(key.id, escape(printable(key.name)), ",".join(sorted(key.scopes)), str(key.rpm or "∞"), str(key.tpm or "∞"),
                      key.created.strftime("%Y-%m-%d %H:%M"), "yes" if key.revoked else "")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(id_or_name: Annotated[str, typer.Argument(help="key id (k_...) or name")], db: DbOption = None,
                config: ConfigOption = None) -> None:
    """Revoke a key: requests with it get 401 from then on."""
    try:
        key = _store(_serve_config(config, {"db": db})).revoke_key(id_or_name)
    except KeyError as exc:
        fail(str(exc.args[0]) if exc.args else f"no key {id_or_name}")
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    console.print(f"revoked {key.id} ({escape(printable(key.name))})", highlight=False)


@feedback_app.command("export")
def feedback_export(
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file for `chatforge prepare` (or data.sources)")],
    db: DbOption = None,
    config: ConfigOption = None,
) -> None:
    """Conversations rated up, and rated down with a correction (as the answer), as OpenAI chat JSONL."""
    from chatforge.serve.feedback import export_feedback  # lazy: SQLAlchemy

    try:
        report = export_feedback(_store(_serve_config(config, {"db": db})), out)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    console.print(f"[bold green]wrote[/] {escape(str(report.path))}: {report.exported_up} rated up, "
                  f"{report.exported_corrected} corrected; skipped {report.skipped_down_without_correction} rated down "
                  f"without a correction, {report.superseded} superseded by a later rating", highlight=False)
