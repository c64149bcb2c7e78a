"""Reload without a restart (SPEC §1): SIGHUP and a change of the config file swap backends,
routing, keys, health and log settings; an invalid or half-written file is refused whole;
nothing in flight is cut and what Nexus knows of a backend that stays is kept.

Nexus runs as `nexus serve`, a real process (signals are real), in front of mock backends
in this test's process, with `--no-discovery` so nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ROOT, backends_toml, free_port

import nexus

NEXUS = [sys.executable, str(ROOT / "nexus.py")]
# Health polls far apart, so that what a test sees of a backend's health is what a reload kept.
SLOW_HEALTH = "[health_check]\ninterval_seconds = 60\n"
NO_WATCH = "[server]\nwatch_config = false\n"


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


class Served:
    """`nexus serve -c FILE` as a process: its URL, its log (stderr, in a file) and its file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, text: str, env: dict[str, str] | None, port_flag: bool) -> Served:
        """Start it; without port_flag the port and host are the file's (added to `text`)."""
        where = ["-p", str(self.port), "-H", "127.0.0.1"]
        if not port_flag:
            text = text.replace("[server]\n", "", 1)
            text = f'[server]\nport = {self.port}\nhost = "127.0.0.1"\n' + text
            where = []
        self.config.write_text(text)
        with self.log.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                *NEXUS,
                *("serve", "-c", str(self.config), *where),
                "--no-discovery",
                stderr=err,
                env={**os.environ, **(env or {})},
            )
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(self.url + "/health") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"nexus did not start: {self.log.read_text()}")

    def hup(self) -> None:
        assert self.proc is not None and self.proc.returncode is None
        self.proc.send_signal(signal.SIGHUP)

    def lines(self, text: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if text in line]

    async def wait_log(self, text: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(found := self.lines(text)) >= count:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"{count} x {text!r} not logged in time:\n{self.log.read_text()}")

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(self.url + path) as resp:
            assert resp.status == 200
            return await resp.json()

    async def backends(self) -> dict[str, dict[str, Any]]:
        return {b["name"]: b for b in (await self.get("/v1/backends"))["data"]}

    async def ask(self, model: str) -> tuple[int, str]:
        """A chat request: its status and the backend that answered it."""
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url + "/v1/chat/completions", json=chat(model)) as resp,
        ):
            await resp.read()
            return resp.status, resp.headers.get("X-Nexus-Backend", "")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def nexus_process(tmp_path: Path):
    started: list[Served] = []

    async def make(text: str, env: dict[str, str] | None = None, port_flag: bool = True):
        served = Served(tmp_path / "nexus.toml", tmp_path / f"nexus-{len(started)}.log")
        started.append(served)
        return await served.start(text, env, port_flag)

    yield make
    for served in started:
        await served.stop()
        assert "Traceback" not in served.log.read_text()


async def wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_sighup_adds_a_backend_and_an_alias(backend_factory, nexus_process):
    a = await backend_factory("generic", {"m-a": {}}, name="a")
    b = await backend_factory("ollama", {"m-b": {}}, name="b")
    nx = await nexus_process(NO_WATCH + backends_toml(a))
    assert await nx.ask("fast") == (404, "")
    added = await backend_factory("generic", {"m-c": {}}, name="c")
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/backends", json={"url": added.url, "name": "c"}) as resp,
    ):
        assert resp.status == 201  # through the admin API: not the file's, and it stays
    nx.config.write_text(NO_WATCH + '[routing]\naliases = { fast = "m-b" }\n' + backends_toml(a, b))
    nx.hup()
    (line,) = await nx.wait_log("config reloaded")
    assert "(SIGHUP)" in line and "+b" in line and "routing" in line
    await wait_until(lambda: _healthy(nx, "b"))
    assert await nx.ask("fast") == (200, "b")
    assert await nx.ask("m-a") == (200, "a")
    assert await nx.ask("m-c") == (200, "c")


async def _healthy(nx: Served, name: str) -> bool:
    backend = (await nx.backends()).get(name)
    return backend is not None and backend["status"] == "healthy"


async def test_a_changed_file_is_picked_up_without_a_signal(backend_factory, nexus_process):
    a = await backend_factory("generic", {"m-a": {}}, name="a")
    b = await backend_factory("generic", {"m-b": {}}, name="b")
    nx = await nexus_process(backends_toml(a))
    await asyncio.sleep(0.5)
    nx.config.write_text(backends_toml(a, b))
    started = time.monotonic()
    (line,) = await nx.wait_log("config reloaded", timeout=8)
    assert "(file changed)" in line and "+b" in line
    assert time.monotonic() - started < 5  # a poll every 2 s, then two reads that agree
    await wait_until(lambda: _healthy(nx, "b"))
    assert await nx.ask("m-b") == (200, "b")


