"""Accuracy and macro-F1 of generated answers when the test conversations carry a label (`meta.label` or
`meta.category`) and the task looks like classification.

Use it like this::

    label_metrics(["billing", "outage"], answers, references, max_classes=20)   # {"accuracy": .., "macro_f1": ..} or {}

The task counts as classification-like when every conversation has a label and there are 2..max_classes distinct
ones. An answer's predicted label is the label it names (the longest label found in the normalised answer);
failing that, the label whose reference answers it overlaps most (token F1), so a support bot that answers each
category with its own wording is scored on whether it picked the right category's answer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from chatforge.evaluate.metrics import label_scores, normalise_answer, token_f1

MAX_REFERENCES_PER_LABEL = 50


def is_classification(labels: Sequence[str | None], max_classes: int) -> bool:
    return bool(labels) and all(label is not None for label in labels) and 2 <= len(set(labels)) <= max_classes


def predict_labels(answers: Sequence[str], labels: Sequence[str], references: Sequence[str]) -> list[str]:
    """The label each answer names, else the label of the references it is closest to (see the module docstring)."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for label, reference in zip(labels, references):
        if len(by_label[label]) < MAX_REFERENCES_PER_LABEL and reference not in by_label[label]:
            by_label[label].append(reference)
    names = sorted(by_label, key=lambda label: -len(normalise_answer(label)))
    predicted = []
    for answer in answers:
        words = f" {normalise_answer(answer)} "
        named = next((label for label in names if normalise_answer(label) and f" {normalise_answer(label)} " in words), None)
        if named is None:
            named = max(by_label, key=lambda label: max(token_f1(answer, ref) for ref in by_label[label]))
        predicted.append(named)
    return predicted


def label_metrics(
    labels: Sequence[str | None], answers: Sequence[str], references: Sequence[str], max_classes: int
) -> dict[str, float]:
    """{"accuracy", "macro_f1"} for a classification-like test set, else {}."""
    if not is_classification(labels, max_classes):
        return {}
    gold = [str(label) for label in labels]
    return label_scores(predict_labels(answers, gold, references), gold)
