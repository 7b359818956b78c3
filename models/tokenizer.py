"""Text tokenizer built from a Hugging Face directory or from GGUF metadata.

`Tokenizer` wraps a `tokenizers.Tokenizer` and adds what generation needs: BOS/EOS ids, the
set of end-of-generation ids and a jinja2 chat template rendered the way Hugging Face does.

GGUF vocabularies are rebuilt with the semantics of llama.cpp, the runtime GGUF files are
made for: byte-level BPE ("gpt2" model) uses the pre-tokenizer regexes named by
`tokenizer.ggml.pre`, SentencePiece ("llama" model) becomes a byte-fallback BPE whose merges
are ranked by piece score.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import models as tok_models

# llama.cpp token types (`tokenizer.ggml.token_type`); 5 (unused) and 6 (byte) need no handling.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4

# Texts llama.cpp treats as end-of-generation when they are special tokens of the vocabulary.
EOG_TOKEN_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>",
    "<end_of_turn>", "<|return|>", "<EOT>", "</s>",
})

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_DEFAULT_SPLITS = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")

# `tokenizer.ggml.pre` -> regexes applied one after the other (as llama.cpp's BPE session).
PRE_TOKENIZER_SPLITS: Mapping[str, tuple[str, ...]] = {
    "default": _DEFAULT_SPLITS,
    "gpt2": (_GPT2_SPLIT,), "mpt": (_GPT2_SPLIT,), "olmo": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT), "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT), "command-r": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,), "llama3": (_LLAMA3_SPLIT,), "llama-v3": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,), "dbrx": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,), "stablelm2": (_QWEN2_SPLIT,),
}
_IGNORE_MERGES_PRE = frozenset({"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"})


class Tokenizer:
    """A tokenizer with BOS/EOS bookkeeping and chat-template rendering.

    Args:
        backend: the `tokenizers.Tokenizer` doing the work; encode never uses its post-processor.
        bos_id: id of the beginning-of-sequence token, or None.
        eos_ids: end-of-generation ids, the primary EOS first (may be empty).
        pad_id: id of the padding token, or None.
        add_bos: whether `encode` prepends `bos_id` by default.
        chat_template: jinja2 chat template source, or None.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None,
                 eos_ids: Sequence[int], pad_id: int | None, add_bos: bool,
                 chat_template: str | None):
        if add_bos and bos_id is None:
            raise ValueError(f"{add_bos=} but the tokenizer has no BOS token")
        self._backend = backend
        self._bos_id = bos_id
        self._eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        self._pad_id = pad_id
        self._add_bos = add_bos
        self._chat_template = chat_template

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_ids[0] if self._eos_ids else None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def pad_id(self) -> int | None:
        return self._pad_id

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text` ([T] ints); special-token texts in `text` map to their ids."""
        add_bos = self._add_bos if add_bos is None else add_bos
        if add_bos and self._bos_id is None:
            raise ValueError(f"{add_bos=} but the tokenizer has no BOS token")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if add_bos else list(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids `ids` ([T] ints)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    @cached_property
    def _template(self) -> jinja2.Template:
        if self._chat_template is None:
            raise ValueError("this tokenizer has no chat template (chat_template=None)")
        return compile_chat_template(self._chat_template)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        """Renders `messages` ({"role", "content"} dicts) with the chat template.

        Extra keyword arguments (e.g. `tools`) are passed to the template as variables.
        """
        bos = None if self._bos_id is None else self.id_to_token(self._bos_id)
        eos = None if self.eos_id is None else self.id_to_token(self.eos_id)
        return self._template.render(messages=messages,
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token=bos or "", eos_token=eos or "", **template_vars)

    def save_pretrained(self, path: str | pathlib.Path) -> pathlib.Path:
        """Writes tokenizer.json, tokenizer_config.json and generation_config.json to `path`.

        `Tokenizer.from_hf_dir(path)` restores an equal tokenizer.
        """
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(path / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self._add_bos,
                  "add_eos_token": False, "chat_template": self._chat_template}
        for name, token_id in (("bos", self._bos_id), ("eos", self.eos_id), ("pad", self._pad_id)):
            if token_id is not None:
                config[f"{name}_token"] = self.id_to_token(token_id)
        generation = {"bos_token_id": self._bos_id, "eos_token_id": list(self._eos_ids),
                      "pad_token_id": self._pad_id}
        for name, content in (("tokenizer_config", config), ("generation_config", generation)):
            (path / f"{name}.json").write_text(json.dumps(content, indent=1, ensure_ascii=False),
                                               encoding="utf-8")
        return path

    @classmethod
    def from_hf_dir(cls, path: str | pathlib.Path) -> Tokenizer:
        """Loads `tokenizer.json` (+ `tokenizer_config.json`, generation/model config) in `path`."""
        path = pathlib.Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {str(path)!r}")
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        tok_cfg = _read_json(path / "tokenizer_config.json")
        configs = [_read_json(path / "generation_config.json"), _read_json(path / "config.json")]
        bos_id = _token_id(backend, tok_cfg.get("bos_token"))
        if bos_id is None:
            bos_id = next((c["bos_token_id"] for c in configs if "bos_token_id" in c), None)
        eos_ids = [_token_id(backend, tok_cfg.get("eos_token"))]
        for cfg in configs:
            eos = cfg.get("eos_token_id")
            eos_ids += eos if isinstance(eos, list) else [eos]
        eos_ids += _eog_ids(backend.get_added_tokens_decoder())
        pad_id = _token_id(backend, tok_cfg.get("pad_token"))
        if pad_id is None:
            pad_id = next((c["pad_token_id"] for c in configs if "pad_token_id" in c), None)
        add_bos = tok_cfg.get("add_bos_token")
        if add_bos is None:
            add_bos = bos_id is not None and _post_processor_adds(backend, bos_id)
        return cls(backend, bos_id=bos_id, eos_ids=[i for i in eos_ids if i is not None],
                   pad_id=pad_id, add_bos=bool(add_bos),
                   chat_template=_hf_chat_template(path, tok_cfg))

    @classmethod
    def from_gguf_fields(cls, fields: Mapping[str, Any]) -> Tokenizer:
        """Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).

        Args:
            fields: GGUF key -> Python value (str, int, float, bool or list).
        """
        tokens, types = _gguf_vocab(fields)
        model = fields.get("tokenizer.ggml.model")
        if model == "gpt2":
            pre = fields.get("tokenizer.ggml.pre", "default")
            backend = _gguf_bpe_backend(tokens, fields.get("tokenizer.ggml.merges") or [], pre)
            add_bos_default = pre in _IGNORE_MERGES_PRE
        elif model == "llama":
            backend = _gguf_spm_backend(tokens, types, fields)
            add_bos_default = True
        else:
            raise ValueError(f"tokenizer.ggml.model={model!r} is not supported "
                             "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
        kinds = dict(zip(tokens, types, strict=True))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k
                                    in kinds.items() if k in (TOKEN_CONTROL, TOKEN_UNKNOWN)])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, k in kinds.items() if k == TOKEN_USER_DEFINED])
        eos_ids = [fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        eos_ids += _eog_ids(backend.get_added_tokens_decoder())
        return cls(backend, bos_id=fields.get("tokenizer.ggml.bos_token_id"),
                   eos_ids=[i for i in eos_ids if i is not None],
                   pad_id=fields.get("tokenizer.ggml.padding_token_id"),
                   add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                   chat_template=fields.get("tokenizer.chat_template"))


def _gguf_vocab(fields: Mapping[str, Any]) -> tuple[list[str], list[int]]:
    """(tokens, llama.cpp token types) of GGUF metadata, checked for consistency."""
    tokens = list(fields.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
    types = list(fields.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for "
                         f"{len(tokens)} tokens")
    return tokens, types


def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles a chat template in a sandbox configured as Hugging Face's renderer."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's pre-tokenizer `pre` as regex splits followed by the byte-to-unicode map."""
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(f"tokenizer.ggml.pre={pre!r} is not supported; "
                         f"supported: {sorted(PRE_TOKENIZER_SPLITS)}")
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in
              PRE_TOKENIZER_SPLITS[pre]]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                          use_regex=False)
    return pre_tokenizers.Sequence([*splits, byte_level])


def _gguf_bpe_backend(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"GGUF merge {merge!r} is not of the form 'left right'")
        pairs.append((left, right))
    model = tok_models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False,
                           ignore_merges=pre in _IGNORE_MERGES_PRE)
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def spm_merges(tokens: Sequence[str], scores: Sequence[float],
               types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece-BPE's "merge the best-scoring piece" rule.

    Every normal/user-defined piece that splits into two vocabulary pieces yields a merge;
    merges are ranked by the merged piece's score (best first), ties by the parts' scores.
    """
    score = {t: s for t, s in zip(tokens, scores, strict=True)}
    ranked = []
    for i, (tok, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind not in (TOKEN_NORMAL, TOKEN_USER_DEFINED):
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in score and right in score:
                ranked.append((-score[tok], -score[left], -score[right], i, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _gguf_spm_backend(tokens: list[str], types: list[int],
                      fields: Mapping[str, Any]) -> tokenizers.Tokenizer:
    scores = fields.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError("tokenizer.ggml.model='llama' needs one tokenizer.ggml.scores entry "
                         f"per token ({len(tokens)})")
    unk_id = fields.get("tokenizer.ggml.unknown_token_id", 0)
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
    model = tok_models.BPE(vocab, spm_merges(tokens, scores, types), unk_token=tokens[unk_id],
                           fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(model)
    prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Replace(" ", "▁")]
    undo = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.insert(0, normalizers.Prepend("▁"))
        undo.append(decoders.Strip(content=" ", left=1, right=0))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence(undo)
    return backend


def _eog_ids(added: Mapping[int, AddedToken]) -> list[int]:
    return sorted(i for i, tok in added.items() if tok.special and tok.content in EOG_TOKEN_TEXTS)


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_id(backend: tokenizers.Tokenizer, token: str | dict | None) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def _post_processor_adds(backend: tokenizers.Tokenizer, bos_id: int) -> bool:
    with_specials = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    return with_specials[:1] == [bos_id] and plain[:1] != [bos_id]


def _hf_chat_template(path: pathlib.Path, tok_cfg: Mapping[str, Any]) -> str | None:
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    return template
