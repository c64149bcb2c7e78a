"""Network namespaces for tests that must not touch the machine's real network.

Anything that sends mDNS or binds beyond loopback (``nexus serve`` with its defaults binds
0.0.0.0:8000 and browses mDNS) runs inside namespaces made here and removed afterwards:

- ``namespace_pair()``: two namespaces joined by a veth pair with link-local addresses
  (169.254.X.1/16 in ``a``, 169.254.X.2/16 in ``b``). mDNS works across it with zeroconf's
  default interfaces, so one side can announce and serve a mock backend while the other runs
  Nexus exactly as a user would.
- ``isolated_namespace()``: one namespace with loopback only (like ``unshare -n``), for tests
  that only need "no real network".

Processes started through a ``Namespace`` are ended when its context exits, then the
namespaces are deleted (which also deletes the veth pair), even when the test failed.
Namespaces left behind by a crashed earlier run (their owner pid is gone) are removed the next
time one is made. Creating namespaces needs root: mark such tests with ``requires_root``.

Tests import it (``from netns import ...``); pytest does not collect it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# Every namespace this module makes is named PREFIX-<pid>-<n><side>; the pid lets parallel runs
# coexist and lets a later run tell which leftovers belong to a dead process.
PREFIX = "nexus-test"
IP = shutil.which("ip") or "/usr/sbin/ip"
NETNS_DIR = Path("/run/netns")
COMMAND_TIMEOUT = 10.0  # seconds for one `ip` command
STOP_TIMEOUT = 5.0  # seconds a process gets after SIGTERM before SIGKILL
HTTP_TIMEOUT = 10.0  # default bound for Namespace.http()

_counter = itertools.count()


def _can_make_namespaces() -> bool:
    return os.geteuid() == 0 and Path(IP).exists()


requires_root = pytest.mark.skipif(
    not _can_make_namespaces(), reason="needs root and iproute2 to create network namespaces"
)


class NamespaceError(RuntimeError):
    """An `ip` command failed while setting up or tearing down namespaces."""


def _ip(*args: str) -> None:
    done = subprocess.run(
        [IP, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def _existing_namespaces() -> list[str]:
    done = subprocess.run(
        [IP, "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=True
    )
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_remaining(name: str) -> None:
    """SIGKILL whatever still runs inside namespace ``name`` (e.g. a grandchild that escaped)."""
    done = subprocess.run(
        [IP, "netns", "pids", name], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
    for pid in done.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces with our prefix whose creating process is gone; return their names."""
    removed = []
    for name in _existing_namespaces():
        parts = name.split("-")
        if not name.startswith(PREFIX + "-") or len(parts) < 4 or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(NamespaceError, subprocess.TimeoutExpired):
            _kill_remaining(name)
            _ip("netns", "delete", name)
            removed.append(name)
    return removed


