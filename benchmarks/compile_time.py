"""Compilation time of `kvjax.generate` on SmolLM2: the first call minus the second.

    python benchmarks/compile_time.py [--presses none,snapkv] [--repo PATH]

Each measurement runs in a fresh Python process (so nothing is compiled yet): it loads
SmolLM2, calls `kvjax.generate` on a 24-token prompt twice (8 new tokens) and reports
first - second = compilation of prefill (+ compression) and decode. `--repo` runs the same
measurement against another checkout of kvjax (e.g. an older commit) for a before/after
figure in one run. Saves docs/results/compile_time.json.
"""

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, save_json  # noqa: E402

CHILD = textwrap.dedent("""
    import json, sys, time
    import jax
    import kvjax, models
    model, tok = models.load("smollm2", progress=False)
    name = sys.argv[1]
    press = None if name == "none" else kvjax.make_press(name, 0.5, window_size=8)
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 3, add_bos=False)[:24]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = kvjax.generate(model, [ids], max_new_tokens=8, press=press)
        jax.block_until_ready(out.cache)
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(first_s=times[0], second_s=times[1], kvjax=kvjax.__file__)))
""")


def measure(repo: Path, press: str) -> dict:
    """First and second generate wall time in a fresh process run from `repo`."""
    out = subprocess.run([sys.executable, "-c", CHILD, press], cwd=repo, check=True,
                         capture_output=True, text=True, env=None)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["compile_s"] = row["first_s"] - row["second_s"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presses", default="none,snapkv")
    ap.add_argument("--repo", default=None, help="another kvjax checkout to compare with")
    ap.add_argument("--out", default="docs/results/compile_time.json")
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parent.parent
    repos = {"this": here} | ({"other": Path(args.repo).resolve()} if args.repo else {})
    rows = []
    for press in args.presses.split(","):
        for label, repo in repos.items():
            row = dict(checkout=label, path=str(repo), press=press, **measure(repo, press))
            rows.append(row)
            print(f"{label:<6} {press:<10} first {row['first_s']:6.2f} s  second "
                  f"{row['second_s']:5.2f} s  compile {row['compile_s']:6.2f} s", flush=True)
        if args.repo:
            this, other = rows[-2]["compile_s"], rows[-1]["compile_s"]
            print(f"       {press:<10} compile this / other = {this / other:.2f}")
    print(f"device: {device_name()}")
    save_json(dict(device=device_name(), rows=rows), args.out)


if __name__ == "__main__":
    main()
