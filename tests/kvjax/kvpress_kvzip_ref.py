"""Run kvpress 0.5.5's KVzip, KeyDiff and KVzap presses on a tiny transformers Llama and read
back what they kept and the raw scores behind it (test helper; no tests here).

See docs/kvzip_reference.md for what each press computes. Entry points:

  hf, path = tiny_llama(tmp_dir)                      # random GQA Llama + byte tokenizer
  ref = kvzip_reference(hf, ids, 0.5)                 # KVzipPress (needs a tokenizer: see below)
  ref = scorer_reference(hf, ids, kvpress.KeyDiffPress(compression_ratio=0.5))
  press, weights = kvzap_press(hf, 0.5, "mlp")        # KVzapPress with random weights, offline
  ref = scorer_reference(hf, ids, press)

Every result is a dict with `kept` (per layer a [B][K] nested list of sorted kept positions,
the same layout as kvpress_ref.kept_positions_by_matching) and `scores` (np.float32
[L, B, K, T], what the press ranked, higher = keep), plus press-specific extras.

KVzipPress loads `AutoTokenizer.from_pretrained(model.config.name_or_path)` to encode its repeat
prompt and read the chat template. `byte_tokenizer` builds an offline tokenizer in code whose
token ids are the UTF-8 bytes of the text (ids 0..255, no specials, no merges), so kvpress's
repeat prompt "\\n\\nRepeat the previous context exactly." is simply `list(text.encode())` and a
JAX port can build the same ids without any tokenizer. ASCII prompts stay below id 128, so a
model with vocab_size=128 (the parity fixture's) works. `attach_tokenizer` saves it next to an
existing model (e.g. the module fixture of test_kvpress_parity.py) and points name_or_path at it.
"""

import contextlib
import pathlib

import numpy as np
import torch
from kvpress_ref import kept_positions_by_mask, kept_positions_by_matching, prefill_cache

# A ChatML-like template (SmolLM2's format, minus its default system prompt). Rendered by
# kvpress it gives prefix "<|im_start|>user\n" (17 bytes = 17 tokens with byte_tokenizer) and
# suffix "<|im_end|>\n<|im_start|>assistant\n" (33 tokens).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode char map (the alphabet of a ByteLevel BPE)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer(chat_template: str | None = None):
    """A transformers fast tokenizer whose ids are the UTF-8 bytes of the text (0..255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.chat_template = chat_template
    return tok


def attach_tokenizer(hf_model, path, chat_template: str | None = None):
    """Save a byte tokenizer into `path` and make `hf_model.config.name_or_path` point there
    (KVzipPress reloads the tokenizer from name_or_path). Returns the tokenizer."""
    tok = byte_tokenizer(chat_template)
    tok.save_pretrained(str(path))
    hf_model.config.name_or_path = str(path)
    return tok


def tiny_llama(path, *, vocab_size=128, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=16,
               hidden_size=96, seed=0, chat_template: str | None = None):
    """The parity suite's tiny random Llama (GQA 3:1 by default), saved with a byte tokenizer.

    Same config and seed as the fixture of test_kvpress_parity.py, so its weights are the same.
    Returns (hf_model in eval mode with eager attention, path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=160,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads,
                      num_key_value_heads=n_kv_heads, head_dim=head_dim,
                      max_position_embeddings=512, initializer_range=0.1,
                      attn_implementation="eager")
    hf = LlamaForCausalLM(cfg).eval()
    path = pathlib.Path(path)
    hf.save_pretrained(path)
    attach_tokenizer(hf, path, chat_template)
    return hf, path


