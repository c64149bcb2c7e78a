"""Discovery: Nexus finds backends by mDNS and by probing well-known local ports.

Everything that runs with discovery on runs inside network namespaces made by the test: mDNS
never leaves them. Nexus runs there exactly as a user starts it (`nexus serve`, defaults,
an empty working directory) and the backends it should find are real servers in the other
namespace of a pair (announced by mDNS) or on its own loopback (found by probing).
The detection that both use, and the bookkeeping of found and lost backends, are also
tested in-process against mock backends on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ROOT, MockBackend, free_port
from netns import Namespace, NamespaceProcess, isolated_namespace, namespace_pair, requires_root

import nexus

NEXUS = ROOT / "nexus.py"
PEER = Path(__file__).with_name("mdns_peer.py")
START_BOUND = 15.0  # seconds for a process to start and answer
FIND_BOUND = 15.0  # seconds for a backend to be discovered and listed
NEXUS_URL = "http://127.0.0.1:8000"
OLLAMA = "_ollama._tcp.local."
LLM = "_llm._tcp.local."
CHAT = {"model": "llama3:8b", "messages": [{"role": "user", "content": "hi"}]}

# --- helpers -------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any NEXUS_* variable of the machine running the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(extra)
    return env


def start_nexus(
    ns: Namespace, cwd: Path, *args: str, env: dict[str, str] | None = None, port: int = 8000
) -> NamespaceProcess:
    """`nexus serve ARGS` in ns, started in cwd; returns once /health answers."""
    proc = ns.python(NEXUS, "serve", *args, cwd=cwd, env=env or clean_env())
    started = time.monotonic()
    status, _ = ns.wait_http(f"http://127.0.0.1:{port}/health", timeout=START_BOUND)
    assert status == 200, proc.stderr_text()
    proc.answered_after = time.monotonic() - started  # type: ignore[attr-defined]
    return proc


def get_json(ns: Namespace, path: str, base: str = NEXUS_URL) -> Any:
    status, body = ns.http("GET", base + path)
    assert status == 200, body
    return json.loads(body)


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Call check until it returns something truthy; bounded by timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last: {value!r})")
        time.sleep(interval)


def backends(ns: Namespace, base: str = NEXUS_URL) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in get_json(ns, "/v1/backends", base)["data"]}


def model_ids(ns: Namespace) -> list[str]:
    return [m["id"] for m in get_json(ns, "/v1/models")["data"]]


def announce(ns: Namespace, *args: str, port: int = 11434, wait: bool = True) -> NamespaceProcess:
    """A mock backend in ns announced by mDNS (see mdns_peer.py for args); wait: until it is."""
    peer = ns.python(PEER, "announce", ns.address, str(port), *args, stdin=subprocess.PIPE)
    if wait:
        peer.read_json(START_BOUND, event="announced")
    return peer


def serve_mock(ns: Namespace, port: int, kind: str = "ollama") -> NamespaceProcess:
    peer = ns.python(PEER, "serve", "127.0.0.1", str(port), kind)
    peer.read_json(START_BOUND, event="serving")
    return peer


def chat(ns: Namespace) -> tuple[int, dict[str, Any]]:
    status, body = ns.http(
        "POST",
        NEXUS_URL + "/v1/chat/completions",
        json.dumps(CHAT).encode(),
        {"Content-Type": "application/json"},
    )
    return status, json.loads(body)


def log_has(proc: NamespaceProcess, *words: str) -> bool:
    """Whether one line of the process's log contains every word."""
    return any(all(w in line for w in words) for line in proc.stderr_text(200_000).splitlines())


def mdns_sockets(ns: Namespace) -> str:
    """The UDP sockets on the mDNS port inside ns."""
    out = ns.run(["ss", "-uanp"]).stdout
    return "\n".join(line for line in out.splitlines() if ":5353 " in line)


def timing(name: str, seconds: float) -> None:
    print(f"{name}: {seconds:.2f}s", file=sys.stderr)


# --- mDNS, end to end -------------------------------------------------------------------------


