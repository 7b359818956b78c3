"""`kvjax eval`'s prefill/compress path on a (1, 8) mesh of fake CPU devices, against
`generate`'s and one device's. Started by tests/models/test_eval_mesh.py in a subprocess;
prints one JSON object per press: the store rows and row sharding each path builds, and the
eval answers, `Pipeline.run` answers and one-device answers."""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from eval_helpers import char_tokenizer  # noqa: E402
from flax import nnx  # noqa: E402

import kvjax  # noqa: E402
import models  # noqa: E402
from kvjax import loops  # noqa: E402
from kvjax.eval.engine import answer_sample  # noqa: E402
from kvjax.eval.sample import Sample  # noqa: E402
from kvjax.plan import plan_request  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.hf import decoder_from_tensors  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mesh_worker import hf_tensors  # noqa: E402

TINY = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8,
                   head_dim=16, mlp_dim=128, max_seq_len=1024)
PRESSES = {"full": None, "snapkv": kvjax.SnapKVPress(compression_ratio=0.5, window_size=8),
           "adakv": kvjax.AdaKVPress(press=kvjax.SnapKVPress(compression_ratio=0.5,
                                                              window_size=8))}


def rows_and_devices(cache) -> list:
    """[store rows R, devices the store's rows are split over]."""
    k = cache.store.k
    shards = {(s.index[1].start, s.index[1].stop) for s in k.addressable_shards}
    return [int(k.shape[1]), len(shards)]


def eval_cache(pipe, sample, press):
    """The cache `answer_sample` decodes from: its plan and the two primitives."""
    ctx_ids, q_ids = pipe.encode(sample.context, sample.question)
    plan = plan_request(pipe.fn, [ctx_ids], max_new_tokens=sample.max_new_tokens, press=press,
                        tail_extra=len(q_ids), attn_impl=pipe.attn_impl)
    _, prompt = loops.prefill_prompt(pipe.fn, pipe.params, jnp.asarray(plan.tokens),
                                     jnp.asarray(plan.lengths), attn_impl=plan.attn_impl,
                                     **plan.prefill_parts())
    return loops.compress_prompt(plan.press, prompt, plan), ctx_ids


def main():
    tok = char_tokenizer()
    ref = models.Decoder(TINY, dtype=jnp.float32, rngs=nnx.Rngs(0))
    tensors = hf_tensors(ref)
    mesh = models.make_mesh(data=1, model=8)
    sharded = decoder_from_tensors(TINY, tensors, mesh=mesh)
    single = decoder_from_tensors(TINY, tensors)
    context = "The secret code is 4711. " + "Grass is green and the sky is blue. " * 6
    sample = Sample(task="t", index=0, context=context, question="What is the code?",
                    answer_prefix="", answers=("4711",), metric="exact", max_new_tokens=6,
                    n_tokens=0)
    pipes = {"mesh": kvjax.Pipeline(sharded, tok), "one": kvjax.Pipeline(single, tok)}
    out = {}
    for name, press in PRESSES.items():
        cache, ctx_ids = eval_cache(pipes["mesh"], sample, press)
        state, _ = loops.start(pipes["mesh"].fn, pipes["mesh"].params, [ctx_ids],
                               max_new_tokens=sample.max_new_tokens, press=press)
        answers = {k: answer_sample(p, sample, [press])[0] for k, p in pipes.items()}
        run = pipes["mesh"].run(context, sample.question, press=press,
                                max_new_tokens=sample.max_new_tokens).tokens
        out[name] = dict(eval_rows=rows_and_devices(cache),
                         generate_rows=rows_and_devices(state.cache),
                         eval_store_rows=answers["mesh"].store_rows,
                         eval_mesh=list(answers["mesh"].tokens),
                         eval_one=list(answers["one"].tokens),
                         run_mesh=list(run), devices=len(jax.devices()))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
