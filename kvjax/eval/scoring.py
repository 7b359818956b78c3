"""Scoring rules: exact match of the leading answer, and recall of all expected items.

`recall` is RULER's `string_match_all` (fraction of expected items found in the prediction,
case-insensitive) with whole-word matching, so "1234567" does not match "12345678".
`exact` asks the answer to come first: the answer prefix ends right before it, so a model that
retrieved the needle continues with it ("... text is 1234567.").
"""

import re
from collections.abc import Sequence

from kvjax.eval.sample import Sample

_LEADING_JUNK = re.compile(r"^[\s:\"'`*(\[]+")


def _contains_word(text: str, item: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(item.lower())}(?!\w)", text.lower()) is not None


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the prediction starts with one of `answers` as a whole word, else 0.0.

    Leading whitespace, quotes, colons, brackets and asterisks are skipped; case is ignored.
    """
    text = _LEADING_JUNK.sub("", prediction).lower()
    for answer in answers:
        a = answer.strip().lower()
        if a and text.startswith(a) and not re.match(r"\w", text[len(a):len(a) + 1]):
            return 1.0
    return 0.0


def recall(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of `answers` present in the prediction as whole words (case-insensitive)."""
    if not answers:
        raise ValueError(f"{answers=} must not be empty")
    return sum(_contains_word(prediction, a) for a in answers) / len(answers)


METRIC_FNS = {"exact": exact_match, "recall": recall}


def score(sample: Sample, prediction: str) -> float:
    """Score a prediction with the sample's rule, in [0, 1]."""
    return METRIC_FNS[sample.metric](prediction, sample.answers)
