"""Weights, cache and presses on a ("data", "model") mesh of 8 fake CPU devices.

The mesh runs happen in a subprocess (`mesh_worker.py`, XLA_FLAGS with 8 host devices) so the
rest of the suite keeps one device. References: the same model on one device (tokens equal,
f32 logits within 1e-5 relative to the largest logit), per-device bytes computed here by hand from the config, and the
compiled HLO of every press on every mesh (no all-gather / all-to-all as large as one device's
share of a layer's keys).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import models
from models.sources import SafetensorsSource

WORKER = Path(__file__).with_name("mesh_worker.py")
F32 = 4


def _run_worker(*args: str, timeout: int = 1200) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(WORKER), *args], env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _expected_weight_bytes(cfg: dict, n_layers: int, d: int, head_dim: int, tied: bool,
                           model: int) -> int:
    """One device's weight bytes: a group is split over "model" when the size divides it."""
    div = lambda units, nbytes: nbytes // model if units % model == 0 else nbytes
    n, k, f, v = cfg["n_heads"], cfg["n_kv_heads"], cfg["mlp_dim"], cfg["vocab_size"]
    attn_q = div(n, 2 * n_layers * d * n * head_dim * F32)   # q_proj, o_proj
    attn_kv = div(k, 2 * n_layers * d * k * head_dim * F32)  # k_proj, v_proj
    mlp = div(f, 3 * n_layers * d * f * F32)
    vocab = div(v, (1 if tied else 2) * v * d * F32)
    norms = (2 * n_layers + 1) * d * F32
    return attn_q + attn_kv + mlp + vocab + norms


def _check_cases(result: dict, n_layers: int, d: int, head_dim: int, tied: bool):
    cfg = result["config"]
    seen_mesh = set()
    for c in result["cases"]:
        data, model = c["mesh"]
        label = f"{c['mesh']} {c['press']}"
        assert c["tokens_equal"], label
        # f32 within 1e-5 of the largest logit: the tensor-parallel all-reduces sum in
        # another order (SmolLM2, 30 layers: 5e-5 absolute on logits of ~40)
        assert c["logits_max_diff"] <= 1e-5 * max(1.0, c["logits_max_abs"]), label
        assert c["prefill_compiles"] <= 1 and c["decode_compiles"] <= 1, label
        if tuple(c["mesh"]) not in seen_mesh:  # a new mesh compiles once for two prompt sets
            assert (c["prefill_compiles"], c["decode_compiles"]) == (1, 1), label
            seen_mesh.add(tuple(c["mesh"]))
        assert c["big_collectives"]["big"] == [], label  # every press, every mesh
        assert c["weight_bytes_dev0"] == _expected_weight_bytes(cfg, n_layers, d, head_dim,
                                                                tied, model), label
        heads_split = cfg["n_kv_heads"] % model == 0 and model > 1
        assert c["store_rows"] == (model if heads_split else 1), label
        share = (data if data > 1 else 1) * (model if heads_split else 1)
        for name, (dev0, total) in c["cache"].items():
            assert dev0 * share == total, (label, name)


def test_tiny_llama_on_meshes():
    """8 kv heads: (1, 8), (2, 4), (8, 1) and (2, 3) on 6 devices (3 divides nothing of the
    tiny model: everything replicated over "model")."""
    result = _run_worker("--model", "tiny", "--meshes", "1x8,2x4,8x1,2x3",
                         "--presses", "full,snapkv,adakv,zigzagkv,think", "--batch", "8")
    _check_cases(result, n_layers=2, d=64, head_dim=16, tied=False)
    # the HLO parse is not vacuous: each press gathers something (small) where heads split
    for c in result["cases"]:
        if c["press"] != "full" and c["mesh"] in ([1, 8], [2, 4]):
            assert c["big_collectives"]["seen"] > 0, c["mesh"]


@pytest.mark.slow
def test_smollm2_on_meshes():
    """SmolLM2 (9 heads, 3 kv heads): (2, 3) shards every group; (1, 8) replicates attention
    and keeps the store in one row, while the MLP and the vocabulary are split."""
    result = _run_worker("--model", "smollm2", "--meshes", "2x3,1x8",
                         "--presses", "snapkv", "--batch", "2")
    _check_cases(result, n_layers=30, d=576, head_dim=64, tied=True)


