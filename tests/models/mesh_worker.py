"""Run kvjax on device meshes of fake CPU devices and print what the mesh tests assert.

Started by tests/models/test_mesh.py in a subprocess (XLA_FLAGS with 8 host devices, so the
rest of the suite keeps one device). Prints one JSON object:

  {"cases": [{mesh, press, tokens_equal, logits_max_diff, weight_bytes_dev0, weight_bytes,
              cache: {name: [dev0 bytes, total bytes]}, prefill_compiles, decode_compiles,
              big_collectives}], "config": {...}}
"""

import argparse
import json
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import kvjax  # noqa: E402
import models  # noqa: E402
from kvjax import loops  # noqa: E402
from kvjax.presses import make_press  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.hf import decoder_from_tensors, hf_name_table  # noqa: E402

TINY = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=16,
                   mlp_dim=128, max_seq_len=1024)
COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-to-all)\(")
ITEMSIZE = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "pred": 1, "s8": 1}


def hf_tensors(model) -> dict:
    """HF-named numpy tensors of an NNX Decoder (the inverse of the loader's name table)."""
    pure = nnx.to_pure_dict(nnx.split(model)[1])
    out = {}
    for name, (path, transpose, layer) in hf_name_table(model.config).items():
        arr = pure
        for key in path:
            arr = arr[key]
        arr = np.asarray(arr if layer is None else arr[layer])
        out[name] = arr.T if transpose else arr
    return out


def load(name: str, mesh):
    if name == "smollm2":
        return models.load("smollm2", dtype=jnp.float32, mesh=mesh, progress=False)[0]
    ref = models.Decoder(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0))
    return decoder_from_tensors(TINY, hf_tensors(ref), mesh=mesh)


def prompts(vocab: int, batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=int(n)) for n in rng.integers(150, 200, size=batch)]


def run(model, ids, press, new: int):
    fn, params = model.kvjax_split()
    state, _ = loops.start(fn, params, ids, max_new_tokens=new, press=press)
    state = loops.decode(fn, params, state, jnp.int32(new), loops.eos_array(None),
                         sampler=kvjax.Greedy(), attn_impl=loops.resolve_attn_impl("auto"))
    return np.asarray(state.tokens)[:, :new], np.asarray(state.logits), state.cache


def big_collectives(model, ids, press) -> dict:
    """all-gather / all-to-all ops of a compiled prefill: "big" lists those at least one
    device's share of a layer's keys, "seen" counts them all (0 on a mesh that only splits
    the batch; > 0 shows the HLO parse still finds them where heads are split)."""
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts(ids)
    text = loops.prefill.lower(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                               tail_capacity=16, press=press,
                               attn_impl="reference").compile().as_text()
    cfg, mesh = model.config, fn.mesh
    keys = tokens.shape[0] * cfg.n_kv_heads * tokens.shape[1] * cfg.head_dim * 4
    share = keys // mesh.size
    big, seen = [], 0
    for m in COLLECTIVE.finditer(text):
        seen += 1
        n = int(np.prod([int(x) for x in m.group(2).split(",") if x])) * ITEMSIZE.get(m.group(1), 4)
        if n >= share:
            big.append(f"{m.group(3)} {m.group(1)}[{m.group(2)}] ({n} >= {share} bytes)")
    return {"big": big, "seen": seen}


def dev0_bytes(tree) -> int:
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree)
               for s in x.addressable_shards if s.device == dev)


def case(name, model, refs, mesh_shape, press_name, batch, first: bool):
    """One (mesh, press) run against the one-device reference `refs[press_name]`; on the
    mesh's first press, a second prompt set of the same bucket must not compile again."""
    press = None if press_name == "full" else make_press(press_name, compression_ratio=0.5)
    vocab = model.config.vocab_size
    ids = prompts(vocab, batch, 0)
    ref_tokens, ref_logits = refs[press_name]
    before = loops.prefill._cache_size(), loops.decode._cache_size()
    tokens, logits, cache = run(model, ids, press, 6)
    if first:
        run(model, prompts(vocab, batch, 1), press, 6)  # same bucket: no new compilation
    params = model.kvjax_split()[1]
    return {"mesh": list(mesh_shape), "press": press_name,
            "tokens_equal": bool((tokens == ref_tokens).all()),
            "logits_max_diff": float(np.abs(logits - ref_logits).max()),
            "logits_max_abs": float(np.abs(ref_logits).max()),
            "weight_bytes_dev0": dev0_bytes(params),
            "weight_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(params)),
            "cache": {k: [dev0_bytes(x), x.nbytes] for k, x in
                      (("store.k", cache.store.k), ("store.v", cache.store.v),
                       ("tail.k", cache.tail.k))},
            "store_rows": cache.store.rows,
            "prefill_compiles": loops.prefill._cache_size() - before[0],
            "decode_compiles": loops.decode._cache_size() - before[1],
            "big_collectives": big_collectives(model, ids, press)}


def cases(name: str, meshes: list[tuple], presses: list[str], batch: int):
    """(case results, the model's config)."""
    single = load(name, None)
    ids = prompts(single.config.vocab_size, batch, 0)
    refs = {p: run(single, ids, None if p == "full" else make_press(p, compression_ratio=0.5),
                   6)[:2] for p in presses}
    out = []
    for shape in meshes:
        model = load(name, models.make_mesh(*shape))
        out += [case(name, model, refs, shape, p, batch, first=i == 0)
                for i, p in enumerate(presses)]
    return out, single.config


