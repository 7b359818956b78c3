"""Shared fixtures: offline hub, tiny random transformers models saved as HF directories."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

# XLA on GPU runs f32 matmuls in TF32 unless told otherwise (errors ~5e-4); the tests compare
# f32 results against references at f32 tolerances. CPU already computes f32 at full precision.
jax.config.update("jax_default_matmul_precision", "highest")
import pytest  # noqa: E402


def pytest_configure(config):
    """Without a GPU, the Mosaic GPU interpreter is the only check of the GPU kernels: on
    the pinned jax (pyproject: jax>=0.10,<0.12) its absence fails the run instead of skipping
    every GPU interpret test."""
    from pallas_kernels._interpret import GPU_INTERPRET_UNAVAILABLE
    if GPU_INTERPRET_UNAVAILABLE and jax.default_backend() != "gpu":
        raise pytest.UsageError(f"{GPU_INTERPRET_UNAVAILABLE} (jax {jax.__version__}): the GPU "
                                "kernel tests cannot run; install the pinned jax")


TINY_HF = {
    "llama_gqa4_untied": dict(family="llama", num_attention_heads=4, num_key_value_heads=1),
    "llama_gqa3_tied_rope3": dict(
        family="llama", num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral_window8": dict(family="mistral", num_attention_heads=4, num_key_value_heads=1,
                            sliding_window=8),
    "llama_mha": dict(family="llama", num_attention_heads=4, num_key_value_heads=4),
}


def tiny_decoder(seed: int = 0, **overrides):
    """A tiny random `models.Decoder` (4 q heads, 2 kv heads, vocab 97) for generate tests."""
    from flax import nnx

    import models
    kw = dict(n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=256)
    kw.update(overrides)
    return models.Decoder(models.ModelConfig.tiny(**kw), rngs=nnx.Rngs(seed))


def random_prompts(lengths, seed: int = 1, vocab: int = 97) -> list[list[int]]:
    """Random token-id prompts of the given lengths."""
    rng = np.random.RandomState(seed)
    return [list(rng.randint(0, vocab, n)) for n in lengths]


def make_hf_model(name: str, seed: int = 0):
    """A tiny random transformers Llama/Mistral in eval mode (f32, eager attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    spec = dict(TINY_HF[name])
    family = spec.pop("family")
    base = dict(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                head_dim=16, max_position_embeddings=512, rope_theta=10000.0,
                tie_word_embeddings=False, attn_implementation="eager")
    base.update(spec)
    torch.manual_seed(seed)
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**base)).eval()
    return LlamaForCausalLM(LlamaConfig(**base)).eval()


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory):
    """name -> (transformers model, saved directory) for every TINY_HF config."""
    out = {}
    for name in TINY_HF:
        model = make_hf_model(name)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (model, path)
    return out


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float().numpy()


def prefill_cache(model, tokens, lengths, *, tail_capacity: int, press=None, hook=None,
                  **prefill_kwargs):
    """`model.prefill` + `kvjax.compress` (eagerly): (last logits [B, V], KVCache)."""
    import jax.numpy as jnp

    import kvjax
    spec = kvjax.compress_obs_spec(press, hook)
    between = None if press is None else press.between_layers
    logits, prompt = model.prefill(jnp.asarray(tokens), jnp.asarray(lengths), obs_spec=spec,
                                   between=between, **prefill_kwargs)
    return logits, kvjax.compress(press, prompt, tail_capacity=tail_capacity, hook=hook)


def kept_all(cache) -> list:
    """Every (layer, sequence)'s kept positions per kv head, as lists (layer-major)."""
    import kvjax
    return [[kvjax.kept_positions(cache, layer)[b][h].tolist()
             for h in range(cache.store.n_kv_heads)]
            for layer in range(cache.n_layers) for b in range(cache.store.k.shape[0])]


def greedy_stepwise(fn, params, logits, cache, n_new: int, merge):
    """Greedy decode of a batch, one token per step; after each step the cache becomes
    `merge(cache)` unless that returns None (the caller's decode-time merge).
    Returns (tokens [B, n_new], the last cache)."""
    import jax
    import jax.numpy as jnp
    b = cache.batch_size
    step = jax.jit(lambda p, tok, c: fn.decode(p, tok, jnp.ones((b,), jnp.int32), c))
    out = []
    for _ in range(n_new):
        tok = np.asarray(logits).argmax(-1)
        out.append(tok)
        step_logits, cache = step(params, jnp.asarray(tok[:, None]), cache)
        logits = step_logits[:, 0]
        merged = merge(cache)
        cache = cache if merged is None else merged
    return np.stack(out, 1), cache


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after every test module: the whole suite in one process
    otherwise accumulates thousands of XLA CPU executables (their code mappings and memory),
    and the CI run crashed inside XLA compilation late in the suite."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
