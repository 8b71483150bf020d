"""Benchmark of `chatforge prepare` on a generated corpus with planted PII and duplicates.

Run it like this (from the repo root, after `make install`)::

    .venv/bin/python benchmarks/prepare_bench.py                      # ~7k conversations, ~250k utterances, ~40 MB
    .venv/bin/python benchmarks/prepare_bench.py --conversations 1000 # smaller

It writes the corpus to a temp folder, runs the whole prepare stage (default tokenizer: Gemma 3 270M; its one-time
GGUF conversion is cached in ~/.cache/chatforge, loading it is part of the total) and prints per-step seconds, the
total, and utterances/s. Every check is on, as by default, and the corpus exercises them: ~30 % of conversations end
with an unanswered user turn (trimmed), every record has nested meta with PII (redacted), and a few lines are
malformed, too deep or over the record size limit (rejected). Target (issues 2 and 10): the whole stage, tokenizer
load included, in <= 30 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

WORDS = (
    "the a my your our router modem invoice bill payment account password reset login error screen phone app "
    "order delivery refund plan price upgrade cancel support ticket network wifi signal light cable server "
    "please thanks hello help issue problem working broken slow fast today yesterday morning again still "
    "can could would should you we they it is was not does did have has been when where why how what which "
    "check try restart update install settings option menu button page click open close send receive email "
    "number code card address name time day week month customer agent manager team service product version"
).split()


def fake_utterance(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + rng.choice([".", "?", "!", "..."])


def planted_pii(rng: random.Random) -> str:
    return rng.choice([
        f"mail me at user{rng.randrange(10**6)}@example.com",
        f"my number is +44 20 7946 {rng.randrange(1000, 9999)}",
        "card 4111 1111 1111 1111 expires soon",
        f"server 10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)} is down",
        "key sk-proj-Zk3mQ9vX2pL7rT4wY8nB1cF6hJ0dS5aG leaked",
        "IBAN GB82 WEST 1234 5698 7654 32 for the refund",
    ])


def hostile_lines(size_limit: int) -> list[str]:
    """Lines every new check has to catch: malformed with an escaped e-mail, 100,000 '[', and one over the limit."""
    return ['{"messages": [{"role": "user", "content": "mail jane\\u0040example.com"}, broken',
            "[" * 100_000, json.dumps({"messages": [{"role": "user", "content": "x" * size_limit}]})]


def generate_corpus(path: Path, conversations: int, turns: int, seed: int = 0) -> int:
    """Write a JSONL corpus; ~1 in 20 utterances carries PII, ~3 % of conversations are (near) duplicates, ~30 % end
    with an unanswered user turn, every record has nested meta with an e-mail, plus the `hostile_lines`."""
    rng = random.Random(seed)
    utterances = 0
    written: list[list[dict[str, str]]] = []
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(conversations):
            roll = rng.random()
            if written and roll < 0.015:
                messages = rng.choice(written)  # exact duplicate
            elif written and roll < 0.03:
                messages = [dict(m) for m in rng.choice(written)]
                messages[-1]["content"] = messages[-1]["content"].replace(" the ", " a ", 1)  # near duplicate
            else:
                messages = []
                for turn in range(turns):
                    text = fake_utterance(rng, rng.randint(18, 38))
                    if rng.random() < 0.05:
                        text += " " + planted_pii(rng)
                    messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": text})
                written.append(messages)
            if rng.random() < 0.3:
                messages = [*messages, {"role": "user", "content": "Thanks, bye!"}]
            meta = {"customer": {"email": f"user{rng.randrange(10**6)}@example.com", "tags": ["support", "web"]}}
            utterances += len(messages)
            handle.write(json.dumps({"messages": messages, "meta": meta}) + "\n")
        for line in hostile_lines(1_000_000):
            handle.write(line + "\n")
    return utterances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=7000)
    parser.add_argument("--turns", type=int, default=36)
    parser.add_argument("--model", default=None, help="tokenizer for the fit step (default: Gemma 3 270M)")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()

    from chatforge.config import FitConfig, PrepareConfig
    from chatforge.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        utterances = generate_corpus(corpus, args.conversations, args.turns)
        size_mb = corpus.stat().st_size / 1e6
        print(f"corpus: {args.conversations} conversations, {utterances} utterances, {size_mb:.1f} MB")
        cfg = PrepareConfig(fit=FitConfig(model=args.model), workers=args.workers)
        t0 = time.perf_counter()
        report = prepare([corpus], Path(tmp) / "out", cfg)
        total = time.perf_counter() - t0
        manifest = json.loads((Path(tmp) / "out" / "manifest.json").read_text())
    print("tokenizer load: inside 'fit' and the total (the one-time GGUF conversion is cached in ~/.cache/chatforge)")
    for step, seconds in manifest["timings_s"].items():
        if step != "total":
            print(f"  {step:<14} {seconds:7.2f} s")
    print(f"TOTAL {total:.1f} s  ({utterances / total:,.0f} utterances/s, {size_mb / total:.2f} MB/s)")
    print("counts:", json.dumps({k: report.counts[k] for k in ("read", "kept", "trimmed", "rejected", "duplicates", "train")}))
    print("pii:", json.dumps(manifest["pii_counts"]))


if __name__ == "__main__":
    main()