@pytest.mark.netns
@requires_root
def test_announced_ollama_is_found_and_serves_chat(tmp_path: Path) -> None:
    """Nexus with default settings (no file, no flags) in one namespace, Ollama in the other."""
    with namespace_pair() as (a, b):
        nexus_proc = start_nexus(b, tmp_path)
        timing("nexus answered /health after", nexus_proc.answered_after)
        assert nexus_proc.answered_after < 5.0  # discovery runs beside, never before, serving
        started = time.monotonic()
        announce(a)
        wait_until(lambda: "llama3:8b" in model_ids(b), FIND_BOUND, "announced model listed")
        timing("announced backend listed after", time.monotonic() - started)

        found = backends(b)["mock-ollama"]
        assert found["url"] == f"http://{a.address}:11434"
        assert (found["type"], found["source"], found["status"]) == (
            "ollama",
            "discovered",
            "healthy",
        )
        status, answer = chat(b)
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"] == f"Hello from the mock at {a.address}"
        assert "Traceback" not in nexus_proc.stderr_text()


@pytest.mark.netns
@requires_root
def test_vanished_backend_is_removed_after_grace_and_kept_when_it_returns(tmp_path: Path) -> None:
    grace = 3.0
    (tmp_path / "nexus.toml").write_text(f"[discovery]\ngrace_period_seconds = {grace}\n")
    with namespace_pair() as (a, b):
        start_nexus(b, tmp_path)
        peer = announce(a)
        wait_until(lambda: "mock-ollama" in backends(b), FIND_BOUND, "backend found")

        # Gone: at once out of routing (unknown), from the list only after the grace period.
        peer.send("unregister")
        peer.read_json(START_BOUND, event="unregistered")
        gone_at = time.monotonic()
        wait_until(
            lambda: backends(b)["mock-ollama"]["status"] == "unknown", FIND_BOUND, "marked lost"
        )
        timing("marked lost after", time.monotonic() - gone_at)
        assert "llama3:8b" not in model_ids(b)
        wait_until(lambda: "mock-ollama" not in backends(b), grace + FIND_BOUND, "removed")
        removed_after = time.monotonic() - gone_at
        timing("removed after", removed_after)
        assert removed_after >= grace - 0.5

        # Back: found again as new.
        peer.send("register")
        peer.read_json(START_BOUND, event="announced")
        wait_until(lambda: "llama3:8b" in model_ids(b), FIND_BOUND, "found again")

        # Gone and back within the grace period: never removed.
        peer.send("unregister")
        peer.read_json(START_BOUND, event="unregistered")
        wait_until(
            lambda: backends(b)["mock-ollama"]["status"] == "unknown", FIND_BOUND, "marked lost"
        )
        peer.send("register")
        peer.read_json(START_BOUND, event="announced")
        back_at = time.monotonic()
        wait_until(
            lambda: backends(b)["mock-ollama"]["status"] == "healthy", FIND_BOUND, "healthy again"
        )
        time.sleep(max(grace + 1.0 - (time.monotonic() - back_at), 0))
        assert backends(b)["mock-ollama"]["status"] == "healthy"
        assert "llama3:8b" in model_ids(b)


@pytest.mark.netns
@requires_root
def test_bad_announcements_are_ignored_with_a_debug_log(tmp_path: Path) -> None:
    with namespace_pair() as (a, b):
        nexus_proc = start_nexus(b, tmp_path, "--log-level", "debug")
        garbage = ["type=hex:fffe00", "api_path=hex:ff2f", "version=hex:0001ff"]
        bad = {
            "no-txt": [LLM, "no-txt", "--no-txt", "--serve=junk"],
            "garbage": [LLM, "garbage", *garbage, "--serve=junk"],
            "ghost": [OLLAMA, "ghost", "--no-address"],
            "not-llm": [OLLAMA, "not-llm", "--serve=junk"],
            "nobody": [LLM, "nobody", "type=vllm", "--serve=none"],
        }
        peers = [
            announce(a, *args, port=port, wait=False)
            for port, args in enumerate(bad.values(), start=9001)
        ]
        peers.append(announce(a, wait=False))  # and one good backend, found in spite of them
        for peer in peers:
            peer.read_json(START_BOUND, event="announced")
        started = time.monotonic()
        wait_until(lambda: "llama3:8b" in model_ids(b), FIND_BOUND, "good backend listed")
        timing("good backend listed after", time.monotonic() - started)
        for name in bad:
            wait_until(
                lambda name=name: log_has(nexus_proc, "DEBUG", repr(name), "ignored"),
                FIND_BOUND,
                f"debug line for {name}",
            )
        timing("all bad ones logged after", time.monotonic() - started)
        assert set(backends(b)) == {"mock-ollama"}
        assert chat(b)[0] == 200
        log_text = nexus_proc.stderr_text(200_000)
        assert "Traceback" not in log_text
        assert "ERROR" not in log_text
        assert nexus_proc.poll() is None


