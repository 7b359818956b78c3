"""RULER's multi-hop and aggregation tasks (arXiv 2404.06654): variable tracking,
common-words extraction (CWE) and frequent-words extraction (FWE)."""

import dataclasses
import string

import numpy as np

from kvjax.eval.haystack import (
    HAYSTACKS,
    TokenCounter,
    corpus_vocabulary,
    fit_length,
    insert_at_depths,
    word_stream,
    words_for_tokens,
)
from kvjax.eval.needles import random_numbers
from kvjax.eval.sample import Sample


def random_names(rng: np.random.Generator, n: int, letters: int = 5) -> list[str]:
    """n distinct upper-case variable names."""
    names: list[str] = []
    while len(names) < n:
        name = "".join(rng.choice(list(string.ascii_uppercase), letters))
        if name not in names:
            names.append(name)
    return names


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariableTrackingTask:
    """Chains `VAR A = 12345. VAR B = VAR A. ...` scattered in noise; name every variable of
    the first chain (the others are distractor chains with other values)."""

    n_chains: int = 1
    n_hops: int = 4
    haystack: str = "noise"
    max_new_tokens: int = 30
    uses_depth = False

    def __post_init__(self):
        if self.n_chains < 1 or self.n_hops < 1:
            raise ValueError(f"{self.n_chains=} and {self.n_hops=} must be >= 1")
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"{self.haystack=} must be one of {HAYSTACKS}")

    def make(self, count: TokenCounter, length: int, rng: np.random.Generator,
             depth: float | None = None, name: str = "vt", index: int = 0) -> Sample:
        """One sample whose context has ~`length` tokens by `count`."""
        n_vars = self.n_hops + 1
        names = random_names(rng, self.n_chains * n_vars)
        values = random_numbers(rng, self.n_chains, 5)
        inserts = []
        for c in range(self.n_chains):
            chain = names[c * n_vars:(c + 1) * n_vars]
            depths = np.sort(rng.uniform(0, 1, n_vars))  # statements in chain order
            inserts.append((depths[0], f"VAR {chain[0]} = {values[c]}."))
            inserts += [(d, f"VAR {b} = VAR {a}.") for d, a, b in zip(depths[1:], chain, chain[1:])]
        inserts.sort(key=lambda t: t[0])
        header = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
        stream = word_stream(self.haystack, rng, words_for_tokens(length))
        _, body = fit_length(lambda m: header + insert_at_depths(stream, m, inserts),
                             count, length, len(stream.words))
        return Sample(
            task=name, index=index, context=body,
            question=f"Find all variables that are assigned the value {values[0]} in the text above.",
            answer_prefix=(f"Answer: According to the chain(s) of variable assignment in the text "
                           f"above, {n_vars} variables are assigned the value {values[0]}, they "
                           f"are:"),
            answers=tuple(names[:n_vars]), metric="recall", max_new_tokens=self.max_new_tokens,
            n_tokens=count(body))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonWordsTask:
    """A numbered list of words where `n_common` words appear `freq_common` times each and the
    others `freq_uncommon` times; name the common ones. Words come from the shipped corpus."""

    n_common: int = 10
    freq_common: int = 8
    freq_uncommon: int = 2
    max_new_tokens: int = 64
    uses_depth = False

    def __post_init__(self):
        if not 1 <= self.freq_uncommon < self.freq_common:
            raise ValueError(f"{self.freq_uncommon=} must be in [1, {self.freq_common=})")
        if self.n_common < 1:
            raise ValueError(f"{self.n_common=} must be >= 1")

    def make(self, count: TokenCounter, length: int, rng: np.random.Generator,
             depth: float | None = None, name: str = "cwe", index: int = 0) -> Sample:
        """One sample whose context has ~`length` tokens by `count`."""
        vocab = corpus_vocabulary()
        words = [vocab[i] for i in rng.permutation(len(vocab))]
        common, uncommon = words[:self.n_common], words[self.n_common:]
        shuffle_seed = int(rng.integers(2**31))
        header = ("Below is a numbered list of words. In these words, some appear more often "
                  "than others. Memorize the ones that appear most often.\n")

        def build(n_uncommon: int) -> str:
            items = common * self.freq_common + uncommon[:n_uncommon] * self.freq_uncommon
            items = [items[i] for i in np.random.default_rng(shuffle_seed).permutation(len(items))]
            return header + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

        n, body = fit_length(build, count, length, len(uncommon))
        if n == len(uncommon) and count(body) < 0.98 * length:
            raise ValueError(f"{length=} needs more than the corpus's {len(vocab)} words")
        k = self.n_common
        return Sample(task=name, index=index, context=body,
                      question=f"What are the {k} most common words in the above list?",
                      answer_prefix=f"Answer: The top {k} words that appear most often in the list are:",
                      answers=tuple(common), metric="recall", max_new_tokens=self.max_new_tokens,
                      n_tokens=count(body))


def coded_words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct random lower-case 'coded' words of 3 to 6 letters."""
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(list(string.ascii_lowercase), int(rng.integers(3, 7))))
        if w not in out:
            out.append(w)
    return out


def zipf_counts(n: int, n_types: int, alpha: float) -> np.ndarray:
    """Counts [n_types] summing to n, proportional to rank^-alpha (ties broken to rank 1)."""
    weights = np.arange(1, n_types + 1, dtype=np.float64) ** -alpha
    counts = np.floor(n * weights / weights.sum()).astype(int)
    counts[0] += n - counts.sum()
    return counts


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrequentWordsTask:
    """Coded words drawn with Zipf frequencies; name the `n_top` most frequent."""

    n_top: int = 3
    n_types: int = 60
    alpha: float = 2.0
    max_new_tokens: int = 24
    uses_depth = False

    def __post_init__(self):
        if not 1 <= self.n_top < self.n_types:
            raise ValueError(f"{self.n_top=} must be in [1, {self.n_types=})")
        if self.alpha <= 0:
            raise ValueError(f"{self.alpha=} must be > 0")

    def make(self, count: TokenCounter, length: int, rng: np.random.Generator,
             depth: float | None = None, name: str = "fwe", index: int = 0) -> Sample:
        """One sample whose context has ~`length` tokens by `count`."""
        vocab = coded_words(rng, self.n_types)
        shuffle_seed = int(rng.integers(2**31))
        header = ("Read the following coded text and track the frequency of each coded word. "
                  f"Find the {self.n_top} most frequently appeared coded words.\n")

        def build(n_words: int) -> str:
            counts = zipf_counts(n_words, self.n_types, self.alpha)
            items = np.repeat(np.arange(self.n_types), counts)
            items = items[np.random.default_rng(shuffle_seed).permutation(len(items))]
            groups = [" ".join(vocab[i] for i in items[j:j + 10]) for j in range(0, len(items), 10)]
            return header + " .... ".join(groups)

        n, body = fit_length(build, count, length, 4 * length)
        counts = zipf_counts(n, self.n_types, self.alpha)
        if not (np.diff(counts[:self.n_top + 1]) < 0).all():
            raise ValueError(f"{length=} is too short for distinct top-{self.n_top} counts")
        return Sample(task=name, index=index, context=body,
                      question=("Do not provide any explanation. Please ignore the dots '....'. "
                                f"What are the {self.n_top} most frequently appeared words in "
                                "the above coded text?"),
                      answer_prefix=("Answer: According to the coded text above, the "
                                     f"{self.n_top} most frequently appeared words are:"),
                      answers=tuple(vocab[:self.n_top]), metric="recall",
                      max_new_tokens=self.max_new_tokens, n_tokens=count(body))
