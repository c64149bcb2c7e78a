"""Nexus's HTTP/1.1 client to its backends (BackendPool), against real servers on 127.0.0.1:
aiohttp apps for well-behaved answers, raw sockets for the exact bytes a broken one sends."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib.metadata
import json
import re
import socket
import ssl
import struct
import subprocess
import sys
import tomllib
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ROOT, ConnectProxy, free_port, self_signed, unaccepting_listener
from netns import isolated_namespace, requires_root

import nexus

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def pool() -> AsyncIterator[nexus.BackendPool]:
    pool = nexus.BackendPool(connect_timeout=2.0)
    yield pool
    pool.close()
    await asyncio.sleep(0)
    assert not pool.open, "every connection is closed with the pool"


@pytest.fixture
async def app_server() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1", port=free_port())
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Script], Awaitable[str]]]:
    """A server that runs a script per connection, reading and writing raw bytes."""
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> str:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(run, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body, as the server got them."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def echo_app(peers: list[object]) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        body = await request.read()
        return web.json_response(
            {"path": request.path_qs, "body": body.decode(), "key": request.headers.get("X-Key")}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def test_a_request_and_its_answer_over_one_kept_connection(pool, app_server) -> None:
    peers: list[object] = []
    url = await app_server(echo_app(peers))
    for i in range(3):
        conn = await pool.request("POST", url + f"/v1/chat?n={i}", {"X-Key": "k"}, b'{"a": 1}')
        assert conn.status == 200
        assert conn.headers["content-type"].startswith("application/json")
        assert await conn.read() == (
            b'{"path": "/v1/chat?n=%d", "body": "{\\"a\\": 1}", "key": "k"}' % i
        )
        conn.release()
    assert len(peers) == 3 and len(set(peers)) == 1, "one connection served all three"
    assert len(pool.open) == 1


async def test_a_chunked_answer_is_read_as_it_arrives(pool, raw_server) -> None:
    go_on = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await go_on.wait()
        writer.write(b"6;ext=1\r\nsecond\r\n0\r\nX-Trailer: 1\r\n\r\n")
        await writer.drain()
        await reader.read()

    url = await raw_server(script)
    conn = await pool.request("POST", url + "/x", {}, b"{}")
    assert await asyncio.wait_for(conn.readany(), 2) == b"first"
    go_on.set()
    assert await asyncio.wait_for(conn.readany(), 2) == b"second"
    assert await conn.readany() == b""
    assert conn.complete
    conn.release()
    assert len(pool.open) == 1, "a chunked answer read to its end leaves the connection reusable"


async def test_an_answer_that_ends_with_its_connection(pool, raw_server) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of ")
        await writer.drain()
        writer.write(b"it")

    url = await raw_server(script)
    conn = await pool.request("GET", url + "/", {})
    assert await asyncio.wait_for(conn.read(), 2) == b"all of it"
    conn.release()
    await asyncio.sleep(0.05)
    assert not pool.open, "a connection whose end framed the answer is not reused"


async def test_an_interim_answer_is_skipped(pool, raw_server) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()

    url = await raw_server(script)
    conn = await pool.request("POST", url + "/", {}, b"x")
    assert conn.status == 201
    assert await conn.read() == b"ok"
    conn.release()


@pytest.mark.parametrize(
    "answer, why",
    [
        (b"", "without answering"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not HTTP"),
        (b"HTTP/1.1 2xx OK\r\n\r\n", "not HTTP"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nonly5", "in the middle of its answer"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", "malformed chunk"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "in the middle"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 70_000, "head too long"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 12\r\n\r\nhi",
            "more than one Content-Length",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\nhi",
            "more than one Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nhi", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi", "bare LF"),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nhi", "bare LF"),
        (
            b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://api.example.com/v1/models\r\n"
            b"Content-Length: 0\r\n\r\n",
            r"redirect \(301\) to https://api.example.com/v1/models",
        ),
        (b"HTTP/1.1 307 Temporary Redirect\r\nContent-Length: 0\r\n\r\n", r"redirect \(307\)"),
    ],
)
async def test_a_broken_answer_is_an_error_and_the_connection_is_dropped(
    pool, raw_server, answer: bytes, why: str
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    url = await raw_server(script)
    with pytest.raises(nexus.BackendHTTPError, match=why):
        conn = await asyncio.wait_for(pool.request("POST", url + "/", {}, b"{}"), 2)
        try:
            await asyncio.wait_for(conn.read(), 2)
        finally:
            conn.release()
    await asyncio.sleep(0.05)
    assert not pool.open


async def test_a_refused_connection_is_an_error(pool) -> None:
    with pytest.raises(nexus.BackendHTTPError, match="could not connect"):
        await pool.request("GET", f"http://127.0.0.1:{free_port()}/health", {})
    assert not pool.open


async def test_a_line_break_in_a_header_is_refused_without_showing_it(pool, app_server) -> None:
    url = await app_server(echo_app([]))
    with pytest.raises(nexus.BackendHTTPError) as failure:
        await pool.request("GET", url + "/", {"Authorization": "Bearer sk-secret\r\nX-Evil: 1"})
    assert "Authorization" in str(failure.value) and "sk-secret" not in str(failure.value)


async def test_a_connection_the_backend_closed_is_not_used_again(pool, raw_server) -> None:
    """As a server's keep-alive limit does, while the connection is idle."""
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    url = await raw_server(script)
    for _ in range(3):
        conn = await pool.request("POST", url + "/", {}, b"")
        assert await asyncio.wait_for(conn.read(), 2) == b"ok"
        conn.release()
        await asyncio.sleep(0.05)
    assert connections == 3


