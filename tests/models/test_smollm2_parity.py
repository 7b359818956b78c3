"""SmolLM2-135M-Instruct from the embedded GGUF: kvjax against transformers on the same file.

transformers dequantizes the GGUF with the same `gguf` package and un-permutes Q/K itself, so
this checks our loader, decoder, RoPE and tied head on real weights.
Measured on CPU f32: max |logit diff| ~1e-4 (typical logit magnitude ~20); bound 2e-3.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_smollm2():
    import torch
    from transformers import AutoModelForCausalLM

    from models.smollm2 import find_smollm2
    path = find_smollm2()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 torch_dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def ours():
    return models.load("smollm2", dtype=jnp.float32, progress=False)


def _prompt_ids(tokenizer, n: int) -> list[int]:
    text = ("The quick brown fox jumps over the lazy dog. Rivers carry sediment to the sea, "
            "where deltas form over centuries. ") * 40
    ids = tokenizer.encode(text, add_bos=False)
    assert len(ids) >= n
    return ids[:n]


def test_logits_match_transformers_on_256_tokens(hf_smollm2, ours):
    import torch
    model, tokenizer = ours
    ids = _prompt_ids(tokenizer, 256)
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(model(jnp.asarray([ids])))[0]
    diff = np.abs(got - ref).max()
    assert diff < 2e-3, diff
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_32_greedy_tokens_identical(hf_smollm2, ours):
    import torch
    model, tokenizer = ours
    ids = _prompt_ids(tokenizer, 200)
    with torch.no_grad():
        ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                  do_sample=False, pad_token_id=0)[0, 200:].tolist()
    assert kvjax.generate(model, [ids], max_new_tokens=32).tokens[0].tolist() == ref
