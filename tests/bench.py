"""Nexus benchmark suite (`make bench`): what a request costs when it goes through Nexus.

Everything runs on 127.0.0.1 in separate processes: a fast mock OpenAI-compatible backend
(a raw asyncio protocol with canned bytes, so it is never the bottleneck), the gateway under
test, and the load generators (this process, `wrk` when installed, and worker processes).
Every figure that depends on the backend is measured in the same run directly against the
mock and through the gateway, in interleaved batches, and "added" is the difference.

    python tests/bench.py [--target nexus|binary|relay|mock] [--quick] [--only SECTIONS]

What the sections measure:
  rss        RSS after start-up and one request, then after 10,000 requests.
  seq        One keep-alive connection, requests one after another (2,000 per side after
             a warm-up); latency from the write to the last byte, taken as bytes arrive.
  conc       100 closed-loop clients while the mock takes 100 ms per answer (their starts
             spread over those 100 ms, so they do not move in lockstep waves).
  stream     20-chunk streams back to back: first chunk (TTFB) and whole stream; then
             chunks 1 ms apart: how much later each chunk arrives through the gateway.
  doors      each front door (the Responses API, Ollama's API) beside chat completions, on
             the same gateway and mock: what the door's translation adds at p50, whole and
             streamed.
  throughput 64 connections as fast as they go (wrk), and the gateway's CPU per request
             from /proc/<pid>/stat (utime + stime) before and after.
  openloop   500 requests/s on a fixed schedule whatever the answers (no coordinated
             omission), latency counted from when each request was due.
  streams    1,000 streams open at once, each held about 30 s: completed, errors, RSS.
  reload     64 closed-loop clients while the config file changes and Nexus gets a SIGHUP:
             errors, and the p99 of the second the reload lands in against the others'.
  backends   RSS with 1,000 extra configured backends against one, per backend.
  routing    nexus.route on a 100 KB prompt among 10, 100 and 1,000 backends, in process,
             with the session-affinity lookup (hash of the opening, table of 10,000).
  ledger     the ledger's CPU per cloud request (counting on the loop, then its row write
             in the worker thread, taken whole for each request), in process.
  lifecycle  what knowing where models are loaded costs: an Ollama health poll (model list and
             /api/ps in parallel) against the same poll without /api/ps, wall time and CPU
             per backend, in process; and the routing decision among 1,000 Ollama backends,
             a third of them without the model loaded (warm before cold).
  binary     dist/nexus: size, and start to first served request (median of 5).
  ceiling    the load generators against the mock alone: the most they can measure.
  affinity   (needs the engine: `make engine`) three coding-agent sessions of four turns with
             a 2,000-token opening on two real llama-servers: time to first token per turn
             through Nexus with session affinity on and off, and directly against one server.
  instructions  (only when named in --only; needs valgrind) CPU instructions per request and
             per 20-chunk stream, gateway beside the bare relay, counted by callgrind: the one
             figure a busy host does not change, for comparing code changes.

`--target relay` runs a bare aiohttp pass-through relay instead of Nexus: the floor that any
aiohttp-based gateway sits on. `--target mock` puts a second mock in the gateway's place, so
every "added" figure shows the measurement's own noise (about 0 on a quiet machine).
The table goes to stdout, and the run is appended to bench-results.json for comparison.
Other load on the host is measured per section and reported: on a shared machine the p99
figures mean little, and `--nice N` (root) raises the benchmark's scheduling priority.
This is a script, not a test module: pytest collects test_*.py only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
MODEL = "bench-model"
CHUNKS = 20  # content chunks in a mock stream, followed by `data: [DONE]`
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# --------------------------------------------------------------------------------------------
# Mock backend: canned OpenAI-compatible answers from a raw asyncio protocol.
# It must cost far less per request than any gateway; it parses only what it needs.
# --------------------------------------------------------------------------------------------

COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from the benchmark backend."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": CHUNKS, "total_tokens": 12 + CHUNKS},
}
MODELS = {
    "object": "list",
    "data": [{"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "bench"}],
}


def http_response(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
        + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse_chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    chunk: dict = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        chunk["usage"] = usage
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


CANNED_COMPLETION = http_response("200 OK", json.dumps(COMPLETION).encode())
CANNED_MODELS = http_response("200 OK", json.dumps(MODELS).encode())
CANNED_HEALTH = http_response("200 OK", b'{"status":"ok"}')
# An Ollama's model list, details and loaded models, for the lifecycle section's health polls.
OLLAMA_TAGS = {"models": [{"name": MODEL, "model": MODEL, "digest": "sha-bench", "size": 1 << 30}]}
OLLAMA_SHOW = {"capabilities": ["completion"], "model_info": {"llama.context_length": 131072}}
OLLAMA_PS = {"models": [{"name": MODEL, "model": MODEL, "size": 1 << 30, "size_vram": 1 << 30}]}
CANNED_TAGS = http_response("200 OK", json.dumps(OLLAMA_TAGS).encode())
CANNED_SHOW = http_response("200 OK", json.dumps(OLLAMA_SHOW).encode())
CANNED_PS = http_response("200 OK", json.dumps(OLLAMA_PS).encode())
CANNED_404 = http_response(
    "404 Not Found", b'{"error":{"message":"not found","type":"invalid_request_error"}}'
)
OLLAMA_ANSWERS = (
    (b"get /api/tags", CANNED_TAGS),
    (b"post /api/show", CANNED_SHOW),
    (b"get /api/ps", CANNED_PS),
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
STREAM_CHUNKS = [
    http_chunk(sse_chunk({"role": "assistant", "content": "tok0 "}))
    if i == 0
    else http_chunk(sse_chunk({}, "stop"))
    if i == CHUNKS - 1
    else http_chunk(sse_chunk({"content": f"tok{i} "}))
    for i in range(CHUNKS)
]
STREAM_USAGE = http_chunk(sse_chunk({}, usage=COMPLETION["usage"]))
STREAM_DONE = http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def split_request(buf: bytearray) -> tuple[bytes, bytes, bytes, int] | None:
    """(request line, lower-cased headers, body, bytes consumed) once a request is complete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    line_end = head.find(b"\r\n")
    line, headers = (head, b"") if line_end < 0 else (head[:line_end], head[line_end:])
    start = end + 4
    m = re.search(rb"\r\ncontent-length:\s*(\d+)", headers)
    if m:
        stop = start + int(m.group(1))
        return (line, headers, bytes(buf[start:stop]), stop) if len(buf) >= stop else None
    if b"chunked" in headers:
        body, pos = bytearray(), start
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                final = buf.find(b"\r\n\r\n", eol)
                return (line, headers, bytes(body), final + 4) if final >= 0 else None
            if len(buf) < eol + 2 + size + 2:
                return None
            body += buf[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
    return line, headers, b"", start


class MockBackend(asyncio.Protocol):
    """One keep-alive connection to the mock backend. Requests are answered in order.

    Behaviour comes from the request body, which any gateway must pass through untouched:
    `stream`, `stream_options.include_usage`, `mock_delay_ms` (before the answer or the first
    chunk) and `mock_chunk_gap_ms` (between stream chunks; 0 writes them back to back)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.close_after = False
        self.timer: asyncio.TimerHandle | None = None
        self.pending: list[bytes] = []
        self.gap = 0.0
        self.first_at = 0.0
        self.written = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.timer:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.serve_buffered()

    def serve_buffered(self) -> None:
        while not self.busy and self.transport is not None:
            parsed = split_request(self.buf)
            if parsed is None:
                return
            line, headers, body, used = parsed
            del self.buf[:used]
            self.close_after = b"connection: close" in headers
            self.answer(line, body)

    def answer(self, line: bytes, body: bytes) -> None:
        assert self.transport is not None
        if line.startswith(b"post /v1/chat/completions"):
            if b'"stream"' not in body and b'"mock_' not in body:
                return self.finish(CANNED_COMPLETION)
            opts = json.loads(body)
            delay = float(opts.get("mock_delay_ms", 0)) / 1000
            if opts.get("stream") is True:
                self.gap = float(opts.get("mock_chunk_gap_ms", 0)) / 1000
                usage = (opts.get("stream_options") or {}).get("include_usage") is True
                self.pending = [*STREAM_CHUNKS, *([STREAM_USAGE] if usage else []), STREAM_DONE]
                self.busy = True
                self.transport.write(STREAM_HEAD)
                self.timer = None
                if delay:
                    loop = asyncio.get_running_loop()
                    loop.call_later(delay, self.write_chunks)
                else:
                    self.write_chunks()
                return None
            if delay:
                self.busy = True
                loop = asyncio.get_running_loop()
                self.timer = loop.call_later(delay, self.finish, CANNED_COMPLETION)
                return None
            return self.finish(CANNED_COMPLETION)
        if line.startswith(b"get /v1/models"):
            return self.finish(CANNED_MODELS)
        if line.startswith(b"get /health"):
            return self.finish(CANNED_HEALTH)
        for start, canned in OLLAMA_ANSWERS:
            if line.startswith(start):
                return self.finish(canned)
        return self.finish(CANNED_404)

    def write_chunks(self) -> None:
        loop = asyncio.get_running_loop()
        if self.timer is None:
            self.first_at, self.written = loop.time(), 0
        self.timer = None
        while self.pending and self.transport is not None:
            chunk = self.pending.pop(0)
            if not self.pending:
                return self.finish(chunk)
            self.transport.write(chunk)
            self.written += 1
            if self.gap:
                # On a fixed schedule from the first chunk, so a slow write never shifts the rest.
                due = self.first_at + self.written * self.gap
                self.timer = loop.call_at(due, self.write_chunks)
                return None
        return None

    def finish(self, data: bytes) -> None:
        self.timer = None
        if self.transport is None:
            return
        self.transport.write(data)
        self.busy = False
        if self.close_after:
            self.transport.close()
        elif self.buf:
            self.serve_buffered()


def run_mock(port: int) -> None:
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(MockBackend, HOST, port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


# --------------------------------------------------------------------------------------------
# Reference relay: a bare aiohttp pass-through with one pooled ClientSession. No routing, no
# parsing: the floor under any aiohttp gateway, and a check on the measurement itself.
# --------------------------------------------------------------------------------------------


def run_relay(port: int, backend: str) -> None:
    from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

    session_key = web.AppKey("session", ClientSession)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        # limit=0: the default pool of 100 connections would queue the 1,000-stream test.
        app[session_key] = ClientSession(
            connector=TCPConnector(limit=0), timeout=ClientTimeout(total=None, sock_connect=5)
        )
        yield
        await app[session_key].close()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session = request.app[session_key]
        headers = {"Content-Type": "application/json"}
        async with session.post(backend + "/v1/chat/completions", data=body, headers=headers) as r:
            ctype = r.headers.get("Content-Type", "application/json")
            if ctype.startswith("text/event-stream"):
                resp = web.StreamResponse(status=r.status, headers={"Content-Type": ctype})
                await resp.prepare(request)
                async for data in r.content.iter_any():
                    await resp.write(data)
                await resp.write_eof()
                return resp
            return web.Response(
                status=r.status, body=await r.read(), headers={"Content-Type": ctype}
            )

    async def models(request: web.Request) -> web.Response:
        async with request.app[session_key].get(backend + "/v1/models") as r:
            return web.Response(
                status=r.status, body=await r.read(), content_type="application/json"
            )

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    web.run_app(app, host=HOST, port=port, access_log=None, print=None, backlog=4096)


# --------------------------------------------------------------------------------------------
# Client: keep-alive HTTP/1.1 connections that timestamp bytes as they arrive. Latency is
# taken in data_received (perf_counter_ns), so the client's own wake-up costs are not in it.
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Reply:
    status: int
    start_ns: int  # request written
    end_ns: int  # last byte of the response
    events: list[int]  # arrival of each complete SSE event (`\n\n`), in ns
    body: bytes

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def ttfb_ms(self) -> float:
        return ((self.events[0] if self.events else self.end_ns) - self.start_ns) / 1e6

    @property
    def stream_ok(self) -> bool:
        return (
            self.status == 200 and len(self.events) == CHUNKS + 1 and b"data: [DONE]" in self.body
        )


class ClientConn(asyncio.Protocol):
    """One client connection; one request at a time; responses parsed incrementally."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.buf = bytearray()
        self.waiter: asyncio.Future[Reply] | None = None
        self.on_first_event: Callable[[], None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.state = "idle"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if self.state == "eof":
                self.complete(time.perf_counter_ns())
            else:
                self.fail(ConnectionError(f"connection lost ({exc or 'closed by peer'})"))

    async def send(self, raw: bytes, timeout: float = 30.0) -> Reply:
        if self.closed or self.transport is None:
            raise ConnectionError("connection closed")
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.timer = loop.call_later(timeout, self.fail, TimeoutError(f"no answer in {timeout}s"))
        self.state, self.status, self.length, self.keep_alive = "head", 0, -1, True
        self.chunk_left, self.body, self.scan, self.events = 0, bytearray(), 0, []
        self.start_ns = time.perf_counter_ns()
        self.transport.write(raw)
        return await self.waiter

    def fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.timer:
            self.timer.cancel()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def complete(self, now: int) -> None:
        if self.timer:
            self.timer.cancel()
        reply = Reply(self.status, self.start_ns, now, self.events, bytes(self.body))
        self.state = "idle"
        if not self.keep_alive and self.transport is not None:
            self.closed = True
            self.transport.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(reply)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        if self.waiter is None or self.waiter.done():
            return  # nothing asked: stray bytes after an abandoned request
        self.buf += data
        try:
            self.parse(now)
        except (ValueError, IndexError) as exc:
            self.fail(ValueError(f"malformed response: {exc}"))

    def take_body(self, data: bytes | bytearray, now: int) -> None:
        self.body += data
        while True:
            idx = self.body.find(b"\n\n", self.scan)
            if idx < 0:
                break
            self.scan = idx + 2
            self.events.append(now)
            if len(self.events) == 1 and self.on_first_event is not None:
                self.on_first_event()
        self.scan = max(self.scan, len(self.body) - 1)

    def parse(self, now: int) -> None:
        buf = self.buf
        if self.state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            self.status = int(head[9:12])
            m = re.search(rb"\r\ncontent-length:\s*(\d+)", head)
            if b"\r\ntransfer-encoding: chunked" in head:
                self.state = "chunked"
            elif m:
                self.state, self.length = "length", int(m.group(1))
            else:
                self.state = "eof"
            self.keep_alive = b"\r\nconnection: close" not in head and self.state != "eof"
        if self.state == "length":
            take = min(len(buf), self.length - len(self.body))
            if take:
                self.take_body(buf[:take], now)
                del buf[:take]
            if len(self.body) >= self.length:
                self.complete(now)
        elif self.state == "eof":
            self.take_body(buf, now)
            buf.clear()
        elif self.state in ("chunked", "trailer"):
            self.parse_chunked(now)

    def parse_chunked(self, now: int) -> None:
        buf = self.buf
        while buf:
            if self.state == "trailer":
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                del buf[: eol + 2]
                if eol == 0:
                    return self.complete(now)
                continue
            if self.chunk_left > 0:
                take = min(len(buf), self.chunk_left)
                self.take_body(buf[:take], now)
                del buf[:take]
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.chunk_left = -2  # the CRLF after the chunk's data
                continue
            if self.chunk_left == -2:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.chunk_left = 0
                continue
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            size = int(bytes(buf[:eol]).split(b";")[0], 16)
            del buf[: eol + 2]
            if size == 0:
                self.state = "trailer"
            else:
                self.chunk_left = size
        return None


async def connect(port: int) -> ClientConn:
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(loop.create_connection(ClientConn, HOST, port), 10)
    return conn


class Client:
    """A keep-alive connection that reopens itself when the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: ClientConn | None = None

    async def send(self, raw: bytes, timeout: float = 30.0) -> Reply:
        if self.conn is None or self.conn.closed:
            self.conn = await connect(self.port)
        return await self.conn.send(raw, timeout)

    def close(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()


def chat_request(port: int, stream: bool = False, **extra: object) -> bytes:
    body: dict = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 32,
        **({"stream": True} if stream else {}),
        **extra,
    }
    data = json.dumps(body).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def post_request(port: int, path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def get_request(port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def pcts(values: list[float]) -> dict[str, float]:
    return {f"p{q}": pct(values, q) for q in (50, 90, 99)} | {"n": len(values)}


# --------------------------------------------------------------------------------------------
# Throughput load generator worker (its own process): closed loop, C connections, D seconds.
# --------------------------------------------------------------------------------------------


def run_loadgen(port: int, concurrency: int, duration: float, stream: bool) -> None:
    async def go() -> dict:
        raw = chat_request(port, stream=stream)
        stop = time.monotonic() + duration
        done = errors = 0

        async def worker() -> None:
            nonlocal done, errors
            client = Client(port)
            while time.monotonic() < stop:
                try:
                    reply = await client.send(raw, 10)
                    if reply.status == 200:
                        done += 1
                    else:
                        errors += 1
                except (OSError, TimeoutError, ValueError):
                    errors += 1
            client.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"requests": done, "errors": errors, "seconds": time.perf_counter() - t0}

    print(json.dumps(asyncio.run(go())), flush=True)


# --------------------------------------------------------------------------------------------
# Processes: every child in its own session, killed with its whole group at the end (also on
# Ctrl-C or error), and told by the kernel to stop if this process dies first.
# --------------------------------------------------------------------------------------------

CHILDREN: list[subprocess.Popen] = []
LEADERS: set[int] = set()  # children started in a session of their own
PRIORITY = [0]  # --nice: how much higher than normal every benchmark process runs


def raise_priority(pid: int) -> None:
    """With autogroup scheduling each session competes as one unit whatever its processes'
    nice values, so the session's autogroup is raised too."""
    if PRIORITY[0]:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, pid, -PRIORITY[0])
        with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(-PRIORITY[0]))


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            cwd=REPO,
        )
    CHILDREN.append(proc)
    LEADERS.add(proc.pid)
    raise_priority(proc.pid)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 5 s; to the whole group when the process leads one."""
    leader = proc.pid in LEADERS

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if leader:
                os.killpg(proc.pid, sig)  # the process and whatever it started
            else:
                proc.send_signal(sig)

    if proc.poll() is None:
        send(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            proc.wait(5)
    if leader:
        send(signal.SIGKILL)  # leftovers of the group (e.g. a one-file bootloader's child)
        LEADERS.discard(proc.pid)
    if proc in CHILDREN:
        CHILDREN.remove(proc)


def stop_all() -> None:
    for proc in list(CHILDREN):
        stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (a PyInstaller one-file binary runs as bootloader + child)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, []))
    return tree


def rss_mb(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE_KB
    return total / 1024


def cpu_seconds(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def host_cpu() -> list[int]:
    """Aggregate /proc/stat cpu counters: user nice system idle iowait irq softirq steal."""
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


class NoiseMeter:
    """CPU time that processes outside this benchmark took on the host, per section, as a
    percentage of the machine. Anything above a few percent makes the figures unreliable."""

    def __init__(self) -> None:
        self.sections: dict[str, float] = {}
        self.name: str | None = None
        self.last = self.snapshot()

    @staticmethod
    def snapshot() -> tuple[float, float, float]:
        host = host_cpu()
        busy = (sum(host) - host[3] - host[4]) / CLK_TCK
        t = os.times()  # children_*: the processes already stopped and waited for
        ours = cpu_seconds(os.getpid()) + t.children_user + t.children_system
        return time.monotonic(), busy, ours

    def mark(self, name: str | None) -> None:
        if name == self.name:
            return
        now = self.snapshot()
        wall = now[0] - self.last[0]
        if self.name is not None and wall > 0.5:  # shorter spans are all rounding
            _, busy, ours = (a - b for a, b in zip(now, self.last, strict=True))
            share = max(0.0, busy - ours) / max(wall * (os.cpu_count() or 1), 1e-9) * 100
            self.sections[self.name] = round(share, 1)
        self.name, self.last = name, now


async def wait_ready(port: int, raw: bytes, proc: subprocess.Popen | None, limit: float) -> float:
    """Seconds until `raw` is answered 200 on port, polling every 2 ms, at most `limit`."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} while starting")
        try:
            conn = await connect(port)
            try:
                reply = await conn.send(raw, 5)
            finally:
                if conn.transport:
                    conn.transport.close()
            if reply.status == 200:
                return time.perf_counter() - t0
        except (OSError, TimeoutError, ValueError):
            pass
        await asyncio.sleep(0.002)
    raise RuntimeError(f"port {port} did not answer 200 within {limit:.0f}s")


