"""One process of the two-process test (tests/models/test_multihost.py).

Each process has 4 CPU devices (XLA_FLAGS), joins `jax.distributed` with gloo CPU collectives,
loads an HF checkpoint on a global ("data", "model") mesh of the 8 devices, generates with
SnapKV, and prints the tokens and which rows of every q_proj tensor it read from the file.

    python multihost_worker.py PROCESS_ID PORT CHECKPOINT_DIR MESH (e.g. 1x8)
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


class CountingSource:
    """A tensor source that records the rows of every tensor read."""

    def __init__(self, inner):
        self.inner, self.reads = inner, {}

    def names(self):
        return self.inner.names()

    def shape(self, name):
        return self.inner.shape(name)

    def read(self, name, rows=slice(None)):
        start, stop, _ = rows.indices(self.inner.shape(name)[0])
        self.reads.setdefault(name, []).append([start, stop])
        return self.inner.read(name, rows)


def main():
    pid, port, ckpt, mesh_text = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=pid)
    from pathlib import Path

    import jax.numpy as jnp
    import numpy as np

    import kvjax
    import models
    from models.config import ModelConfig
    from models.hf import decoder_from_tensors, read_hf_config
    from models.sources import SafetensorsSource

    mesh = models.make_mesh(*map(int, mesh_text.split("x")))
    cfg = ModelConfig.from_hf_config(read_hf_config(Path(ckpt)))
    source = CountingSource(SafetensorsSource(Path(ckpt)))
    model = decoder_from_tensors(cfg, source, dtype=jnp.float32, mesh=mesh)
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, cfg.vocab_size, size=int(n)) for n in (150, 170)]
    out = kvjax.generate(model, ids, max_new_tokens=6,
                         press=kvjax.SnapKVPress(compression_ratio=0.5))
    q_reads = {k: v for k, v in source.reads.items() if "q_proj" in k}
    print(json.dumps({"pid": pid, "devices": jax.device_count(),
                      "tokens": np.asarray(out.tokens).tolist(), "q_reads": q_reads}))


if __name__ == "__main__":
    main()