async def test_watch_config_false_turns_off_the_watch_not_sighup(backend_factory, nexus_process):
    a = await backend_factory("generic", {"m-a": {}}, name="a")
    b = await backend_factory("generic", {"m-b": {}}, name="b")
    nx = await nexus_process(NO_WATCH + backends_toml(a))
    nx.config.write_text(NO_WATCH + backends_toml(a, b))
    await asyncio.sleep(4.5)  # two polls of the watch, were it on
    assert "b" not in await nx.backends()
    assert nx.lines("config reloaded") == []
    nx.hup()
    await nx.wait_log("config reloaded")
    assert "b" in await nx.backends()


REFUSED = [
    ("garbage", "\x00\x01 not [toml at all", "invalid setting config:"),
    ("emptied", "", "invalid setting config:"),
    ("bad value", NO_WATCH + '[routing]\nstrategy = "fastest"\n', "routing.strategy"),
    ("unknown key", "[server]\nwatch_config = false\nspeed = 3\n", "server.speed"),
    (
        "missing key variable",  # the same check as at start: the environment, not only the file
        NO_WATCH
        + '[[backends]]\nname = "cloud"\nurl = "http://127.0.0.1:9"\ntype = "openai"\n'
        + 'api_key_env = "NEXUS_TEST_NOT_SET"\n',
        "backends[0].api_key_env: variable NEXUS_TEST_NOT_SET is not set",
    ),
]


async def test_an_invalid_config_is_refused_whole_and_the_old_one_serves(
    backend_factory, nexus_process
):
    a = await backend_factory("generic", {"m-a": {}}, name="a")
    alias = '[routing]\naliases = { fast = "m-a" }\n'
    nx = await nexus_process(NO_WATCH + alias + backends_toml(a))
    for i, (what, text, key) in enumerate(REFUSED, start=1):
        nx.config.write_text(text)
        nx.hup()
        lines = await nx.wait_log("config not reloaded", count=i)
        assert len(lines) == i, what  # one line per refusal
        assert key in lines[-1] and "the running configuration stays" in lines[-1], what
        assert await nx.ask("fast") == (200, "a"), what
        assert list(await nx.backends()) == ["a"], what
    assert nx.lines("config reloaded") == []


async def test_a_deleted_file_is_refused_not_taken_for_no_file(backend_factory, nexus_process):
    a = await backend_factory("generic", {"m-a": {}}, name="a")
    b = await backend_factory("generic", {"m-b": {}}, name="b")
    nx = await nexus_process(backends_toml(a))
    nx.config.unlink()
    (line,) = await nx.wait_log("config not reloaded", timeout=8)
    assert "(file changed)" in line and "not found" in line
    assert await nx.ask("m-a") == (200, "a")  # not the defaults: a stays
    nx.config.write_text(backends_toml(a, b))  # saved again: the watch takes it
    (line,) = await nx.wait_log("config reloaded", timeout=8)
    assert "+b" in line and "-a" not in line


async def test_a_half_written_file_is_never_applied(backend_factory, nexus_process):
    """The file is saved the slow way, truncated and then written a line at a time, while the
    watch runs and SIGHUPs arrive: only the whole file is ever applied. Its prefixes include
    an empty file (no backends at all) and `b` without its type (a generic backend)."""
    a = await backend_factory("generic", {"m-a": {}}, name="a")
    b = await backend_factory("ollama", {"m-b": {}}, name="b")
    old = backends_toml(a)
    nx = await nexus_process(old)
    new = old + backends_toml(b, b={"priority": 5})
    with nx.config.open("w") as file:
        for line in new.splitlines(keepends=True):
            file.write(line)
            file.flush()
            nx.hup()
            await asyncio.sleep(0.05)  # well within the 0.3 s two reads must agree over
    await wait_until(lambda: _healthy(nx, "b"))
    backend = (await nx.backends())["b"]
    assert backend["type"] == "ollama" and backend["priority"] == 5
    await asyncio.sleep(2.5)  # the watch's next poll sees the file it has applied
    applied = nx.lines("config reloaded")
    changes = " ".join(line.split(": ", 1)[1] for line in applied)
    assert changes.count("+b") == 1 and "~b" not in changes and "-a" not in changes, applied
    assert await nx.ask("m-a") == (200, "a")


async def test_a_storm_of_sighups_is_coalesced(backend_factory, nexus_process):
    a = await backend_factory("generic", {"m-a": {}}, name="a")
    nx = await nexus_process(NO_WATCH + backends_toml(a))
    asking = asyncio.gather(*(nx.ask("m-a") for _ in range(20)))
    started = time.monotonic()
    for _ in range(10):
        nx.hup()
        await asyncio.sleep(0.1)
    storm = time.monotonic() - started
    assert {status for status, _ in await asking} == {200}
    await nx.wait_log("config reloaded")
    await asyncio.sleep(1.5)
    reloads = nx.lines("config reloaded")
    # One reload takes at least 0.5 s (0.2 s for the storm to gather, 0.3 s for two reads):
    # the signals that come meanwhile make one more.
    assert 1 <= len(reloads) <= 2 + storm / 0.5, reloads
    assert all("no changes" in line for line in reloads)
    assert nx.proc.returncode is None and await nx.ask("m-a") == (200, "a")


