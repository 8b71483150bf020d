"""Named chat templates whose assistant turns carry `{% generation %}` markers, so loss masks come for free.

Use it like this::

    name = ensure_chat_template(tokenizer)              # keeps the tokenizer's own template, else picks one
    batch = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
    batch["assistant_masks"]                            # 1 on each answer and its end-of-turn token
    end_of_turn_token(tokenizer)                        # '<end_of_turn>': the token generation stops on

Every template wraps an assistant turn's content *and* the token that ends the turn in the generation block: a
model only learns to stop if the stop token carries loss. Contents are trimmed, as Gemma's and Llama 3's own
templates do, and `add_generation_prompt=True` opens an assistant turn.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Gemma 3: no system role; a leading system message is prepended to the first turn, as the official template does.
# Later system messages (rare) become user turns rather than an unseen "system" role.
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_prefix = messages[0]['content'] | trim + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set prefix = first_prefix if loop.first else '' -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<start_of_turn>model\n' + prefix -}}"
    "{%- generation -%}{{- message['content'] | trim + '<end_of_turn>' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<start_of_turn>user\n' + prefix + message['content'] | trim + '<end_of_turn>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] | trim + '<|im_end|>' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- message['content'] | trim + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)

CHAT_TEMPLATES: dict[str, str] = {"chatml": CHATML_TEMPLATE, "gemma": GEMMA_TEMPLATE, "llama3": LLAMA3_TEMPLATE}

# The special tokens each template writes (all must be in the vocabulary) and the one that ends an assistant turn.
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}
TURN_END: dict[str, str] = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>", "llama3": "<|eot_id|>"}


def ensure_chat_template(tokenizer: Any, name: str | None = None) -> str:
    """Give `tokenizer` a chat template and return which: a name from CHAT_TEMPLATES, "tokenizer" for its own, or
    the path of a Jinja file (`name` ending in .jinja, or an existing file) whose text becomes the template.

    A named template always wins. With no name the tokenizer's own template is kept; a tokenizer without one gets
    the template whose turn tokens its vocabulary has (gemma, then chatml, then llama3), else chatml. Turn tokens
    missing from the vocabulary are added as special tokens (logged): the model's embeddings must then be resized
    to `len(tokenizer)` before training.
    """
    known = ", ".join(sorted(CHAT_TEMPLATES))
    if name is not None and name not in CHAT_TEMPLATES and name != "tokenizer" and _looks_like_file(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f"chat template {name!r}: no such file")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
        return str(path)
    if name == "tokenizer":  # what this function returns for a kept template, so it round-trips through configs
        if getattr(tokenizer, "chat_template", None):
            return "tokenizer"
        raise ValueError(f"chat template 'tokenizer': the tokenizer has none of its own; name one of {known}")
    if name is not None and name not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {known}, or a .jinja file")
    if name is None:
        if getattr(tokenizer, "chat_template", None):
            return "tokenizer"
        vocab = tokenizer.get_vocab()
        name = next(
            (n for n in ("gemma", "chatml", "llama3") if all(t in vocab for t in TEMPLATE_TOKENS[n])),
            "chatml",
        )
    missing = [t for t in TEMPLATE_TOKENS[name] if t not in tokenizer.get_vocab()]
    if missing:
        logger.warning(
            "chat template %r needs tokens %s that the tokenizer lacks; adding them (resize the model's embeddings)",
            name,
            missing,
        )
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    return name


def _looks_like_file(name: str) -> bool:
    return name.endswith((".jinja", ".j2", ".txt")) or "/" in name or Path(name).expanduser().is_file()


def end_of_turn_token(tokenizer: Any) -> str:
    """The token that ends an assistant turn under the tokenizer's chat template; generation should stop on it.

    A known turn token in the template wins; otherwise the special token the template writes right after an answer
    (Phi-3's <|end|>, Mistral's </s>), found by rendering one; else eos."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # several named templates: the default one is what apply_chat_template uses
        template = template.get("default", "")
    for token in TURN_END.values():
        if token in template:
            return token
    probe = "\u27e6answer\u27e7"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}],
                                                 tokenize=False)
    except Exception:  # noqa: BLE001 - any template error: fall back to eos, as before
        return str(tokenizer.eos_token)
    after = str(rendered)[str(rendered).rfind(probe) + len(probe):].lstrip()
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    specials.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    following = [token for token in specials if token and after.startswith(token)]
    return max(following, key=len) if following else str(tokenizer.eos_token)


TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>")


def template_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the turn-marking special tokens the tokenizer's chat template writes (e.g. Gemma's <start_of_turn>,
    <end_of_turn>): the rows `lora.train_template_tokens` trains."""
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template or ""
    return [vocab[token] for token in TURN_TOKENS if token in vocab and token in template]
