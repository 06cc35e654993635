"""The real ``taskvision serve`` as a subprocess on a free loopback port, with its own data dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import pytest
import requests

# The console script installed next to the interpreter that runs the tests.
TASKVISION = Path(sys.executable).parent / "taskvision"
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TASKVISION), *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def create_user(name: str, data_dir: Path) -> str:
    """``taskvision users create NAME``: returns the API token it prints (and nothing else)."""
    result = _cli("users", "create", name, data_dir=data_dir)
    assert result.returncode == 0, f"users create failed ({result.returncode}): {result.stderr}"
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"users create must print only the token, got {result.stdout!r}"
    token = lines[0].strip()
    assert token and " " not in token
    return token


@dataclass
class LiveServer:
    """A running ``taskvision serve`` and the user created before it started."""

    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    token: str
    _names: count = field(default_factory=lambda: count(1))

    @property
    def base_url(self) -> str:
        """The endpoint as ximilar-client wants it (trailing slash, "localhost" in it)."""
        return f"http://localhost:{self.port}/"

    @property
    def ip_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def new_user(self, prefix: str = "user") -> str:
        """Create another user (own empty workspace) while the server runs; returns its token."""
        return create_user(f"{prefix}-{next(self._names)}", self.data_dir)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def is_alive(self) -> bool:
        return self.proc.poll() is None


def _wait_healthy(server: LiveServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if not server.is_alive():
            pytest.fail(f"taskvision serve exited with {server.proc.returncode}:\n{server.log()}")
        try:
            response = requests.get(f"{server.ip_url}healthz", timeout=2)
            if response.status_code == 200 and response.json() == {"status": "ok"}:
                return
        except requests.RequestException as exc:
            last_error = exc
        time.sleep(0.1)
    pytest.fail(
        f"taskvision serve did not become healthy in {STARTUP_TIMEOUT_S}s ({last_error}):\n{server.log()}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def running_server(root: Path, *, env: dict[str, str] | None = None) -> Iterator[LiveServer]:
    """Start ``taskvision serve`` under ``root`` (data dir and log); stop it afterwards."""
    assert TASKVISION.exists(), (
        f"{TASKVISION} not found: install the project into this venv (pip install -e .)"
    )
    data_dir = root / "data"
    log_path = root / "server.log"
    # One user is created before the server starts (the CLI migrates the fresh DB itself).
    token = create_user("e2e-owner", data_dir)
    port = _free_port()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TASKVISION_")}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                str(TASKVISION),
                "--log-level",
                "info",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**base_env, **(env or {})},
        )
    server = LiveServer(port=port, data_dir=data_dir, proc=proc, log_path=log_path, token=token)
    try:
        _wait_healthy(server)
        yield server
    finally:
        _stop(proc)
