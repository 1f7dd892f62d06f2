"""A real `mlflow server` process for tests: started in its own process session on a free localhost port, ready
when ``/health`` answers, ended (with its uvicorn workers) by its process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(command: list[str], port: int, env: dict[str, str] | None = None, log: Path | None = None,
                  timeout_s: float = 240) -> Iterator[str]:  # fmt: skip
    """Run ``command`` (an `mlflow server` listening on 127.0.0.1:``port``, or a script that execs one) and yield
    its URL once healthy; the venv's ``mlflow`` is first on its PATH."""
    # no GenAI job runner (7 more processes on a 2-core machine; nothing here uses it)
    env = {**(env or os.environ), "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    out = open(log, "w") if log else subprocess.DEVNULL
    server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.read().strip() == b"OK":
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    tail = log.read_text()[-3000:] if log else ""
                    raise RuntimeError(f"mlflow server did not come up: {' '.join(command)}\n{tail}") from None
                time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        if log:
            out.close()