# --------------------------------------------------------------------------------------------
# Routing decision time. The one function to adapt when nexus.route's signature changes.
# --------------------------------------------------------------------------------------------


ROUTING_SAMPLES = 500  # decisions timed per size, each on a body of its own


def routing_case(
    nexus: ModuleType, n_backends: int, payload: dict, cold_every: int = 0
) -> Callable[[], object]:
    """Return a zero-argument callable that makes one complete routing decision for `payload`
    (a chat request with a 100 KB prompt, in its second turn) among `n_backends` healthy
    backends that all serve its model: extracting the request's needs from the payload (token
    estimate included), finding its session (hashing the opening) and the backend of its last
    turn in a full session table, and choosing. Each call gets a freshly decoded copy of the
    body, as a request would, so the opening's hash is computed, not cached. Build the
    registry, table and bodies here, outside the timed call. With `cold_every`, the backends
    are Ollamas that say what they hold, and every such one has the model cold."""
    registry = nexus.Registry()
    for i in range(n_backends):
        backend = nexus.Backend(
            name=f"b{i}", url=f"http://{HOST}:{20000 + i}", type="generic", status="healthy"
        )
        backend.models = {MODEL: nexus.Model(id=MODEL, context_length=131072)}
        if cold_every:
            backend.type = "ollama"
            backend.loaded = {} if i % cold_every == 0 else {MODEL: 1 << 30}
        registry.add(backend)
    settings = nexus.Settings()
    headers: dict[str, str] = {}
    table = nexus.SessionTable()
    now = time.monotonic()
    for i in range(nexus.SESSIONS_MAX):
        table.note(hash(("other", i)), f"b{i % n_backends}", None, now)
    key, _ = nexus.session_key(headers, payload)
    table.note(key, f"b{n_backends // 2}", None, now)
    raw = json.dumps(payload)
    bodies = iter([json.loads(raw) for _ in range(ROUTING_SAMPLES + 1)])

    def decide() -> object:
        body = next(bodies)
        needs = nexus.chat_needs(body)
        found = nexus.session_key(headers, body)
        if found is not None and found[1]:
            needs.last_backend = table.backend_of(found[0], time.monotonic())
        return nexus.route(needs, registry, settings)

    return decide


