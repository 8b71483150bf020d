"""chatforge: train your own ChatGPT on your own conversations."""

__version__ = "0.1.0"
