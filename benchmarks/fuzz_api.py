"""Fuzz `chatforge serve`'s OpenAPI spec with schemathesis: every generated request must get an answer that is not
a 5xx. The server runs for real (`chatforge serve` in a child process, loopback) on a tiny random model, with
OAuth configured (a local JWKS file) and the API docs on (`--api-docs`: /openapi.json is off by default).

Run it like this (repo root, after `make install` and `.venv/bin/pip install -c constraints.txt -e ".[bench]"`)::

    .venv/bin/python benchmarks/fuzz_api.py                      # ~100 examples per operation, per credential
    .venv/bin/python benchmarks/fuzz_api.py --max-examples 20

Every operation (completions, feedback, models, metrics, the admin key routes, ...) is fuzzed twice: once with an
API key holding every scope, once with an OAuth JWT (ES256, signed here) granting every scope, so the fuzzer gets
past both kinds of auth into the handlers. schemathesis' `not_a_server_error` check fails a run on any 5xx; the
exit status is the worse of the two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


ISSUER, AUDIENCE = "https://fuzz-issuer.test", "chatforge"


def oauth_setup(folder: Path) -> tuple[Path, str]:
    """A project file whose serve.oauth trusts a fresh EC key (local JWKS file), and a JWT it signs (1 h)."""
    signing_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [{**json.loads(ECAlgorithm.to_jwk(signing_key.public_key())), "kid": "fuzz", "alg": "ES256"}]}
    (folder / "jwks.json").write_text(json.dumps(jwks), encoding="utf-8")
    project = {"serve": {"api_docs": True, "oauth": {
        "issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(folder / "jwks.json"), "algorithms": ["ES256"],
        "rpm": None, "tpm": None}}}
    (folder / "chatforge.yaml").write_text(json.dumps(project), encoding="utf-8")  # JSON is YAML
    now = int(time.time())
    token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "fuzzer", "iat": now, "exp": now + 3600,
                        "scope": "chat feedback admin"}, signing_key, algorithm="ES256", headers={"kid": "fuzz"})
    return folder / "chatforge.yaml", token


def main() -> None:
    parser = argparse.ArgumentParser(description="schemathesis against chatforge serve")
    parser.add_argument("--max-examples", type=int, default=100)
    parser.add_argument("--model", default=None, help="run or model to serve (default: a tiny random model)")
    args = parser.parse_args()

    from chatforge.serve.store import Store

    with tempfile.TemporaryDirectory(prefix="chatforge-fuzz-") as tmp:
        model = args.model
        if model is None:
            from chatforge.models.tiny import build_tiny_llama, build_tiny_tokenizer

            model = str(build_tiny_llama(Path(tmp) / "model", build_tiny_tokenizer(Path(tmp) / "tok")))
        db = f"sqlite:///{Path(tmp) / 'fuzz.db'}"
        key = Store(db).create_key("fuzzer", ("chat", "feedback", "admin"), rpm=None, tpm=None)[0]
        project, token = oauth_setup(Path(tmp))
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", model, "--db", db, "--port", str(port),
                                   "--max-queue", "64", "--config", str(project)], cwd=tmp,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    sys.exit("the server did not become ready")
                time.sleep(0.5)
            schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
            status = 0
            for credential, secret in (("API key", key), ("OAuth JWT", token)):
                command = [schemathesis, "run", f"{base}/openapi.json", "--checks", "not_a_server_error",
                           "--max-examples", str(args.max_examples), "--header", f"Authorization: Bearer {secret}",
                           "--request-timeout", "120"]
                print(f"--- fuzzing with an {credential}:", flush=True)
                print("$", " ".join(c if "Bearer" not in c else "Authorization: Bearer ***" for c in command),
                      flush=True)
                status = max(status, subprocess.run(command, check=False).returncode)
        finally:
            server.terminate()
            server.wait(timeout=30)
    sys.exit(status)


if __name__ == "__main__":
    main()
