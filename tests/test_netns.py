"""The namespace harness itself, and real mDNS between two namespaces.

These prove what the discovery tests build on: namespaces are made and removed (also after a
failure or a crashed run), a loopback-only namespace reaches nothing else, and zeroconf with
its default settings sees a service announced in the other namespace of a pair, resolves it,
reaches it over the veth, and sees it leave and come back.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from netns import (
    IP,
    Namespace,
    NamespaceProcess,
    _existing_namespaces,
    isolated_namespace,
    namespace_pair,
    remove_stale_namespaces,
    requires_root,
)

pytestmark = [requires_root, pytest.mark.netns]

PEER = Path(__file__).with_name("mdns_peer.py")
MDNS_BOUND = 10.0  # seconds: discovery and removal must each happen within this
START_BOUND = 15.0  # seconds for a peer process to start and report ready
STOP_BOUND = 5.0  # seconds for a killed process to be gone
OLLAMA = "_ollama._tcp.local."


def serve_http(ns: Namespace, port: int) -> NamespaceProcess:
    """A static HTTP server on ns.address:port inside ns, started and ready."""
    code = """
        import http.server, sys
        server = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])),
                                        http.server.SimpleHTTPRequestHandler)
        print("ready", flush=True)
        server.serve_forever()
    """
    proc = ns.python(code, ns.address, str(port), cwd=Path(__file__).parent)
    assert proc.read_line(START_BOUND) == "ready"
    return proc


def free_port_here() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pair_is_linked_and_removed_on_exit() -> None:
    with namespace_pair() as (a, b):
        assert a.address.startswith("169.254.") and a.address.endswith(".1")
        assert b.address == a.address[:-1] + "2"
        assert {a.name, b.name} <= set(_existing_namespaces())
        server = serve_http(a, 8080)
        status, body = b.http("GET", f"http://{a.address}:8080/mdns_peer.py")
        assert status == 200
        assert b"def announce" in body
        # The veth lives only in the pair: the machine's own namespace never sees it.
        own = subprocess.run([IP, "-o", "link"], capture_output=True, text=True, timeout=10)
        assert f"link-netns {a.name}" not in own.stdout
    assert server.poll() is not None
    assert not {a.name, b.name} & set(_existing_namespaces())


def test_everything_is_removed_after_a_failure() -> None:
    with pytest.raises(RuntimeError, match="boom"), namespace_pair() as (a, b):
        sleeper = b.popen(["sleep", "60"])
        raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert not {a.name, b.name} & set(_existing_namespaces())


def process_gone(pid: int) -> bool:
    """True once pid has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def test_namespaces_left_by_a_crashed_run_are_removed() -> None:
    crash = """
        import os, signal, sys
        sys.path.insert(0, sys.argv[1])
        import netns
        pair = netns.namespace_pair()  # kept referenced: collecting it would clean up
        a, b = pair.__enter__()
        sleeper = b.popen(["sleep", "60"])
        print(a.name, b.name, sleeper.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(crash), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=START_BOUND,
    )
    name_a, name_b, sleeper = done.stdout.split()
    assert {name_a, name_b} <= set(_existing_namespaces())
    with isolated_namespace() as mine:
        # Making a namespace swept the dead run's ones (and what ran inside), not ours.
        assert not {name_a, name_b} & set(_existing_namespaces())
        assert mine.name in _existing_namespaces()
        assert mine.name not in remove_stale_namespaces()
    deadline = time.monotonic() + STOP_BOUND
    while not process_gone(int(sleeper)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_gone(int(sleeper))


def test_isolated_namespace_has_loopback_only() -> None:
    port = free_port_here()
    with isolated_namespace() as ns:
        links = ns.run(["ip", "-o", "link"]).stdout.splitlines()
        assert [line.split(":")[1].strip() for line in links] == ["lo"]
        assert ns.run(["ip", "-4", "route"]).stdout.strip() == ""
        with pytest.raises(ConnectionError):
            ns.wait_http(f"http://127.0.0.1:{port}/", timeout=0.5)
        # A server that starts late is waited for (what a test of `nexus serve` does).
        late = """
            import http.server, sys, time
            time.sleep(1)
            http.server.test(http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]))
        """
        ns.python(late, str(port), cwd=Path(__file__).parent)
        status, body = ns.wait_http(f"http://127.0.0.1:{port}/")
        assert status == 200
        assert b"Directory listing" in body
        # Its loopback is its own: the same port is closed in the machine's namespace.
        with pytest.raises(ConnectionRefusedError), socket.socket() as s:
            s.settimeout(5)
            s.connect(("127.0.0.1", port))


def start_browser(ns: Namespace) -> NamespaceProcess:
    browser = ns.python(PEER, "browse", "60", stdin=subprocess.PIPE)
    browser.read_json(START_BOUND, event="browsing")
    return browser


def start_announcer(ns: Namespace, port: int) -> NamespaceProcess:
    announcer = ns.python(PEER, "announce", ns.address, str(port), stdin=subprocess.PIPE)
    announcer.read_json(START_BOUND, event="announced")
    return announcer


def expect_added(browser: NamespaceProcess, a: Namespace, port: int) -> float:
    started = time.monotonic()
    added = browser.read_json(MDNS_BOUND, event="added")
    elapsed = time.monotonic() - started
    assert added["name"] == f"mock-ollama.{OLLAMA}"
    assert added["address"] == a.address
    assert added["port"] == port
    assert added["txt"] == {"type": "ollama", "api_path": "/"}
    assert added["models"] == ["llama3:8b"]
    return elapsed


def test_mdns_service_in_one_namespace_is_found_removed_and_found_again() -> None:
    """The browser runs first (Nexus up before the backend), with zeroconf's defaults."""
    timings = {}
    with namespace_pair() as (a, b):
        browser = start_browser(b)
        started = time.monotonic()
        announcer = start_announcer(a, 11434)
        browser_wait = expect_added(browser, a, 11434)
        timings["found after start"] = time.monotonic() - started
        timings["found after announced"] = browser_wait

        started = time.monotonic()
        announcer.send("unregister")
        announcer.read_json(START_BOUND, event="unregistered")
        removed = browser.read_json(MDNS_BOUND, event="removed")
        timings["removed"] = time.monotonic() - started
        assert removed["name"] == f"mock-ollama.{OLLAMA}"

        started = time.monotonic()
        announcer.send("register")
        announcer.read_json(START_BOUND, event="announced")
        expect_added(browser, a, 11434)
        timings["found again"] = time.monotonic() - started
    print(" ".join(f"{k}: {v:.2f}s" for k, v in timings.items()), file=sys.stderr)
    assert timings["removed"] < MDNS_BOUND


def test_mdns_service_announced_before_browsing_is_found() -> None:
    """The backend runs first (Nexus started later): the browser's first query finds it."""
    with namespace_pair() as (a, b):
        start_announcer(a, 11434)
        started = time.monotonic()
        browser = start_browser(b)
        expect_added(browser, a, 11434)
        elapsed = time.monotonic() - started
    print(f"found {elapsed:.2f}s after starting the browser", file=sys.stderr)
    assert elapsed < MDNS_BOUND + START_BOUND


def test_nothing_is_found_from_an_isolated_namespace() -> None:
    """A browser with loopback only starts cleanly and finds nothing (no error, no hang)."""
    with namespace_pair() as (a, _b), isolated_namespace() as alone:
        start_announcer(a, 11434)
        browser = start_browser(alone)
        with pytest.raises(TimeoutError):
            browser.read_json(3.0, event="added")
        browser.stdin.close()
        browser.wait(timeout=START_BOUND)
        assert browser.returncode == 0, browser.stderr_text()
