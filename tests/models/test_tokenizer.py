"""Tests of models.tokenizer against independent references: tokenizers trained and assembled
from the `tokenizers` library's own components, transformers' GGUF and chat-template code,
and pre-token splits derived by hand from llama.cpp's regexes."""

from __future__ import annotations

import json

import jinja2
import numpy as np
import pytest
import tokenizers
from tokenizers import pre_tokenizers, processors, trainers

from models.tokenizer import Tokenizer, byte_level_pre_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(12, 345))\n",
    "Numbers: 1 22 333 4444 55555 and 3.14159, 2024-06-01.",
    "I'm sure they'll say we've done what you'd do.  Spaces   and\ttabs\n\n\nnewlines",
    "Café, naïve, Straße, 東京, Привет мир, 😀 emoji!",
] * 4
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def bpe_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 pre-tokenizer) trained on CORPUS, specials at ids 0..2."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def bpe_fields(bpe_tokenizer) -> dict:
    """GGUF `tokenizer.*` metadata of the trained BPE, laid out as llama.cpp's converter does."""
    merges = json.loads(bpe_tokenizer.to_str())["model"]["merges"]
    tokens = [bpe_tokenizer.id_to_token(i) for i in range(bpe_tokenizer.get_vocab_size())]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIAL_TOKENS else 1 for t in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "Numbers 1 22 333 4444 and 3.14159, x=12345",
    "Tabs\tand\nnewlines\n\n\nthree  spaces   four",
    "Café naïve Straße 東京 Привет 😀🤖",
    "def add(a, b):\n    return a + b  # comment\n",
    "I'm sure they'll say we've done what you'd do. I'M LOUD",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>no space<|im_end|>",
    "  \n  \t ",
    "",
]


@pytest.fixture(scope="module")
def gguf_tok(bpe_fields) -> Tokenizer:
    return Tokenizer.from_gguf_fields(bpe_fields)


def test_gguf_gpt2_vocab_matches_trained_tokenizer(gguf_tok, bpe_tokenizer):
    for text in TEXTS:
        want = bpe_tokenizer.encode(text).ids
        assert gguf_tok.encode(text) == want, text
        assert gguf_tok.encode(text, add_bos=True) == [1, *want]
        assert gguf_tok.decode(want, skip_special_tokens=False) == text
    assert gguf_tok.vocab_size == bpe_tokenizer.get_vocab_size()
    assert (gguf_tok.bos_id, gguf_tok.eos_id, gguf_tok.pad_id) == (1, 2, 0)
    assert not gguf_tok.add_bos


def test_decode_skips_control_tokens(gguf_tok):
    ids = gguf_tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert gguf_tok.decode(ids) == "user\nhi"
    assert gguf_tok.decode(np.asarray(ids), skip_special_tokens=False) == (
        "<|im_start|>user\nhi<|im_end|>")


def test_eos_ids_include_end_of_generation_specials(bpe_fields):
    tok = Tokenizer.from_gguf_fields(bpe_fields)
    tokens = bpe_fields["tokenizer.ggml.tokens"]
    # eos first, then llama.cpp's end-of-generation texts present as control tokens.
    assert tok.eos_ids == (2, tokens.index("<|endoftext|>"))
    with_eot = Tokenizer.from_gguf_fields({**bpe_fields, "tokenizer.ggml.eot_token_id": 1})
    assert with_eot.eos_ids[:2] == (2, 1)