@pytest.mark.netns
@requires_root
def test_static_backend_wins_over_its_discovered_duplicate(tmp_path: Path) -> None:
    with namespace_pair() as (a, b):
        url = f"http://{a.address}:11434"
        (tmp_path / "nexus.toml").write_text(
            f'[[backends]]\nname = "gpu-box"\nurl = "{url}"\ntype = "ollama"\n'
        )
        announce(a)  # already there when Nexus starts, so the static backend is healthy at once
        nexus_proc = start_nexus(b, tmp_path, "--log-level", "debug")
        wait_until(
            lambda: log_has(nexus_proc, "DEBUG", url, "gpu-box"), FIND_BOUND, "duplicate seen"
        )
        listed = backends(b)
        assert set(listed) == {"gpu-box"}
        assert listed["gpu-box"]["source"] == "static"
        assert chat(b)[0] == 200


@pytest.mark.netns
@requires_root
def test_nexus_never_adds_itself_or_another_nexus_found_by_mdns(tmp_path: Path) -> None:
    with namespace_pair() as (a, b):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first = start_nexus(a, tmp_path / "a", "--log-level", "debug")
        second = start_nexus(b, tmp_path / "b", "--log-level", "debug")
        for proc in (first, second):
            wait_until(lambda p=proc: log_has(p, "announcing Nexus"), FIND_BOUND, "announced")
            wait_until(lambda p=proc: log_has(p, "is this Nexus"), FIND_BOUND, "own seen")
            wait_until(lambda p=proc: log_has(p, "is a Nexus"), FIND_BOUND, "other seen")
        assert backends(a) == {}
        assert backends(b) == {}


# --- probing well-known local ports, end to end ------------------------------------------------


@pytest.mark.netns
@requires_root
def test_local_ollama_on_its_well_known_port_is_served(tmp_path: Path) -> None:
    with isolated_namespace() as ns:
        serve_mock(ns, 11434)
        started = time.monotonic()
        start_nexus(ns, tmp_path)
        wait_until(lambda: "llama3:8b" in model_ids(ns), FIND_BOUND, "local model")
        timing("local ollama listed after", time.monotonic() - started)
        listed = backends(ns)
        assert [(b["url"], b["type"], b["source"]) for b in listed.values()] == [
            ("http://127.0.0.1:11434", "ollama", "discovered")
        ]
        status, answer = chat(ns)
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"] == "Hello from the mock at 127.0.0.1"
        assert mdns_sockets(ns)  # discovery on: mDNS browsing too


@pytest.mark.netns
@requires_root
def test_local_backend_that_stops_is_removed_and_found_when_it_returns(tmp_path: Path) -> None:
    """A crashed server says no goodbye: health checks see it down, probing sees it gone."""
    grace = 2.0
    (tmp_path / "nexus.toml").write_text(
        f"[discovery]\ngrace_period_seconds = {grace}\n"
        "[health_check]\ninterval_seconds = 0.5\nfailure_threshold = 1\n"
    )
    with isolated_namespace() as ns:
        mock = serve_mock(ns, 11434)
        start_nexus(ns, tmp_path)
        wait_until(lambda: "local-ollama" in backends(ns), FIND_BOUND, "local backend found")
        mock.stop()
        stopped_at = time.monotonic()
        wait_until(lambda: "local-ollama" not in backends(ns), grace + FIND_BOUND, "removed")
        removed_after = time.monotonic() - stopped_at
        timing("stopped local backend removed after", removed_after)
        assert removed_after >= grace - 0.5
        serve_mock(ns, 11434)
        wait_until(lambda: "llama3:8b" in model_ids(ns), FIND_BOUND, "found again")


