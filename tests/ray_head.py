"""A real `ray start --head` for tests marked ``cluster``, several at once on one machine, in token-auth mode.

Each head gets its own short temp dir (Ray's socket paths must stay under 107 bytes), its own HOME holding its
token (``~/.ray/auth_token``, as Ray documents; never the user's real one), its own block of ports for
everything Ray opens, and a shutdown that ends only its own processes: `ray stop` ends every Ray process of the
user on the machine (other engineers' tests included) and must not appear in any test.

    with ray_head(num_cpus=2) as head:
        head.cli("job", "submit", "--address", head.dashboard_url, "--", "python", "-c", "print(1)")
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Every port `ray start --head` opens, each set explicitly: Ray's defaults (6379, 8265, 10001, 52365, ...) are
# fixed numbers that a second head on the same machine would collide with.
PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "metrics-export-port", "node-manager-port", "object-manager-port",
              "runtime-env-agent-port")  # fmt: skip
WORKER_PORTS = 100  # one per worker process (drivers, actors, tasks); a 2-CPU test head uses a few dozen at most
BLOCK = 128  # ports reserved per head: the named ones, then the worker range
# Blocks lie below Linux's ephemeral range (32768+), so no outgoing connection takes one of their ports meanwhile.
FIRST_PORT, LAST_PORT = 20000, 32767
LOCK_DIR = Path(tempfile.gettempdir()) / "ray-head-ports"  # one lock file per block, shared by all heads
# Env vars that would point a child at another Ray (the in-process test session's, the user's) or another token.
FOREIGN_RAY_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass
class RayHead:
    temp_dir: Path
    ports: dict[str, int]
    session_id: int  # the process session of `ray start`: every daemon of this head inherits it
    home: Path = field(init=False)

    def __post_init__(self) -> None:
        self.home = self.temp_dir / "home"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def env(self, with_token: bool = True) -> dict[str, str]:
        """The environment of a client of this head: Ray's documented token path (HOME's ``.ray/auth_token``
        under ``RAY_AUTH_MODE=token``), or, ``with_token=False``, a client that has no token at all."""
        env = {k: v for k, v in os.environ.items() if k not in FOREIGN_RAY_ENV}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        if with_token:
            env.update(HOME=str(self.home), RAY_AUTH_MODE="token")
        else:
            env["HOME"] = str(self.temp_dir / "stranger")
            (self.temp_dir / "stranger").mkdir(exist_ok=True)
        return env

    def cli(self, *args: str, with_token: bool = True, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:  # fmt: skip
        """`ray <args>` run from the project root as a client of this head."""
        return subprocess.run([str(BIN / "ray"), *args], cwd=PROJECT_ROOT, env=env or self.env(with_token),
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip


@contextlib.contextmanager
def reserved_port_block() -> Iterator[int]:
    """The first port of a block of `BLOCK` free ports, held (flock) against other heads until the block closes."""
    LOCK_DIR.mkdir(exist_ok=True)
    blocks = list(range(FIRST_PORT, LAST_PORT - BLOCK, BLOCK))
    random.shuffle(blocks)
    for base in blocks:
        lock = open(LOCK_DIR / f"{base}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        try:
            if all(port_is_free(port) for port in range(base, base + BLOCK)):
                yield base
                return
        finally:
            lock.close()  # closing releases the lock
    raise RuntimeError(f"no block of {BLOCK} free ports between {FIRST_PORT} and {LAST_PORT}")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as sock:
        try:
            sock.bind(("", port))  # the wildcard address: Ray's GCS and raylet bind every interface
        except OSError:
            return False
    return True


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, extra_args: tuple[str, ...] = ()) -> Iterator[RayHead]:
    """Start a head in token mode (Ray 2.60's default once a token exists), yield it, end only its processes."""
    with reserved_port_block() as base:  # held until the head is gone: its worker ports open later
        temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: socket paths stay < 107 bytes
        ports = {flag: base + i for i, flag in enumerate(PORT_FLAGS)}
        head = RayHead(temp_dir, ports, session_id=-1)
        try:
            env = head.env()
            env.pop("RAY_AUTH_MODE")  # the head runs in Ray's default mode: token, since a token exists
            generated = head.cli("get-auth-token", "--generate", env=env, timeout=120)
            if generated.returncode != 0:
                raise RuntimeError(f"ray get-auth-token failed: {generated.stderr[-2000:]}")
            first_worker_port = base + len(PORT_FLAGS)
            args = [str(BIN / "ray"), "start", "--head", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                    *(f"--{flag}={port}" for flag, port in ports.items()),
                    f"--min-worker-port={first_worker_port}",
                    f"--max-worker-port={first_worker_port + WORKER_PORTS - 1}", *extra_args]  # fmt: skip
            # A new session: every process of this head (and only those) inherits its id.
            starter = subprocess.Popen(args, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
            head.session_id = starter.pid
            output, _ = starter.communicate(timeout=300)
            if starter.returncode != 0:
                raise RuntimeError(f"ray start --head failed:\n{output[-3000:]}")
            yield head
        finally:
            if head.session_id > 0:
                end_processes(head.session_id, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)


def head_processes(session_id: int, temp_dir: Path) -> set[psutil.Process]:
    """This head's processes: its session's, those naming its temp dir, and all their descendants (a job's
    driver runs in a session of its own under the job supervisor). Never this process or its ancestors."""
    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: set[psutil.Process] = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid in spared:
                continue
            if os.getsid(proc.pid) == session_id or str(temp_dir) in " ".join(proc.info["cmdline"] or ()):
                found.add(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    for proc in list(found):
        with contextlib.suppress(psutil.Error):
            found.update(c for c in proc.children(recursive=True) if c.pid not in spared)
    return found


def end_processes(session_id: int, temp_dir: Path, grace_s: float = 5) -> None:
    """SIGTERM this head's processes, SIGKILL what is left after ``grace_s`` (the GCS ignores SIGTERM at times);
    repeated until none is left, since a dying raylet's workers may be found only on the next pass."""
    for _ in range(3):
        procs = head_processes(session_id, temp_dir)
        if not procs:
            return
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace_s)
    left = head_processes(session_id, temp_dir)
    if left:
        raise RuntimeError(f"processes of the Ray head in {temp_dir} survived SIGKILL: {sorted(p.pid for p in left)}")
