"""The tiny models and tokenizers tests build on the fly live in the package (the fast demo uses them too)."""

from chatforge.models.tiny import SPECIAL_TOKENS, build_tiny_llama, build_tiny_tokenizer, tiny_chat_text

__all__ = ["SPECIAL_TOKENS", "build_tiny_llama", "build_tiny_tokenizer", "tiny_chat_text"]
