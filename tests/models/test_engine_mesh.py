"""`kvjax.Engine` under a device mesh (8 fake CPU devices, in a subprocess): heads and the
pool's rows are sharded over "model", and every request's tokens equal single-device
`kvjax.generate` (SnapKV, AdaKV's per-head budgets, an int8 pool); a mesh with a data axis
is refused by name (one pool is not split over data)."""

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("engine_mesh_worker.py")


def test_engine_on_meshes_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True,
                         text=True, timeout=1200, cwd=WORKER.parent)
    assert out.returncode == 0, out.stderr[-4000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(res["cases"]) == 6
    for case in res["cases"]:
        assert case["tokens_equal"], case
        model = case["mesh"][1]  # 8 kv heads: the pool's rows split over "model"
        assert case["pool_dev0_bytes"] * model == case["pool_bytes"], case
    assert "data=2" in res["refused"] and "data=1 meshes" in res["refused"]