async def test_an_answer_not_read_to_its_end_closes_its_connection(pool, raw_server) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await reader.read()

    url = await raw_server(script)
    conn = await pool.request("GET", url + "/", {})
    assert await conn.readany() == b"first"
    conn.release()
    await asyncio.sleep(0.05)
    assert not pool.open


async def test_a_cancelled_wait_closes_its_connection(pool, raw_server) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers

    url = await raw_server(script)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(pool.request("GET", url + "/", {}), 0.2)
    await asyncio.sleep(0.05)
    assert not pool.open


async def test_a_slow_reader_pauses_the_socket_and_still_gets_everything(pool, raw_server) -> None:
    size = 4 * nexus.BACKEND_BUFFER_HIGH

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()
        await reader.read()

    url = await raw_server(script)
    conn = await pool.request("GET", url + "/", {})
    await asyncio.sleep(0.2)  # the whole body has been sent; little of it may be buffered
    assert conn.buffered <= 2 * nexus.BACKEND_BUFFER_HIGH
    received = 0
    for _ in range(10_000):
        block = await asyncio.wait_for(conn.readany(), 2)
        if not block:
            break
        received += len(block)
    assert received == size
    conn.release()


async def test_read_takes_a_whole_body_bigger_than_the_buffer(pool, raw_server) -> None:
    size = 3 * nexus.BACKEND_BUFFER_HIGH

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"y" * size)
        await writer.drain()
        await reader.read()

    url = await raw_server(script)
    conn = await pool.request("GET", url + "/", {})
    assert len(await asyncio.wait_for(conn.read(), 5)) == size
    conn.release()


async def test_fetch_reads_at_most_its_limit(pool, raw_server) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"z" * 100_000)
        await writer.drain()
        await reader.read()

    url = await raw_server(script)
    status, body = await pool.fetch("GET", url + "/", {}, limit=1000)
    assert status == 200 and body == b"z" * 1000
    await asyncio.sleep(0.05)
    assert not pool.open, "a body not read to its end is not reused"


