"""A local S3 protocol server (moto's server mode) on loopback, for tests and benchmarks.

Needs ``moto[server]`` (in the ``dev`` extra). Nothing here is used by jobs themselves.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")
        time.sleep(0.1)


class MotoServer:
    """``python -m moto.server`` on a free loopback port, as a subprocess; ``stop()`` ends it.

    ``env`` adds server settings, e.g. ``INITIAL_NO_AUTH_ACTION_COUNT=0`` to check credentials.
    """

    def __init__(self, log_path: str | Path | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            wait_for_port(self.port, self.proc)
        except Exception:
            self.stop()
            raise

    def __enter__(self) -> MotoServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