async def read_stream(session: aiohttp.ClientSession, url: str, model: str) -> str:
    """A whole streamed answer's text; it must end with [DONE]."""
    text = ""
    async with session.post(url + "/v1/chat/completions", json=chat(model, True)) as resp:
        assert resp.status == 200
        done = False
        async for raw in resp.content:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                choices = json.loads(line[6:])["choices"]
                if choices:
                    text += choices[0]["delta"].get("content") or ""
        assert done, "the stream was cut"
    return text


async def test_a_reload_while_200_streams_are_in_flight_cuts_none(backend_factory, nexus_process):
    slow = await backend_factory("generic", {"m": {}}, name="slow")
    slow.reply = " ".join(f"w{i}" for i in range(40))
    slow.chunk_delay = 0.1  # 4 s per stream
    other = await backend_factory("generic", {"m2": {}}, name="other")
    nx = await nexus_process(NO_WATCH + backends_toml(slow))
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        streams = [asyncio.create_task(read_stream(session, nx.url, "m")) for _ in range(200)]
        deadline = time.monotonic() + 20
        while slow.in_flight < 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert slow.in_flight == 200
        nx.config.write_text(
            NO_WATCH
            + '[routing]\naliases = { fast = "m2" }\n'
            + backends_toml(slow, other, slow={"priority": 20})
        )
        nx.hup()
        await nx.wait_log("config reloaded")
        assert slow.in_flight > 100  # the reload came while they ran
        load = {b["name"]: b["pending"] for b in (await nx.get("/v1/stats"))["backends"]}
        assert load["slow"] > 100 and load["other"] == 0  # its load was kept
        texts = await asyncio.wait_for(asyncio.gather(*streams), 60)
    assert texts == [slow.reply] * 200
    stats = await nx.get("/v1/stats")
    assert stats["requests"]["errors"] == 0 and stats["requests"]["success"] == 200
    assert (await nx.backends())["slow"]["priority"] == 20


async def test_a_removed_backend_finishes_its_stream(backend_factory, nexus_process):
    a = await backend_factory("generic", {"m-a": {}}, name="a")
    a.reply = " ".join(f"w{i}" for i in range(40))
    a.chunk_delay = 0.1  # 4 s: the reload comes while it runs
    b = await backend_factory("generic", {"m-b": {}}, name="b")
    nx = await nexus_process(NO_WATCH + backends_toml(a, b))
    async with aiohttp.ClientSession() as session:
        stream = asyncio.create_task(read_stream(session, nx.url, "m-a"))
        await wait_until(lambda: _true(a.in_flight == 1))
        nx.config.write_text(NO_WATCH + backends_toml(b))
        nx.hup()
        (line,) = await nx.wait_log("config reloaded")
        assert "-a" in line and not stream.done()
        assert list(await nx.backends()) == ["b"]
        assert (await nx.ask("m-a"))[0] == 404  # no longer routed to
        assert await asyncio.wait_for(stream, 15) == a.reply  # but its answer is whole


async def _true(value: bool) -> bool:
    return value


async def test_a_backend_that_stays_keeps_its_health_and_latency(backend_factory, nexus_process):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    dead = f'[[backends]]\nname = "dead"\nurl = "http://127.0.0.1:{free_port()}"\n'
    nx = await nexus_process(NO_WATCH + SLOW_HEALTH + backends_toml(a, b) + dead)
    for _ in range(5):
        assert (await nx.ask("m"))[0] == 200
    before = {x["name"]: x for x in (await nx.get("/v1/stats"))["backends"]}
    assert before["dead"]["status"] == "unhealthy" and before["a"]["avg_latency_ms"]
    polls = (a.polls, b.polls)
    # b's priority changes; a and the dead one stay as they were; aliases and the log level too
    nx.config.write_text(
        NO_WATCH
        + SLOW_HEALTH
        + '[logging]\nlevel = "warning"\n[routing]\naliases = { x = "m" }\n'
        + backends_toml(a, b, b={"priority": 90})
        + dead
    )
    nx.hup()
    (line,) = await nx.wait_log("config reloaded")
    assert "~b" in line and "~a" not in line and "routing" in line and "logging" in line
    await asyncio.sleep(0.5)
    after = {x["name"]: x for x in (await nx.get("/v1/stats"))["backends"]}
    for name in ("a", "b", "dead"):
        for what in ("status", "requests", "avg_latency_ms", "avg_ttft_ms", "last_error"):
            assert after[name][what] == before[name][what], (name, what)
    assert after["b"]["priority"] == 90
    assert a.polls == polls[0]  # a was not polled again: nothing about it changed
    assert await nx.ask("x") == (200, "a")  # b is now the less preferred one
    requests = len(nx.lines("request "))
    assert await nx.ask("m") == (200, "a")
    await asyncio.sleep(0.3)
    assert len(nx.lines("request ")) == requests  # level warning: request lines are info