async def test_https_backends_are_reached_over_tls(pool, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    server = TestServer(echo_app([]), host="127.0.0.1", port=free_port())
    await server.start_server(ssl=server_tls)
    try:
        url = f"https://127.0.0.1:{server.port}/v1/models"
        with pytest.raises(nexus.BackendHTTPError, match="could not connect"):
            await pool.request("GET", url, {})  # not signed by anyone the system trusts
        trusted = ssl.create_default_context(cafile=cert)
        trusting = nexus.BackendPool(connect_timeout=2.0, tls=trusted)
        try:
            status, body = await trusting.fetch("GET", url, {})
            assert status == 200 and b'"path": "/v1/models"' in body
        finally:
            trusting.close()
    finally:
        await server.close()


def test_every_package_nexus_imports_is_declared() -> None:
    """certifi (the https backends' certificates where the system's cannot be found) and
    aiohappyeyeballs (dual-stack connects) are imported by Nexus itself: declared and pinned,
    not there by accident because aiohttp or requests brings them."""
    tree = ast.parse((ROOT / "nexus.py").read_text(encoding="utf-8"))
    modules = set()
    for node in ast.walk(tree):  # imports inside functions too
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    distributions = importlib.metadata.packages_distributions()
    wanted = {
        distributions[m][0].lower()
        for m in modules
        if m not in sys.stdlib_module_names and m != "__future__"
    }
    assert {"certifi", "aiohappyeyeballs"} <= wanted
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {re.split(r"[=<>; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert wanted <= declared, f"not in pyproject.toml: {sorted(wanted - declared)}"
    pinned = (ROOT / "requirements.txt").read_text(encoding="utf-8").lower()
    for name in wanted:
        assert re.search(rf"^{re.escape(name)}==", pinned, re.M), f"{name} not pinned"


async def answer_twice(answer: bytes) -> tuple[Script, list[int]]:
    """A script answering every request on a connection with the same bytes; counts
    connections."""
    connections = [0]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        for _ in range(10):
            await read_request(reader)
            writer.write(answer)
            await writer.drain()

    return script, connections


@pytest.mark.parametrize(
    "answer, reused",
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 2\r\n\r\nhi", False),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi", False),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\n",
            False,
        ),
    ],
)
async def test_framing_and_keep_alive_follow_the_headers_in_any_case(
    pool, raw_server, answer: bytes, reused: bool
) -> None:
    script, connections = await answer_twice(answer)
    url = await raw_server(script)
    for _ in range(2):
        conn = await pool.request("GET", url + "/", {})
        assert await asyncio.wait_for(conn.read(), 2) == b"hi"
        conn.release()
        await asyncio.sleep(0.02)
    assert connections[0] == (1 if reused else 2)


