"""Evaluation: metrics against references, generation for eval, bias probe, reports, human rating."""
