"""Two processes (4 CPU devices each, gloo collectives) generate together on one mesh.

Reference: the same checkpoint on one device in this process. Also asserted: with the
"model" axis spanning both processes, each process reads only its own devices' rows of the
checkpoint (make_array_from_callback asks only for addressable shards).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kvjax
import models

WORKER = Path(__file__).with_name("multihost_worker.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, vocab_size=256,
                                   num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=8, head_dim=8,
                                   max_position_embeddings=1024)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mh_ckpt")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_pair(ckpt: Path, mesh: str) -> list[dict]:
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(pid), port, str(ckpt), mesh],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-4000:]
        outs.append(json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1]))
    return outs


def _reference(ckpt: Path) -> list:
    import jax.numpy as jnp

    model, _ = models.load(ckpt, dtype=jnp.float32, progress=False)
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, 256, size=int(n)) for n in (150, 170)]
    out = kvjax.generate(model, ids, max_new_tokens=6,
                         press=kvjax.SnapKVPress(compression_ratio=0.5))
    return out.tokens.tolist()


@pytest.mark.parametrize("mesh", ["1x8", "2x4"])
def test_two_processes_generate_like_one(checkpoint, mesh):
    outs = _run_pair(checkpoint, mesh)
    ref = _reference(checkpoint)
    for out in outs:
        assert out["devices"] == 8
        assert out["tokens"] == ref, (mesh, out["pid"])
    if mesh == "1x8":  # model axis across processes: each reads its half of q_proj's rows
        half = 8 * 8 // 2
        for out in outs:
            rows = [r for reads in out["q_reads"].values() for r in reads]
            assert len(out["q_reads"]) == 2 and rows
            if out["pid"] == 0:
                assert max(stop for _, stop in rows) <= half
            else:
                assert min(start for start, _ in rows) >= half