async def test_a_content_length_in_other_digits_is_an_error_not_a_crash(
    pool, raw_server, caplog
) -> None:
    script, _ = await answer_twice(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\nhi")
    url = await raw_server(script)
    with pytest.raises(nexus.BackendHTTPError, match="Content-Length"):
        await pool.request("GET", url + "/", {})
    assert "data_received" not in caplog.text


async def test_a_connection_idle_past_the_keep_alive_limit_is_not_reused(
    pool, raw_server, monkeypatch
) -> None:
    monkeypatch.setattr(nexus, "BACKEND_KEEPALIVE_SECONDS", 0.1)
    script, connections = await answer_twice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    url = await raw_server(script)
    for _ in range(2):
        conn = await pool.request("GET", url + "/", {})
        assert await conn.read() == b"hi"
        conn.release()
        await asyncio.sleep(0.3)
    assert connections[0] == 2


async def test_fetch_leaves_the_pooled_connections_alone(pool, raw_server) -> None:
    script, connections = await answer_twice(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    url = await raw_server(script)
    conn = await pool.request("GET", url + "/", {})
    assert await conn.read() == b"hi"
    conn.release()
    assert await pool.fetch("GET", url + "/health", {}) == (200, b"hi")
    await asyncio.sleep(0.05)
    assert not conn.closed and connections[0] == 2
    again = await pool.request("GET", url + "/", {})
    assert again is conn
    await again.read()
    again.release()


async def test_a_reset_cuts_an_answer_framed_by_its_connection(pool, raw_server) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # an RST, not a FIN

    url = await raw_server(script)
    conn = await pool.request("GET", url + "/", {})
    with pytest.raises(nexus.BackendHTTPError, match="in the middle"):
        await asyncio.wait_for(conn.read(), 2)
    conn.release()


async def test_a_stream_left_before_its_end_closes_its_connection(pool, raw_server) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"6\r\ndata: \r\n")
        await writer.drain()
        await reader.read()  # the backend learns the client left when this ends

    url = await raw_server(script)
    conn = await pool.request("POST", url + "/", {}, b"{}")
    await conn.readany()
    conn.release()  # not whole: the backend must stop generating
    await asyncio.sleep(0.05)
    assert not pool.open


async def test_a_host_name_that_cannot_be_encoded_is_an_error(pool) -> None:
    with pytest.raises(nexus.BackendHTTPError, match="host name"):
        await pool.request("GET", "http://a..b:1234/v1/models", {})
    assert await nexus.detect_backend_type(pool, "http://a..b:1234") is None


async def test_a_connect_that_hangs_is_a_timeout() -> None:
    pool = nexus.BackendPool(connect_timeout=0.3)
    try:
        with unaccepting_listener() as port, pytest.raises(TimeoutError) as failure:
            # a TimeoutError: handled as a silent backend's
            await asyncio.wait_for(pool.request("GET", f"http://127.0.0.1:{port}/", {}), 5)
        assert isinstance(failure.value, nexus.BackendHTTPError)
        assert nexus.describe_failure(failure.value) == "timed out connecting"
    finally:
        pool.close()


@pytest.mark.parametrize("end_comes", [True, False])
async def test_a_finished_stream_keeps_its_connection_only_if_its_end_comes(
    pool, raw_server, monkeypatch, end_comes: bool
) -> None:
    """A stream whose [DONE] was read goes back to the pool when the chunked coding's end
    arrives; if it never does, the connection is closed after the drain limit."""
    monkeypatch.setattr(nexus, "BACKEND_DRAIN_SECONDS", 0.1)
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for _ in range(2):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n")
            await writer.drain()
            if not end_comes:
                await reader.read()
                return
            await asyncio.sleep(0.02)  # the end comes in a later packet
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    url = await raw_server(script)
    conn = await pool.request("POST", url + "/", {}, b"{}")
    assert await asyncio.wait_for(conn.readany(), 2) == b"data: [DONE]\n\n"
    conn.whole = True
    conn.release()
    await asyncio.sleep(0.3)
    if end_comes:
        again = await pool.request("POST", url + "/", {}, b"{}")
        assert again is conn and connections == 1
        again.close()
    else:
        assert not pool.open


@pytest.mark.parametrize("dies_after", [0.0, 0.3])
async def test_a_request_the_backend_took_before_closing_is_not_sent_again(
    pool, raw_server, dies_after: float
) -> None:
    """However soon the close comes, the backend may have acted on the request (a POST that
    started a generation, or a tool's side effect): it is never sent twice."""
    bodies: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            _, body = await read_request(reader)
            bodies.append(body)
            if len(bodies) == 2:
                await asyncio.sleep(dies_after)  # working on it, then dies without a word
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    url = await raw_server(script)
    conn = await pool.request("POST", url + "/", {}, b'{"n": 1}')
    assert await conn.read() == b"ok"
    conn.release()
    with pytest.raises(nexus.BackendHTTPError, match="without answering"):
        await asyncio.wait_for(pool.request("POST", url + "/", {}, b'{"n": 2}'), 5)
    assert bodies == [b'{"n": 1}', b'{"n": 2}'], "sent once: the backend may have acted on it"


async def test_an_ollama_poll_that_fails_stops_its_other_shows(pool, raw_server) -> None:
    """One /api/show breaking fails the poll; the others are not left running past it."""
    tags = b'{"models": [{"model": "a"}, {"model": "b"}, {"model": "bad"}]}'
    hanging: list[str] = []
    ended: list[str] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await read_request(reader)
        if head.startswith(b"GET /api/tags"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(tags), tags))
            await writer.drain()
            return
        if head.startswith(b"GET /api/ps"):  # read alongside the model list
            writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{"models": []}')
            await writer.drain()
            return
        if b'"bad"' in body:
            await asyncio.sleep(0.1)  # the others are waiting by now
            return  # closed without answering
        hanging.append(body.decode())
        await reader.read()  # until Nexus lets the connection go
        ended.append(body.decode())

    url = await raw_server(script)
    backend = nexus.Backend(name="o", url=url, type="ollama")
    with pytest.raises(nexus.BackendHTTPError, match="without answering"):
        await asyncio.wait_for(nexus.OllamaAdapter().poll(pool, backend), 5)
    for _ in range(50):
        if len(ended) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(hanging) == 2 and len(ended) == 2, "the other shows were stopped with the poll"


