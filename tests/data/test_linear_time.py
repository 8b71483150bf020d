"""Every PII detector and cleaning step is linear in its input: 10x the adversarial text costs at most ~10x the time.

Detectors and steps are taken from their registries (`pii_detectors.DETECTORS`, `clean.CLEANING_STEPS`), so one
added later is checked without touching this file. Timings are the CPU time of this thread (what the function
costs, not how long the scheduler let other processes run in between), the minimum of a few runs with the garbage
collector paused, as `timeit` does; a case is measured again before it is called a failure.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chatforge.config import PII_TYPES, CleanConfig, FormatOptions
from chatforge.data.clean import CLEANING_STEPS, Cleaner
from chatforge.data.dedup import normalise_for_dedup
from chatforge.data.formats import read_file
from chatforge.core.pii import Redactor
from chatforge.core.pii_detectors import DETECTORS
from tests.data.adversarial import adversarial_texts

SMALL, LARGE = 10_000, 100_000
MAX_RATIO = 15  # 10x the input may cost at most 15x the time (quadratic would be ~100x)
MAX_LARGE_SECONDS = 1.0
NOISE_FLOOR_SECONDS = 0.01  # below this a 100 KB run is fast whatever the ratio (timer and cache noise)


def _functions() -> dict[str, Callable[[str], object]]:
    functions: dict[str, Callable[[str], object]] = {f"detector {name}": fn for name, fn in DETECTORS.items()}
    functions["redactor (every type but PERSON)"] = Redactor(types=[t for t in PII_TYPES if t != "PERSON"]).redact
    functions |= {f"cleaning step {name}": fn for name, fn in CLEANING_STEPS.items()}
    everything_on = CleanConfig(spelling=True, capitalize=True)
    functions["cleaner (every step on, spelling too)"] = Cleaner(everything_on)
    functions["dedup normalise_for_dedup"] = normalise_for_dedup  # another regex pass over every conversation
    return functions


FUNCTIONS = _functions()
SMALL_TEXTS, LARGE_TEXTS = adversarial_texts(SMALL), adversarial_texts(LARGE)


def fastest_of(function: Callable[[Any], object], text: Any, runs: int) -> float:
    best = float("inf")
    gc.disable()
    try:
        for _ in range(runs):
            start = time.thread_time()
            function(text)
            best = min(best, time.thread_time() - start)
    finally:
        gc.enable()
    return best


def too_slow(function: Callable[[str], object], name: str, attempts: int = 4) -> str | None:
    """None when one of a few attempts shows linear cost, else what was measured. A quadratic step costs ~100x, so
    it fails every attempt; a linear one that was unlucky once (another process thrashing the caches) passes."""
    measured = []
    for attempt in range(attempts):
        small = fastest_of(function, SMALL_TEXTS[name], 3)
        large = fastest_of(function, LARGE_TEXTS[name], 1 if attempt == 0 else 2)
        if large <= NOISE_FLOOR_SECONDS or (large <= MAX_RATIO * small and large <= MAX_LARGE_SECONDS):
            return None
        measured.append(f"{small * 1000:.1f} -> {large * 1000:.1f} ms")
    return f"{name}: {SMALL // 1000} KB -> {LARGE // 1000} KB took {', '.join(measured)}"


def test_registries_hold_every_detector_and_step() -> None:
    assert len(DETECTORS) >= 11 and {"strip_html", "whitespace", "capitalize"} <= set(CLEANING_STEPS)
    assert len(SMALL_TEXTS) >= 40 and all(len(text) == LARGE for text in LARGE_TEXTS.values())


@pytest.mark.parametrize("function_name", sorted(FUNCTIONS))
def test_linear_time_on_adversarial_text(function_name: str) -> None:
    function = FUNCTIONS[function_name]
    slow = [problem for name in SMALL_TEXTS if (problem := too_slow(function, name))]
    assert not slow, f"{function_name} is not linear (limit {MAX_RATIO}x and {MAX_LARGE_SECONDS} s): {slow}"


def test_transcript_reader_is_linear_in_continuation_lines(tmp_path: Path) -> None:
    def read(path: Path) -> None:
        list(read_file(path, "transcript", FormatOptions()))

    paths = {}
    for lines in (20_000, 200_000):  # 0.3 MB and 3 MB in one message (the old `+=` copied it once per line)
        paths[lines] = tmp_path / f"t{lines}.txt"
        paths[lines].write_text("User: hi\nAgent: start\n" + "more words here\n" * lines)
    small, large = fastest_of(read, paths[20_000], 3), fastest_of(read, paths[200_000], 2)
    assert large <= max(MAX_RATIO * small, NOISE_FLOOR_SECONDS) and large <= MAX_LARGE_SECONDS, (small, large)
