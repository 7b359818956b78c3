"""Task generators: length, needle placement, answers recoverable by regex, determinism.

Checked with the SmolLM2 tokenizer (read from the GGUF's metadata only, ~3 s) and with a
character tokenizer; the answers are re-derived from the context text by regexes that know
nothing of the generators.
"""

import collections
import re

import numpy as np
import pytest
from eval_helpers import char_tokenizer

from kvjax.eval import haystack
from kvjax.eval.needles import needle_text
from kvjax.eval.tasks import TASKS, depth, make_sample, make_samples


@pytest.fixture(scope="module")
def smol_tok():
    from models.gguf import open_gguf, read_metadata
    from models.smollm2 import find_smollm2
    from models.tokenizer import Tokenizer
    try:
        path = find_smollm2(download=False)
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF not available")
    return Tokenizer.from_gguf_fields(read_metadata(open_gguf(path).fields))


def _count(tok, text):
    return len(tok.encode(text, add_bos=False))


def _niah_values(context):
    """key -> values of every needle sentence in the text."""
    found = collections.defaultdict(list)
    for key, value in re.findall(r"special magic numbers for ([a-z]+-[a-z]+) is: (\d+)\.", context):
        found[key].append(value)
    return found


def _queried_keys(question):
    keys = re.search(r"for (.+) mentioned", question).group(1)
    return re.split(r", | and ", keys)


def _vt_answers(context, question):
    value = re.search(r"assigned the value (\d+)", question).group(1)
    assign = dict(re.findall(r"VAR ([A-Z]+) = (\d+|VAR [A-Z]+)\.", context))

    def resolve(name):
        v = assign[name]
        return resolve(v[4:]) if v.startswith("VAR ") else v
    return {n for n in assign if resolve(n) == value}


def _recover(sample):
    """The expected answers, re-derived from the context alone (plus the question's key)."""
    c, task = sample.context, sample.task
    if task.startswith("niah"):
        values = _niah_values(c)
        return {v for k in _queried_keys(sample.question) for v in values[k]}
    if task == "passkey":
        return set(re.findall(r"The pass key is (\d+)\.", c))
    if task == "vt":
        return _vt_answers(c, sample.question)
    if task == "cwe":
        counts = collections.Counter(re.findall(r"\d+\. ([a-z]+)", c))
        top = max(counts.values())
        return {w for w, n in counts.items() if n == top}
    counts = collections.Counter(w for w in c.split("\n", 1)[1].split() if w != "....")
    return {w for w, _ in counts.most_common(3)}


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [1024, 2048])
def test_length_and_answers_smollm2(smol_tok, task, length):
    for s in make_samples(task, smol_tok, length, 3, seed=1):
        n = _count(smol_tok, s.context)
        assert n == s.n_tokens
        assert abs(n - length) <= 0.02 * length, (task, n)
        assert _recover(s) == set(s.answers), (task, s.index)


@pytest.mark.parametrize("task", ["niah_single", "passkey", "vt", "cwe", "fwe"])
def test_length_char_tokenizer(task):
    tok = char_tokenizer()
    s = make_sample(task, tok, 1500, index=0)
    assert abs(len(s.context) - 1500) <= 30
    assert _recover(s) == set(s.answers)


@pytest.mark.parametrize("task", ["niah_single", "niah_single_noise", "passkey"])
def test_needle_once_at_requested_depth(smol_tok, task):
    for index in range(9):
        s = make_sample(task, smol_tok, 2048, index)
        assert s.depth == depth(index)
        value = s.answers[0]
        needle = (needle_text(_queried_keys(s.question)[0], value) if task.startswith("niah")
                  else f"The pass key is {value}. Remember it. {value} is the pass key.")
        assert s.context.count(needle) == 1 and s.context.count(value) == (
            1 if task.startswith("niah") else 2)
        body = s.context.split("\n", 1)[1]
        before = _count(smol_tok, body[:body.index(needle)])
        total = _count(smol_tok, body) - _count(smol_tok, needle)
        assert abs(before / total - s.depth) < 0.05, (index, before / total, s.depth)


