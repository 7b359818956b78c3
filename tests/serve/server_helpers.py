"""Start `kvjax serve` in a subprocess on 127.0.0.1 with a free port, and stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `kvjax serve` process: `url` ("http://127.0.0.1:PORT"), `base` (its /v1),
    `model` (the name it serves)."""

    def __init__(self, model_path, *args: str, env: dict | None = None):
        self.model = str(model_path)  # the served model name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base = self.url + "/v1"
        cmd = [sys.executable, "-m", "kvjax.cli", "serve", "--model", str(model_path),
               "--dtype", "float32", "--host", "127.0.0.1", "--port", str(self.port), *args]
        env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", **(env or {}))
        self._log = tempfile.TemporaryFile("w+")  # a file, so a chatty server never blocks
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvjax serve exited {self.proc.returncode}:\n"
                                   f"{self.output()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"kvjax serve did not become healthy in {START_TIMEOUT_S} s")

    def metrics(self) -> dict[str, float]:
        """The unlabelled gauges and counters of /metrics."""
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, value = line.split()
                out[name] = float(value)
        return out

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()

    def terminate(self, timeout: float = 120) -> tuple[int, str]:
        """SIGTERM, then wait -> (exit code, output)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.output()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
