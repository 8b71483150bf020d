"""Eval's batched generation vs one prompt at a time with transformers' `generate`: generated tokens/s, same model,
same prompts, same greedy decoding and answer cap, in one process.

Run it like this (repo root, after `make install`)::

    .venv/bin/python benchmarks/eval_bench.py --tiny                  # tiny random Llama, seconds
    .venv/bin/python benchmarks/eval_bench.py --prompts 32            # default Gemma 3 270M (a few minutes)

Prompts are the first user turns of the bundled chatterbot English corpus, in the model's chat template. Both
sides stop at the template's end-of-turn token or eos, or after --max-new-tokens. The baseline is
`model.generate(ids, do_sample=False)` called once per prompt (batch 1, KV cache on: the usual loop of a script
that evaluates one example at a time); chatforge is `generate_batch` (left-padded batches of --batch-size with a
KV cache, finished rows dropped). Both see the same prompts in the same order; a warm-up prompt runs first on each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def chatterbot_questions(count: int) -> list[str]:
    from chatforge.config import FormatOptions
    from chatforge.data.formats import read_file
    from chatforge.demo import demo_inputs

    questions: list[str] = []
    for path in sorted(p for folder in demo_inputs() for p in (folder.glob("*.yml") if folder.is_dir() else [folder])
                       if p.suffix == ".yml"):
        for item in read_file(path, "chatterbot", FormatOptions()):
            record = getattr(item, "record", item)
            if not isinstance(record, dict):
                continue
            first = next((m["content"] for m in record.get("messages", []) if m["role"] == "user"), None)
            if first and first not in questions:
                questions.append(first)
            if len(questions) == count:
                return questions
    return questions


def main() -> None:
    parser = argparse.ArgumentParser(description="batched eval generation vs one-at-a-time generate")
    parser.add_argument("--model", default=None, help="base model or run dir (default: Gemma 3 270M)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama built on the fly")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from chatforge.models.generate import (
        SamplingSettings,
        chat_prompt_ids,
        generate_batch,
    )
    from chatforge.models.run import load_run

    model_spec = args.model
    if args.tiny:
        from tests.tiny_models import build_tiny_llama, build_tiny_tokenizer

        tmp = Path(tempfile.mkdtemp())
        model_spec = str(build_tiny_llama(tmp / "model", build_tiny_tokenizer(tmp / "tok"), hidden=256, layers=4))
    loaded = load_run(model_spec) if model_spec else load_run(_default_model())
    tokenizer = loaded.tokenizer
    questions = chatterbot_questions(args.prompts + 1)
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    warmup, prompts = prompts[0], prompts[1:]
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens)

    def one_at_a_time() -> int:
        tokens = 0
        for prompt in prompts:
            out = loaded.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                        max_new_tokens=args.max_new_tokens, do_sample=False,
                                        eos_token_id=loaded.stop_token_ids, pad_token_id=tokenizer.pad_token_id or 0)
            new = out[0, len(prompt):].tolist()
            tokens += next((i for i, t in enumerate(new) if t in loaded.stop_token_ids), len(new))
        return tokens

    def batched() -> int:
        return sum(len(g.token_ids) for g in generate_batch(loaded, prompts, settings, args.batch_size))

    generate_batch(loaded, [warmup], settings)
    loaded.model.generate(torch.tensor([warmup]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    results = {}
    with torch.inference_mode():
        for name, run in (("generate, one prompt at a time", one_at_a_time), ("chatforge generate_batch", batched)):
            started = time.perf_counter()
            tokens = run()
            seconds = time.perf_counter() - started
            results[name] = (tokens, seconds)
            print(f"{name:32s} {tokens:6d} tokens in {seconds:7.2f} s = {tokens / seconds:8.1f} tok/s", flush=True)
    (base_tokens, base_s), (ours_tokens, ours_s) = results.values()
    print(f"model {model_spec or 'default Gemma 3 270M'}; {len(prompts)} prompts; max_new_tokens {args.max_new_tokens}; "
          f"batch {args.batch_size}; threads {args.threads}")
    print(f"speed-up (tokens/s): {(ours_tokens / ours_s) / (base_tokens / base_s):.2f}x")


def _default_model() -> str:
    from chatforge.models.source import DEFAULT_MODEL

    return DEFAULT_MODEL


if __name__ == "__main__":
    main()
