"""models.load dispatch, orbax save/restore, and clear errors for bad sources."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import models

IDS = np.random.RandomState(0).randint(0, 128, (1, 12))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_save_restore_roundtrip(tiny_hf_dirs, tmp_path):
    _, path = tiny_hf_dirs["llama_gqa3_tied_rope3"]
    model, _ = models.load(path, progress=False, dtype=jnp.float32)
    out = models.save(model, None, tmp_path / "saved")
    restored, tok = models.load(out)
    assert tok is None and restored.config == model.config
    np.testing.assert_array_equal(np.asarray(restored(jnp.asarray(IDS))),
                                  np.asarray(model(jnp.asarray(IDS))))
    as_bf16, _ = models.load(out, dtype=jnp.bfloat16)
    assert as_bf16.embed_tokens.embedding[...].dtype == jnp.bfloat16


def test_save_refuses_non_empty_dir(tiny_hf_dirs, tmp_path):
    model, _ = models.load(tiny_hf_dirs["llama_mha"][1], progress=False)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("occupied")
    with pytest.raises(FileExistsError, match="not empty"):
        models.save(model, None, tmp_path / "x")


def test_unknown_architecture(tiny_hf_dirs, tmp_path):
    path = _copy(tiny_hf_dirs["llama_mha"][1], tmp_path / "gpt2")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        models.load(path)


def test_missing_source_and_files(tiny_hf_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        models.load(tmp_path / "does-not-exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load(empty)
    path = _copy(tiny_hf_dirs["llama_mha"][1], tmp_path / "noweights")
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        models.load(path)


def test_truncated_safetensors(tiny_hf_dirs, tmp_path):
    path = _copy(tiny_hf_dirs["llama_mha"][1], tmp_path / "trunc")
    shard = next(path.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read safetensors shard"):
        models.load(path)


def test_missing_tensor(tiny_hf_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file
    path = _copy(tiny_hf_dirs["llama_mha"][1], tmp_path / "partial")
    shard = next(path.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, shard)
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        models.load(path)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a .gguf file"):
        models.load(f)


def test_biased_config_rejected():
    with pytest.raises(ValueError, match="attention_bias=True"):
        models.ModelConfig.from_hf_config(dict(
            model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=8,
            num_hidden_layers=1, num_attention_heads=2, attention_bias=True))


@pytest.mark.slow
def test_smollm2_save_restore_with_tokenizer(tmp_path):
    model, tok = models.load("smollm2", progress=False, dtype=jnp.float32)
    out = models.save(model, tok, tmp_path / "smollm2")
    model2, tok2 = models.load(out)
    text = "Hello! The year 2024 had 366 days."
    assert tok2.encode(text) == tok.encode(text) and tok2.eos_ids == tok.eos_ids
    assert tok2.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    ids = jnp.asarray([tok.encode(text)])
    np.testing.assert_array_equal(np.asarray(model2(ids)), np.asarray(model(ids)))
