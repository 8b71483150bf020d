"""Batched generation: greedy answers equal one-prompt-at-a-time `model.generate` (also for rows that join a
running batch, on Llama and on Gemma 3 with a sliding window), rows stop on their own stop token, stop strings cut
the text, seeded sampling does not depend on what a row is batched with, a vanishing temperature or a broken row
never fails the others, penalties act as documented, and incremental text equals a full decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from chatforge.models.detokenize import TextDecoder
from chatforge.models.generate import DecodeBatch, SamplingSettings, chat_prompt_ids, generate_batch
from chatforge.models.run import LoadedRun, load_run
from chatforge.models.sampling import PenaltyState, choose_tokens, new_generator
from chatforge.models.tiny import build_tiny_gemma3, build_tiny_tokenizer

QUESTIONS = ["My router light is red.", "Refund please", "How do I reset the password of my account today?",
             "hi", "The modem keeps dropping the line every evening after six; what now?"]


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> LoadedRun:
    torch.manual_seed(0)
    return load_run(tiny_model_dir)


def prompts_of(loaded: LoadedRun) -> list[list[int]]:
    return [chat_prompt_ids(loaded.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def reference_greedy(loaded: LoadedRun, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=loaded.stop_token_ids, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    return [t for t in tokens if t not in loaded.stop_token_ids][: max_new_tokens]


def test_batched_greedy_matches_generate_one_at_a_time(base: LoadedRun) -> None:
    prompts = prompts_of(base)
    batched = generate_batch(base, prompts, SamplingSettings(max_new_tokens=12), batch_size=3)
    for prompt, answer in zip(prompts, batched):
        assert answer.token_ids == reference_greedy(base, prompt, 12)
        assert answer.prompt_tokens == len(prompt)
        assert answer.finish_reason in {"stop", "length"}


def test_a_row_that_emits_its_stop_token_finishes_while_others_go_on(base: LoadedRun) -> None:
    prompts = prompts_of(base)[:2]
    batch = DecodeBatch(base, prompts, [SamplingSettings(max_new_tokens=2), SamplingSettings(max_new_tokens=6)])
    steps = 0
    while not batch.done:
        batch.step()
        steps += 1
    first, second = batch.results()
    assert len(first.token_ids) <= 2 and len(second.token_ids) <= 6
    assert steps == max(len(first.token_ids) + (first.finish_reason == "stop"),
                        len(second.token_ids) + (second.finish_reason == "stop"))


def test_stop_string_cuts_the_text(base: LoadedRun) -> None:
    prompt = prompts_of(base)[0]
    free = generate_batch(base, [prompt], SamplingSettings(max_new_tokens=10))[0]
    assert len(free.text) >= 3, "the seeded tiny model should answer at least a few characters to cut"
    stop = free.text[1:3]
    cut = generate_batch(base, [prompt], SamplingSettings(max_new_tokens=10, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and free.text.startswith(cut.text)


def test_seeded_sampling_is_independent_of_batch_neighbours(base: LoadedRun) -> None:
    prompts = prompts_of(base)
    settings = SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    alone = generate_batch(base, [prompts[0]], settings)[0]
    together = generate_batch(base, prompts, [settings] + [SamplingSettings(max_new_tokens=8, temperature=1.0)] * 4)[0]
    assert alone.token_ids == together.token_ids


def test_cancel_keeps_what_was_generated(base: LoadedRun) -> None:
    batch = DecodeBatch(base, prompts_of(base)[:2], [SamplingSettings(max_new_tokens=50)] * 2)
    batch.step()
    batch.cancel(0)
    while not batch.done:
        batch.step()
    assert batch.results()[0].finish_reason in {"cancelled", "stop"}


def test_a_vanishing_top_p_keeps_the_most_likely_token(base: LoadedRun) -> None:
    """Found by schemathesis: top_p=5e-324 underflows to 0 in float32 and used to leave nothing to sample."""
    prompt = prompts_of(base)[0]
    greedy = generate_batch(base, [prompt], SamplingSettings(max_new_tokens=6))[0]
    tiny_p = generate_batch(base, [prompt], SamplingSettings(max_new_tokens=6, temperature=1.0, top_p=5e-324, seed=1))[0]
    assert tiny_p.token_ids == greedy.token_ids


@pytest.fixture(scope="module")
def chatty(tiny_model_dir: Path) -> LoadedRun:
    """The tiny Llama with its weights scaled up: random init alone answers one token over and over, this one
    answers varied tokens, so equal answers mean something."""
    loaded = load_run(tiny_model_dir)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.mul_(3.0)
    return loaded


@pytest.fixture(scope="module")
def sliding_gemma(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> LoadedRun:
    """A tiny Gemma 3 whose sliding window (8) is shorter than the prompts: the cache merge must respect it."""
    model_dir = build_tiny_gemma3(tmp_path_factory.mktemp("gemma") / "model", tiny_tokenizer_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    loaded = load_run(model_dir)
    with torch.no_grad():
        for parameter in loaded.model.parameters():
            parameter.mul_(3.0)
    return loaded


@pytest.mark.parametrize("model", ["chatty", "sliding_gemma"])
def test_rows_joining_a_running_batch_get_their_one_at_a_time_greedy_answers(
        model: str, request: pytest.FixtureRequest) -> None:
    loaded: LoadedRun = request.getfixturevalue(model)
    prompts = prompts_of(loaded)
    lengths = [12, 5, 9, 12, 3]
    expected = [reference_greedy(loaded, p, n) for p, n in zip(prompts, lengths)]
    assert len({tuple(e) for e in expected}) == len(expected), "the model should answer each prompt differently"
    arrivals = {0: [0], 2: [1], 4: [2, 3], 7: [4]}  # step -> prompts that join before it
    batch = DecodeBatch(loaded)
    prompt_of_row: dict[int, int] = {}
    for step in range(40):
        joining = arrivals.get(step, [])
        if joining:
            rows = batch.add([prompts[i] for i in joining], [SamplingSettings(max_new_tokens=lengths[i]) for i in joining])
            prompt_of_row.update(zip(rows, joining))
        if step > max(arrivals) and batch.done:
            break
        batch.step()
    assert sorted(prompt_of_row.values()) == list(range(len(prompts)))
    for row, index in prompt_of_row.items():
        assert batch.result(row).token_ids == expected[index], f"prompt {index}"


def test_generate_batch_refills_free_places_with_the_same_answers(chatty: LoadedRun) -> None:
    prompts = prompts_of(chatty)
    settings = [SamplingSettings(max_new_tokens=n) for n in (2, 11, 4, 7, 9)]
    answers = generate_batch(chatty, prompts, settings, batch_size=2)
    for prompt, setting, answer in zip(prompts, settings, answers):
        assert answer.token_ids == reference_greedy(chatty, prompt, setting.max_new_tokens)
        assert answer.text == chatty.tokenizer.decode(answer.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("temperature", [1e-300, 1e-12, 5e-324, float("nan")])
def test_a_vanishing_temperature_decodes_greedily_instead_of_failing(chatty: LoadedRun, temperature: float) -> None:
    prompts = prompts_of(chatty)[:2]
    tiny = SamplingSettings(max_new_tokens=6, temperature=temperature, seed=1)
    answers = generate_batch(chatty, prompts, [tiny, SamplingSettings(max_new_tokens=6, temperature=0.8, seed=2)])
    assert answers[0].token_ids == reference_greedy(chatty, prompts[0], 6)
    assert len(answers[1].token_ids) == 6


def test_non_finite_logits_still_give_a_token() -> None:
    logits = torch.tensor([[float("nan"), 1.0, 3.0], [float("inf"), 0.0, 1.0], [float("nan")] * 3])
    rows = [SamplingSettings(temperature=1.0, seed=0)] * 3
    chosen = choose_tokens(logits, rows, [new_generator(0) for _ in rows])
    assert chosen[0] in (1, 2) and chosen[1] == 0 and 0 <= chosen[2] < 3


def test_a_row_whose_sampling_breaks_ends_alone_with_an_error(chatty: LoadedRun) -> None:
    prompts = prompts_of(chatty)[:2]
    broken = SamplingSettings(max_new_tokens=5, temperature=1.0, top_p="x")  # type: ignore[arg-type]
    batch = DecodeBatch(chatty, prompts, [broken, SamplingSettings(max_new_tokens=5)])
    while not batch.done:
        batch.step()
    failed, fine = batch.results()
    assert failed.finish_reason == "error" and failed.token_ids == []
    assert fine.token_ids == reference_greedy(chatty, prompts[1], 5)


def test_penalties_follow_openai_and_transformers_semantics() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    rows = [SamplingSettings(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0)]
    penalties = PenaltyState(4, prompts=[[3]], answers=[[0, 0, 1]], settings=rows, device=torch.device("cpu"))
    penalised = penalties.apply(logits)[0].tolist()
    # token 0: seen, positive -> /2, then twice in the answer: -2*0.5 - 0.25; token 1: seen, negative -> *2, once
    # in the answer: -0.5 - 0.25; token 2: untouched; token 3: seen in the prompt only -> /2, no answer count
    assert penalised == pytest.approx([1.0 - 1.0 - 0.25, -4.0 - 0.5 - 0.25, 1.0, 0.25])


def test_a_frequency_penalty_breaks_the_loop_of_a_repeating_model(base: LoadedRun) -> None:
    prompt = prompts_of(base)[0]
    looping = generate_batch(base, [prompt], SamplingSettings(max_new_tokens=10))[0]
    assert len(set(looping.token_ids)) == 1, "precondition: the random tiny model repeats one token"
    penalised = generate_batch(base, [prompt], SamplingSettings(max_new_tokens=10, frequency_penalty=2.0,
                                                                presence_penalty=2.0))[0]
    assert len(set(penalised.token_ids)) > 3


def test_text_decoder_matches_a_full_decode_for_both_tokenizer_styles(tmp_path: Path) -> None:
    text = "Hello there, how are you? Café ☕ 😀 — fine.\nNext line   with  spaces."
    for style in ("bytelevel", "sentencepiece"):
        tokenizer = AutoTokenizer.from_pretrained(build_tiny_tokenizer(tmp_path / style, style=style))
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        decoder = TextDecoder(tokenizer)
        pieces = [decoder.push(token_id) for token_id in token_ids] + [decoder.flush()]
        assert "".join(pieces) == decoder.text == tokenizer.decode(token_ids, skip_special_tokens=True), style
