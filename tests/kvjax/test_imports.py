"""`import kvjax` loads no kernel package: pallas_kernels imports its Mosaic kernels on
first use (pallas_kernels/__init__.py), so a CPU user never pays for them."""

import json
import subprocess
import sys


def _modules_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_kvjax_loads_no_mosaic_kernels():
    mods = _modules_after("import kvjax, models")
    assert "jax.experimental.mosaic" not in mods
    assert not [m for m in mods if m.startswith(("pallas_kernels.gpu", "pallas_kernels.tpu"))]


def test_kernels_load_on_first_use():
    mods = _modules_after("import pallas_kernels\npallas_kernels.tpu_decode_attention")
    assert "pallas_kernels.tpu.decode_attention" in mods
    assert "pallas_kernels.gpu.decode_attention" not in mods
