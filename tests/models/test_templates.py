"""Chat templates: the layouts they render, their generation prompts and the assistant-token masks they give."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from chatforge.models.templates import CHAT_TEMPLATES, TURN_END, end_of_turn_token, ensure_chat_template

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How do I reset my password? "},
    {"role": "assistant", "content": "Click 'Forgot password' on the login page."},
    {"role": "user", "content": "Thanks a lot."},
    {"role": "assistant", "content": "Have a wonderful day!"},
]


def tokenizer_with(tiny_tokenizer_dir: Path, template: str):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert ensure_chat_template(tokenizer, template) == template
    return tokenizer


def word_level_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", *words])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), eos_token="<eos>")


def test_gemma_template_folds_the_system_message_into_the_first_user_turn(tiny_tokenizer_dir: Path) -> None:
    tokenizer = tokenizer_with(tiny_tokenizer_dir, "gemma")
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHow do I reset my password?<end_of_turn>\n"
        "<start_of_turn>model\nClick 'Forgot password' on the login page.<end_of_turn>\n"
        "<start_of_turn>user\nThanks a lot.<end_of_turn>\n"
        "<start_of_turn>model\nHave a wonderful day!<end_of_turn>\n"
    )


def test_chatml_and_llama3_templates_render_their_layouts(tiny_tokenizer_dir: Path) -> None:
    chatml = tokenizer_with(tiny_tokenizer_dir, "chatml").apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert chatml == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow do I reset my password?<|im_end|>\n"
        "<|im_start|>assistant\nClick 'Forgot password' on the login page.<|im_end|>\n"
    )
    llama3 = tokenizer_with(tiny_tokenizer_dir, "llama3").apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert llama3 == (
        "<bos><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow do I reset my password?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nClick 'Forgot password' on the login page.<|eot_id|>"
    )


@pytest.mark.parametrize(
    "template, user_turn_end, opening",
    [
        ("gemma", "<end_of_turn>\n", "<start_of_turn>model\n"),
        ("chatml", "<|im_end|>\n", "<|im_start|>assistant\n"),
        ("llama3", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ],
)
def test_generation_prompt_opens_an_assistant_turn(
    tiny_tokenizer_dir: Path, template: str, user_turn_end: str, opening: str
) -> None:
    tokenizer = tokenizer_with(tiny_tokenizer_dir, template)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("How do I reset my password?" + user_turn_end + opening)
    assert tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False).endswith(user_turn_end)


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_assistant_mask_covers_each_answer_and_its_end_of_turn_token_only(
    tiny_tokenizer_dir: Path, template: str
) -> None:
    tokenizer = tokenizer_with(tiny_tokenizer_dir, template)
    batch = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = batch["input_ids"], batch["assistant_masks"]
    assert len(ids) == len(mask)
    turn_end = TURN_END[template]
    answer_ids = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(answer_ids) == (
        f"Click 'Forgot password' on the login page.{turn_end}Have a wonderful day!{turn_end}"
    )
    prompt_text = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert "How do I reset my password?" in prompt_text and "Thanks a lot." in prompt_text
    assert "Click" not in prompt_text and "wonderful" not in prompt_text
    # the model learns to stop: every end-of-turn token after an answer carries loss
    turn_end_id = tokenizer.convert_tokens_to_ids(turn_end)
    assert sum(m for i, m in zip(ids, mask) if i == turn_end_id) == 2


def test_ensure_chat_template_keeps_the_tokenizers_own_unless_one_is_named(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert ensure_chat_template(tokenizer) == "tokenizer"
    assert tokenizer.chat_template.startswith("{% for m in messages %}")
    assert ensure_chat_template(tokenizer, "chatml") == "chatml"
    assert tokenizer.chat_template == CHAT_TEMPLATES["chatml"]


def test_ensure_chat_template_picks_one_by_the_vocabulary(tiny_tokenizer_dir: Path) -> None:
    gemma_vocab = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    gemma_vocab.chat_template = None
    assert ensure_chat_template(gemma_vocab) == "gemma"
    chatml_vocab = word_level_tokenizer(["<|im_start|>", "<|im_end|>", "hello"])
    assert ensure_chat_template(chatml_vocab) == "chatml"
    assert len(chatml_vocab) == 5  # nothing added


def test_ensure_chat_template_adds_missing_turn_tokens_as_special_tokens() -> None:
    bare = word_level_tokenizer(["hello"])
    assert ensure_chat_template(bare) == "chatml"
    assert len(bare) == 5
    ids = bare.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True, return_dict=False)
    assert bare.convert_ids_to_tokens(ids)[:2] == ["<|im_start|>", "<unk>"]  # the marker is one token


def test_ensure_chat_template_rejects_unknown_names(tiny_tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown chat template 'vicuna'; known: chatml, gemma, llama3"):
        ensure_chat_template(AutoTokenizer.from_pretrained(tiny_tokenizer_dir), "vicuna")


def test_end_of_turn_token_follows_the_template(tiny_tokenizer_dir: Path) -> None:
    for template, token in TURN_END.items():
        assert end_of_turn_token(tokenizer_with(tiny_tokenizer_dir, template)) == token
    own = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    own.chat_template = "{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
    assert end_of_turn_token(own) == "<eos>"