async def test_new_health_settings_take_effect(backend_factory, nexus_process):
    a = await backend_factory("generic", {"m": {}}, name="a")
    nx = await nexus_process(NO_WATCH + SLOW_HEALTH + backends_toml(a))
    a.healthy = False  # answers 503 from now on; with a poll a minute, Nexus has not seen it
    await asyncio.sleep(0.5)
    assert (await nx.backends())["a"]["status"] == "healthy"
    fast = "[health_check]\ninterval_seconds = 0.2\nfailure_threshold = 2\n"
    nx.config.write_text(NO_WATCH + fast + backends_toml(a))
    nx.hup()
    (line,) = await nx.wait_log("config reloaded")
    assert "health_check" in line
    await wait_until(lambda: _status(nx, "a", "unhealthy"), timeout=5)
    assert (await nx.backends())["a"]["last_error"] == "HTTP 503 on /v1/models"
    a.healthy = True
    await wait_until(lambda: _status(nx, "a", "healthy"), timeout=5)


async def _status(nx: Served, name: str, status: str) -> bool:
    return (await nx.backends())[name]["status"] == status


async def test_auth_keys_are_swapped_and_a_key_that_stays_keeps_its_usage(
    backend_factory, nexus_process
):
    a = await backend_factory("generic", {"m": {}}, name="a")
    keys = '[auth]\napi_keys = [{ name = "alice", key_env = "NEXUS_TEST_ALICE", admin = true }]\n'
    env = {"NEXUS_TEST_ALICE": "alice-secret-key-1", "NEXUS_TEST_BOB": "bob-secret-key-22"}
    nx = await nexus_process(NO_WATCH + keys + backends_toml(a), env=env)

    async def ask(key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(nx.url + "/v1/chat/completions", json=chat("m"), headers=headers) as r,
        ):
            return r.status

    assert await ask("alice-secret-key-1") == 200 and await ask("bob-secret-key-22") == 401
    both = keys.replace("}]", '}, { name = "bob", key_env = "NEXUS_TEST_BOB" }]')
    nx.config.write_text(NO_WATCH + both + backends_toml(a))
    nx.hup()
    (line,) = await nx.wait_log("config reloaded")
    assert "auth" in line
    assert await ask("bob-secret-key-22") == 200 and await ask("alice-secret-key-1") == 200
    headers = {"Authorization": "Bearer alice-secret-key-1"}  # an admin key: stats need one
    async with (
        aiohttp.ClientSession() as session,
        session.get(nx.url + "/v1/stats", headers=headers) as resp,
    ):
        usage = {k["name"]: k["requests"] for k in (await resp.json())["keys"]}
    assert usage == {"alice": 2, "bob": 1}
    log = nx.log.read_text()
    assert "alice-secret-key-1" not in log and "bob-secret-key-22" not in log


async def test_a_host_or_port_change_is_logged_as_needing_a_restart(backend_factory, nexus_process):
    a = await backend_factory("generic", {"m-a": {}}, name="a")
    other = free_port()
    nx = await nexus_process(NO_WATCH + backends_toml(a), port_flag=False)
    nx.config.write_text(
        f'[server]\nwatch_config = false\nport = {other}\nhost = "0.0.0.0"\n' + backends_toml(a)
    )
    nx.hup()
    (line,) = await nx.wait_log("config reloaded")
    assert "no changes" in line
    warnings = nx.lines("takes a restart")
    assert len(warnings) == 2
    assert f"server.port changed from {nx.port} to {other}" in warnings[1]
    assert "server.host changed from '127.0.0.1' to '0.0.0.0'" in warnings[0]
    assert await nx.ask("m-a") == (200, "a")  # still where it was
    assert not await _serving(f"http://127.0.0.1:{other}")


async def _serving(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


def test_a_reload_copies_what_comes_from_the_file_and_keeps_the_rest() -> None:
    """What a reload sets on a Backend or ApiKey that stays is what the file says of it; all
    else on them (health, load, latency, usage) is kept."""
    assert set(nexus.BACKEND_SETTINGS) == {
        "name", "url", "type", "priority", "zone", "tier", "max_concurrent", "api_key_env",
        "vram_gb",
    }  # fmt: skip
    assert set(nexus.KEY_SETTINGS) == {
        "digest", "models", "admin", "rpm", "tpm", "monthly_limit_usd",
    }  # fmt: skip
