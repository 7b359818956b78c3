"""Run `kvjax.Engine` on meshes of fake CPU devices and print what test_engine_mesh.py asserts.

Started in a subprocess (XLA_FLAGS with 8 host devices). Prints one JSON object:
  {"cases": [{mesh, press, kv_dtype, tokens_equal, pool_dev0_bytes, pool_bytes}],
   "refused": message for a data > 1 mesh}
"""

import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402

import kvjax  # noqa: E402
import models  # noqa: E402
from kvjax.presses import PRESSES, make_press  # noqa: E402
from mesh_worker import load  # noqa: E402


def tokens(out):
    return out.tokens[0, :out.lengths[0]].tolist()


def main() -> None:
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 256, size=int(n))) for n in (150, 180, 120)]
    single = load("tiny", None)
    cases = []
    for data, mdl in ((1, 8), (1, 2)):
        meshed = load("tiny", models.make_mesh(data, mdl))
        for name, kv in (("snapkv", None), ("adakv", None), ("snapkv", "int8")):
            press = make_press(name, 0.5, **PRESSES[name][1])
            want = [tokens(kvjax.generate(single, [p], max_new_tokens=6, press=press,
                                          kv_dtype=kv)) for p in prompts]
            eng = kvjax.Engine(meshed, kv_budget="8MiB", max_running=2, max_tail=32,
                               kv_dtype=kv)
            reqs = [eng.submit(p, press=press, max_new_tokens=6) for p in prompts]
            eng.run()
            k = eng._state.cache.store.k
            cases.append(dict(mesh=[data, mdl], press=name, kv_dtype=kv,
                              tokens_equal=[r.result().tokens for r in reqs] == want,
                              pool_dev0_bytes=int(k.addressable_shards[0].data.nbytes),
                              pool_bytes=int(k.nbytes)))
    try:
        kvjax.Engine(load("tiny", models.make_mesh(2, 4)), kv_budget="8MiB")
        refused = None
    except ValueError as e:
        refused = str(e)
    print(json.dumps({"cases": cases, "refused": refused}))


if __name__ == "__main__":
    main()