def test_smollm_pre_tokenizer_equals_digit_split_then_byte_level(bpe_tokenizer, bpe_fields):
    reference = tokenizers.Tokenizer.from_str(bpe_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    ours = Tokenizer.from_gguf_fields({**bpe_fields, "tokenizer.ggml.pre": "smollm"})
    for text in TEXTS + ["x  1", "a   22 b", "\n\n1", "abc123def 1.5e-10"]:
        assert ours.encode(text) == reference.encode(text).ids, text


SPLIT_TEXT = "Hello 12345 world!!\n\nI'M ok  \tx"
# Pieces worked out by hand from llama.cpp's regexes (llama-vocab.cpp), applied in order.
EXPECTED_SPLITS = {
    "gpt2": ["Hello", " 12345", " world", "!!", "\n", "\n", "I", "'", "M", " ok", "  ", "\t",
             "x"],
    "smollm": ["Hello", " ", "1", "2", "3", "4", "5", " world", "!!", "\n", "\n", "I", "'",
               "M", " ok", "  ", "\t", "x"],
    "llama-bpe": ["Hello", " ", "123", "45", " world", "!!\n\n", "I", "'M", " ok", "  ",
                  "\tx"],
    "default": ["Hello", " ", "123", "45", " world", "!!", "\n", "\n", "I", "'", "M", " ok",
                "  ", "\t", "x"],
}


@pytest.mark.parametrize("pre", sorted(EXPECTED_SPLITS))
def test_pre_tokenizer_splits(pre):
    pieces = byte_level_pre_tokenizer(pre).pre_tokenize_str(SPLIT_TEXT)
    assert [SPLIT_TEXT[a:b] for _, (a, b) in pieces] == EXPECTED_SPLITS[pre]


def test_gguf_errors_name_the_value(bpe_fields):
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='tekken'"):
        Tokenizer.from_gguf_fields({**bpe_fields, "tokenizer.ggml.pre": "tekken"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model='bert'"):
        Tokenizer.from_gguf_fields({**bpe_fields, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_fields({"tokenizer.ggml.model": "gpt2"})
    no_template = Tokenizer.from_gguf_fields(
        {k: v for k, v in bpe_fields.items() if k != "tokenizer.chat_template"})
    with pytest.raises(ValueError, match="chat_template=None"):
        no_template.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="add_bos=True"):
        Tokenizer.from_gguf_fields({**bpe_fields, "tokenizer.ggml.bos_token_id": None,
                                    "tokenizer.ggml.add_bos_token": True})


HF_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}\n"
    "  {% if m['role'] == 'system' %}\n"
    "[SYS]{{ m['content'] | trim }}\n"
    "  {% else %}\n"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "  {% endif %}\n"
    "{% if loop.last and m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}\n"
    "{% if messages | length > 3 %}{{ raise_exception('too many: ' ~ messages | length) }}"
    "{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATIONS = [
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
]


def test_chat_template_matches_transformers(tmp_path, bpe_fields):
    import transformers

    tok = Tokenizer.from_gguf_fields({**bpe_fields, "tokenizer.chat_template": HF_TEMPLATE})
    hf = transformers.AutoTokenizer.from_pretrained(tok.save_pretrained(tmp_path / "tok"))
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == want
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
    with pytest.raises(jinja2.TemplateError, match="too many: 4"):
        tok.apply_chat_template([{"role": "user", "content": "x"}] * 4)


def test_save_pretrained_round_trip(tmp_path, bpe_fields):
    tok = Tokenizer.from_gguf_fields({**bpe_fields, "tokenizer.ggml.eot_token_id": 1,
                                      "tokenizer.ggml.add_bos_token": True})
    back = Tokenizer.from_hf_dir(tok.save_pretrained(tmp_path / "t"))
    for attr in ("bos_id", "eos_ids", "pad_id", "add_bos", "chat_template", "vocab_size"):
        assert getattr(back, attr) == getattr(tok, attr), attr
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)


def test_from_hf_dir_reads_hf_layout(tmp_path, bpe_tokenizer):
    backend = tokenizers.Tokenizer.from_str(bpe_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>",
        "chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}"},
                          {"name": "tool_use", "template": "tools"}]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.bos_id == 1 and tok.add_bos  # detected from the post-processor
    assert tok.eos_ids == (2, 0) and tok.pad_id is None
    assert tok.encode("Hello") == backend.encode("Hello").ids
    assert tok.apply_chat_template([{"role": "user", "content": "c"}]) == "c"
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "missing")


# ---- the real SmolLM2 GGUF vocabulary, against transformers' GGUF tokenizer ----

SMOLLM2_TEXTS = [
    "Hello, world!",
    "The capital of France is Paris.",
    "naïve café — Straße, 東京タワー, Привет, 😀🤖👍🏽",
    "Numbers: 3.14159, -42, 1e-10, 2024-06-01, 1234567890",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "if (x != y) { return a->b[i] << 2; } // C++ code\n\n",
    "Line one\nLine two\r\nLine three\n\n\n",
    "Tabs\tare\there and trailing spaces   ",
    "I'm sure they'll say we've done what you'd do.",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "<|endoftext|><repo_name>kvjax<file_sep>README.md",
    "   ",
    "",
]
# transformers builds the GGUF vocabulary with GPT-2 pre-tokenization and ignores
# `tokenizer.ggml.pre` ("smollm": digits split first, as in llama.cpp and the original
# tokenizer.json), so its ids differ from the model's when whitespace precedes a digit.
DIGIT_AFTER_SPACE = ["x  1", "a   22 b", "\n\n1. item", "total:  42\n\n7"]


@pytest.fixture(scope="module")
def smollm2(request):
    import transformers

    from models.gguf import open_gguf, read_metadata
    from models.smollm2 import find_smollm2

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        path = find_smollm2()
        hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = Tokenizer.from_gguf_fields(read_metadata(open_gguf(path).fields))
    return ours, hf


@pytest.mark.slow
def test_smollm2_encode_decode_match_transformers(smollm2):
    ours, hf = smollm2
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (1, 2, 2, False)
    for text in SMOLLM2_TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        # transformers defaults to clean_up_tokenization_spaces=True (" !=" -> "!="), lossy.
        want = hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert ours.decode(ids) == want, text


@pytest.mark.slow
def test_smollm2_digits_follow_the_smollm_pre_tokenizer(smollm2):
    ours, hf = smollm2
    reference = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in DIGIT_AFTER_SPACE + SMOLLM2_TEXTS:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False).ids, text


@pytest.mark.slow
@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "You are a pirate."},
     {"role": "user", "content": "Where is the treasure?"}],
    [{"role": "user", "content": "What is 2 + 2?"}],
])
def test_smollm2_chat_template_matches_transformers(smollm2, messages):
    ours, hf = smollm2
    for gen in (True, False):
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want
