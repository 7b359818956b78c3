"""Needle-in-a-haystack tasks in the RULER style (arXiv 2404.06654) and passkey retrieval
(Mohtashami & Jaggi, arXiv 2305.16300).

A needle is "One of the special magic numbers for <key> is: <value>."; keys are
adjective-noun pairs, values random 7-digit numbers. Variants: distractor keys (multi-key),
several values for one key (multi-value), several keys asked at once (multi-query). The first
queried needle goes at the requested depth, the others at random depths.
"""

import dataclasses

import numpy as np

from kvjax.eval.haystack import (
    HAYSTACKS,
    TokenCounter,
    fit_length,
    insert_at_depths,
    word_stream,
    words_for_tokens,
)
from kvjax.eval.sample import Sample

ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "crimson", "curious",
    "distant", "eager", "elegant", "fierce", "fragile", "gentle", "gilded", "golden", "hollow",
    "humble", "icy", "jolly", "lively", "lonely", "lucky", "mellow", "misty", "noble", "odd",
    "pale", "proud", "quiet", "rapid", "restless", "rustic", "scarlet", "shy", "silent",
    "silver", "sleepy", "slender", "sturdy", "swift", "tender", "tidy", "vivid", "wandering",
    "wicked", "wise", "witty", "zealous",
)
NOUNS = (
    "anchor", "badger", "banjo", "barrel", "beacon", "bicycle", "blanket", "bucket", "cactus",
    "candle", "canyon", "castle", "cobra", "comet", "compass", "cushion", "dolphin", "falcon",
    "feather", "fountain", "garden", "giraffe", "glacier", "hammer", "harbor", "helmet",
    "island", "jacket", "kettle", "ladder", "lantern", "lizard", "meadow", "mirror", "orchid",
    "otter", "oyster", "parrot", "pebble", "pillow", "puzzle", "rabbit", "saddle", "sparrow",
    "teapot", "thimble", "tractor", "trumpet", "violin", "walrus",
)


def random_keys(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct adjective-noun keys."""
    flat = rng.choice(len(ADJECTIVES) * len(NOUNS), size=n, replace=False)
    return [f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}" for i in flat]


def random_numbers(rng: np.random.Generator, n: int, digits: int) -> list[str]:
    """n distinct random numbers of exactly `digits` digits, as strings."""
    lo, hi = 10 ** (digits - 1), 10 ** digits
    values: list[str] = []
    while len(values) < n:
        v = str(int(rng.integers(lo, hi)))
        if v not in values:
            values.append(v)
    return values


def _english_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NeedleTask:
    """RULER needle in a haystack: single, multi-key, multi-value or multi-query.

    Attributes:
      n_keys: keys with needles (n_keys - n_queries are distractors).
      n_values: values per key; n_queries: keys asked at once.
      haystack: "essay" (varied natural text) or "noise" (a repeated passage).
      digits: digits of each value; max_new_tokens: decode budget.
    """

    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1
    haystack: str = "essay"
    digits: int = 7
    max_new_tokens: int = 16
    uses_depth = True

    def __post_init__(self):
        if not 1 <= self.n_queries <= self.n_keys:
            raise ValueError(f"{self.n_queries=} must be in [1, {self.n_keys=}]")
        if self.n_values < 1 or self.digits < 1:
            raise ValueError(f"{self.n_values=} and {self.digits=} must be >= 1")
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"{self.haystack=} must be one of {HAYSTACKS}")

    def make(self, count: TokenCounter, length: int, rng: np.random.Generator,
             depth: float, name: str = "niah", index: int = 0) -> Sample:
        """One sample whose context has ~`length` tokens by `count`."""
        keys = random_keys(rng, self.n_keys)
        values = random_numbers(rng, self.n_keys * self.n_values, self.digits)
        needles = [(k, values[i * self.n_values + j]) for i, k in enumerate(keys)
                   for j in range(self.n_values)]
        depths = [depth] + list(rng.uniform(0, 1, len(needles) - 1))
        order = rng.permutation(len(needles) - 1) + 1  # distractors in random order
        texts = [needle_text(*needles[0])] + [needle_text(*needles[i]) for i in order]
        depths = [depths[0]] + [depths[i] for i in order]
        queried = keys[:self.n_queries]
        answers = tuple(v for k, v in needles if k in queried)
        many = len(needles) > 1
        header = (f"{'Some special magic numbers are' if many else 'A special magic number is'} "
                  f"hidden within the following text. Make sure to memorize "
                  f"{'them' if many else 'it'}. I will quiz you about the "
                  f"{'numbers' if many else 'number'} afterwards.\n")
        plural = len(answers) > 1
        noun = "numbers" if plural else "number"
        inserts = list(zip(depths, texts))
        stream = word_stream(self.haystack, rng, words_for_tokens(length))
        _, body = fit_length(lambda m: header + insert_at_depths(stream, m, inserts),
                             count, length, len(stream.words))
        what = "are all the special magic numbers" if plural else "is the special magic number"
        keys_text = _english_list(queried)
        return Sample(
            task=name, index=index, context=body,
            question=f"What {what} for {keys_text} mentioned in the provided text?",
            answer_prefix=(f"The special magic {noun} for {keys_text} mentioned in the provided "
                           f"text {'are' if plural else 'is'}"),
            answers=answers, metric="recall" if plural else "exact",
            max_new_tokens=self.max_new_tokens * len(answers), n_tokens=count(body),
            depth=float(depth))


def needle_text(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


@dataclasses.dataclass(frozen=True, kw_only=True)
class PasskeyTask:
    """Passkey retrieval: a random number hidden in repeated noise (arXiv 2305.16300)."""

    digits: int = 5
    haystack: str = "noise"
    max_new_tokens: int = 12
    uses_depth = True

    def __post_init__(self):
        if self.digits < 1:
            raise ValueError(f"{self.digits=} must be >= 1")
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"{self.haystack=} must be one of {HAYSTACKS}")

    def make(self, count: TokenCounter, length: int, rng: np.random.Generator,
             depth: float, name: str = "passkey", index: int = 0) -> Sample:
        """One sample whose context has ~`length` tokens by `count`."""
        key = random_numbers(rng, 1, self.digits)[0]
        header = ("There is an important piece of information hidden inside a lot of irrelevant "
                  "text. Find it and memorize it. I will quiz you about it afterwards.\n")
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        stream = word_stream(self.haystack, rng, words_for_tokens(length))
        _, body = fit_length(lambda m: header + insert_at_depths(stream, m, [(depth, needle)]),
                             count, length, len(stream.words))
        return Sample(task=name, index=index, context=body, question="What is the pass key?",
                      answer_prefix="The pass key is", answers=(key,), metric="exact",
                      max_new_tokens=self.max_new_tokens, n_tokens=count(body),
                      depth=float(depth))