@pytest.mark.netns
@requires_root
def test_probed_nexus_and_own_port_are_skipped(tmp_path: Path) -> None:
    with isolated_namespace() as ns:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first = start_nexus(ns, tmp_path / "a", "--log-level", "debug")
        # The second listens on llama.cpp's well-known port 8080 and probes 8000: the first one.
        second = start_nexus(ns, tmp_path / "b", "-p", "8080", "--log-level", "debug", port=8080)
        wait_until(
            lambda: log_has(second, "DEBUG", "http://127.0.0.1:8000", "is a Nexus"),
            FIND_BOUND,
            "probed Nexus skipped",
        )
        assert not log_has(second, "http://127.0.0.1:8080")  # its own port is never probed
        assert backends(ns) == {}
        assert backends(ns, "http://127.0.0.1:8080") == {}
        assert first.poll() is None and second.poll() is None


@pytest.mark.netns
@requires_root
@pytest.mark.parametrize(
    ("args", "env", "toml"),
    [
        (["--no-discovery"], {}, ""),
        ([], {"NEXUS_DISCOVERY": "false"}, ""),
        ([], {}, "[discovery]\nenabled = false\n"),
    ],
    ids=["flag", "environment", "file"],
)
def test_discovery_off_sends_no_probe_and_opens_no_mdns_socket(
    tmp_path: Path, args: list[str], env: dict[str, str], toml: str
) -> None:
    if toml:
        (tmp_path / "nexus.toml").write_text(toml)
    with isolated_namespace() as ns:
        mock = serve_mock(ns, 11434)
        start_nexus(ns, tmp_path, *args, env=clean_env(**env))
        with pytest.raises(TimeoutError):
            mock.read_json(2.0, event="request")
        assert model_ids(ns) == []
        assert mdns_sockets(ns) == ""


# --- detection and bookkeeping, in-process on 127.0.0.1 -----------------------------------------


@pytest.mark.parametrize("kind", ["ollama", "llamacpp", "lmstudio", "vllm", "generic"])
async def test_detect_backend_type(backend_factory, nexus_factory, kind: str) -> None:
    mock = await backend_factory(kind)
    running = await nexus_factory()
    session = running.app[nexus.CLIENT]
    assert await nexus.detect_backend_type(session, mock.url) == kind


async def test_detect_says_what_is_no_backend(nexus_factory) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>It works!</html>", content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", page)
    junk = TestServer(app, host="127.0.0.1", port=free_port())
    await junk.start_server()
    try:
        running = await nexus_factory()
        session = running.app[nexus.CLIENT]
        assert await nexus.detect_backend_type(session, f"http://127.0.0.1:{junk.port}") is None
        refused = f"http://127.0.0.1:{free_port()}"
        assert await nexus.detect_backend_type(session, refused) is None
        assert await nexus.detect_backend_type(session, running.url) == "nexus"
    finally:
        await junk.close()


async def test_found_lost_and_grace_period_in_process(backend_factory, nexus_factory) -> None:
    mock = await backend_factory("ollama", name="box")
    static = await backend_factory("ollama", name="static")
    running = await nexus_factory(
        f'[discovery]\nenabled = false\ngrace_period_seconds = 0.3\n[[backends]]\nname = "box"\n'
        f'url = "{static.url}"\ntype = "ollama"\n'
    )
    discovery = nexus.Discovery(running.app)
    try:
        # A name taken by a static backend gets a suffix; the static one's URL is not added.
        await discovery.found("box", mock.url, "ollama")
        await discovery.found("dup", static.url + "/v1", None)
        assert set(running.registry.backends) == {"box", "box-2"}
        found = running.backend("box-2")
        assert (found.url, found.source, found.status) == (mock.url, "discovered", "healthy")
        assert "llama3:8b" in running.registry.by_model

        discovery.lost("box")
        assert found.status == "unknown" and found.lost_at is not None
        discovery.lost("dup")  # never added, so nothing to lose: the static one stays
        assert running.backend("box").lost_at is None
        await discovery.found("box", mock.url, "ollama")  # back in time: removal cancelled
        assert found.lost_at is None and found.status == "healthy"
        await asyncio.sleep(0.5)
        assert "box-2" in running.registry.backends

        discovery.lost("box")
        await asyncio.sleep(0.5)
        assert set(running.registry.backends) == {"box"}

        # Gone for good, then back: added again. Removed through the admin API: stays removed.
        await discovery.found("box", mock.url, "ollama")
        assert running.backend("box-2").status == "healthy"
        async with (
            aiohttp.ClientSession() as client,
            client.delete(running.url + "/v1/backends/box-2") as resp,
        ):
            assert resp.status == 200
        await discovery.found("box", mock.url, "ollama")
        assert set(running.registry.backends) == {"box"}
    finally:
        await discovery.stop()


