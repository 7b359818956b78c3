"""Peak host memory of `models.load` on a synthetic Llama safetensors checkpoint.

Writes a random-weight Llama checkpoint (transformers' `LlamaConfig`, bf16 safetensors,
shards of at most 1 GB) of about --size-mb, then loads it in bf16 in a fresh subprocess, with
and without a mesh, and prints peak RSS above the interpreter's baseline next to the
checkpoint size and the goal: at most 1.25 x the loaded weights' bytes + the largest single
tensor in f32.

    python benchmarks/load_memory.py --size-mb 2048 --mesh 1x4 [--out docs/results/load_memory.json]

The baseline is the resident set after importing jax/kvjax/models and starting the backend;
the peak is the process's high-water mark (VmHWM) after loading. With a mesh of fake CPU
devices every device's shard lives in host memory, so a mesh with data > 1 (replicas) is not
comparable; use data=1.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def llama_config(size_mb: int) -> dict:
    """A Llama config whose bf16 weights are about `size_mb` MB (d_model 1024, 8 kv heads)."""
    d, f, v, heads, kv = 1024, 2816, 32000, 16, 8
    per_layer = 2 * (d * d * 2 + 2 * d * (d * kv // heads) + 3 * d * f + 2 * d)
    fixed = 2 * (2 * v * d + d)
    layers = max(1, round((size_mb * 2**20 - fixed) / per_layer))
    return dict(hidden_size=d, intermediate_size=f, vocab_size=v, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=d // heads,
                max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="bfloat16")


def write_checkpoint(path: Path, size_mb: int) -> dict:
    """Write config.json and bf16 *.safetensors shards (<= 1 GB each) of random weights."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(**llama_config(size_mb))
    path.mkdir(parents=True, exist_ok=True)
    cfg.to_json_file(path / "config.json")
    with torch.device("meta"):
        shapes = {k: tuple(p.shape) for k, p in transformers.LlamaForCausalLM(cfg).state_dict()
                  .items()}
    gen = torch.Generator().manual_seed(0)
    shard, size, index, weight_map = {}, 0, 0, {}

    def flush():
        nonlocal shard, size, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size, index = {}, 0, index + 1

    for key, shape in shapes.items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > 2**30:
            flush()
        shard[key], size = t, size + t.numel() * 2
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return cfg.to_dict()


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(path: str, mesh: str | None) -> dict:
    """In this process: baseline RSS, load in bf16, peak RSS (bytes)."""
    import jax
    import jax.numpy as jnp

    import models
    from models.sources import SafetensorsSource

    jnp.zeros(1).block_until_ready()
    src = SafetensorsSource(Path(path))
    largest = max(math.prod(src.shape(n)) for n in src.names()) * 4
    del src
    mesh_obj = None if mesh is None else models.make_mesh(*map(int, mesh.split("x")))
    baseline = _rss_kb("VmRSS") * 1024
    model, _ = models.load(path, dtype=jnp.bfloat16, mesh=mesh_obj, progress=False)
    params = jax.tree_util.tree_leaves(model.kvjax_split()[1])
    jax.block_until_ready(params)
    peak = _rss_kb("VmHWM") * 1024
    weights = sum(x.nbytes for x in params)
    return {"mesh": mesh, "baseline_rss": baseline, "peak_rss": peak,
            "peak_above_baseline": peak - baseline, "weights_bytes": weights,
            "largest_tensor_f32": largest, "bound": 1.25 * weights + largest,
            "ratio_to_weights": (peak - baseline) / weights}


def run_measure(path: Path, mesh: str | None) -> dict:
    """`measure` in a fresh subprocess (8 host devices when a mesh is asked for)."""
    env = dict(os.environ)
    if mesh is not None:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    cmd = [sys.executable, __file__, "--measure", str(path)] + ([] if mesh is None else
                                                               ["--mesh", mesh])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=2048)
    ap.add_argument("--mesh", default=None, help="e.g. 1x4 (data x model); also run without")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.mesh)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        write_checkpoint(path, args.size_mb)
        ckpt = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        rows = [run_measure(path, None)] + ([run_measure(path, args.mesh)] if args.mesh else [])
    print(f"checkpoint: {ckpt / 2**20:.0f} MiB of bf16 safetensors")
    for r in rows:
        print(f"mesh={r['mesh'] or 'none':5s} peak RSS above baseline "
              f"{r['peak_above_baseline'] / 2**20:7.0f} MiB = {r['ratio_to_weights']:.2f}x the "
              f"loaded weights ({r['weights_bytes'] / 2**20:.0f} MiB); bound 1.25x + largest "
              f"f32 tensor = {r['bound'] / 2**20:.0f} MiB: "
              f"{'OK' if r['peak_above_baseline'] <= r['bound'] else 'OVER'}")
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint_bytes": ckpt, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
