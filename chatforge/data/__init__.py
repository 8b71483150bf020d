"""Data preparation: read, validate, clean, redact, dedup, fit, balance, augment, split."""