def template_ids(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix_ids, suffix_ids) exactly as KVzipPress derives them from the chat template
    (prefix_ids = [] and suffix_ids = encode("\\n") when the tokenizer has no template).
    A context given to KVzip must start with prefix_ids (kvpress's pipeline puts them there);
    KVzip never scores those positions."""
    if tokenizer.chat_template is None:
        prefix_text, suffix_text = "", "\n"
    else:
        dummy = "dummy context"
        sep = "\n" + "#" * len(dummy)
        text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + sep}],
                                             add_generation_prompt=True, tokenize=False,
                                             enable_thinking=False)
        context, suffix_text = text.split(sep)
        prefix_text = context.split(dummy)[0]
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)
    return enc(prefix_text), enc(suffix_text)


@contextlib.contextmanager
def attn_implementation(hf_model, name):
    """Temporarily switch the model's attention (kvpress's mask patch only wraps the
    registered attention functions such as sdpa, not eager: decode under sdpa to apply it)."""
    old = hf_model.config._attn_implementation
    hf_model.set_attn_implementation(name)
    try:
        yield
    finally:
        hf_model.set_attn_implementation(old)


def clear_masks(hf_model) -> None:
    """Remove the head-wise eviction masks KVzip leaves on the attention modules (kvpress's
    global attention patch applies them to every later decode step of this model)."""
    for layer in hf_model.model.layers:
        layer.self_attn.masked_key_indices = None


def kvzip_reference(hf_model, ids, compression_ratio, *, layerwise=False, n_sink=4,
                    chunk_size=2048, kvzip_plus_normalization=False, keep_mask=False) -> dict:
    """Run kvpress.KVzipPress as its pipeline does (prefill of `ids` through model.model under
    the press; the repeat passes and the selection run when the context manager exits).

    kvpress's KVzip masks instead of dropping (like AdaKV) and refuses eager attention, so the
    model runs with sdpa here (restored afterwards). kvpress supports batch size 1 only.

    Returns a dict:
      kept: per layer [[sorted kept positions of kv head h] for h] (batch 1), from the mask;
      scores: float32 [L, 1, K, T], the raw max-attention scores before the sink override
        (positions before prefix_length, i.e. the chat template's prefix, are never scored and
        stay 0);
      scores_final: the same after `score[..., :n_sink] = scores.max() + 1` (what is ranked);
      n_pruned: [L] evicted (head, token) pairs per layer;
      repeat_ids: list of int lists, the token ids of each chunk's repeat pass;
      chunks: list of (start, end) context positions each repeat pass scored;
      prefix_length, suffix_ids: as KVzipPress derived them from the tokenizer;
      cache: the DynamicCache after compression (full length T, masking is separate);
      The model keeps kvpress's masks when keep_mask=True (to decode with them; call
      clear_masks afterwards); otherwise they are cleared.
    """
    import kvpress

    ids = np.asarray(ids)
    assert ids.shape[0] == 1, "kvpress's KVzipPress supports batch size 1 only"
    press = kvpress.KVzipPress(compression_ratio=compression_ratio, layerwise=layerwise,
                               n_sink=n_sink, chunk_size=chunk_size,
                               kvzip_plus_normalization=kvzip_plus_normalization)
    got = {}
    orig_prepare, orig_post = press.prepare, press.compress_post

    def prepare(model, tokenizer, *a, **kw):
        pairs = orig_prepare(model, tokenizer, *a, **kw)
        got["repeat_ids"] = [r[0].tolist() for _, r in pairs]
        start, chunks = press.prefix_length, []
        for p, _ in pairs:
            chunks.append((start, start + p.shape[1]))
            start += p.shape[1]
        got["chunks"] = chunks
        got["prefix_length"] = press.prefix_length
        got["suffix_ids"] = press._suffix_ids[0].tolist()
        return pairs

    def compress_post(model):
        got["scores"] = press.score_val.detach().float().numpy().copy()
        orig_post(model)
        got["scores_final"] = press.score_val.detach().float().numpy().copy()

    press.prepare, press.compress_post = prepare, compress_post
    with attn_implementation(hf_model, "sdpa"):
        cache = prefill_cache(hf_model, ids, press)
    T = ids.shape[1]
    if compression_ratio > 0:
        kept = kept_positions_by_mask(hf_model, T)
        got["n_pruned"] = np.array([T * len(l[0]) - sum(map(len, l[0])) for l in kept])
    else:
        kept = [[[list(range(T))] * hf_model.config.num_key_value_heads]
                for _ in hf_model.model.layers]
        got["n_pruned"] = np.zeros(len(kept), int)
    if not keep_mask:
        clear_masks(hf_model)
    got.setdefault("scores", None)  # ratio 0: kvpress skips the repeat passes entirely
    got.setdefault("scores_final", None)
    got.update(kept=kept, cache=cache)
    return got


def scorer_reference(hf_model, ids, press) -> dict:
    """Run a kvpress ScorerPress (KeyDiffPress, KVzapPress, ...) on a prefill of `ids` and
    return {kept, scores [L, B, K, T] float32, cache} (kept found by matching kept key rows to
    the uncompressed cache: ScorerPress gathers exact copies)."""
    scores = {}
    orig_score = press.score

    def score(module, *args, **kwargs):
        s = orig_score(module, *args, **kwargs)
        scores[int(module.layer_idx)] = s.detach().float().numpy().copy()
        return s

    press.score = score
    try:
        full = prefill_cache(hf_model, np.asarray(ids))
        compressed = prefill_cache(hf_model, np.asarray(ids), press)
    finally:
        del press.score
    kept = kept_positions_by_matching(full, compressed)
    return {"kept": kept, "scores": np.stack([scores[i] for i in range(len(scores))]),
            "cache": compressed}


def kvzap_press(hf_model, compression_ratio, model_type="mlp", *, hidden_dim=32, seed=0):
    """A kvpress.KVzapPress with a randomly initialised surrogate (no hub download).

    kvpress would load `nvidia/KVzap-{model_type}-{basename(name_or_path)}`; we pre-set that
    name so post_init_from_model keeps our model. Returns (press, weights) where weights is a
    list (one per layer) of dicts of float32 numpy arrays in torch's nn.Linear layout
    (weight [out, in]): linear -> {"w", "b"}; mlp -> {"w1", "b1", "w2", "b2"} for
    Linear(D, hidden) -> GELU (exact, erf) -> Linear(hidden, K).
    """
    import kvpress
    from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel

    cfg = hf_model.config
    torch.manual_seed(seed)
    model = KVzapModel(KVzapConfig(input_dim=cfg.hidden_size, output_dim=cfg.num_key_value_heads,
                                   n_modules=cfg.num_hidden_layers,
                                   hidden_dim=hidden_dim if model_type == "mlp" else None)).eval()
    press = kvpress.KVzapPress(compression_ratio=compression_ratio, model_type=model_type)
    press.kvzap_model_name = (f"nvidia/KVzap-{model_type}-"
                              f"{cfg.name_or_path.split('/')[-1]}")
    press.kvzap_model = model
    np_ = lambda t: t.detach().float().numpy().copy()
    if model_type == "mlp":
        weights = [{"w1": np_(m[0].weight), "b1": np_(m[0].bias), "w2": np_(m[2].weight),
                    "b2": np_(m[2].bias)} for m in model.layers]
    else:
        weights = [{"w": np_(m.weight), "b": np_(m.bias)} for m in model.layers]
    return press, weights


def attention_inputs(hf_model, ids) -> np.ndarray:
    """float32 [L, B, T, D]: each layer's attention input (after input_layernorm), the
    `hidden_states` that kvpress hooks (and KVzap scores) see during a plain prefill."""
    got = {}
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, a, kw, out: got.__setitem__(int(m.layer_idx),
                                              kw["hidden_states"].detach().float().numpy()),
        with_kwargs=True) for layer in hf_model.model.layers]
    try:
        prefill_cache(hf_model, np.asarray(ids))
    finally:
        for h in hooks:
            h.remove()
    return np.stack([got[i] for i in range(len(got))])