def answer(body: bytes, *headers: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (
        len(body),
        b"".join(h + b"\r\n" for h in headers),
        body,
    )


async def test_fetch_then_sends_both_requests_at_once_on_one_connection(pool, raw_server) -> None:
    """The second request goes with the first (pipelined); both answers may come in one
    segment, and neither spills into the other."""
    connections: list[list[bytes]] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads = [(await read_request(reader))[0], (await read_request(reader))[0]]
        connections.append([h.split(b"\r\n")[0] for h in heads])
        writer.write(answer(b'{"first": 1}') + answer(b'{"second": 2}'))  # one write
        await writer.drain()
        await reader.read()

    url = await raw_server(script)
    both = pool.fetch_then(url + "/api/tags", url + "/api/ps", {}, 1 << 20, 2.0)
    first, second = await asyncio.wait_for(both, 5)
    assert first == (200, b'{"first": 1}') and second == (200, b'{"second": 2}')
    assert connections == [[b"GET /api/tags HTTP/1.1", b"GET /api/ps HTTP/1.1"]]


async def test_fetch_then_second_answer_arriving_in_pieces(pool, raw_server) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await read_request(reader)
        data = answer(b"[1]") + answer(b'{"models": []}')
        cut = len(answer(b"[1]")) + 7  # the second head cut in the middle of its status line
        for piece in (data[:cut], data[cut:-3], data[-3:]):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        await reader.read()

    url = await raw_server(script)
    both = pool.fetch_then(url + "/a", url + "/b", {}, 1 << 20, 2.0)
    first, second = await asyncio.wait_for(both, 5)
    assert first == (200, b"[1]") and second == (200, b'{"models": []}')


async def test_fetch_then_second_answer_late_or_broken(pool, raw_server) -> None:
    """The second answer slower than its grace is None (nothing known); one that is not HTTP
    is its error, returned. The first stands either way."""
    for tail in (b"", b"garbage\r\n\r\n"):

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            await read_request(reader)
            writer.write(answer(b"[1]") + tail)  # noqa: B023 (awaited within this iteration)
            await writer.drain()
            await reader.read()  # never answers the second (or answered garbage)

        url = await raw_server(script)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first, second = await pool.fetch_then(url + "/a", url + "/b", {}, 1 << 20, 0.3)
        assert first == (200, b"[1]")
        if tail:
            assert isinstance(second, nexus.BackendHTTPError), second
            assert loop.time() - started < 0.3
        else:
            assert second is None
            assert loop.time() - started < 2.0


def unpipelined(answers: dict[bytes, bytes]) -> Script:
    """A server that answers one request at a time and drops whatever came after it before
    its answer went out: a pipelined request is never answered."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            with contextlib.suppress(TimeoutError):  # what came with the request: dropped
                await asyncio.wait_for(reader.read(1 << 16), 0.05)
            writer.write(answer(answers[head.split(b" ")[1]]))
            await writer.drain()

    return script


async def test_fetch_then_asks_one_by_one_when_told(pool, raw_server) -> None:
    url = await raw_server(unpipelined({b"/a": b"[1]", b"/b": b"[2]"}))
    first, second = await pool.fetch_then(url + "/a", url + "/b", {}, 1 << 20, 0.3)
    assert first == (200, b"[1]") and second is None  # the pipelined request went unanswered
    first, second = await pool.fetch_then(url + "/a", url + "/b", {}, 1 << 20, 0.3, False)
    assert first == (200, b"[1]") and second == (200, b"[2]")


async def test_an_ollama_that_drops_pipelined_requests_is_asked_one_by_one(
    pool, raw_server
) -> None:
    """The first poll's /api/ps goes unanswered; from then on that backend is asked for it
    after the model list's answer, and what is loaded is known again."""
    tags = b'{"models": [{"model": "m", "digest": "d"}]}'
    ps = b'{"models": [{"model": "m", "size_vram": 7}]}'
    url = await raw_server(unpipelined({b"/api/tags": tags, b"/api/ps": ps, b"/api/show": b"{}"}))
    backend = nexus.Backend(name="o", url=url, type="ollama")
    adapter = nexus.OllamaAdapter()
    assert list(await asyncio.wait_for(adapter.poll(pool, backend), 5)) == ["m"]
    assert backend.loaded is None  # not known yet
    assert list(await asyncio.wait_for(adapter.poll(pool, backend), 5)) == ["m"]
    assert backend.loaded == {"m": 7}


async def test_fetch_then_asks_again_when_the_first_answer_closes(pool, raw_server) -> None:
    """A server (or a proxy before it) that keeps no connection: the second request is asked
    again on a connection of its own."""
    paths: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        paths.append(head.split(b" ")[1])
        body = b"[%d]" % len(paths)
        writer.write(answer(body, b"Connection: close"))
        await writer.drain()

    url = await raw_server(script)
    first, second = await pool.fetch_then(url + "/a", url + "/b", {}, 1 << 20, 2.0)
    assert first == (200, b"[1]") and second == (200, b"[2]")
    assert paths == [b"/a", b"/b"]


async def test_a_request_asks_for_no_compression(pool, raw_server) -> None:
    heads: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        heads.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    url = await raw_server(script)
    assert await pool.fetch("POST", url + "/", {}, b"{}") == (200, b"ok")
    assert b"\r\nAccept-Encoding: identity\r\n" in heads[0]


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "raw deflate"])
async def test_a_compressed_answer_is_decoded(pool, raw_server, coding: str) -> None:
    """Sent anyway by a server (or a proxy in front of it) that compresses whatever it is
    asked: read as the JSON it is."""
    document = b'{"object": "list", "data": [' + b'{"id": "m"}, ' * 200 + b'{"id": "z"}]}'
    wbits = {"gzip": 31, "x-gzip": 31, "deflate": 15, "raw deflate": -15}[coding]
    packer = zlib.compressobj(wbits=wbits)
    packed = packer.compress(document) + packer.flush()
    name = coding.split()[-1].encode()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
                % (name, len(packed))
            )
            writer.write(packed)
            await writer.drain()
        await reader.read()

    url = await raw_server(script)
    for _ in range(2):  # and the connection serves the next answer as well
        conn = await pool.request("GET", url + "/v1/models", {})
        assert await asyncio.wait_for(conn.read(), 2) == document
        conn.release()
    assert len(pool.open) == 1


