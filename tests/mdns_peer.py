"""Both ends of an mDNS exchange, run as scripts inside test network namespaces.

    python mdns_peer.py announce ADDRESS PORT [TYPE [NAME [KEY=VALUE ...]]]
        Serves a mock Ollama (GET /api/tags) on ADDRESS:PORT and announces it by mDNS as
        NAME.TYPE (default: "mock-ollama._ollama._tcp.local.", TXT type=ollama api_path=/).
        Prints {"event": "announced"} once registered. Reads commands on stdin:
        "unregister" (prints {"event": "unregistered"}), "register" (again), "quit".

    python mdns_peer.py browse [SECONDS]
        Browses _ollama._tcp.local. and _llm._tcp.local. with zeroconf's default settings,
        resolves each service, fetches its /api/tags and prints one JSON line per event:
        {"event": "added", "name", "address", "port", "txt", "models", "t"} and
        {"event": "removed", "name", "t"} (t: seconds since browsing started).
        Stops after SECONDS (default 60) or when stdin closes.

Each line printed is one JSON object, so a test can follow the exchange step by step.
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


async def announce(address: str, port: int, args: list[str]) -> None:
    service_type = args[0] if args else "_ollama._tcp.local."
    name = args[1] if len(args) > 1 else "mock-ollama"
    txt = dict(item.split("=", 1) for item in args[2:]) or {"type": "ollama", "api_path": "/"}

    async def tags(_request: web.Request) -> web.Response:
        return web.json_response(MODELS)

    app = web.Application()
    app.router.add_get("/api/tags", tags)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, address, port).start()

    info = AsyncServiceInfo(
        service_type,
        f"{name}.{service_type}",
        addresses=[socket.inet_aton(address)],
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
    elif role == "browse":
        asyncio.run(browse(float(sys.argv[2]) if len(sys.argv) > 2 else 60.0))
    else:
        sys.exit(f"unknown role {role!r}: use announce or browse")


if __name__ == "__main__":
    main()
