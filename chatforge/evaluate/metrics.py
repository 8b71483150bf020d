"""Scores of generated answers against reference answers: BLEU, ROUGE-1/2/L, token F1, exact match, and
accuracy / macro-F1 when the answers are labels.

Use it like this::

    scores = text_scores(["the cat sat"], ["the cat sat down"])
    scores.corpus         # {"bleu": ..., "rouge1": ..., "rouge2": ..., "rougeL": ..., "token_f1": ..., "exact_match": ...}
    scores.per_sample[0]  # the same keys for one answer (BLEU per sample is sacrebleu's sentence BLEU)
    label_scores(["billing", "outage"], ["billing", "billing"])   # {"accuracy": 0.5, "macro_f1": ...}

BLEU is sacrebleu's corpus BLEU (0-100, its default 13a tokenisation); ROUGE is rouge-score's F-measure with the
Porter stemmer, averaged over samples (0-1); token F1 and exact match follow SQuAD's normalisation (lower case,
punctuation and articles removed, whitespace collapsed).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import sacrebleu
from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass
class TextScores:
    corpus: dict[str, float]
    per_sample: list[dict[str, float]]


def normalise_answer(text: str) -> str:
    """SQuAD-style normalisation used by token F1 and exact match."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (1.0 when both are empty)."""
    predicted, expected = normalise_answer(prediction).split(), normalise_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise_answer(prediction) == normalise_answer(reference))


def text_scores(predictions: Sequence[str], references: Sequence[str]) -> TextScores:
    """Corpus and per-sample scores of `predictions` against `references` (same length, same order)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return TextScores({}, [])
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    per_sample = []
    for prediction, reference in zip(predictions, references):
        rouge = scorer.score(reference, prediction)
        per_sample.append({
            "bleu": sacrebleu.sentence_bleu(prediction, [reference]).score,
            **{name: rouge[name].fmeasure for name in ROUGE_TYPES},
            "token_f1": token_f1(prediction, reference),
            "exact_match": exact_match(prediction, reference),
        })
    corpus = {"bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score}
    for name in (*ROUGE_TYPES, "token_f1", "exact_match"):
        corpus[name] = sum(sample[name] for sample in per_sample) / len(per_sample)
    return TextScores(corpus, per_sample)


def label_scores(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over the gold labels' classes (a predicted label outside them only costs recall)."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predicted labels but {len(gold)} gold labels")
    if not gold:
        return {}
    norm_predicted = [normalise_answer(p) for p in predicted]
    norm_gold = [normalise_answer(g) for g in gold]
    f1s = []
    for label in sorted(set(norm_gold)):
        true_positive = sum(p == label and g == label for p, g in zip(norm_predicted, norm_gold))
        predicted_count = sum(p == label for p in norm_predicted)
        gold_count = sum(g == label for g in norm_gold)
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / gold_count
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    accuracy = sum(p == g for p, g in zip(norm_predicted, norm_gold)) / len(gold)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}