async def test_a_compressed_stream_is_decoded_as_it_arrives(pool, raw_server) -> None:
    go_on = asyncio.Event()
    packer = zlib.compressobj(wbits=31)
    first = packer.compress(b"data: {}\n\n") + packer.flush(zlib.Z_SYNC_FLUSH)
    last = packer.compress(b"data: [DONE]\n\n") + packer.flush()

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk(first)
        )
        await writer.drain()
        await go_on.wait()
        writer.write(chunk(last) + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    url = await raw_server(script)
    conn = await pool.request("POST", url + "/v1/chat/completions", {}, b"{}")
    lines = nexus.SseLines(conn)
    assert await asyncio.wait_for(lines.readline(), 2) == b"data: {}"
    go_on.set()
    assert await asyncio.wait_for(lines.readline(), 2) == b"data: [DONE]"
    assert await asyncio.wait_for(lines.readline(), 2) == b""
    conn.release()


@pytest.mark.parametrize(
    "coding, body, why",
    [
        (b"br", b"\x0b\x02\x80hi\x03", "encoding Nexus cannot decode: br"),
        (b"gzip", b"not gzip at all", "does not decode"),
    ],
)
async def test_an_answer_in_an_encoding_that_does_not_decode_is_an_error(
    pool, raw_server, coding: bytes, body: bytes, why: str
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (coding, len(body), body)
        )
        await writer.drain()
        await reader.read()

    url = await raw_server(script)
    with pytest.raises(nexus.BackendHTTPError, match=why):
        conn = await pool.request("GET", url + "/", {})
        try:
            await asyncio.wait_for(conn.read(), 2)
        finally:
            conn.release()


async def test_a_stream_ended_by_its_connection_that_does_not_decode_is_an_error(
    pool, raw_server
) -> None:
    """A body framed by its connection's end whose compression breaks: the reader of a stream
    gets the error, not a quiet end (aborting the connection also ends such a body)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\nnot gzip at all")
        await writer.drain()
        await reader.read()

    url = await raw_server(script)
    conn = await pool.request("GET", url + "/", {})
    try:
        with pytest.raises(nexus.BackendHTTPError, match="does not decode"):
            for _ in range(10):
                assert await asyncio.wait_for(conn.readany(), 2), "ended quietly"
    finally:
        conn.release()


async def test_a_drained_streams_timer_does_not_close_the_next_answer(
    pool, raw_server, monkeypatch
) -> None:
    """Stream 1's end comes soon and its connection serves stream 2; the drain limit of
    stream 1 passing while stream 2 waits for its own end closes nothing."""
    monkeypatch.setattr(nexus, "BACKEND_DRAIN_SECONDS", 1.0)
    connections = 0
    ends = [0.1, 0.8]  # how long after its [DONE] each stream's end comes

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        for wait in ends:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n")
            await writer.drain()
            await asyncio.sleep(wait)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    url = await raw_server(script)
    first = None
    for _ in ends:
        conn = await pool.request("POST", url + "/", {}, b"{}")
        assert first is None or conn is first
        first = conn
        assert await asyncio.wait_for(conn.readany(), 2) == b"data: [DONE]\n\n"
        conn.whole = True
        conn.release()
        await asyncio.sleep(0.4)
    await asyncio.sleep(0.6)  # stream 1's drain limit has passed; stream 2's end has come
    last = await pool.request("POST", url + "/", {}, b"{}")
    assert last is first and connections == 1
    assert await asyncio.wait_for(last.read(), 2) == b"ok"
    last.release()


# In a namespace of its own: dual.test has an IPv6 address whose packets vanish (a neighbour
# nobody is, so no refusal ever comes) and an IPv4 one that answers.
DUAL_STACK_CLIENT = """
import asyncio, json, socket, sys, time
sys.path.insert(0, sys.argv[1])
import nexus

async def main():
    async def answer(reader, writer):
        await reader.readuntil(b"\\r\\n\\r\\n")
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    infos = await asyncio.get_running_loop().getaddrinfo("dual.test", port, type=socket.SOCK_STREAM)
    out = {"order": [info[0].name for info in infos]}
    try:
        socket.create_connection(("2001:db8::2", port), timeout=0.5).close()
        out["blackholed"] = False
    except TimeoutError:
        out["blackholed"] = True
    pool = nexus.BackendPool(connect_timeout=5.0)
    started = time.monotonic()
    try:
        out["answer"] = list(await pool.fetch("GET", f"http://dual.test:{port}/v1/models", {}))
        out["answer"][1] = out["answer"][1].decode()
    except Exception as exc:
        out["error"] = str(exc)
    out["seconds"] = time.monotonic() - started
    pool.close()
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.netns
@requires_root
def test_a_dual_stack_host_whose_ipv6_blackholes_connects_over_ipv4_at_once() -> None:
    """RFC 8305: the IPv4 attempt starts 250 ms after the IPv6 one, not after its timeout."""
    with isolated_namespace() as ns:
        hosts = Path("/etc/netns") / ns.name / "hosts"  # `ip netns exec` mounts it on /etc/hosts
        hosts.parent.mkdir(parents=True)
        try:
            hosts.write_text("2001:db8::2 dual.test\n127.0.0.1 dual.test\n")
            for command in (
                "link add veth0 type veth peer name veth1",
                "addr add 2001:db8::1/64 dev veth0 nodad",
                "link set veth0 up",
                "link set veth1 up",
                "-6 neigh add 2001:db8::2 lladdr 02:00:00:00:00:99 dev veth0 nud permanent",
            ):
                subprocess.run(["ip", "-n", ns.name, *command.split()], check=True, timeout=10)
            ns.run(["sysctl", "-qw", "net.ipv6.conf.veth1.disable_ipv6=1"])
            client = ns.python(DUAL_STACK_CLIENT, str(ROOT))
            out = json.loads(client.read_line(timeout=20))
        finally:
            hosts.unlink(missing_ok=True)
            hosts.parent.rmdir()
    assert out["order"][0] == "AF_INET6" and out["blackholed"], out  # IPv6 first, and lost
    assert out.get("answer") == [200, "ok"], out
    assert out["seconds"] < 2.0, out  # not the 5 s connect limit spent on IPv6


@pytest.fixture
def no_proxy_settings(monkeypatch) -> None:
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)


