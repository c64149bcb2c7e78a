"""Real llama.cpp inference servers for the end-to-end tests.

`tests/engine.sh` builds llama.cpp's `llama-server` and places a tiny real model (SmolLM2-135M
Instruct, GGUF) in a cache shared by every checkout on the machine (~/.cache/nexus-engine).
This module runs that script once per test session, starts `llama-server` processes on free
127.0.0.1 ports, waits until they answer `/health`, and stops them afterwards.
Every wait is bounded.

conftest.py loads it as a plugin, so its fixtures are there for every test module.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE_SCRIPT = ROOT / "tests" / "engine.sh"

# The first run compiles llama.cpp (a quarter of an hour on two cores); later runs hit the cache.
PROVISION_TIMEOUT_S = 3600
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 10
CONTEXT_SIZE = 2048  # split between the slots: each request gets CONTEXT_SIZE // PARALLEL_SLOTS
PARALLEL_SLOTS = 2
# Without --alias, llama-server names the model by the path it was given.
MODEL_ALIAS = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Engine:
    """Where the provisioned llama-server binary and model file are."""

    server_binary: Path
    model: Path


@dataclass
class LlamaServer:
    """One running llama-server on 127.0.0.1; kill() it to simulate a crashed backend."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """Kill the process at once (no graceful shutdown) and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        """Ask the process to exit, killing it if it does not within STOP_TIMEOUT_S."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def provision() -> Engine:
    """Run tests/engine.sh (builds or reuses the cache) and return what it provisioned."""
    result = subprocess.run(
        ["bash", str(ENGINE_SCRIPT)],
        capture_output=True,
        timeout=PROVISION_TIMEOUT_S,
        check=False,
        cwd=ROOT,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"tests/engine.sh failed with exit code {result.returncode}:\n"
            + result.stderr.decode(errors="replace")[-4000:]
        )
    paths = dict(line.split("=", 1) for line in result.stdout.decode().splitlines() if "=" in line)
    engine = Engine(server_binary=Path(paths["LLAMA_SERVER"]), model=Path(paths["MODEL"]))
    if not os.access(engine.server_binary, os.X_OK) or not engine.model.is_file():
        raise RuntimeError(f"tests/engine.sh reported paths that are not there: {engine}")
    return engine


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET url; (status, body). Connection errors raise OSError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_until_ready(server: LlamaServer, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll /health until it answers 200 (the model is loaded), the process dies, or time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"llama-server {server.name} exited with {server.process.returncode}:\n"
                + server.log_tail()
            )
        with contextlib.suppress(OSError):
            status, _ = http_get(f"{server.url}/health", timeout=2.0)
            if status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(
        f"llama-server {server.name} not ready after {timeout_s} s:\n{server.log_tail()}"
    )


def start_llama_server(
    engine: Engine,
    name: str,
    log_dir: Path,
    *,
    context_size: int = CONTEXT_SIZE,
    parallel: int = PARALLEL_SLOTS,
    threads: int = 1,
    alias: str = MODEL_ALIAS,
) -> LlamaServer:
    """Start one llama-server on a free 127.0.0.1 port and wait until it is ready.

    One thread each: on a busy two-core machine, llama.cpp's spinning thread pool gets ten
    times slower with two threads than with one."""
    port = free_port()
    log_path = log_dir / f"llama-server-{name}.log"
    command = [
        str(engine.server_binary),
        "--model",
        str(engine.model),
        "--alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--ctx-size",
        str(context_size),
        "--parallel",
        str(parallel),
        "--threads",
        str(threads),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    server = LlamaServer(name=name, port=port, process=process, log_path=log_path)
    try:
        wait_until_ready(server)
    except BaseException:
        server.kill()
        raise
    return server


@contextlib.contextmanager
def running_llama_servers(
    engine: Engine, names: list[str], log_dir: Path, **options: int
) -> Iterator[list[LlamaServer]]:
    """Start one llama-server per name; stop every one of them on the way out."""
    servers: list[LlamaServer] = []
    try:
        for name in names:
            servers.append(start_llama_server(engine, name, log_dir, **options))
        yield servers
    finally:
        for server in servers:
            server.stop()


# Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The llama-server binary and the model, built or taken from the cache once per session."""
    return provision()


@pytest.fixture(scope="session")
def llama_pair(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LlamaServer]]:
    """Two llama-servers serving the same model, shared by the tests that do not kill them."""
    log_dir = tmp_path_factory.mktemp("llama-logs")
    with running_llama_servers(engine, ["llama-a", "llama-b"], log_dir) as servers:
        yield servers


@pytest.fixture
def fresh_llama_pair(engine: Engine, tmp_path: Path) -> Iterator[list[LlamaServer]]:
    """Two llama-servers of the test's own, for tests that kill one."""
    with running_llama_servers(engine, ["llama-a", "llama-b"], tmp_path) as servers:
        yield servers
