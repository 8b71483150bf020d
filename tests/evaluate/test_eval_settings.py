"""Eval's generation settings and its bias probe of the base: penalties reach the decoder (or fail clearly), and
metrics.json holds the base model's bias flags next to the run's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chatforge.config import BiasConfig, EvalConfig, GenerationConfig
from chatforge.evaluate.run_eval import EvalError, evaluate_run, penalty_settings
from chatforge.models.generate import SamplingSettings
from tests.models.test_run import prepared_dataset, tiny_run


def test_penalties_left_at_off_pass_nothing_to_the_decoder() -> None:
    assert penalty_settings(GenerationConfig()) == {}


def test_a_penalty_that_is_asked_for_reaches_sampling_settings_or_fails_clearly() -> None:
    gen = GenerationConfig(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.2)
    fields = {f.name for f in dataclasses.fields(SamplingSettings)}
    if {"frequency_penalty", "presence_penalty", "repetition_penalty"} <= fields:
        settings = SamplingSettings(**penalty_settings(gen))
        assert (settings.frequency_penalty, settings.presence_penalty, settings.repetition_penalty) == (0.5, 0.25, 1.2)
    else:  # a decoder without penalties: never silently ignored
        with pytest.raises(EvalError, match="eval.generation.frequency_penalty: this chatforge's decoder has no such setting"):
            penalty_settings(gen)


def test_bias_probe_reports_the_base_models_flags_next_to_the_runs(tmp_path: Path, tiny_model_dir: Path) -> None:
    run_dir = tiny_run(prepared_dataset(tmp_path, tiny_model_dir), tiny_model_dir, tmp_path / "run", "lora", max_steps=2)
    cfg = EvalConfig(max_examples=4, generation=GenerationConfig(max_new_tokens=4, batch_size=4),
                     bias=BiasConfig(attributes=["gender"], max_new_tokens=4))
    metrics = evaluate_run(run_dir, cfg, log=lambda _m: None).metrics
    assert metrics["bias"]["total_pairs"] > 0
    assert metrics["bias_baseline"]["total_pairs"] == metrics["bias"]["total_pairs"]
    assert 0 <= metrics["bias_baseline"]["flagged_pairs"] <= metrics["bias_baseline"]["total_pairs"]