async def test_https_backends_are_reached_through_the_https_proxy(
    tmp_path: Path, monkeypatch, no_proxy_settings, app_server
) -> None:
    cert, key = self_signed(tmp_path, "cloud.test")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    peers: list[object] = []
    backend = TestServer(echo_app(peers), host="127.0.0.1", port=free_port())
    await backend.start_server(ssl=server_tls)
    local = await app_server(echo_app([]))  # a plain-http backend on the LAN: never proxied
    proxy = ConnectProxy()
    monkeypatch.setenv("HTTPS_PROXY", await proxy.start())
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")
    pool = nexus.BackendPool(connect_timeout=2.0, tls=ssl.create_default_context(cafile=cert))
    try:
        url = f"https://cloud.test:{backend.port}/v1/models"
        for _ in range(2):  # the second on the same tunnelled connection
            conn = await asyncio.wait_for(pool.request("GET", url, {"X-Key": "k"}), 5)
            assert conn.status == 200
            assert b'"path": "/v1/models"' in await asyncio.wait_for(conn.read(), 2)
            conn.release()
        assert proxy.requests == [
            b"CONNECT cloud.test:%d HTTP/1.1\r\nHost: cloud.test:%d\r\n" % ((backend.port,) * 2)
            + b"User-Agent: "
            + nexus.BACKEND_USER_AGENT.encode()
            + b"\r\n\r\n"
        ]
        assert proxy.tunnelled > 0 and len(peers) == 2  # the requests went through it, in TLS
        assert await pool.fetch("GET", local + "/health", {}) == (
            200,
            b'{"path": "/health", "body": "", "key": null}',
        )
        assert len(proxy.requests) == 1
    finally:
        pool.close()
        await proxy.stop()
        await backend.close()


