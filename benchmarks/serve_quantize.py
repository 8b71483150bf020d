"""int8 vs fp32 for serving on CPU: perplexity on chat text and the time of a batched greedy decode.

Run it like this (repo root; on a quiet machine for the timings)::

    .venv/bin/python benchmarks/serve_quantize.py --model gemma3-270m --batch 8 --tokens 32
    .venv/bin/python benchmarks/serve_quantize.py --model tiny --tokens 4          # smoke

Perplexity is over `--texts` lines of a JSONL chat file (each record's messages joined) or, without it, the
English lines the tiny tokenizer is trained on; `serve.quantize: int8` should become the default once it is within
1 % of fp32 on the demo's test set.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.models.generate import SamplingSettings, chat_prompt_ids, generate_batch  # noqa: E402
from chatforge.models.quantize import perplexity, quantize_int8  # noqa: E402
from chatforge.models.run import load_run  # noqa: E402
from chatforge.models.tiny import build_tiny_llama, build_tiny_tokenizer, tiny_chat_text  # noqa: E402

QUESTIONS = ["How do I reset my password?", "Where can I find my invoice?", "Do you ship internationally?",
             "Why was my card declined?", "What are your opening hours on weekends?", "How do I cancel?"]


def texts_of(path: Path | None, limit: int) -> list[str]:
    if path is None:
        return [line for line in tiny_chat_text().splitlines() if len(line) > 20][:limit]
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [" ".join(m["content"] for m in r["messages"]) for r in records[:limit]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--texts", type=Path, default=None, help="chat JSONL (e.g. the demo dataset's test.jsonl)")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "tiny":
            model = str(build_tiny_llama(Path(tmp) / "m", build_tiny_tokenizer(Path(tmp) / "t")))
        fp32 = load_run(model)
        int8 = quantize_int8(fp32)
        texts = texts_of(args.texts, args.limit)
        prompts = [chat_prompt_ids(fp32.tokenizer, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
                   for i in range(args.batch)]
        settings = SamplingSettings(max_new_tokens=args.tokens)
        for name, loaded in (("fp32", fp32), ("int8", int8)):
            started = time.perf_counter()
            ppl = perplexity(loaded, texts)
            ppl_s = time.perf_counter() - started
            generate_batch(loaded, prompts[:1], SamplingSettings(max_new_tokens=2))  # warm-up
            started = time.perf_counter()
            answers = generate_batch(loaded, prompts, settings, batch_size=args.batch)
            seconds = time.perf_counter() - started
            tokens = sum(len(a.token_ids) for a in answers)
            print(f"{name}: perplexity {ppl:.3f} on {len(texts)} texts ({ppl_s:.1f} s); batch {args.batch}: "
                  f"{tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
