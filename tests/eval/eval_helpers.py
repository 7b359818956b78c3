"""Shared fixtures for the eval tests: a character tokenizer and a tiny random decoder."""

import string

import tokenizers
from tokenizers import AddedToken

SPECIALS = ("<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def char_tokenizer(chat: bool = True):
    """A `models.Tokenizer` with one token per printable ASCII character (< 128 ids), so that
    `ModelConfig.tiny()` (vocab 128) can run it; specials <pad> <s> </s> first, EOS = </s>."""
    from models.tokenizer import Tokenizer

    chars = list(string.printable[:95]) + ["\n"]
    vocab = {t: i for i, t in enumerate(list(SPECIALS) + chars)}
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    backend.decoder = tokenizers.decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return Tokenizer(backend, bos_id=1, eos_ids=[2], pad_id=0, add_bos=False,
                     chat_template=CHAT_TEMPLATE if chat else None)


def tiny_model(seed: int = 0):
    """`models.Decoder` with `ModelConfig.tiny()` (2 layers, vocab 128, 512 positions)."""
    from flax import nnx

    import models
    return models.Decoder(models.ModelConfig.tiny(), rngs=nnx.Rngs(seed))