async def test_no_proxy_and_a_refused_tunnel(monkeypatch, no_proxy_settings) -> None:
    refusing = ConnectProxy(refuse=b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
    monkeypatch.setenv("https_proxy", "http://user:secret@" + (await refusing.start())[7:])
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    pool = nexus.BackendPool(connect_timeout=2.0)
    try:
        with pytest.raises(nexus.BackendHTTPError) as failure:
            await pool.request("GET", "https://api.cloud.test/v1/models", {})
        assert "407" in str(failure.value) and "secret" not in str(failure.value)
        assert b"Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=\r\n" in refusing.requests[0]
        with pytest.raises(nexus.BackendHTTPError, match="could not connect"):
            # not proxied: nothing listens there
            await pool.request("GET", f"https://127.0.0.1:{free_port()}/v1/models", {})
        assert len(refusing.requests) == 1
    finally:
        pool.close()
        await refusing.stop()


async def test_an_https_proxy_nexus_cannot_use_is_named_without_its_password(
    monkeypatch, no_proxy_settings
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://user:pw-secret@127.0.0.1:1080")
    pool = nexus.BackendPool(connect_timeout=2.0)
    try:
        with pytest.raises(nexus.BackendHTTPError, match="cannot use HTTPS_PROXY") as failure:
            await pool.request("GET", "https://api.cloud.test/v1/models", {})
        assert "pw-secret" not in str(failure.value)
    finally:
        pool.close()


async def test_a_compressed_answer_that_expands_too_far_is_an_error(
    pool, raw_server, monkeypatch
) -> None:
    """A few kB that would become gigabytes (a zip bomb) end the answer, not Nexus's memory."""
    monkeypatch.setattr(nexus, "BACKEND_DECODED_BLOCK_MAX", 1024 * 1024)
    packer = zlib.compressobj(wbits=31)
    packed = packer.compress(b"\0" * (4 * 1024 * 1024)) + packer.flush()
    assert len(packed) < 16 * 1024

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(packed), packed)
        )
        await writer.drain()
        await reader.read()

    url = await raw_server(script)
    with pytest.raises(nexus.BackendHTTPError, match="expands"):
        await pool.fetch("GET", url + "/v1/models", {})
