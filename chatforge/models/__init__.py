"""Base models and tokenizers: where they come from (HF dir, hub id, GGUF), chat templates and their loss masks.

Use it like this::

    from chatforge.models import load_tokenizer, model_dir
    tokenizer = load_tokenizer(None)          # the default Gemma 3 270M, with the "gemma" chat template
    AutoModelForCausalLM.from_pretrained(model_dir(None))

Importing this package does not import transformers; the loaders do, when called.
"""

from chatforge.models.source import (
    DEFAULT_MODEL,
    ModelSource,
    cache_root,
    file_sha256,
    load_tokenizer,
    model_dir,
    resolve_model_source,
    tokenizer_dir,
)
from chatforge.models.templates import CHAT_TEMPLATES, end_of_turn_token, ensure_chat_template

__all__ = [
    "CHAT_TEMPLATES",
    "DEFAULT_MODEL",
    "ModelSource",
    "cache_root",
    "end_of_turn_token",
    "ensure_chat_template",
    "file_sha256",
    "load_tokenizer",
    "model_dir",
    "resolve_model_source",
    "tokenizer_dir",
]