class NamespaceProcess(subprocess.Popen):
    """A process started inside a namespace, with bounded reads of its output.

    stdout is a text pipe read line by line (``read_line``, ``read_json``); stderr goes to a
    temporary file unless the caller redirects it, so a chatty process never blocks on a full
    pipe and its log can be shown when a test fails (``stderr_text``).
    """

    def __init__(self, args: Sequence[str], **kwargs) -> None:
        self._stderr_file = None
        if "stderr" not in kwargs:
            self._stderr_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close_streams)
            kwargs["stderr"] = self._stderr_file
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("text", True)
        # A new session so that ending it also ends anything it started.
        kwargs.setdefault("start_new_session", True)
        super().__init__(args, **kwargs)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None

    def _read_stdout(self) -> None:
        assert self.stdout is not None
        with contextlib.suppress(ValueError, OSError):  # ValueError: closed by stop()
            for line in self.stdout:
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def read_line(self, timeout: float) -> str:
        """The next line of stdout; TimeoutError or EOFError (with stderr's tail) otherwise."""
        if self._reader is None:
            self._reader = threading.Thread(target=self._read_stdout, daemon=True)
            self._reader.start()
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"no output within {timeout:.1f}s from {self.args!r}; stderr:\n{self.stderr_text()}"
            ) from None
        if line is None:
            self._lines.put(None)  # stay at EOF for later reads
            try:
                code = self.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = None
            raise EOFError(
                f"{self.args!r} closed stdout (exit {code}); stderr:\n{self.stderr_text()}"
            )
        return line

    def read_json(self, timeout: float, event: str | None = None) -> dict:
        """The next JSON object line on stdout (with ``"event": event`` if given).

        Other lines are skipped; the whole wait is bounded by ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(max(deadline - time.monotonic(), 0.0))
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and (event is None or obj.get("event") == event):
                return obj

    def send(self, line: str) -> None:
        """Write one line to the process's stdin (start it with ``stdin=subprocess.PIPE``)."""
        assert self.stdin is not None, "start the process with stdin=subprocess.PIPE"
        self.stdin.write(line + "\n")
        self.stdin.flush()

    def stderr_text(self, limit: int = 4000) -> str:
        """The last ``limit`` characters the process wrote to stderr (if we captured it)."""
        if self._stderr_file is None:
            return "(stderr not captured)"
        self._stderr_file.flush()
        self._stderr_file.seek(0)
        return self._stderr_file.read().decode(errors="replace")[-limit:]

    def stop(self) -> int | None:
        """SIGTERM its process group, then SIGKILL after STOP_TIMEOUT; return the exit code."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.wait(timeout=STOP_TIMEOUT)
        return self.returncode

    def close_streams(self) -> None:
        for stream in (self.stdout, self.stdin, self._stderr_file):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@dataclass
class Namespace:
    """One network namespace: where its processes run and the address they can be reached at."""

    name: str
    address: str  # the IPv4 address others reach this namespace at; 127.0.0.1 if loopback only
    processes: list[NamespaceProcess] = field(default_factory=list)

    def popen(self, args: Sequence[str], **kwargs) -> NamespaceProcess:
        """Start ``args`` inside this namespace; it is ended when the namespace's context exits.

        Defaults: stdin from /dev/null, stdout a text pipe, stderr a temporary file.
        """
        # `ip netns exec` execs the command itself, so the pid is the command's pid.
        proc = NamespaceProcess([IP, "netns", "exec", self.name, *args], **kwargs)
        self.processes.append(proc)
        return proc

    def run(
        self, args: Sequence[str], timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess:
        """Run ``args`` inside this namespace to completion (bounded by ``timeout``)."""
        return subprocess.run(
            [IP, "netns", "exec", self.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def python(self, code_or_path: str | Path, *args: str, **kwargs) -> NamespaceProcess:
        """Start this interpreter on a snippet (a str of code) or a script (a Path)."""
        if isinstance(code_or_path, Path):
            command = [sys.executable, "-u", str(code_or_path), *args]
        else:
            command = [sys.executable, "-u", "-c", textwrap.dedent(code_or_path), *args]
        return self.popen(command, **kwargs)

    def http(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = HTTP_TIMEOUT,
    ) -> tuple[int, bytes]:
        """Make one HTTP request from inside this namespace; return (status, body).

        A connection failure raises ``ConnectionError``.
        """
        request = json.dumps(
            {
                "method": method,
                "url": url,
                "body": None if body is None else body.decode("latin-1"),
                "headers": headers or {},
                "timeout": timeout,
            }
        )
        done = subprocess.run(
            [IP, "netns", "exec", self.name, sys.executable, "-c", _HTTP_CLIENT],
            input=request,
            capture_output=True,
            text=True,
            timeout=timeout + COMMAND_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise ConnectionError(f"{method} {url} from {self.name}: {done.stderr.strip()}")
        answer = json.loads(done.stdout)
        return answer["status"], answer["body"].encode("latin-1")

    def wait_http(self, url: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, bytes]:
        """GET ``url`` from inside this namespace until something answers (bounded by timeout).

        For a server that was just started: connection failures are retried every 0.1 s.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.http("GET", url, timeout=max(deadline - time.monotonic(), 0.5))
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop_processes(self) -> None:
        """End every process started here (they are asked to stop all at once)."""
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.processes:
            proc.stop()
            proc.close_streams()


