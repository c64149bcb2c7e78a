"""Load: 1,000 concurrent streaming clients through Nexus while one backend is killed.

Every request must end in a complete answer or a clean error (an error status with an error
envelope, or a stream that ends with an error chunk and [DONE]); the server stays up and every
in-flight counter returns to 0. The backends run in processes of their own; one of them dies by
SIGKILL while answers stream from it, so its connections really break mid-answer."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web
from conftest import free_port, settings_from

import nexus

CLIENTS = 1000
REPLY = " ".join(f"word{i}" for i in range(30))
CHUNK_DELAY = 0.05  # each answer streams for about 1.5 s
KILL_WHEN_STREAMING = 100  # n1 dies (SIGKILL) 0.3 s after this many requests are on it
MOCK = Path(__file__).resolve().parent / "mock_process.py"


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))


async def start_mock(name: str, port: int, die_when_busy: int = 0) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(MOCK),
        name,
        str(port),
        str(CHUNK_DELAY),
        REPLY,
        str(die_when_busy),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.strip() == b"ready", line
    return proc


def outcome(status: int, raw: bytes) -> str:
    """complete, error (a clean one) or broken (anything a client could mistake or choke on)."""
    if status != 200:
        try:
            return "error" if "error" in json.loads(raw) else "broken"
        except ValueError:
            return "broken"
    if not raw.endswith(b"data: [DONE]\n\n"):
        return "broken"
    text, finishes, errors = "", [], 0
    for block in raw.split(b"\n\n")[:-2]:
        if not block.startswith(b"data: "):
            return "broken"
        chunk = json.loads(block[6:])
        errors += "error" in chunk
        for choice in chunk.get("choices") or []:
            text += (choice.get("delta") or {}).get("content") or ""
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    if text == REPLY and finishes == ["stop"] and not errors:
        return "complete"
    if finishes and finishes[-1] == "error" and errors == 1 and REPLY.startswith(text):
        return "error"
    return "broken"


async def test_1000_streaming_clients_while_a_backend_is_killed(tmp_path):
    raise_fd_limit(8 * CLIENTS)
    ports = [free_port() for _ in range(3)]
    procs = [
        await start_mock(f"n{i}", port, KILL_WHEN_STREAMING if i == 1 else 0)
        for i, port in enumerate(ports)
    ]
    toml = "[discovery]\nenabled = false\n[health_check]\ninterval_seconds = 30\n"
    for i, port in enumerate(ports):
        toml += f'[[backends]]\nname = "n{i}"\nurl = "http://127.0.0.1:{port}"\n'
    app = nexus.create_app(settings_from(toml, tmp_path))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    nexus_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", nexus_port, backlog=4096).start()
    url = f"http://127.0.0.1:{nexus_port}"
    registry = app[nexus.REGISTRY]
    try:
        deadline = time.monotonic() + 10
        while len(registry.healthy()) < 3:
            assert time.monotonic() < deadline, "backends not healthy in time"
            await asyncio.sleep(0.05)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> str:
                try:
                    async with session.post(url + "/v1/chat/completions", json=body) as resp:
                        return outcome(resp.status, await resp.read())
                except (aiohttp.ClientError, TimeoutError) as exc:
                    return f"dropped: {type(exc).__name__}"

            started = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(CLIENTS))), 90)
            elapsed = time.monotonic() - started
            assert procs[1].returncode == -9 or await procs[1].wait() == -9  # n1 was killed
            outcomes = Counter(results)
            served = Counter(b.name for b in registry.backends.values() for _ in range(b.requests))
            print(
                f"\n{CLIENTS} streams in {elapsed:.1f}s: {dict(outcomes)}; "
                f"attempts per backend {dict(served)}; n1 is {registry.backends['n1'].status}"
            )
            assert set(outcomes) <= {"complete", "error"}, outcomes
            assert outcomes["complete"] >= CLIENTS // 2
            assert outcomes["error"] >= 1  # streams cut by the kill ended with an error chunk
            # The server is still up and serving, and nothing is left counted as in flight.
            async with session.get(url + "/health") as resp:
                assert resp.status == 200
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                assert outcome(resp.status, await resp.read()) == "complete"
        assert registry.backends["n1"].status == "unhealthy"
        assert all(b.in_flight == 0 for b in registry.backends.values())
        assert len(app[nexus.QUEUE]) == 0
    finally:
        await runner.cleanup()
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()


def test_collector_skips_the_start_up_heap_and_runs_rarely():
    """The cyclic collector's defaults cost tens of µs per proxied request (`make bench`):
    after start-up its objects are frozen and young collections wait for more allocations."""
    import gc

    threshold = gc.get_threshold()
    try:
        nexus.tune_gc()
        assert gc.get_freeze_count() > 10_000  # modules, settings, registry: never scanned
        assert gc.get_threshold()[0] >= 10_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