async def test_an_announcement_cancelled_while_reported_is_reported_again() -> None:
    reported: list[str] = []
    entered = asyncio.Event()

    async def on_found(name: str, url: str, type_hint: str | None) -> None:
        reported.append(url)
        if len(reported) == 1:
            entered.set()
            await asyncio.sleep(10)  # detection of the first report, cut short below

    mdns = nexus.MdnsDiscovery(on_found, lambda name: None, 8000, "127.0.0.1")
    service = nexus.MdnsService("box", "http://127.0.0.1:9/", "ollama")
    first = asyncio.create_task(mdns.report("box._ollama._tcp.local.", service))
    await asyncio.wait_for(entered.wait(), 2)
    first.cancel()  # as on_change does when the same name changes again
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(mdns.report("box._ollama._tcp.local.", service), 2)
    assert reported == [service.url, service.url]
    await asyncio.wait_for(mdns.report("box._ollama._tcp.local.", service), 2)
    assert len(reported) == 2  # reported once it went through: not again while unchanged


class SlowFirstShow(MockBackend):
    """An Ollama whose first /api/show hangs: a poll in progress when its task is cancelled."""

    def __init__(self) -> None:
        super().__init__("ollama", None, "box")
        self.shows = 0

    async def ollama_show(self, request: web.Request) -> web.Response:
        self.shows += 1
        if self.shows == 1:
            await asyncio.sleep(3)
        return await super().ollama_show(request)


async def test_cancelled_first_poll_is_made_again_without_health_checks(nexus_factory) -> None:
    mock = await SlowFirstShow().start()
    running = await nexus_factory("[health_check]\nenabled = false\n")
    discovery = nexus.Discovery(running.app)
    try:
        first = asyncio.create_task(discovery.found("box", mock.url, "ollama"))
        await asyncio.wait_for(wait_for_value(lambda: mock.shows == 1), 2)
        first.cancel()  # the announcement changed while its backend was being polled
        await asyncio.gather(first, return_exceptions=True)
        assert running.backend("box").status == "unknown"
        await discovery.found("box", mock.url, "ollama")  # the new announcement's report
        assert running.backend("box").status == "healthy"
        assert "llama3:8b" in running.registry.by_model
    finally:
        await discovery.stop()
        await mock.stop()


async def test_lost_backend_healthy_again_by_its_polls_is_kept(
    backend_factory, nexus_factory
) -> None:
    mock = await backend_factory("ollama", name="box")
    running = await nexus_factory(
        "[discovery]\nenabled = false\ngrace_period_seconds = 0.5\n"
        "[health_check]\ninterval_seconds = 0.1\ntimeout_seconds = 1\n"
    )
    discovery = nexus.Discovery(running.app)
    try:
        await discovery.found("box", mock.url, "ollama")
        backend = running.backend("box")
        discovery.lost("box")  # its announcement went, but it still answers its health polls
        assert backend.status == "unknown"
        await asyncio.wait_for(wait_for_value(lambda: backend.status == "healthy"), 2)
        await asyncio.sleep(0.8)  # past the grace period
        assert running.registry.backends.get("box") is backend
        assert backend.lost_at is None
        discovery.lost("box")  # lost again later: the grace period runs again
        assert backend.lost_at is not None
    finally:
        await discovery.stop()


async def wait_for_value(check: Callable[[], Any]) -> None:
    for _ in range(500):  # 5 s at most
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")