# Runs inside a namespace for Namespace.http(): reads the request as JSON on stdin.
_HTTP_CLIENT = """
import json, sys, urllib.error, urllib.request
r = json.load(sys.stdin)
body = None if r["body"] is None else r["body"].encode("latin-1")
req = urllib.request.Request(r["url"], data=body, headers=r["headers"], method=r["method"])
try:
    with urllib.request.urlopen(req, timeout=r["timeout"]) as resp:
        status, data = resp.status, resp.read()
except urllib.error.HTTPError as e:
    status, data = e.code, e.read()
json.dump({"status": status, "body": data.decode("latin-1")}, sys.stdout)
"""


def _new_names(count: int) -> list[str]:
    base = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
    return [f"{base}{side}" for side in "ab"[:count]]


def _delete(namespaces: list[Namespace]) -> None:
    for ns in namespaces:
        ns.stop_processes()
    for ns in namespaces:
        with contextlib.suppress(NamespaceError, subprocess.TimeoutExpired):
            _kill_remaining(ns.name)
            _ip("netns", "delete", ns.name)


def _wait_link_up(ns: Namespace, device: str, timeout: float = 5.0) -> None:
    """Wait (bounded) until ``device`` has carrier, so the first packets are not lost."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            [IP, "-n", ns.name, "-o", "link", "show", device],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )
        if "state UP" in done.stdout:
            return
        if time.monotonic() > deadline:
            raise NamespaceError(f"{device} in {ns.name} not up after {timeout}s: {done.stdout}")
        time.sleep(0.02)


@contextlib.contextmanager
def isolated_namespace() -> Iterator[Namespace]:
    """One namespace with only loopback up: no route anywhere else."""
    remove_stale_namespaces()
    (name,) = _new_names(1)
    ns = Namespace(name, "127.0.0.1")
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield ns
    finally:
        _delete([ns])


@contextlib.contextmanager
def namespace_pair() -> Iterator[tuple[Namespace, Namespace]]:
    """Two namespaces joined by a veth pair: a at 169.254.X.1/16, b at 169.254.X.2/16.

    The veth ends are created directly inside the namespaces, so no interface ever appears
    in the machine's own namespace.
    """
    remove_stale_namespaces()
    name_a, name_b = _new_names(2)
    subnet = f"169.254.{os.getpid() % 254 + 1}"
    a, b = Namespace(name_a, f"{subnet}.1"), Namespace(name_b, f"{subnet}.2")
    made: list[Namespace] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns.name)
            made.append(ns)
        veth = ["type", "veth", "peer", "name", "veth0", "netns", b.name]
        _ip("link", "add", "veth0", "netns", a.name, *veth)
        for ns in (a, b):
            _ip("-n", ns.name, "addr", "add", f"{ns.address}/16", "dev", "veth0")
            _ip("-n", ns.name, "link", "set", "lo", "up")
            _ip("-n", ns.name, "link", "set", "veth0", "up")
        for ns in (a, b):
            _wait_link_up(ns, "veth0")
        yield a, b
    finally:
        _delete(made)


@pytest.fixture
def netns_pair() -> Iterator[tuple[Namespace, Namespace]]:
    """Fixture form of namespace_pair(); enable with ``pytest_plugins = ["netns"]``."""
    with namespace_pair() as pair:
        yield pair


@pytest.fixture
def netns_isolated() -> Iterator[Namespace]:
    """Fixture form of isolated_namespace()."""
    with isolated_namespace() as ns:
        yield ns
