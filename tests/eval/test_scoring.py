"""Scoring rules on hand-written predictions: exact, partial and no match."""

import pytest

from kvjax.eval.sample import Sample
from kvjax.eval.scoring import exact_match, recall, score


@pytest.mark.parametrize("prediction, expected", [
    (" 1234567.", 1.0),                      # what the model says after the answer prefix
    (": 1234567. It is a number.", 1.0),     # leading colon skipped, trailing text allowed
    ("**1234567**", 1.0),
    ("1234567", 1.0),
    (" 12345678.", 0.0),                     # longer number: not the answer
    (" 123456.", 0.0),                       # prefix of the answer
    (" the number 1234567.", 0.0),           # answer present but not first
    ("", 0.0),
])
def test_exact_match(prediction, expected):
    assert exact_match(prediction, ["1234567"]) == expected


def test_exact_match_any_alias_and_case():
    assert exact_match(" Paris, France", ["London", "paris"]) == 1.0
    assert exact_match(" Parisian", ["paris"]) == 0.0


@pytest.mark.parametrize("prediction, expected", [
    ("1111111, 2222222, 3333333 and 4444444.", 1.0),   # all four
    ("2222222 and 4444444", 0.5),                      # partial
    ("44444445 and 11111110", 0.0),                    # no whole-word match
    ("none of them", 0.0),
])
def test_recall(prediction, expected):
    assert recall(prediction, ["1111111", "2222222", "3333333", "4444444"]) == expected


def test_recall_words_case_insensitive():
    assert recall("ABCDE, fghij and KLMNO", ["abcde", "FGHIJ", "klmno", "pqrst"]) == 0.75
    with pytest.raises(ValueError, match="answers"):
        recall("x", [])


def test_score_uses_the_sample_metric():
    base = {"task": "t", "index": 0, "context": "c", "question": "q", "answer_prefix": "p",
            "max_new_tokens": 8, "n_tokens": 1}
    exact = Sample(answers=("42",), metric="exact", **base)
    many = Sample(answers=("a", "b"), metric="recall", **base)
    assert score(exact, " 42.") == 1.0 and score(exact, "it is 42") == 0.0
    assert score(many, "b") == 0.5
    with pytest.raises(ValueError, match="metric"):
        Sample(answers=("a",), metric="bleu", **base)
    with pytest.raises(ValueError, match="answers"):
        Sample(answers=(), metric="exact", **base)