def bench_routing(
    nexus: ModuleType, sizes: list[int], budget_s: float, cold_every: int = 0
) -> dict:
    prompt = ("The quick brown fox jumps over the lazy dog. " * 2300)[:102400]
    payload = {
        "model": MODEL,
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": "Done."},
            {"role": "user", "content": "And now?"},
        ],
    }
    results = {}
    for n in sizes:
        decide = routing_case(nexus, n, payload, cold_every)
        decide()  # warm-up: lazy imports, caches
        times: list[float] = []
        stop_at = time.perf_counter() + budget_s
        while len(times) < ROUTING_SAMPLES and (len(times) < 5 or time.perf_counter() < stop_at):
            t0 = time.perf_counter_ns()
            decide()
            times.append((time.perf_counter_ns() - t0) / 1e6)
        results[n] = pcts(times)
    return results


async def bench_ollama_poll(nexus: ModuleType, port: int, polls: int) -> dict:
    """An Ollama health poll as Nexus makes it (the model list, then /api/ps on its connection) and
    the same poll without /api/ps, against the mock, one after another in alternating batches:
    wall time per poll and this process's CPU per poll. The difference is what knowing the
    loaded models costs per backend and poll."""

    class WithoutPs(nexus.OllamaAdapter):
        async def poll(self, pool: object, backend: object) -> dict:
            url = backend.url + "/api/tags"  # type: ignore[attr-defined]
            tags = await nexus.fetch_json(pool, "GET", url, self.headers(backend))
            return await self.models(pool, backend, tags)

    pool = nexus.BackendPool(5.0)
    backend = nexus.Backend(name="ollama", url=f"http://{HOST}:{port}", type="ollama")
    adapters = {"with": nexus.OllamaAdapter(), "without": WithoutPs()}
    times: dict[str, list[float]] = {"with": [], "without": []}
    cpu = dict.fromkeys(adapters, 0.0)
    try:
        for adapter in (adapters["without"], adapters["with"]):  # warm-up: /api/show once
            await adapter.poll(pool, backend)
        assert backend.loaded == {MODEL: 1 << 30}, backend.loaded  # /api/ps was read
        batch = 50
        for _ in range(max(polls // batch, 1)):
            for side, adapter in adapters.items():
                cpu0 = time.process_time()
                for _ in range(batch):
                    t0 = time.perf_counter_ns()
                    await adapter.poll(pool, backend)
                    times[side].append((time.perf_counter_ns() - t0) / 1e6)
                cpu[side] += time.process_time() - cpu0
    finally:
        pool.close()
    return {
        side: pcts(values) | {"cpu_ms": cpu[side] / len(values) * 1000}
        for side, values in times.items()
    }


# --------------------------------------------------------------------------------------------
# The ledger's CPU per cloud request, in process: what the request path does on the event loop
# (charge the total, count the request under its key, hand the changed rows over), and the
# worker thread's write of those rows, taken whole for every request: the worst case, a lone
# cloud request in its second. Thread CPU time, so other load on the host barely moves it.
# --------------------------------------------------------------------------------------------


async def bench_ledger(nexus: ModuleType, workdir: Path, requests: int) -> dict:
    ledger = nexus.Ledger(workdir / "ledger" / "nexus.db")
    await ledger.open()
    assert ledger.persistent, "the ledger could not open its file"
    record = nexus.RequestRecord("req-bench", "gpt-4o", "chat", 0.0, backend="cloud")
    record.prompt_tokens, record.completion_tokens = 12, CHUNKS
    record.cost_usd, record.key = 0.0002, "bench-key"
    rows: list = []
    t0 = time.thread_time_ns()
    for _ in range(requests):
        ledger.add(nexus.TOTAL_ROW, record.cost_usd, 0, 0)
        ledger.count(record)
        rows = ledger.take_changed()
    loop_us = (time.thread_time_ns() - t0) / requests / 1000

    def writes() -> list[float]:
        times = []
        for _ in range(min(requests, 200)):
            t = time.thread_time_ns()
            ledger.file.write(rows)
            times.append((time.thread_time_ns() - t) / 1000)
        return times

    write_us = statistics.median(await ledger.in_worker(writes))
    await ledger.close()
    return {"loop_us": loop_us, "write_us": write_us, "rows": len(rows)}


# --------------------------------------------------------------------------------------------
# Measurements. Each returns plain dicts; direct and gateway are measured in the same way,
# interleaved where drift could bias one side.
# --------------------------------------------------------------------------------------------


@dataclass
class Ports:
    mock: int
    gw: int


async def sequential(ports: Ports, total: int, batch: int, stream: bool, **extra: object) -> dict:
    """One keep-alive connection per side; batches alternate direct/gateway to cancel drift."""
    sides = {"direct": ports.mock, "gateway": ports.gw}
    clients = {k: Client(p) for k, p in sides.items()}
    raws = {k: chat_request(p, stream=stream, **extra) for k, p in sides.items()}
    replies: dict[str, list[Reply]] = {k: [] for k in sides}
    errors = {k: 0 for k in sides}
    warmup = min(200, max(20, total // 10))
    for k in sides:  # warm-up: connections, caches, the gateway's backend pool
        for _ in range(warmup):
            await clients[k].send(raws[k])
    deadline = time.monotonic() + 120
    for r in range(max(1, total // batch)):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for k in order:
            for _ in range(batch):
                try:
                    reply = await clients[k].send(raws[k])
                except (OSError, TimeoutError, ValueError):
                    errors[k] += 1
                    continue
                ok = reply.stream_ok if stream else reply.status == 200
                if ok:
                    replies[k].append(reply)
                else:
                    errors[k] += 1
        if time.monotonic() > deadline:
            break
    for c in clients.values():
        c.close()
    return {"replies": replies, "errors": errors, "warmup": warmup}


# Nexus's front doors other than chat completions: where each takes a request, and what ends
# its stream. Each is asked what chat_request asks, through the same gateway and mock.
DOORS: dict[str, tuple[str, bytes]] = {
    "chat": ("/v1/chat/completions", b"data: [DONE]"),
    "responses": ("/v1/responses", b"event: response.completed"),
    "ollama": ("/api/chat", b'"done": true'),
}


def door_request(port: int, door: str, stream: bool) -> bytes:
    """The same question as chat_request, asked through a front door."""
    if door == "chat":
        return chat_request(port, stream=stream)
    if door == "responses":
        body: dict = {"model": MODEL, "input": "Say hello.", "max_output_tokens": 32}
    else:  # Ollama's API streams unless told not to
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
        body["options"] = {"num_predict": 32}
    body["stream"] = stream
    return post_request(port, DOORS[door][0], body)


async def door_latency(port: int, total: int, batch: int, stream: bool) -> dict:
    """Sequential requests through each front door of the gateway, one keep-alive connection
    per door, batches taking turns so drift falls on every door alike; latency from the write
    to the last byte, and to the first stream event."""
    clients = {door: Client(port) for door in DOORS}
    raws = {door: door_request(port, door, stream) for door in DOORS}
    lat: dict[str, list[float]] = {door: [] for door in DOORS}
    ttfb: dict[str, list[float]] = {door: [] for door in DOORS}
    errors = {door: 0 for door in DOORS}
    for door in DOORS:  # warm-up
        for _ in range(max(20, total // 10)):
            await clients[door].send(raws[door])
    deadline = time.monotonic() + 120
    for r in range(max(1, total // batch)):
        order = list(DOORS)[r % len(DOORS) :] + list(DOORS)[: r % len(DOORS)]
        for door in order:
            for _ in range(batch):
                try:
                    reply = await clients[door].send(raws[door])
                except (OSError, TimeoutError, ValueError):
                    errors[door] += 1
                    continue
                ended = not stream or DOORS[door][1] in reply.body
                if reply.status == 200 and ended:
                    lat[door].append(reply.ms)
                    ttfb[door].append(reply.ttfb_ms)
                else:
                    errors[door] += 1
        if time.monotonic() > deadline:
            break
    for client in clients.values():
        client.close()
    return {"latency": lat, "ttfb": ttfb, "errors": errors}


async def concurrent(
    ports: Ports, concurrency: int, total: int, rounds: int, delay_ms: float
) -> dict:
    """`concurrency` closed-loop clients per side; the mock answers after `delay_ms`.

    The clients start evenly spread over one delay. Started together against a backend that
    always takes the same time they would stay in lockstep: waves of `concurrency` answers at
    once, which any gateway handles one after another, so the figure would be the wave's
    length (about concurrency x CPU per request) rather than what one request adds."""
    sides = {"direct": ports.mock, "gateway": ports.gw}
    spread = delay_ms / 1000 / concurrency
    lat: dict[str, list[float]] = {k: [] for k in sides}
    errors = {k: 0 for k in sides}
    extra = {"mock_delay_ms": delay_ms} if delay_ms else {}
    raws = {k: chat_request(p, **extra) for k, p in sides.items()}
    clients = {k: [Client(p) for _ in range(concurrency)] for k, p in sides.items()}

    async def run(k: str, n: int, record: bool) -> None:
        left = n
        deadline = time.monotonic() + 120

        async def worker(client: Client, start_after: float) -> None:
            nonlocal left
            await asyncio.sleep(start_after)
            while left > 0 and time.monotonic() < deadline:
                left -= 1
                try:
                    reply = await client.send(raws[k])
                except (OSError, TimeoutError, ValueError):
                    errors[k] += record
                    continue
                if not record:
                    continue
                if reply.status == 200:
                    lat[k].append(reply.ms)
                else:
                    errors[k] += 1

        await asyncio.gather(*(worker(c, i * spread) for i, c in enumerate(clients[k])))

    for k in sides:
        await run(k, concurrency * 2, record=False)
    for r in range(rounds):
        for k in list(sides) if r % 2 == 0 else list(reversed(sides)):
            await run(k, total // rounds, record=True)
    for cs in clients.values():
        for c in cs:
            c.close()
    return {k: pcts(v) for k, v in lat.items()} | {"errors": errors}


async def blast(port: int, concurrency: int, total: int, stream: bool = False) -> int:
    """`total` requests from `concurrency` closed-loop clients, as fast as they go; errors."""
    raw, left, errors = chat_request(port, stream=stream), total, 0
    deadline = time.monotonic() + 120

    async def worker() -> None:
        nonlocal left, errors
        client = Client(port)
        while left > 0 and time.monotonic() < deadline:
            left -= 1
            try:
                errors += (await client.send(raw)).status != 200
            except (OSError, TimeoutError, ValueError):
                errors += 1
        client.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


async def reload_under_load(
    port: int, pid: int, config: Path, seconds: float, concurrency: int = 64
) -> dict:
    """`concurrency` closed-loop clients for `seconds`; halfway, the config file gets a new
    alias and the gateway a SIGHUP. A probe asks for the alias until it is served: that is
    when the new configuration took over. Latency is grouped by the wall-clock second each
    request finished in: the p99 of the second the reload landed in against the others'."""
    raw = chat_request(port)
    alias = "bench-reloaded"
    probe_raw = chat_request(port, model=alias)
    started = time.monotonic()
    deadline = started + seconds
    done: list[tuple[float, float]] = []  # (finished, seconds after start; latency ms)
    errors = 0
    swapped: float | None = None

    async def worker() -> None:
        nonlocal errors
        client = Client(port)
        while time.monotonic() < deadline:
            try:
                reply = await client.send(raw)
            except (OSError, TimeoutError, ValueError):
                errors += 1
                continue
            if reply.status != 200:
                errors += 1
            else:
                done.append((time.monotonic() - started, reply.ms))
        client.close()

    async def reload_midway() -> None:
        nonlocal swapped
        await asyncio.sleep(seconds / 2)
        text = config.read_text()
        config.write_text(f'[routing]\naliases = {{ "{alias}" = "{MODEL}" }}\n' + text)
        os.kill(pid, signal.SIGHUP)
        probe = Client(port)
        while time.monotonic() < deadline and swapped is None:
            with contextlib.suppress(OSError, TimeoutError, ValueError):
                if (await probe.send(probe_raw)).status == 200:
                    swapped = time.monotonic() - started
            await asyncio.sleep(0.01)
        probe.close()

    await asyncio.gather(reload_midway(), *(worker() for _ in range(concurrency)))
    by_second: dict[int, list[float]] = {}
    for at, ms in done:
        by_second.setdefault(int(at), []).append(ms)
    reload_second = int(swapped) if swapped is not None else None
    # The first and last seconds are ramps (clients starting, the deadline cutting them).
    steady = [sec for sec in by_second if 0 < sec < int(seconds) - 1]
    others = [ms for sec in steady if sec != reload_second for ms in by_second[sec]]
    during = by_second.get(reload_second, []) if reload_second is not None else []
    return {
        "errors": errors,
        "requests": len(done),
        "swapped_at_s": swapped,
        "reload_second": pcts(during),
        "other_seconds": pcts(others),
        "p99_per_second": {sec: pct(by_second[sec], 99) for sec in sorted(by_second)},
    }


async def open_loop(ports: Ports, rate: float, seconds: float, rounds: int) -> dict:
    """Requests sent on a fixed schedule whatever the answers; a connection per request in
    flight (pool grows as needed). Latency counts from the moment the request was due to go
    (after the scheduler woke), so connection set-up in a growing pool is included."""
    sides = {"direct": ports.mock, "gateway": ports.gw}
    lat: dict[str, list[float]] = {k: [] for k in sides}
    lag: list[float] = []
    errors = {k: 0 for k in sides}
    raws = {k: chat_request(p) for k, p in sides.items()}
    pools: dict[str, list[ClientConn]] = {k: [] for k in sides}

    async def one(k: str) -> None:
        t0 = time.perf_counter_ns()
        pool = pools[k]
        try:
            conn = pool.pop() if pool else await connect(sides[k])
            while conn.closed:
                conn = pool.pop() if pool else await connect(sides[k])
            reply = await conn.send(raws[k], 10)
        except (OSError, TimeoutError, ValueError):
            errors[k] += 1
            return
        if reply.status == 200:
            lat[k].append((reply.end_ns - t0) / 1e6)
        else:
            errors[k] += 1
        if not conn.closed:
            pool.append(conn)

    async def run(k: str, n: int) -> None:
        interval = 1e9 / rate
        start = time.perf_counter_ns() + 5_000_000
        tasks = set()
        for i in range(n):
            due = start + i * interval
            wait = (due - time.perf_counter_ns()) / 1e9
            if wait > 0:
                await asyncio.sleep(wait)
            lag.append(max(0.0, (time.perf_counter_ns() - due) / 1e6))
            task = asyncio.create_task(one(k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=15)

    per_round = int(rate * seconds / rounds)
    for k in sides:
        await run(k, min(per_round, int(rate)))  # warm-up: one second or less
        lat[k].clear()
    lag.clear()
    for r in range(rounds):
        for k in list(sides) if r % 2 == 0 else list(reversed(sides)):
            await run(k, per_round)
    for pool in pools.values():
        for c in pool:
            if c.transport:
                c.transport.close()
    return (
        {k: pcts(v) for k, v in lat.items()}
        | {"errors": errors}
        | {"sender_lag_ms": pcts(lag), "connections": {k: len(p) for k, p in pools.items()}}
    )


async def hold_streams(port: int, n: int, hold_s: float, gw_pid: int | None) -> dict:
    """n streams open at once, each lasting about hold_s (chunks spread over it). Streams are
    opened 50 at a time (the next starts when one has its first chunk) so the listen backlog
    never overflows; RSS of the gateway is sampled while they are held."""
    gap_ms = hold_s * 1000 / (CHUNKS - 1)
    raw = chat_request(port, stream=True, mock_chunk_gap_ms=gap_ms)
    opening = asyncio.Semaphore(50)
    results: dict[str, int] = {"completed": 0}
    all_open = asyncio.Event()
    settled = 0  # streams that got their first chunk, or failed before it
    peak_rss = 0.0

    async def one() -> None:
        nonlocal settled
        await opening.acquire()
        released = False

        def first_chunk() -> None:
            nonlocal released, settled
            if not released:
                released = True
                settled += 1
                opening.release()
                if settled == n:
                    all_open.set()

        try:
            conn = await connect(port)
            conn.on_first_event = first_chunk
            reply = await conn.send(raw, hold_s + 60)
            if conn.transport:
                conn.transport.close()
            key = "completed" if reply.stream_ok else f"bad answer (status {reply.status})"
        except (OSError, TimeoutError, ValueError) as exc:
            key = type(exc).__name__
        finally:
            first_chunk()
        results[key] = results.get(key, 0) + 1

    async def sample() -> None:
        nonlocal peak_rss
        while True:
            if gw_pid:
                peak_rss = max(peak_rss, rss_mb(gw_pid))
            await asyncio.sleep(0.5)

    t0 = time.perf_counter()
    sampler = asyncio.create_task(sample())
    tasks = [asyncio.create_task(one()) for _ in range(n)]
    ramp = float("nan")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_open.wait(), hold_s + 60)
        ramp = time.perf_counter() - t0
    rss_held = rss_mb(gw_pid) if gw_pid else float("nan")
    await asyncio.wait(tasks, timeout=hold_s * 2 + 90)
    for t in tasks:
        t.cancel()
    sampler.cancel()
    errors = {k: v for k, v in results.items() if k != "completed"}
    unfinished = n - sum(results.values())
    if unfinished:
        errors["unfinished"] = unfinished
    return {
        "streams": n,
        "completed": results["completed"],
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "ramp_s": ramp,
        "seconds": time.perf_counter() - t0,
        "rss_mb_all_open": rss_held,
        "rss_mb_peak": peak_rss,
    }


def run_wrk(port: int, connections: int, seconds: float, workdir: Path) -> dict:
    body = json.loads(chat_request(port).split(b"\r\n\r\n", 1)[1])
    script = workdir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = [[{json.dumps(body)}]]\n"
    )
    threads = max(1, (os.cpu_count() or 2) // 2)
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    cmd += ["--timeout", "10s", "-s", str(script), f"http://{HOST}:{port}/v1/chat/completions"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout

    def num(pattern: str) -> float:
        m = re.search(pattern, out)
        return float(m.group(1)) if m else 0.0

    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": num(r"Requests/sec:\s+([\d.]+)"),
        "requests": int(num(r"(\d+) requests in")),
        "errors": int(num(r"Non-2xx or 3xx responses: (\d+)"))
        + (sum(int(x) for x in sock.groups()) if sock else 0),
    }


def throughput(loadgen: str, port: int, connections: int, seconds: float, workdir: Path) -> dict:
    if loadgen == "wrk":
        return run_wrk(port, connections, seconds, workdir)
    return run_python_loadgen(port, connections, seconds, 2, workdir)


def run_python_loadgen(
    port: int, connections: int, seconds: float, workers: int, logs: Path
) -> dict:
    procs = []
    for w in range(workers):
        share = connections // workers + (1 if w < connections % workers else 0)
        cmd = [sys.executable, __file__, "_loadgen", str(port), str(share), str(seconds)]
        with open(logs / "loadgen.log", "ab") as log:
            procs.append(
                subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=log, cwd=REPO, preexec_fn=_die_with_parent
                )
            )
        CHILDREN.append(procs[-1])
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=seconds + 60)
        CHILDREN.remove(p)
        results.append(json.loads(out))
    requests = sum(r["requests"] for r in results)
    secs = max(r["seconds"] for r in results)
    return {
        "rps": requests / secs,
        "requests": requests,
        "errors": sum(r["errors"] for r in results),
    }


# --------------------------------------------------------------------------------------------
# The run: start processes, measure, print the table, save the JSON.
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    metric: str
    unit: str
    target: float | None = None  # pass when measured <= target (or >= when higher_is_better)
    maximum: float | None = None  # the SPEC's hard maximum, when it has one
    direct: float | None = None
    gateway: float | None = None
    measured: float | None = None  # the figure judged against the target
    higher_is_better: bool = False
    note: str = ""
    prev: float | None = field(default=None, repr=False)

    @property
    def added(self) -> float | None:
        if self.direct is None or self.gateway is None:
            return None
        return self.gateway - self.direct

    @property
    def verdict(self) -> str:
        if self.target is None or self.measured is None or self.measured != self.measured:
            return ""
        diff = self.measured - self.target
        ok = diff >= 0 if self.higher_is_better else diff <= 0
        amount = f"{abs(diff):.{decimals(self.unit)}f} {self.unit}".strip()
        pct_of = f" ({abs(diff) / self.target * 100:.0f}%)" if self.target else ""
        if ok:
            return f"pass, {amount} spare"
        within = ""
        if self.maximum is not None and self.measured <= self.maximum:
            within = f", within max {fmt(self.maximum, self.unit)}"
        return f"MISS by {amount}{pct_of}{within}"


def decimals(unit: str) -> int:
    return {"ms": 3, "MB": 1, "KB": 2, "req/s": 0, "s": 3, "": 0}.get(unit, 2)


def fmt(value: float | None, unit: str, signed: bool = False) -> str:
    if value is None:
        return "—"
    if value != value:
        return "n/a"
    text = f"{value:{'+' if signed else ''},.{decimals(unit)}f}"
    return text


def print_table(rows: list[Row], title: str, notes: list[str]) -> None:
    headers = [
        "metric",
        "unit",
        "target",
        "direct",
        "gateway",
        "added",
        "measured",
        "prev",
        "result",
    ]
    table = []
    for r in rows:
        target = ""
        if r.target is not None:
            target = ("≥ " if r.higher_is_better else "≤ ") + fmt(r.target, r.unit)
        table.append(
            [
                r.metric,
                r.unit,
                target,
                fmt(r.direct, r.unit),
                fmt(r.gateway, r.unit),
                fmt(r.added, r.unit, signed=True) if r.added is not None else "",
                fmt(r.measured, r.unit),
                fmt(r.prev, r.unit) if r.prev is not None else "",
                "; ".join(x for x in (r.verdict, r.note) if x),
            ]
        )
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    print()
    print(title)
    line = "  ".join(
        h.ljust(w) if i < 2 else h.rjust(w)
        for i, (h, w) in enumerate(zip(headers, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for t in table:
        cells = [
            c.ljust(w) if i in (0, 1, 8) else c.rjust(w)
            for i, (c, w) in enumerate(zip(t, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
    for n in notes:
        print(f"  * {n}")
    print()


def git_commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=5,
        )
        return out.stdout.strip()
    return ""


def nexus_config(path: Path, mock_port: int, backends: int) -> Path:
    lines = []
    for i in range(backends):
        lines += [
            "[[backends]]",
            f'name = "mock{i + 1}"',
            f'url = "http://{HOST}:{mock_port}"',
            'type = "generic"',
            "",
        ]
    path.write_text("\n".join(lines))
    return path


class Gateway:
    """The process under test: reference relay, nexus.py, or the built binary."""

    def __init__(self, target: str, mock_port: int, workdir: Path, extra_args: list[str]) -> None:
        self.target, self.mock_port, self.workdir, self.extra = (
            target,
            mock_port,
            workdir,
            extra_args,
        )
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.start_s = float("nan")

    def command(self, port: int, backends: int) -> list[str]:
        if self.target == "mock":
            return [sys.executable, __file__, "_mock", str(port)]
        if self.target == "relay":
            return [
                sys.executable,
                __file__,
                "_relay",
                str(port),
                f"http://{HOST}:{self.mock_port}",
            ]
        cfg = nexus_config(self.workdir / f"nexus-{backends}.toml", self.mock_port, backends)
        prog = (
            [str(REPO / "dist" / "nexus")]
            if self.target == "binary"
            else [sys.executable, str(REPO / "nexus.py")]
        )
        return [
            *prog,
            "serve",
            "-c",
            str(cfg),
            "-p",
            str(port),
            "-H",
            HOST,
            "--no-discovery",
            *self.extra,
        ]

    async def start(self, backends: int = 1, timeout: float = 60) -> None:
        self.port = free_port()
        t0 = time.perf_counter()
        self.proc = spawn(self.command(self.port, backends), self.workdir / f"{self.target}.log")
        try:
            await wait_ready(self.port, chat_request(self.port), self.proc, timeout)
        except RuntimeError as exc:
            log = (self.workdir / f"{self.target}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"{self.target} did not start: {exc}\n--- its log ---\n{log}"
            ) from exc
        self.start_s = time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


async def count_backends(port: int) -> int | None:
    with contextlib.suppress(OSError, TimeoutError, ValueError):
        conn = await connect(port)
        reply = await conn.send(get_request(port, "/v1/backends"), 10)
        if conn.transport:
            conn.transport.close()
        if reply.status == 200:
            return len(json.loads(reply.body).get("data", []))
    return None


async def settle_rss(pid: int, seconds: float = 1.0) -> float:
    await asyncio.sleep(seconds)
    return rss_mb(pid)


# Targets on a 2-core machine, everything on loopback: (target, SPEC maximum or None).
# Lower is better except where HIGHER_IS_BETTER says otherwise.
TARGETS: dict[str, tuple[float, float | None]] = {
    "seq_p50": (0.6, None),
    "seq_p99": (1.5, None),
    "conc_p50": (1.0, 2.0),
    "conc_p99": (3.0, 10.0),
    "ttfb_p50": (0.6, None),
    "stream20_p50": (1.0, None),
    "rps64": (3000, None),
    "door_responses_p50": (0.2, None),
    "door_responses_stream_p50": (0.2, None),
    "door_ollama_p50": (0.2, None),
    "door_ollama_stream_p50": (0.2, None),
    "open_p99": (5.0, None),
    "streams_err": (0, None),
    "reload_p99": (1.0, 5.0),  # SPEC: a reload adds at most 5 ms to its second's p99
    "reload_err": (0, 0),
    "route_100": (0.1, 1.0),
    "route_1000": (1.0, None),
    "ledger_cloud": (0.1, None),
    "route_1000_warm": (1.0, None),
    "rss_idle": (50, None),
    "rss_10k": (50, 60),
    "rss_per_backend": (5, 10),
    "binary_size": (15, 20),
    "binary_start": (0.5, 2.0),
}
HIGHER_IS_BETTER = {"rps64", "streams_done"}


async def bench(
    args: argparse.Namespace, workdir: Path, noise: NoiseMeter
) -> tuple[list[Row], dict, list[str]]:
    q = args.quick
    only = set(args.only.split(",")) if args.only else None
    rows: list[Row] = []
    raw: dict = {}
    notes: list[str] = []

    def want(section: str) -> bool:
        if only is None or section in only:
            noise.mark(section)
            return True
        return False

    def row(key: str, metric: str, unit: str, value: float | None, **kw: object) -> None:
        target, maximum = TARGETS.get(key, (None, None))
        higher = key in HIGHER_IS_BETTER
        kw.setdefault("gateway", value)
        rows.append(
            Row(key, metric, unit, target, maximum, measured=value, higher_is_better=higher, **kw)
        )  # type: ignore[arg-type]

    def added(key: str, metric: str, direct: float, gateway: float, **kw: object) -> None:
        row(key, metric, "ms", gateway - direct, direct=direct, gateway=gateway, **kw)

    mock_port = free_port()
    mock = spawn([sys.executable, __file__, "_mock", str(mock_port)], workdir / "mock.log")
    await wait_ready(mock_port, chat_request(mock_port), mock, 20)
    gw = Gateway(args.target, mock_port, workdir, args.nexus_arg)
    await gw.start()
    ports = Ports(mock_port, gw.port)
    print(f"gateway ({args.target}) on port {gw.port}, mock on {mock_port}", flush=True)
    row("start_s", f"start → first served request ({args.target})", "s", gw.start_s)

    if want("rss"):
        row("rss_idle", "RSS idle (after start, one request)", "MB", await settle_rss(gw.pid))
        errors = await blast(gw.port, 32, 10_000)
        row("rss_10k", "RSS after 10k requests", "MB", await settle_rss(gw.pid))
        if errors:
            notes.append(f"{errors} errors in the 10k requests")

    if want("seq"):
        cpu0 = cpu_seconds(gw.pid)
        res = await sequential(ports, args.requests, 100, stream=False)
        cpu = cpu_seconds(gw.pid) - cpu0
        lat = {k: [r.ms for r in v] for k, v in res["replies"].items()}
        raw["sequential"] = {k: pcts(v) for k, v in lat.items()} | {"errors": res["errors"]}
        for p in (50, 90, 99):
            added(
                f"seq_p{p}",
                f"non-stream sequential, added p{p}",
                pct(lat["direct"], p),
                pct(lat["gateway"], p),
            )
        served = len(lat["gateway"]) + res["warmup"]
        row("cpu_seq", "gateway CPU per request (sequential)", "ms", cpu / served * 1000)
        if sum(res["errors"].values()):
            notes.append(f"sequential errors: {res['errors']}")

    if want("conc"):
        delay = args.concurrent_delay_ms
        res = await concurrent(ports, 100, 1000 if q else 6000, 2 if q else 4, delay)
        raw["concurrent"] = res
        for p in (50, 90, 99):
            added(
                f"conc_p{p}",
                f"non-stream 100 concurrent, added p{p}",
                res["direct"][f"p{p}"],
                res["gateway"][f"p{p}"],
            )
        notes.append(
            f"100 concurrent: the mock answers after {delay:g} ms (a backend doing work), so the"
            f" offered load is about {100 / max(delay, 0.1) * 1000:,.0f} req/s, not saturation"
        )
        if sum(res["errors"].values()):
            notes.append(f"100-concurrent errors: {res['errors']}")

    if want("stream"):
        res = await sequential(ports, 200 if q else 1000, 50, stream=True)
        ttfb = {k: [r.ttfb_ms for r in v] for k, v in res["replies"].items()}
        total = {k: [r.ms for r in v] for k, v in res["replies"].items()}
        raw["stream_burst"] = {
            "ttfb": {k: pcts(v) for k, v in ttfb.items()},
            "total": {k: pcts(v) for k, v in total.items()},
            "errors": res["errors"],
        }
        for p in (50, 99):
            added(
                f"ttfb_p{p}",
                f"stream first chunk (TTFB), added p{p}",
                pct(ttfb["direct"], p),
                pct(ttfb["gateway"], p),
            )
        for p in (50, 99):
            added(
                f"stream20_p{p}",
                f"{CHUNKS}-chunk stream total, added p{p}",
                pct(total["direct"], p),
                pct(total["gateway"], p),
            )
        if sum(res["errors"].values()):
            notes.append(f"stream errors (not {CHUNKS} chunks + [DONE]): {res['errors']}")
        # Chunks 1 ms apart, as a model produces them: how much later does each one arrive?
        res = await sequential(ports, 100 if q else 300, 25, stream=True, mock_chunk_gap_ms=1)
        arrival = {
            k: [
                statistics.median((r.events[i] - r.start_ns) / 1e6 for r in v)
                for i in range(CHUNKS)
            ]
            for k, v in res["replies"].items()
            if v
        }
        if len(arrival) == 2:
            late = [g - d for g, d in zip(arrival["gateway"], arrival["direct"], strict=True)]
            raw["stream_spaced_added_per_chunk_ms"] = late
            row(
                "chunk_added",
                "stream chunks 1 ms apart: added delay per chunk (mean of p50s)",
                "ms",
                statistics.mean(late),
                gateway=None,
                note=f"worst chunk {max(late):+.3f} ms",
            )

    if want("doors"):
        if args.target in ("nexus", "binary"):
            await bench_doors(gw.port, 200 if q else 1000, row, raw, notes)
        else:
            notes.append(f"doors: {args.target} has no front doors but chat completions")

    if want("throughput"):
        seconds = 3 if q else args.duration
        cpu_mock0 = cpu_seconds(mock.pid)
        direct = throughput(args.loadgen, mock_port, 64, seconds, workdir)
        cpu_mock = cpu_seconds(mock.pid) - cpu_mock0
        cpu0, host0 = cpu_seconds(gw.pid), host_cpu()
        via = throughput(args.loadgen, gw.port, 64, seconds, workdir)
        cpu, host = (
            cpu_seconds(gw.pid) - cpu0,
            [b - a for a, b in zip(host0, host_cpu(), strict=True)],
        )
        raw["throughput"] = {"loadgen": args.loadgen, "direct": direct, "gateway": via}
        row(
            "rps64",
            f"throughput, 64 concurrent ({args.loadgen})",
            "req/s",
            via["rps"],
            direct=direct["rps"],
        )
        cpu_ms = cpu / max(1, via["requests"]) * 1000
        row("cpu_tput", "gateway CPU per request (at 64 concurrent)", "ms", cpu_ms)
        # What one core would serve at that CPU cost: steadier than req/s on a shared host.
        ceiling = 1000 / cpu_ms if cpu_ms else float("nan")
        row("cpu_ceiling", "CPU-bound ceiling: 1 core ÷ CPU per request", "req/s", ceiling)
        if direct["errors"] or via["errors"]:
            notes.append(f"throughput errors: direct {direct['errors']}, gateway {via['errors']}")
        all_ticks = sum(host) or 1
        notes.append(
            f"throughput run: host CPU {100 - host[3] / all_ticks * 100:.0f}% busy, steal"
            f" {host[7] / all_ticks * 100:.1f}%; mock CPU"
            f" {cpu_mock / max(1, direct['requests']) * 1e6:.0f} µs/request"
        )

    if want("openloop"):
        res = await open_loop(ports, 500, (3 if q else args.duration) * 2, 2)
        raw["open_loop_500"] = res
        for p in (50, 99):
            added(
                f"open_p{p}",
                f"open loop 500 req/s, added p{p}",
                res["direct"][f"p{p}"],
                res["gateway"][f"p{p}"],
            )
        notes.append(
            f"open loop: sender lag p99 {res['sender_lag_ms']['p99']:.3f} ms, connections"
            f" used {res['connections']}, errors {res['errors']}"
        )

    if want("streams"):
        n = args.streams
        hold = args.hold_seconds if args.hold_seconds is not None else (5 if q else 30)
        res = await hold_streams(gw.port, n, hold, gw.pid)
        raw["streams_held"] = res
        row(
            "streams_done",
            f"{n} concurrent streams held {hold:g} s: completed",
            "",
            res["completed"],
        )
        rows[-1].target = n
        row(
            "streams_err",
            f"{n} concurrent streams: errors",
            "",
            res["errors"],
            note=str(res["error_kinds"] or ""),
        )
        row(
            "streams_rss",
            f"RSS with {n} streams open (peak)",
            "MB",
            res["rss_mb_peak"],
            note=f"opened in {res['ramp_s']:.1f} s",
        )

    if want("reload"):
        if args.target in ("relay", "mock"):
            row(
                "reload_p99", "reload under c64 load", "ms", None, note=f"n/a for the {args.target}"
            )
        else:
            config = workdir / "nexus-1.toml"  # the gateway's (Gateway.command)
            res = await reload_under_load(gw.port, gw.pid, config, 6 if q else args.duration)
            raw["reload_under_load"] = res
            added(
                "reload_p99",
                "reload under c64 load: p99 of its second, added vs the other seconds",
                res["other_seconds"]["p99"],
                res["reload_second"]["p99"],
                note=f"took over {res['swapped_at_s'] or float('nan'):.2f} s in",
            )
            row("reload_err", "reload under c64 load: errors", "", res["errors"])
            if res["swapped_at_s"] is None:
                notes.append("reload under load: the new configuration never took over")

    gw.stop()

    if want("backends"):
        if args.target == "relay":
            row(
                "rss_per_backend",
                "RSS per extra registered backend",
                "KB",
                None,
                note=f"n/a for the {args.target}",
            )
        else:
            n = args.extra_backends
            rss = {}
            for count in (1, 1 + n):
                g = Gateway(args.target, mock_port, workdir, args.nexus_arg)
                await g.start(count)
                rss[count] = await settle_rss(g.pid, 2)
                registered = await count_backends(g.port)
                g.stop()
            raw["rss_backends"] = {"rss_mb": rss, "registered": registered}
            per = (rss[1 + n] - rss[1]) * 1024 / n
            row(
                "rss_per_backend",
                f"RSS per extra registered backend ({n} extra)",
                "KB",
                per,
                gateway=None,
                note=f"{registered} registered",
            )

    if want("routing"):
        if args.target == "relay":
            row(
                "route_1000",
                "routing decision, 100 KB prompt",
                "ms",
                None,
                note=f"n/a for the {args.target}",
            )
        else:
            try:
                sys.path.insert(0, str(REPO))
                import nexus  # type: ignore[import-not-found]

                res = bench_routing(nexus, [10, 100, 1000], 2 if q else 5)
            except Exception as exc:  # the adapter may lag behind nexus.route's signature
                res = {}
                note = f"not measured: {type(exc).__name__}: {exc}"[:100]
                row("route_1000", "routing decision, 100 KB prompt", "ms", None, note=note)
            raw["routing"] = res
            for n, r in res.items():
                row(
                    f"route_{n}",
                    f"routing decision, {n} backends, 100 KB prompt, session lookup, p50",
                    "ms",
                    r["p50"],
                    gateway=None,
                    note=f"p99 {r['p99']:.3f} ms",
                )

    if want("ledger") and args.target in ("nexus", "binary"):
        sys.path.insert(0, str(REPO))
        import nexus  # type: ignore[import-not-found]

        res = await bench_ledger(nexus, workdir, 2_000 if q else 20_000)
        raw["ledger"] = res
        row(
            "ledger_cloud",
            "ledger CPU per cloud request (a whole write each)",
            "ms",
            (res["loop_us"] + res["write_us"]) / 1000,
            gateway=None,
            note=f"loop {res['loop_us']:.1f} µs + write of {res['rows']} rows "
            f"{res['write_us']:.1f} µs",
        )
    if want("lifecycle"):
        await lifecycle_rows(args, mock_port, row, raw)

    binary = REPO / "dist" / "nexus"
    if want("binary") and binary.exists():
        row(
            "binary_size",
            "binary size (dist/nexus)",
            "MB",
            binary.stat().st_size / 1e6,
            gateway=None,
        )
        starts, health = [], []
        for _ in range(5):
            b = Gateway("binary", mock_port, workdir, args.nexus_arg)
            b.port = free_port()
            t0 = time.perf_counter()
            b.proc = spawn(b.command(b.port, 1), workdir / "binary-start.log")
            try:
                health.append(await wait_ready(b.port, get_request(b.port, "/health"), b.proc, 30))
                await wait_ready(b.port, chat_request(b.port), b.proc, 30)
                starts.append(time.perf_counter() - t0)
            finally:
                b.stop()
        raw["binary_start"] = {"first_request_s": starts, "health_s": health}
        note = f"/health 200 after {statistics.median(health):.3f} s"
        row(
            "binary_start",
            "binary start → first served request (median of 5)",
            "s",
            statistics.median(starts),
            gateway=None,
            note=note,
        )
    elif want("binary"):
        row(
            "binary_size",
            "binary size and start time",
            "",
            None,
            note="dist/nexus not built (make dist)",
        )

    noise.mark(None)
    stop(mock)
    return rows, raw, notes


async def lifecycle_rows(
    args: argparse.Namespace, mock_port: int, row: Callable[..., None], raw: dict
) -> None:
    """The lifecycle section: /api/ps in a health poll, and routing with warm before cold."""
    if args.target != "nexus":
        row("poll_ps_cpu", "Ollama health poll with /api/ps", "ms", None, note="nexus only")
        return
    sys.path.insert(0, str(REPO))
    import nexus  # type: ignore[import-not-found]

    polls = await bench_ollama_poll(nexus, mock_port, 200 if args.quick else 1000)
    raw["ollama_poll"] = polls
    with_ps, without = polls["with"], polls["without"]
    row(
        "poll_ps_wall",
        "Ollama health poll, added by /api/ps (wall, p50)",
        "ms",
        with_ps["p50"] - without["p50"],
        direct=without["p50"],
        gateway=with_ps["p50"],
    )
    row(
        "poll_ps_cpu",
        "Ollama health poll, CPU added by /api/ps per backend",
        "ms",
        with_ps["cpu_ms"] - without["cpu_ms"],
        direct=without["cpu_ms"],
        gateway=with_ps["cpu_ms"],
    )
    res = bench_routing(nexus, [1000], 2 if args.quick else 5, cold_every=3)
    raw["routing_warm"] = res
    row(
        "route_1000_warm",
        "routing decision, 1000 Ollamas, a third cold, p50",
        "ms",
        res[1000]["p50"],
        gateway=None,
        note=f"p99 {res[1000]['p99']:.3f} ms",
    )


async def bench_doors(
    port: int, total: int, row: Callable[..., None], raw: dict, notes: list[str]
) -> None:
    """What each front door adds to chat completions on the same gateway and mock: the door's
    p50 minus chat completions' p50, whole answers and 20-chunk streams."""
    for stream in (False, True):
        res = await door_latency(port, total, 50, stream)
        kind = "stream" if stream else "non-stream"
        raw[f"doors_{kind}"] = {
            "latency": {d: pcts(v) for d, v in res["latency"].items() if v},
            "errors": res["errors"],
        }
        chat = res["latency"]["chat"]
        for door, lat in res["latency"].items():
            if door == "chat" or not lat or not chat:
                continue
            key = f"door_{door}_stream_p50" if stream else f"door_{door}_p50"
            row(
                key,
                f"{door} door beside chat completions, {kind}, added p50",
                "ms",
                pct(lat, 50) - pct(chat, 50),
                direct=pct(chat, 50),
                gateway=pct(lat, 50),
            )
        if sum(res["errors"].values()):
            notes.append(f"doors {kind} errors: {res['errors']}")
    notes.append("doors: the direct column is chat completions through the same gateway")


async def loadgen_ceiling(args: argparse.Namespace, workdir: Path) -> dict:
    """How fast the load generators go against the mock alone (their own ceiling)."""
    mock_port = free_port()
    mock = spawn([sys.executable, __file__, "_mock", str(mock_port)], workdir / "mock-ceiling.log")
    await wait_ready(mock_port, chat_request(mock_port), mock, 20)
    seconds = 3 if args.quick else 5
    out: dict = {}
    try:
        if shutil.which("wrk"):
            out["wrk_64"] = run_wrk(mock_port, 64, seconds, workdir)
        out["python_1proc_64"] = run_python_loadgen(mock_port, 64, seconds, 1, workdir)
        out["python_2proc_64"] = run_python_loadgen(mock_port, 64, seconds, 2, workdir)
        res = await sequential(Ports(mock_port, mock_port), 1000, 100, stream=False)
        out["sequential_direct_p50_ms"] = pct([r.ms for r in res["replies"]["direct"]], 50)
    finally:
        stop(mock)
    return out


INSTRUCTION_REQUESTS = 1000  # per kind (non-stream, 20-chunk stream), after 200 of warm-up


async def instructions_per_request(
    command: Callable[[int], list[str]], workdir: Path, stream: bool
) -> float:
    """CPU instructions the gateway executes per request (in thousands), counted by callgrind
    over INSTRUCTION_REQUESTS requests from 16 clients after a warm-up. Unlike CPU time it is
    the same on a busy host as on a quiet one, so two runs compare to within about 3%."""
    port = free_port()
    out = workdir / f"callgrind.{port}.out"
    proc = spawn(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",  # start-up and warm-up are not counted
            f"--callgrind-out-file={out}",
            *command(port),
        ],
        workdir / "callgrind.log",
    )
    try:
        await wait_ready(port, chat_request(port), proc, 300)
        await blast(port, 16, 200, stream)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], capture_output=True)
        errors = await blast(port, 16, INSTRUCTION_REQUESTS, stream)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], capture_output=True)
        if errors:
            raise RuntimeError(f"{errors} errors while counting instructions")
    finally:
        proc.send_signal(signal.SIGINT)  # a clean exit, so callgrind writes its counts
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            stop(proc)
        if proc in CHILDREN:
            CHILDREN.remove(proc)
    totals = re.findall(r"^(?:totals|summary): (\d+)", out.read_text(), re.M)
    return max(map(int, totals)) / INSTRUCTION_REQUESTS / 1000


async def instruction_rows(args: argparse.Namespace, workdir: Path) -> list[Row]:
    """The gateway's instructions per request beside the bare relay's, for both kinds."""
    mock_port = free_port()
    mock = spawn([sys.executable, __file__, "_mock", str(mock_port)], workdir / "mock-cg.log")
    rows = []
    try:
        await wait_ready(mock_port, chat_request(mock_port), mock, 20)
        # The binary runs the same code as nexus.py; valgrind follows one process, not the
        # one-file bootloader's child.
        target = "nexus" if args.target == "binary" else args.target
        gateway = Gateway(target, mock_port, workdir, args.nexus_arg)
        relay = Gateway("relay", mock_port, workdir, [])
        for stream, what in ((False, "non-stream request"), (True, "20-chunk stream")):
            mine = await instructions_per_request(
                lambda port: gateway.command(port, 1), workdir, stream
            )
            floor = await instructions_per_request(
                lambda port: relay.command(port, 1), workdir, stream
            )
            rows.append(
                Row(
                    f"instructions_{'stream' if stream else 'request'}",
                    f"instructions per {what} (callgrind), bare relay → gateway",
                    "k",
                    direct=floor,
                    gateway=mine,
                    measured=mine,
                    note=f"{mine / floor:.2f}× the relay",
                )
            )
    finally:
        stop(mock)
    return rows


# --------------------------------------------------------------------------------------------
# Session affinity on a real engine (section `affinity`, needs `make engine`): two llama-servers
# (one thread each), three coding-agent sessions of four turns, each opening with about 2,000
# tokens of system prompt and tool definitions; every later turn resends the conversation with
# the last answer and a short user message. Time to first token per turn, through Nexus with
# session affinity on and off, and directly against a third server (its prompt cache warm).
# --------------------------------------------------------------------------------------------

AFFINITY_SESSIONS = 3
AFFINITY_TURNS = 4
AFFINITY_OPENING_TOKENS = 2000
AFFINITY_MAX_TOKENS = 12
AFFINITY_SLOTS = 3  # a llama-server slot (and its prompt cache) per session it may hold
AFFINITY_SLOT_CONTEXT = 4096
AFFINITY_PROJECTS = (
    ("ledger", "a double-entry bookkeeping library in Python 3.12 with SQLite storage"),
    ("tiles", "a map tile server in Go that renders vector tiles from PostGIS"),
    ("pager", "an on-call scheduling web app: TypeScript, React and a Node.js API"),
)
AFFINITY_GUIDANCE = (
    "You are a coding agent working in the user's repository through the tools below. Read "
    "the code before you change it, keep changes small and focused on the task, and follow "
    "the conventions you find in the surrounding files rather than your own preferences.",
    "Before editing a file, read it in full or at least the function you are changing and its "
    "callers. Never guess an API: search for its definition. When a change spans several "
    "files, list them first and say in one sentence why each one changes.",
    "Run the project's tests after every change that could affect behaviour. When a test "
    "fails, read the failure in full, reproduce it with the narrowest command, fix the cause "
    "rather than the symptom, and run the whole suite again before you report success.",
    "Write code that a reviewer can read top to bottom: descriptive names, short functions, "
    "comments that say why rather than what, no dead code, no commented-out code, and no "
    "debugging output left behind. Match the formatter and linter the project already uses.",
    "Treat errors as part of the interface: validate input at the boundary, return or raise "
    "errors that say what went wrong and what to do next, and never swallow an exception "
    "silently. Log with the project's logger at the right level, never with print.",
    "Security matters in every change: never log secrets, tokens or personal data; use "
    "parameterised queries; check paths against traversal; treat every input from the "
    "network as hostile; prefer the standard library's vetted primitives to your own.",
    "Keep the user informed without noise: before a long operation say what you are about to "
    "do, after it say what changed and how you verified it. If the task is ambiguous, ask one "
    "precise question instead of guessing, and offer the option you would choose.",
    "Use version control carefully: never rewrite published history, never commit generated "
    "files or credentials, and write commit messages in the imperative mood that explain the "
    "reason for the change. Stage only the files that belong to the change.",
    "Performance: measure before optimising, keep allocations out of hot loops, prefer "
    "streaming to loading whole files into memory, and add a benchmark when you claim a "
    "speed-up. Do not trade readability for speed without numbers that justify it.",
    "Dependencies: prefer what the project already depends on. Adding a package needs a "
    "reason the user would accept: say which, why, and its licence. Pin versions the way the "
    "project pins them and update the lock file in the same change.",
)
AFFINITY_TOOLS = [
    ("read_file", "Read a file of the repository, optionally a range of lines.", ["path"]),
    ("write_file", "Create or overwrite a file with the given content.", ["path", "content"]),
    ("edit_file", "Replace an exact snippet of a file with new text.", ["path", "old", "new"]),
    ("list_directory", "List the entries of a directory, with sizes.", ["path"]),
    ("search_code", "Search the repository for a regular expression.", ["pattern", "glob"]),
    ("run_command", "Run a shell command in the repository and return its output.", ["cmd"]),
    ("run_tests", "Run the test suite or a subset of it and report failures.", ["selector"]),
    ("git_diff", "Show the uncommitted changes, optionally for one path.", ["path"]),
]
AFFINITY_FOLLOW_UPS = (
    "Good. Now handle the empty input case too.",
    "Run the tests and tell me what failed.",
    "Show me the final diff in one short summary.",
)


def agent_opening(session: int, nonce: str, paragraphs: int) -> list[dict]:
    """A coding agent's first request: a system prompt (project, guidance, tool definitions)
    and the task. Distinct from its first token per session and per run (`nonce`), so no
    server holds any of it from another session or an earlier run."""
    name, what = AFFINITY_PROJECTS[session % len(AFFINITY_PROJECTS)]
    tools = [
        {
            "type": "function",
            "function": {
                "name": tool,
                "description": text,
                "parameters": {
                    "type": "object",
                    "properties": {arg: {"type": "string"} for arg in args},
                    "required": args,
                },
            },
        }
        for tool, text, args in AFFINITY_TOOLS
    ]
    guidance = [AFFINITY_GUIDANCE[i % len(AFFINITY_GUIDANCE)] for i in range(paragraphs)]
    system = "\n\n".join(
        [
            f"Run {nonce}, session {session}. Project {name}: {what}.",
            *guidance,
            "Tools (call one by answering with a JSON object naming it and its arguments):",
            json.dumps(tools, indent=1),
        ]
    )
    task = f"In {name}, the import of an empty file crashes. Find why and fix it."
    return [{"role": "system", "content": system}, {"role": "user", "content": task}]


def count_tokens(url: str, messages: list[dict]) -> int:
    """What the server counts for the conversation's text (its /tokenize, no generation)."""
    text = "\n".join(m["content"] for m in messages)
    request = urllib.request.Request(
        url + "/tokenize",
        data=json.dumps({"content": text}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return len(json.loads(response.read())["tokens"])


async def first_token(session: object, url: str, messages: list[dict]) -> tuple[float, str]:
    """Stream one chat turn: seconds to the first content token, and the whole answer."""
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": messages,
        "stream": True,
        "max_tokens": AFFINITY_MAX_TOKENS,
        "temperature": 0,
    }
    t0 = time.perf_counter()
    ttft = None
    answer = []
    async with session.post(url + "/v1/chat/completions", json=body) as resp:  # type: ignore[attr-defined]
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:300]}")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    answer.append(piece)
    return (ttft if ttft is not None else time.perf_counter() - t0), "".join(answer)


async def agent_runs(urls: dict[str, str], paragraphs: int) -> dict[str, list[list[float]]]:
    """Three sessions' turns interleaved (as three agents at work) against each URL, the URLs'
    requests alternating so that the host's load weighs on them alike; each URL's sessions
    open with text of their own. TTFT in seconds, per URL [turn][session]."""
    import aiohttp

    talks = {
        lane: [agent_opening(i, os.urandom(4).hex(), paragraphs) for i in range(AFFINITY_SESSIONS)]
        for lane in urls
    }
    ttfts: dict[str, list[list[float]]] = {lane: [] for lane in urls}
    timeout = aiohttp.ClientTimeout(total=600)
    # A connection per turn: llama-server closes a connection after a streamed answer.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for turn in range(AFFINITY_TURNS):
            for lane in urls:
                ttfts[lane].append([])
            for i in range(AFFINITY_SESSIONS):
                for lane, url in urls.items():
                    messages = talks[lane][i]
                    ttft, answer = await first_token(session, url, messages)
                    ttfts[lane][turn].append(ttft)
                    follow_up = AFFINITY_FOLLOW_UPS[turn % len(AFFINITY_FOLLOW_UPS)]
                    messages += [
                        {"role": "assistant", "content": answer or "(no answer)"},
                        {"role": "user", "content": follow_up},
                    ]
                    print(f"    {lane}: turn {turn + 1} session {i + 1}: {ttft:.2f} s", flush=True)
    return ttfts


async def nexus_for(servers: list, affinity: bool, workdir: Path) -> tuple[subprocess.Popen, str]:
    """nexus.py in front of the llama-servers, with session affinity on or off; ready."""
    cfg = workdir / f"nexus-affinity-{'on' if affinity else 'off'}.toml"
    lines = [
        "[server]",
        "first_byte_timeout_seconds = 300",
        "request_timeout_seconds = 900",
        "[routing]",
        f"session_affinity = {'true' if affinity else 'false'}",
    ]
    for server in servers:
        lines += ["[[backends]]", f'name = "{server.name}"', f'url = "{server.url}"']
        lines.append('type = "llamacpp"')
    cfg.write_text("\n".join(lines) + "\n")
    port = free_port()
    command = [sys.executable, str(REPO / "nexus.py"), "serve", "-c", str(cfg)]
    command += ["-p", str(port), "-H", HOST, "--no-discovery"]
    proc = spawn(command, workdir / cfg.with_suffix(".log").name)
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(url + "/v1/stats", timeout=2) as response:
                stats = json.loads(response.read())
            if sum(b["status"] == "healthy" for b in stats["backends"]) == len(servers):
                return proc, url
        await asyncio.sleep(0.2)
    stop(proc)
    raise RuntimeError("Nexus in front of the llama-servers did not become ready")


def later_median(ttfts: list[list[float]]) -> float:
    return statistics.median(t for row in ttfts[1:] for t in row)


def later_mean(ttfts: list[list[float]]) -> float:
    return statistics.fmean(t for row in ttfts[1:] for t in row)


async def affinity_rows(args: argparse.Namespace, workdir: Path) -> list[Row]:
    """The affinity section: TTFT per turn on real llama-servers, three ways (see above)."""
    sys.path.insert(0, str(REPO / "tests"))
    import real_engine  # type: ignore[import-not-found]

    print("affinity: provisioning the engine (tests/engine.sh; cached after `make engine`)")
    engine = real_engine.provision()
    options = {
        "context_size": AFFINITY_SLOTS * AFFINITY_SLOT_CONTEXT,
        "parallel": AFFINITY_SLOTS,
        "threads": 1,
    }
    runs: dict[str, list[list[float]]] = {}
    # Two servers behind Nexus, and a third for the direct figure: its requests alternate with
    # those through Nexus with affinity on, so both meet the same load on this host.
    names = ["llama-a", "llama-b", "llama-direct"]
    with real_engine.running_llama_servers(engine, names, workdir, **options) as servers:
        behind, alone = servers[:2], servers[2]
        paragraphs = 1
        while count_tokens(alone.url, agent_opening(0, "0" * 8, paragraphs)) < (
            AFFINITY_OPENING_TOKENS
        ):
            paragraphs += 1
        tokens = count_tokens(alone.url, agent_opening(0, "0" * 8, paragraphs))
        print(f"affinity: openings of about {tokens} tokens ({paragraphs} guidance paragraphs)")
        for affinity in (True, False):
            proc, url = await nexus_for(behind, affinity, workdir)
            try:
                lanes = {"on": url, "direct": alone.url} if affinity else {"off": url}
                runs.update(await agent_runs(lanes, paragraphs))
            finally:
                stop(proc)
    print_affinity_table(runs, tokens)
    first = statistics.median(runs["on"][0])
    on, off, direct = (later_median(runs[m]) for m in ("on", "off", "direct"))
    return [
        Row(
            "affinity_first",
            f"agent turn 1 TTFT ({tokens}-token opening), through Nexus, median",
            "s",
            measured=first,
            gateway=first,
        ),
        Row(
            "affinity_later",
            "agent turns 2-4 TTFT, affinity on, median: direct warm → Nexus",
            "s",
            target=round(min(direct * 1.3, first / 3), 3),
            direct=direct,
            gateway=on,
            measured=on,
            note=f"{on / direct:.2f}× direct warm, {first / on:.1f}× faster than turn 1",
        ),
        Row(
            "affinity_off_later",
            "agent turns 2-4 TTFT, affinity off, median",
            "s",
            gateway=off,
            measured=off,
            note=f"{off / on:.1f}× the affinity-on figure; mean {later_mean(runs['off']):.2f} s",
        ),
    ]


def print_affinity_table(runs: dict[str, list[list[float]]], tokens: int) -> None:
    """TTFT per turn (median of the sessions, and each session's), per mode."""
    names = {
        "on": "Nexus, affinity on",
        "off": "Nexus, affinity off",
        "direct": "direct, one server",
    }
    print(
        f"\nSession affinity: TTFT per turn, {AFFINITY_SESSIONS} sessions, {tokens}-token opening"
    )
    header = "  ".join(f"turn {t + 1:<17}" for t in range(AFFINITY_TURNS))
    print(f"{'':22}{header}  later turns: median (mean)")
    for mode, ttfts in runs.items():
        cells = "  ".join(
            f"{statistics.median(row):5.2f} s ({'/'.join(f'{t:.1f}' for t in row)})".ljust(22)
            for row in ttfts
        )
        print(f"{names[mode]:22}{cells}  {later_median(ttfts):.2f} s ({later_mean(ttfts):.2f} s)")
    print()


def load_history(path: Path) -> list[dict]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, list):
            return data
    return []


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("_mock", "_relay", "_loadgen"):
        role, rest = sys.argv[1], sys.argv[2:]
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        if role == "_mock":
            run_mock(int(rest[0]))
        elif role == "_relay":
            run_relay(int(rest[0]), rest[1])
        else:
            run_loadgen(int(rest[0]), int(rest[1]), float(rest[2]), False)
        return 0

    p = argparse.ArgumentParser(description="Nexus benchmark suite (make bench).")
    default_target = "nexus" if (REPO / "nexus.py").exists() else "relay"
    p.add_argument(
        "--target",
        choices=["nexus", "binary", "relay", "mock"],
        default=default_target,
        help="nexus: nexus.py; binary: dist/nexus; relay: a bare aiohttp relay (the floor);"
        " mock: a second mock in the gateway's place, so every added figure shows the noise",
    )
    p.add_argument("--quick", action="store_true", help="short run for development")
    p.add_argument(
        "--only",
        help="comma list of sections: rss,seq,conc,stream,doors,throughput,openloop,streams,"
        "reload,backends,routing,ledger,lifecycle,binary,ceiling,instructions,affinity",
    )
    p.add_argument(
        "--requests", type=int, help="sequential requests per side (default 2000, quick 300)"
    )
    p.add_argument(
        "--duration", type=float, default=10, help="seconds per throughput / open-loop side"
    )
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument(
        "--hold-seconds", type=float, help="how long the streams are held (default 30, quick 5)"
    )
    p.add_argument(
        "--extra-backends", type=int, help="for RSS per backend (default 1000, quick 200)"
    )
    p.add_argument("--concurrent-delay-ms", type=float, default=100)
    p.add_argument(
        "--loadgen", choices=["wrk", "python"], default="wrk" if shutil.which("wrk") else "python"
    )
    p.add_argument(
        "--nexus-arg",
        action="append",
        default=[],
        help="extra argument for nexus serve (repeatable)",
    )
    p.add_argument("--json", type=Path, default=REPO / "bench-results.json")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run every benchmark process at this higher priority (e.g. 10 means nice -10;"
        " needs root) to shield the figures from other load on a shared host",
    )
    args = p.parse_args()
    if args.requests is None:
        args.requests = 300 if args.quick else 2000
    if args.extra_backends is None:
        args.extra_backends = 200 if args.quick else 1000
    if args.target == "nexus" and not (REPO / "nexus.py").exists():
        p.error("nexus.py not found; use --target relay")
    if args.target == "binary" and not (REPO / "dist" / "nexus").exists():
        p.error("dist/nexus not built; run make dist")
    if args.only and "instructions" in args.only.split(",") and not shutil.which("valgrind"):
        p.error("the instructions section needs valgrind (apt-get install valgrind)")

    PRIORITY[0] = args.nice
    raise_priority(os.getpid())  # inherited by the processes started without a new session
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    started = time.time()
    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"warning: load average {load1:.1f} before the start; figures will be noisy")
    with tempfile.TemporaryDirectory(prefix="nexus-bench-") as tmp:
        workdir = Path(tmp)
        try:
            noise = NoiseMeter()
            rows, raw, notes = asyncio.run(bench(args, workdir, noise))
            if args.only is not None and "instructions" in args.only.split(","):
                rows += asyncio.run(instruction_rows(args, workdir))
            if args.only is None or "affinity" in args.only.split(","):
                rows += asyncio.run(affinity_rows(args, workdir))
            if args.only is None or "ceiling" in args.only:
                raw["loadgen_ceiling"] = ceiling = asyncio.run(loadgen_ceiling(args, workdir))
                parts = [
                    f"{k} {v['rps']:,.0f} req/s" for k, v in ceiling.items() if isinstance(v, dict)
                ]
                notes.append(
                    "load generator ceiling against the mock alone: "
                    + ", ".join(parts)
                    + f"; sequential direct p50 {ceiling['sequential_direct_p50_ms']:.3f} ms"
                )
            raw["foreign_cpu_percent"] = noise.sections
            busy = {k: v for k, v in noise.sections.items() if v >= 5}
            if busy:
                shares = ", ".join(f"{k} {v:.0f}%" for k, v in busy.items())
                notes.append(
                    f"NOISY: other processes on this host used {shares} of the machine during"
                    " those sections (with --nice they mostly take what the bench leaves idle)"
                )
        except KeyboardInterrupt:
            print("interrupted; child processes stopped", file=sys.stderr)
            return 130
        except RuntimeError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
        finally:
            stop_all()

    history = load_history(args.json)
    prev = next(
        (
            h
            for h in reversed(history)
            if h.get("target") == args.target and h.get("quick") == args.quick
        ),
        None,
    )
    prev_vals = {r["key"]: r.get("measured") for r in prev.get("rows", [])} if prev else {}
    for r in rows:
        r.prev = prev_vals.get(r.key)
    title = (
        f"Nexus bench — target {args.target}{' (quick)' if args.quick else ''},"
        f" commit {git_commit() or '?'}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {time.time() - started:.0f} s"
    )
    print_table(rows, title, notes)
    run = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "target": args.target,
        "quick": args.quick,
        "commit": git_commit(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "rows": [asdict(r) | {"added": r.added, "verdict": r.verdict} for r in rows],
        "raw": raw,
        "notes": notes,
    }
    history = [*history, run][-50:]
    args.json.write_text(json.dumps(history, indent=1, default=str))
    print(f"results appended to {args.json.name} ({len(history)} runs kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
