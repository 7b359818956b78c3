"""`kvjax eval` prefills and compresses through the same primitives as `generate` on a mesh
(kvjax/plan.py, kvjax/prefill.py): on (1, 8) fake CPU devices its store has one row per
"model" device, split over the devices like generate's, and its answers equal one device's
and `Pipeline.run`'s. The mesh runs in a subprocess (`eval_mesh_worker.py`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("eval_mesh_worker.py")


def test_eval_builds_generate_store_rows_on_a_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"full", "snapkv", "adakv"}
    for name, r in result.items():
        assert r["devices"] == 8, name
        # 8 kv heads over model=8: one store row per device, each on its own device
        assert r["generate_rows"] == [8, 8], name
        assert r["eval_rows"] == r["generate_rows"], name
        assert r["eval_store_rows"] == 8, name  # what answer_sample itself decoded from
        assert len(r["eval_mesh"]) > 0, name
        assert r["eval_mesh"] == r["eval_one"], name
        assert r["eval_mesh"] == r["run_mesh"], name