@pytest.mark.slow
def test_smollm2_pipeline_and_cli_on_a_mesh(tmp_path):
    """Pipeline.run, compress + save + load + ask, and `kvjax eval --mesh` give the same
    text on a (1, 3) mesh as on one device."""
    out = _run_worker("--pipeline", str(tmp_path))
    assert out["mesh"] == out["single"], out
    assert "4417" in out["single"]["run"], out
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               HF_HUB_OFFLINE="1")
    answers = []
    for name, mesh in (("single", []), ("mesh", ["--mesh", "data=1,model=3"])):
        out_dir = tmp_path / f"eval_{name}"
        cmd = [sys.executable, "-m", "kvjax.cli", "eval", "--tasks", "niah_single",
               "--lengths", "1024", "--presses", "snapkv", "--ratios", "0.5", "--samples", "1",
               "--no-plot", "--no-progress", "--dtype", "float32", "--out", str(out_dir), *mesh]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        cell = json.loads(next(out_dir.glob("niah_single__1024__snapkv__0.5.json")).read_text())
        answers.append([r["prediction"] for r in cell["records"]])
    assert answers[0] == answers[1], answers


def test_pallas_tpu_kernels_under_shard_map():
    """The TPU prefill and decode kernels (interpret mode) run per device under shard_map on
    (2, 4) (batch and heads split) and give the tokens of the jnp reference on one device.
    The Mosaic GPU interpreter fails with more than one device (jax 0.10.2), so the GPU
    kernels go through the same shard_map wrapper on a (1, 1) mesh only."""
    out = _run_worker("--kernels")
    assert out["pallas_tpu 2x4"] == out["reference"], out
    assert out["pallas_gpu 1x1"] == out["reference"], out


def test_bad_meshes_and_batches():
    result = _run_worker("--check-errors")
    assert "mesh axes ('x', 'model') must be ('data', 'model')" in result["axes"]
    assert "needs 16 devices, only 8 are available" in result["too_many"]
    assert "batch of 3 sequences is not divisible by the mesh's data axis of 2" in \
        result["batch"]
    assert "--mesh 'data=2,modl=4'" in result["parse"]


def test_explicit_and_auto_axis_meshes_give_one_device_tokens():
    """`jax.make_mesh` (Explicit axes by default in this jax) works as models.make_mesh does:
    the parameters load, generate runs, and the tokens are the one-device tokens."""
    out = _run_worker("--axis-types")
    assert "AxisType.Explicit" in out["default_types"], out["default_types"]
    for name in ("default", "explicit", "auto"):
        assert out[name] == out["single"], name


def test_missing_checkpoint_shard_is_named(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(
        (2).to_bytes(8, "little") + b"{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        SafetensorsSource(tmp_path)


def test_safetensors_row_slices_match_torch(tmp_path):
    """Row slices read from the file equal torch's tensors (f32 and bf16)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    a, b = torch.randn(7, 5), torch.randn(6, 3).to(torch.bfloat16)
    save_file({"a": a, "b": b}, str(tmp_path / "model.safetensors"))
    src = SafetensorsSource(tmp_path)
    assert src.shape("a") == (7, 5) and src.shape("b") == (6, 3)
    np.testing.assert_array_equal(src.read("a", slice(2, 5)), a[2:5].numpy())
    np.testing.assert_array_equal(src.read("a"), a.numpy())
    np.testing.assert_array_equal(src.read("b", slice(1, 4)).astype(np.float32),
                                  b[1:4].float().numpy())


def test_one_device_load_is_single_device(tiny_hf_dirs):
    model, _ = models.load(tiny_hf_dirs["llama_mha"][1], progress=False)
    fn, params = model.kvjax_split()
    assert fn.mesh is None
    leaf = jax.tree_util.tree_leaves(params)[0]
    assert len(leaf.sharding.device_set) == 1


@pytest.mark.slow
def test_loading_peak_memory_is_bounded():
    """~200 MB bf16 checkpoint loaded in a subprocess, without and with a (1, 4) mesh: peak
    RSS above the baseline <= 1.25 x the loaded weights + the largest tensor in f32."""
    bench = Path(__file__).parents[2] / "benchmarks" / "load_memory.py"
    out = subprocess.run([sys.executable, str(bench), "--size-mb", "200", "--mesh", "1x4",
                          "--out", "/dev/stdout"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    runs = json.loads(out.stdout[out.stdout.index("{"):])["runs"]
    assert [r["mesh"] for r in runs] == [None, "1x4"]
    for r in runs:
        assert r["weights_bytes"] > 150 * 2**20
        assert r["peak_above_baseline"] <= 1.25 * r["weights_bytes"] + r["largest_tensor_f32"], r