def test_depth_sweep_covers_0_to_1():
    d = [depth(i) for i in range(9)]
    assert d[:2] == [0.0, 1.0] and sorted(d) == [i / 8 for i in range(9)]


def test_multi_needle_variants(smol_tok):
    mk = make_sample("niah_multikey", smol_tok, 1024, 0)
    assert len(_niah_values(mk.context)) == 4 and len(mk.answers) == 1
    mv = make_sample("niah_multivalue", smol_tok, 1024, 0)
    assert len(_niah_values(mv.context)) == 1 and len(mv.answers) == 4
    mq = make_sample("niah_multiquery", smol_tok, 1024, 0)
    assert len(_queried_keys(mq.question)) == 4 and len(mq.answers) == 4
    assert mk.metric == "exact" and mv.metric == mq.metric == "recall"


def test_same_seed_same_samples_other_seed_differs(smol_tok):
    for task in ("niah_multikey", "vt", "fwe"):
        a = make_samples(task, smol_tok, 1024, 3, seed=7)
        assert a == make_samples(task, smol_tok, 1024, 3, seed=7)
        assert a[0] != make_samples(task, smol_tok, 1024, 3, seed=8)[0]
    # sample i does not depend on how many samples are asked for
    assert make_samples("niah_single", smol_tok, 1024, 2)[1] == make_sample(
        "niah_single", smol_tok, 1024, 1)


def test_haystack_kinds_differ(smol_tok):
    essay = make_sample("niah_single", smol_tok, 1024, 0).context
    noise = make_sample("niah_single_noise", smol_tok, 1024, 0).context
    assert noise.count("The grass is green.") > 20 and "The grass is green." not in essay
    assert len(set(essay.split(". "))) > 40


def test_insert_at_depths_uses_sentence_starts():
    stream = haystack.WordStream(("A", "b.", "C", "d.", "E", "f."), (0, 2, 4))
    assert haystack.insert_at_depths(stream, 6, [(0.0, "X")]) == "X A b. C d. E f."
    assert haystack.insert_at_depths(stream, 6, [(1.0, "X")]) == "A b. C d. E f. X"
    assert haystack.insert_at_depths(stream, 6, [(0.4, "X"), (0.4, "Y")]) == "A b. X Y C d. E f."
    # 5 words end mid-sentence: depth 1 goes before the truncated sentence
    assert haystack.insert_at_depths(stream, 5, [(1.0, "X")]) == "A b. C d. X E"
    with pytest.raises(ValueError, match="depth"):
        haystack.insert_at_depths(stream, 6, [(1.5, "X")])


def test_fit_length_closest():
    n, text = haystack.fit_length(lambda m: "ab" * m, len, 11, 100)
    assert (n, text) in ((5, "a" * 0 + "ab" * 5), (6, "ab" * 6))
    with pytest.raises(ValueError, match="too short"):
        haystack.fit_length(lambda m: "x" * (20 + m), len, 10, 5)


def test_bad_inputs(smol_tok):
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("niah_nope", smol_tok, 1024, 0)
    with pytest.raises(ValueError, match="length"):
        make_sample("niah_single", smol_tok, 10, 0)
    with pytest.raises(ValueError, match="too short"):
        make_sample("cwe", smol_tok, 100, 0)
    with pytest.raises(ValueError, match="n_queries"):
        TASKS["niah_single"].__class__(n_keys=1, n_queries=2)
    with pytest.raises(ValueError, match="haystack"):
        TASKS["passkey"].__class__(haystack="lorem")


def test_corpus_is_offline_ascii_without_digits():
    paragraphs = haystack.corpus_paragraphs()
    text = " ".join(paragraphs)
    assert len(paragraphs) > 60 and len(text.split()) > 6000
    assert text.isascii() and not re.search(r"\d", text)
    assert not re.search(r"magic|pass key|VAR ", text)
    words = haystack.essay_sentences(np.random.default_rng(0), 20000)
    assert sum(len(s.split()) for s in words) >= 20000
