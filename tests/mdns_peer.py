"""Both ends of an mDNS exchange, and mock backends, run as scripts inside test namespaces.

    python mdns_peer.py announce ADDRESS PORT [TYPE [NAME [KEY=VALUE ...]]] [OPTIONS]
        Serves a mock Ollama on ADDRESS:PORT and announces it by mDNS as NAME.TYPE (default:
        "mock-ollama._ollama._tcp.local.", TXT type=ollama api_path=/). A TXT value written
        hex:FFFE is sent as those raw bytes. Options:
          --no-txt           announce without any TXT record content
          --serve=KIND       what answers on the port: ollama (default), junk (an HTML page
                             for every path, not an LLM server) or none (nothing listens)
          --no-address       announce no address record, so the service never resolves
        Prints {"event": "announced"} once registered. Reads commands on stdin:
        "unregister" (prints {"event": "unregistered"}), "register" (again), "quit".

    python mdns_peer.py serve ADDRESS PORT [KIND]
        Only the mock server (KIND as --serve above), no mDNS. Prints {"event": "serving"},
        then {"event": "request", "method", "path"} for every request it receives.

    python mdns_peer.py browse [SECONDS]
        Browses _ollama._tcp.local. and _llm._tcp.local. with zeroconf's default settings,
        resolves each service, fetches its /api/tags and prints one JSON line per event:
        {"event": "added", "name", "address", "port", "txt", "models", "t"} and
        {"event": "removed", "name", "t"} (t: seconds since browsing started).
        Stops after SECONDS (default 60) or when stdin closes.

The mock Ollama speaks /api/tags, /api/show and /v1/chat/completions (its answer names the
address it serves on), enough for Nexus to list its models and route a chat to it. Each line
printed is one JSON object, so a test can follow the exchange step by step.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

from aiohttp import ClientSession, ClientTimeout, web
from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

SERVICE_TYPES = ["_ollama._tcp.local.", "_llm._tcp.local."]
MODELS = {
    "models": [
        {
            "name": "llama3:8b",
            "model": "llama3:8b",
            "size": 4661224676,
            "digest": "365c0bd3c000",
            "details": {"family": "llama", "parameter_size": "8.0B"},
        }
    ]
}
RESOLVE_TIMEOUT_MS = 3000


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def read_stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def mock_app(kind: str, address: str) -> web.Application:
    """The mock server: an Ollama, or a junk page for every path (not an LLM server)."""

    async def tags(request: web.Request) -> web.Response:
        return web.json_response(MODELS)

    async def show(request: web.Request) -> web.Response:
        return web.json_response(
            {"capabilities": ["completion"], "model_info": {"llama.context_length": 8192}}
        )

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        message = {"role": "assistant", "content": f"Hello from the mock at {address}"}
        return web.json_response(
            {
                "id": "chatcmpl-mock",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
            }
        )

    async def junk(request: web.Request) -> web.Response:
        return web.Response(text="<html><body>It works!</body></html>", content_type="text/html")

    @web.middleware
    async def report(request: web.Request, handler) -> web.StreamResponse:
        emit(event="request", method=request.method, path=request.path)
        return await handler(request)

    app = web.Application(middlewares=[report])
    if kind == "ollama":
        app.router.add_get("/api/tags", tags)
        app.router.add_post("/api/show", show)
        app.router.add_post("/v1/chat/completions", chat)
    else:
        app.router.add_route("*", "/{tail:.*}", junk)
    return app


async def start_mock(kind: str, address: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(mock_app(kind, address), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address, port).start()
    return runner


def txt_value(text: str) -> bytes:
    return bytes.fromhex(text[4:]) if text.startswith("hex:") else text.encode()


async def announce(address: str, port: int, args: list[str]) -> None:
    options = [a for a in args if a.startswith("--")]
    args = [a for a in args if not a.startswith("--")]
    service_type = args[0] if args else "_ollama._tcp.local."
    name = args[1] if len(args) > 1 else "mock-ollama"
    txt: dict[str, bytes] = {k: txt_value(v) for k, v in (i.split("=", 1) for i in args[2:])}
    if "--no-txt" in options:
        txt = {}
    elif not txt:
        txt = {"type": b"ollama", "api_path": b"/"}
    serve = next((o.split("=", 1)[1] for o in options if o.startswith("--serve=")), "ollama")
    runner = await start_mock(serve, address, port) if serve != "none" else None
    addresses = [] if "--no-address" in options else [socket.inet_aton(address)]
    info = AsyncServiceInfo(
        service_type,
        f"{name}.{service_type}",
        addresses=addresses,
        port=port,
        properties=txt,
        server=f"{name}.local.",
    )
    azc = AsyncZeroconf()
    await azc.async_register_service(info)
    emit(event="announced")
    commands = await read_stdin_lines()
    try:
        while line := (await commands.readline()).decode().strip():
            if line == "unregister":
                await azc.async_unregister_service(info)
                emit(event="unregistered")
            elif line == "register":
                await azc.async_register_service(info)
                emit(event="announced")
            elif line == "quit":
                break
    finally:
        await azc.async_close()
        if runner is not None:
            await runner.cleanup()


async def serve(address: str, port: int, kind: str) -> None:
    runner = await start_mock(kind, address, port)
    emit(event="serving")
    try:
        await asyncio.Event().wait()  # until the test ends the process
    finally:
        await runner.cleanup()


async def browse(seconds: float) -> None:
    started = time.monotonic()
    azc = AsyncZeroconf()
    pending: set[asyncio.Task] = set()
    http = ClientSession(timeout=ClientTimeout(total=5))

    async def added(service_type: str, name: str) -> None:
        try:
            await resolve_and_fetch(service_type, name)
        except Exception as exc:  # reported to the test rather than lost in a task
            emit(event="error", name=name, error=repr(exc), t=time.monotonic() - started)

    async def resolve_and_fetch(service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(azc.zeroconf, RESOLVE_TIMEOUT_MS):
            emit(event="unresolved", name=name, t=time.monotonic() - started)
            return
        addresses = info.parsed_addresses()
        txt = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        models = None
        if addresses:
            async with http.get(f"http://{addresses[0]}:{info.port}/api/tags") as resp:
                models = [m["name"] for m in (await resp.json())["models"]]
        emit(
            event="added",
            name=name,
            address=addresses[0] if addresses else None,
            port=info.port,
            txt=txt,
            models=models,
            t=time.monotonic() - started,
        )

    def on_change(
        zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Added:
            task = asyncio.ensure_future(added(service_type, name))
            pending.add(task)
            task.add_done_callback(pending.discard)
        elif state_change is ServiceStateChange.Removed:
            emit(event="removed", name=name, t=time.monotonic() - started)

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPES, handlers=[on_change])
    emit(event="browsing")
    commands = await read_stdin_lines()
    try:
        await asyncio.wait_for(commands.read(), timeout=seconds)
    except TimeoutError:
        pass
    finally:
        await browser.async_cancel()
        for task in pending:
            task.cancel()
        await http.close()
        await azc.async_close()


def main() -> None:
    role = sys.argv[1]
    if role == "announce":
        asyncio.run(announce(sys.argv[2], int(sys.argv[3]), sys.argv[4:]))
    elif role == "serve":
        kind = sys.argv[4] if len(sys.argv) > 4 else "ollama"
        asyncio.run(serve(sys.argv[2], int(sys.argv[3]), kind))
    elif role == "browse":
        asyncio.run(browse(float(sys.argv[2]) if len(sys.argv) > 2 else 60.0))
    else:
        sys.exit(f"unknown role {role!r}: use announce, serve or browse")


if __name__ == "__main__":
    main()
