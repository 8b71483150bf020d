"""`chatforge serve`: the OpenAI-compatible API, its engine, keys, limits, store, metrics and feedback."""