def kernel_tokens(mesh_shapes, batch: int) -> dict:
    """Greedy tokens with Pallas kernels (interpret mode) under shard_map on each (mesh,
    attn_impl), next to the jnp reference on one device (SnapKV 0.5: prefill with window scores,
    decode over the compressed store)."""
    single = load("tiny", None)
    ids = prompts(TINY.vocab_size, batch, 0)
    press = make_press("snapkv", compression_ratio=0.5)
    ref = kvjax.generate(single, ids, max_new_tokens=3, press=press, attn_impl="reference")
    out = {"reference": ref.tokens.tolist()}
    for shape, impl in mesh_shapes:
        model = load("tiny", models.make_mesh(*shape))
        got = kvjax.generate(model, ids, max_new_tokens=3, press=press, attn_impl=impl)
        out[f"{impl} {'x'.join(map(str, shape))}"] = got.tokens.tolist()
    return out


def error_of(f) -> str:
    try:
        f()
    except (ValueError, TypeError) as e:
        return str(e)
    return "no error"


def check_errors() -> dict:
    """The messages of bad meshes and batches (asserted by the test)."""
    single = load("tiny", None)
    bad_axes = jax.sharding.Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2), ("x", "model"))
    meshed = load("tiny", models.make_mesh(2, 4))
    return {"axes": error_of(lambda: decoder_from_tensors(TINY, hf_tensors(single),
                                                          mesh=bad_axes)),
            "too_many": error_of(lambda: models.make_mesh(4, 4)),
            "batch": error_of(lambda: kvjax.generate(meshed, prompts(256, 3, 0),
                                                     max_new_tokens=2)),
            "parse": error_of(lambda: models.parse_mesh("data=2,modl=4"))}


def axis_type_tokens() -> dict:
    """Greedy tokens (SnapKV 0.5) of the tiny model on one device and on (2, 4) meshes made
    by `jax.make_mesh` with its default axis types, with Explicit and with Auto axes."""
    auto, explicit = jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit
    meshes = {"default": jax.make_mesh((2, 4), ("data", "model")),
              "explicit": jax.make_mesh((2, 4), ("data", "model"), axis_types=(explicit,) * 2),
              "auto": jax.make_mesh((2, 4), ("data", "model"), axis_types=(auto,) * 2)}
    ids = prompts(256, 4, 3)
    press = kvjax.SnapKVPress(compression_ratio=0.5, window_size=8)
    out = {"single": kvjax.generate(load("tiny", None), ids, max_new_tokens=4,
                                    press=press).tokens.tolist(),
           "default_types": [str(t) for t in meshes["default"].axis_types]}
    for name, mesh in meshes.items():
        out[name] = kvjax.generate(load("tiny", mesh), ids, max_new_tokens=4,
                                   press=press).tokens.tolist()
    return out


def pipeline_texts(mesh_shape, tmp: str) -> dict:
    """SmolLM2 Pipeline answers (run, compress + save + load + ask) on one device and on a
    mesh, with SnapKV 0.5: the texts must agree."""
    from kvjax.context import CompressedContext

    context = ("The bakery on Elm Street opens at seven. Its owner, Mara, bakes rye bread. "
               * 12) + "The secret code of the vault is 4417. " + ("The river is calm. " * 20)
    question = "What is the secret code of the vault?"
    out = {}
    for name, mesh in (("single", None), ("mesh", models.make_mesh(*mesh_shape))):
        model, tok = models.load("smollm2", dtype=jnp.float32, mesh=mesh, progress=False)
        pipe = kvjax.Pipeline(model, tok)
        press = kvjax.SnapKVPress(compression_ratio=0.5)
        run = pipe.run(context, question, press=press, max_new_tokens=12).text
        path = os.path.join(tmp, name)
        pipe.compress(context, press=press).save(path)
        ask = pipe.ask(CompressedContext.load(path, model), question, max_new_tokens=12).text
        out[name] = {"run": run, "ask": ask}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default=None, metavar="TMPDIR")
    ap.add_argument("--check-errors", action="store_true")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--axis-types", action="store_true")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--meshes", default="1x8,2x4,8x1,2x3")
    ap.add_argument("--presses", default="full,snapkv,adakv,zigzagkv,think")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    if args.pipeline:
        print(json.dumps(pipeline_texts((1, 3), args.pipeline)))
        return
    if args.kernels:
        print(json.dumps(kernel_tokens([((2, 4), "pallas_tpu"), ((1, 1), "pallas_gpu")],
                                        4)))
        return
    if args.axis_types:
        print(json.dumps(axis_type_tokens()))
        return
    if args.check_errors:
        print(json.dumps(check_errors()))
        return
    meshes = [tuple(int(x) for x in m.split("x")) for m in args.meshes.split(",")]
    results, cfg = cases(args.model, meshes, args.presses.split(","), args.batch)
    print(json.dumps({"cases": results, "config": {
        "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "mlp_dim": cfg.mlp_dim,
        "vocab_size": cfg.vocab_size}}))


if __name__ == "__main__":
    main()
