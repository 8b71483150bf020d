"""Blind A/B human rating of two runs: the items to rate and what the ratings add up to.

Use it like this::

    study = build_rating_study("runs/a", "runs/b", Path("data/ds"), db_url="sqlite:///chatforge.db", max_items=50)
    serve_rating("sqlite:///chatforge.db", study.id, port=8000)        # chatforge.evaluate.rating_app: the page
    print(format_results(rating_results("sqlite:///chatforge.db")))   # the latest study; or name run_a, run_b

An item is one conversation of DATA/SPLIT.jsonl: its prompt is every turn before the last assistant turn (the whole
conversation when it has none), and each run answers that prompt (`load_run` + `generate_batch`). Items live in the
project database next to the ratings (`chatforge.evaluate.rating_store`, which also decides the blind order each
rater sees), so building the same study again (same runs, data and split) reuses them and only generates answers
for conversations not stored yet; the page serves every stored item of the study.

Results count A wins, ties and B wins with a 95 % Wilson score interval for each proportion (see `wilson_interval`),
plus A's win rate among decisive ratings (ties left out) and per-rater counts.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chatforge.config import GenerationConfig
from chatforge.evaluate.rating_store import DEFAULT_DB_URL, RatingStore, RatingStudy
from chatforge.models.generate import SamplingSettings, chat_prompt_ids, generate_batch
from chatforge.models.run import load_run

Z_95 = 1.959963984540054  # the standard normal quantile at 0.975

Log = Callable[[str], None]


def read_prompts(split_file: Path, max_items: int | None = None) -> list[tuple[str, list[dict[str, str]]]]:
    """(record id, prompt) of the first `max_items` conversations; errors name the file and line."""
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: no such split file; is {split_file.parent} a prepared dataset?")
    prompts: list[tuple[str, list[dict[str, str]]]] = []
    for line_number, line in enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1):
        if max_items is not None and len(prompts) >= max_items:
            break
        if not line.strip():
            continue
        where = f"{split_file}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError(f"{where}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        prompt = messages[:assistant_turns[-1]] if assistant_turns else messages
        if not any(m["role"] == "user" for m in prompt):
            raise ValueError(f"{where}: no user turn before the last assistant turn; nothing to ask the runs")
        prompts.append((str(record.get("id") or f"{split_file.name}:{line_number}"),
                        [{"role": m["role"], "content": m["content"]} for m in prompt]))
    return prompts


def study_key(run: str | Path) -> str:
    """How a run or dataset is named in the database: its absolute path when it exists, else as given (hub id)."""
    path = Path(run).expanduser()
    return str(path.resolve()) if path.exists() else str(run)


def generate_answers(run: str, prompts: list[list[dict[str, str]]], generation: GenerationConfig,
                     device: str = "auto") -> list[str]:
    """`run`'s answer to every prompt (on `device`; auto = the GPU when there is one), decoded as `generation` says."""
    loaded = load_run(run, device=device)
    prompt_ids = [chat_prompt_ids(loaded.tokenizer, prompt) for prompt in prompts]
    settings = [SamplingSettings(max_new_tokens=generation.max_new_tokens, temperature=generation.temperature,
                                 top_p=generation.top_p, seed=generation.seed + index) for index in range(len(prompts))]
    answers = [g.text.strip() for g in generate_batch(loaded, prompt_ids, settings, generation.batch_size)]
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return answers


