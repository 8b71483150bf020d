"""Answer scores: BLEU/ROUGE equal the libraries' own numbers; token F1, exact match and macro-F1 by hand."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from chatforge.evaluate.metrics import exact_match, label_scores, text_scores, token_f1

PREDICTIONS = ["Restart the router and wait a minute.", "Your invoice is in the billing tab.", "I do not know."]
REFERENCES = ["Restart the router, then wait one minute.", "The invoice is in the billing tab.", "Call support."]


def test_corpus_scores_equal_sacrebleu_and_rouge_score_directly() -> None:
    scores = text_scores(PREDICTIONS, REFERENCES)
    assert scores.corpus["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES)]
    for name in ("rouge1", "rouge2", "rougeL"):
        assert scores.corpus[name] == pytest.approx(sum(d[name].fmeasure for d in direct) / 3)
    assert len(scores.per_sample) == 3 and scores.per_sample[2]["rougeL"] == 0.0
    perfect = text_scores(REFERENCES, REFERENCES).corpus
    assert perfect["bleu"] == pytest.approx(100.0) and perfect["exact_match"] == 1.0


def test_token_f1_and_exact_match_follow_squad_normalisation() -> None:
    assert exact_match("The Billing tab!", "billing tab") == 1.0
    assert token_f1("the billing tab", "billing tab") == 1.0
    # prediction {invoice, in, billing, tab} vs reference {invoice, is, in, billing, tab}: P=1, R=4/5
    assert token_f1("invoice in billing tab", "the invoice is in the billing tab") == pytest.approx(2 * 0.8 / 1.8)
    assert token_f1("nothing shared", "billing tab") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0


def test_label_scores_accuracy_and_macro_f1() -> None:
    gold = ["billing", "billing", "outage", "outage"]
    predicted = ["billing", "outage", "outage", "outage"]
    # billing: P=1, R=.5, F1=2/3; outage: P=2/3, R=1, F1=.8
    scores = label_scores(predicted, gold)
    assert scores["accuracy"] == 0.75
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_mismatched_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_scores(["a", "b"], ["a"])
