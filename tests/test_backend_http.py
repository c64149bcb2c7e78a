"""Nexus's HTTP/1.1 client to its backends (BackendPool), against real servers on 127.0.0.1:
aiohttp apps for well-behaved answers, raw sockets for the exact bytes a broken one sends."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import free_port, unaccepting_listener

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


@pytest.mark.parametrize("closes", ["while idle", "as the next request arrives"])
async def test_a_connection_the_backend_closed_is_not_used_again(
    pool, raw_server, closes: str
) -> None:
    """As a server's keep-alive limit does. When the close meets a request that went out, the
    request goes again on a new connection: nothing was answered."""
    connections = 0

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if closes != "while idle":
            await reader.readuntil(b"\r\n\r\n")  # the next request arrives; closed unanswered

    url = await raw_server(script)
    for _ in range(3):
        conn = await pool.request("POST", url + "/", {}, b"")
        assert await asyncio.wait_for(conn.read(), 2) == b"ok"
        conn.release()
        if closes == "while idle":
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


async def test_a_request_the_backend_took_before_closing_is_not_sent_again(
    pool, raw_server, monkeypatch
) -> None:
    monkeypatch.setattr(nexus, "BACKEND_RACE_SECONDS", 0.1)
    bodies: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(2):
            _, body = await read_request(reader)
            bodies.append(body)
            if len(bodies) == 2:
                await asyncio.sleep(0.3)  # working on it, then dies without a word
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