def build_rating_study(
    run_a: str | Path,
    run_b: str | Path,
    data_dir: Path,
    db_url: str = DEFAULT_DB_URL,
    split: str = "test",
    max_items: int | None = None,
    generation: GenerationConfig | None = None,
    log: Log = lambda _msg: None,
    device: str = "auto",
) -> RatingStudy:
    """The study of run A vs run B on DATA/SPLIT.jsonl, with both runs' answers stored (see the module docstring).

    Only conversations without a stored item are answered, so a second call is instant and a larger `max_items`
    adds the missing ones. `generation` defaults to GenerationConfig() (greedy, 128 new tokens).
    """
    generation = generation or GenerationConfig()
    key_a, key_b, data_key = study_key(run_a), study_key(run_b), study_key(data_dir)
    if key_a == key_b:
        raise ValueError(f"run A and run B are both {key_a}; rate two different runs")
    prompts = read_prompts(Path(data_dir) / f"{split}.jsonl", max_items)
    if not prompts:
        raise ValueError(f"{Path(data_dir) / f'{split}.jsonl'}: no conversations to rate")
    store = RatingStore(db_url)
    try:
        study = store.find_study(key_a, key_b, data_key, split) or store.create_study(key_a, key_b, data_key, split)
        stored = {item.record_id for item in study.items}
        missing = [(record_id, prompt) for record_id, prompt in prompts if record_id not in stored]
        log(f"rating study {study.id}: {len(prompts) - len(missing)} of {len(prompts)} items stored already")
        if missing:
            log(f"answering {len(missing)} prompts with run A ({key_a})")
            answers_a = generate_answers(str(run_a), [prompt for _, prompt in missing], generation, device)
            log(f"answering {len(missing)} prompts with run B ({key_b})")
            answers_b = generate_answers(str(run_b), [prompt for _, prompt in missing], generation, device)
            store.add_items(study.id, [(record_id, prompt, a, b)
                                       for (record_id, prompt), a, b in zip(missing, answers_a, answers_b)])
        return store.study(study.id)
    finally:
        store.close()


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / trials (95 % for the default z).

    With p = successes / trials and n = trials it is (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n). Unlike
    p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and keeps sensible width for small n and for p near 0 or 1,
    which is where a handful of human ratings lands: 5 of 10 gives (0.237, 0.763), 0 of 10 gives (0, 0.278).
    """
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"wilson_interval: need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def _proportion(count: int, trials: int) -> dict[str, Any]:
    """{"count", "of", "rate", "low", "high"}; rate and bounds are None when there are no trials."""
    if trials == 0:
        return {"count": count, "of": 0, "rate": None, "low": None, "high": None}
    low, high = wilson_interval(count, trials)
    return {"count": count, "of": trials, "rate": count / trials, "low": low, "high": high}


def rating_results(db_url: str = DEFAULT_DB_URL, run_a: str | None = None, run_b: str | None = None) -> dict[str, Any]:
    """Win/tie/loss of A vs B in the latest study (of these runs, when given), with 95 % Wilson intervals.

    Returns {"study": {...}, "ratings": n, "raters": k, "items_rated": m, "a_wins" / "ties" / "b_wins": share of
    all ratings, "a_wins_decisive": A's share of the ratings that were not ties, "per_rater": {name: {"a_wins",
    "ties", "b_wins"}}, "method": str}; each share is {"count", "of", "rate", "low", "high"}.
    """
    store = RatingStore(db_url)
    try:
        study = store.latest_study(run_a and study_key(run_a), run_b and study_key(run_b))
        ratings = store.ratings(study.id)
    finally:
        store.close()
    counts = Counter(r.choice for r in ratings)
    per_rater: dict[str, dict[str, int]] = {}
    for rating in ratings:
        tally = per_rater.setdefault(rating.rater, {"a_wins": 0, "ties": 0, "b_wins": 0})
        tally[{"a": "a_wins", "tie": "ties", "b": "b_wins"}[rating.choice]] += 1
    return {
        "study": {"id": study.id, "run_a": study.run_a, "run_b": study.run_b, "data": study.data,
                  "split": study.split, "created": study.created, "items": len(study.items)},
        "ratings": len(ratings),
        "raters": len(per_rater),
        "items_rated": len({r.item_id for r in ratings}),
        "a_wins": _proportion(counts["a"], len(ratings)),
        "ties": _proportion(counts["tie"], len(ratings)),
        "b_wins": _proportion(counts["b"], len(ratings)),
        "a_wins_decisive": _proportion(counts["a"], counts["a"] + counts["b"]),
        "per_rater": dict(sorted(per_rater.items())),
        "method": "95 % Wilson score interval per proportion; each rating counts once (raters and items pooled)",
    }


def _percent(share: dict[str, Any]) -> str:
    if share["rate"] is None:
        return "n/a"
    return f"{100 * share['rate']:5.1f} %  [{100 * share['low']:.1f}, {100 * share['high']:.1f}]"


def format_results(results: dict[str, Any]) -> str:
    """The results of `rating_results` as lines for the terminal."""
    study = results["study"]
    lines = [f"Rating study {study['id']} ({study['created']}): A = {study['run_a']}  vs  B = {study['run_b']}",
             f"data {study['data']} split {study['split']}, {study['items']} items"]
    if results["ratings"] == 0:
        return "\n".join([*lines, "no ratings yet"])
    lines.append(f"{results['ratings']} ratings of {results['items_rated']} items by {results['raters']} raters")
    for label, key in (("A wins", "a_wins"), ("ties  ", "ties"), ("B wins", "b_wins")):
        lines.append(f"  {label} {results[key]['count']:5d}  {_percent(results[key])}")
    decisive = results["a_wins_decisive"]
    lines.append(f"A's win rate without ties: {_percent(decisive)} of {decisive['of']} decisive ratings")
    if decisive["low"] is not None and (decisive["low"] > 0.5 or decisive["high"] < 0.5):
        lines.append(f"-> {'A' if decisive['low'] > 0.5 else 'B'} is preferred (the interval excludes 50 %)")
    else:
        lines.append("-> no clear preference yet (the interval includes 50 %)")
    for rater, tally in results["per_rater"].items():
        lines.append(f"  {rater}: A {tally['a_wins']}, tie {tally['ties']}, B {tally['b_wins']}")
    lines.append(results["method"])
    return "\n".join(lines)
