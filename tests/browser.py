"""A headless Chromium driven over the Chrome DevTools Protocol, for the dashboard's browser tests.

It needs nothing beyond aiohttp (already a Nexus dependency) and Debian's `chromium` package
(`apt-get install -y chromium`). `Chromium` starts a private browser with a throw-away profile,
talks CDP over a WebSocket, records every URL the page requests, and removes everything on
exit. Every wait is bounded. The browser's host resolver maps every name except the loopback
addresses to nothing, so even a page that tried could not reach beyond this machine (the
attempt still shows in `requested_urls`).

`png_size` and `png_colour_counts` decode a PNG with the standard library only, to tell a
blank screenshot from a drawn one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import struct
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
START_TIMEOUT_SECONDS = 30.0
COMMAND_TIMEOUT_SECONDS = 15.0
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
)


class BrowserError(RuntimeError):
    """The browser could not be started, or a DevTools command failed or timed out."""


def find_chromium() -> str:
    """Path of the Chromium binary (`CHROMIUM` in the environment wins)."""
    for candidate in (os.environ.get("CHROMIUM"), *CHROMIUM_CANDIDATES):
        if candidate and (path := shutil.which(candidate)):
            return path
    raise BrowserError("Chromium not found: install it with `apt-get install -y chromium`")


class Chromium:
    """One headless Chromium with one page, used as `async with Chromium() as browser:`."""

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_chromium()
        self.requested_urls: list[str] = []
        self.console_errors: list[str] = []
        self._profile = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._waiters: list[tuple[str, asyncio.Future[dict[str, Any]]]] = []

    async def __aenter__(self) -> Chromium:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- lifecycle --------------------------------------------------------------------------

    async def _start(self) -> None:
        self._profile = tempfile.mkdtemp(prefix="nexus-chromium-")
        log = open(Path(self._profile, "chromium.log"), "wb")  # noqa: SIM115 (closed below)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self.binary,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self._profile}",
                "about:blank",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group, so close() reaps all children
            )
        finally:
            log.close()
        port = await self._devtools_port()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        async with self._session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            targets = await resp.json()
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError(f"no page target in {targets!r}")
        self._ws = await self._session.ws_connect(
            pages[0]["webSocketDebuggerUrl"], max_msg_size=0, timeout=aiohttp.ClientWSTimeout(10)
        )
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send("Network.enable")
        await self.send("Network.setCacheDisabled", {"cacheDisabled": True})

    async def _devtools_port(self) -> int:
        """Wait (bounded) for Chromium to write the port it chose into its profile."""
        marker = Path(self._profile, "DevToolsActivePort")
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.returncode is not None:
                raise BrowserError(f"Chromium exited at start:\n{self._log_tail()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(marker.read_text().splitlines()[0])
            await asyncio.sleep(0.05)
        raise BrowserError(f"Chromium did not open DevTools in time:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return Path(self._profile, "chromium.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    async def close(self) -> None:
        """Stop the browser and all its processes, and remove its profile."""
        if self._reader:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._session:
            await self._session.close()
        proc = self._proc
        if proc and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await asyncio.wait_for(proc.wait(), 5)
        if proc:
            # Children (renderers, zygote) share the group; make sure none outlives the test.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._profile:
            shutil.rmtree(self._profile, ignore_errors=True)

    # -- protocol ---------------------------------------------------------------------------

    async def _read(self) -> None:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method", ""), data.get("params", {})
            if method == "Network.requestWillBeSent":
                self.requested_urls.append(params["request"]["url"])
            elif method == "Runtime.exceptionThrown":
                self.console_errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.console_errors.append(json.dumps(params.get("args", []))[:500])
            for name, fut in list(self._waiters):
                if name == method and not fut.done():
                    fut.set_result(params)
                    self._waiters.remove((name, fut))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(BrowserError("DevTools connection closed"))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = 0
    ) -> dict[str, Any]:
        """Send one CDP command and return its result (bounded by `timeout` seconds)."""
        if self._ws is None or self._ws.closed:
            raise BrowserError("DevTools connection is not open")
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.send_str(
            json.dumps({"id": msg_id, "method": method, "params": params or {}})
        )
        try:
            reply = await asyncio.wait_for(fut, timeout or COMMAND_TIMEOUT_SECONDS)
        except TimeoutError:
            raise BrowserError(f"{method} timed out") from None
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    # -- page helpers -----------------------------------------------------------------------

    async def navigate(self, url: str, timeout: float = 15) -> None:
        """Open `url` and wait for its load event."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append(("Page.loadEventFired", fut))
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigation to {url} failed: {result['errorText']}")
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise BrowserError(f"{url} did not finish loading in {timeout} s") from None

    async def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its value (promises are awaited)."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 10, interval: float = 0.1) -> Any:
        """Evaluate `expression` until it is truthy; return that value (bounded by `timeout`)."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(interval)
        raise BrowserError(
            f"timed out after {timeout} s waiting for {expression!r} (last: {value!r})"
        )

    async def set_viewport(self, width: int, height: int, mobile: bool = False) -> None:
        """Emulate a screen: desktop (1280x800) or phone (390x844, mobile)."""
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {
                "width": width,
                "height": height,
                "deviceScaleFactor": 1,
                "mobile": mobile,
                "screenWidth": width,
                "screenHeight": height,
            },
        )

    async def set_color_scheme(self, scheme: str) -> None:
        """Emulate the system colour scheme: "light" or "dark"."""
        await self.send(
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": scheme}]},
        )

    async def screenshot(self, full_page: bool = False) -> bytes:
        """A PNG of the viewport (or of the whole page)."""
        params: dict[str, Any] = {"format": "png", "optimizeForSpeed": True}
        if full_page:
            params["captureBeyondViewport"] = True
            metrics = await self.send("Page.getLayoutMetrics")
            size = metrics["cssContentSize"]
            params["clip"] = {
                "x": 0,
                "y": 0,
                "width": size["width"],
                "height": size["height"],
                "scale": 1,
            }
        result = await self.send("Page.captureScreenshot", params, timeout=30)
        return base64.b64decode(result["data"])


# -- PNG, standard library only -------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel


def _png_chunks(data: bytes) -> tuple[dict[str, Any], bytes]:
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    pos, header, idat = 8, {}, bytearray()
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            header = {
                "width": w,
                "height": h,
                "depth": depth,
                "type": ctype,
                "interlace": interlace,
            }
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    return header, bytes(idat)


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG."""
    header, _ = _png_chunks(data)
    return header["width"], header["height"]


def _add_bytewise(a: bytes | bytearray, b: bytes | bytearray) -> bytearray:
    """(a[i] + b[i]) & 0xFF for every i, on whole rows at once (big-int arithmetic, no carries)."""
    n = len(a)
    low, high = int.from_bytes(b"\x7f" * n, "little"), int.from_bytes(b"\x80" * n, "little")
    x, y = int.from_bytes(a, "little"), int.from_bytes(b, "little")
    return bytearray((((x & low) + (y & low)) ^ ((x ^ y) & high)).to_bytes(n, "little"))


def png_colour_counts(data: bytes, step: int = 1) -> Counter[tuple[int, ...]]:
    """How often each colour occurs in an 8-bit, non-interlaced PNG (every `step`-th row)."""
    header, idat = _png_chunks(data)
    if header["depth"] != 8 or header["interlace"] or header["type"] not in PNG_CHANNELS:
        raise ValueError(f"unsupported PNG layout {header}")
    bpp = PNG_CHANNELS[header["type"]]
    width, height = header["width"], header["height"]
    stride = width * bpp
    raw = zlib.decompress(idat)
    prev = bytearray(stride)
    counts: Counter[tuple[int, ...]] = Counter()
    for y in range(height):
        start = y * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                row[i] = (row[i] + row[i - bpp]) & 0xFF
        elif kind == 2:
            row = _add_bytewise(row, prev)
        elif kind == 3:
            for i in range(stride):
                left = row[i - bpp] if i >= bpp else 0
                row[i] = (row[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = row[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                row[i] = (row[i] + pred) & 0xFF
        elif kind != 0:
            raise ValueError(f"bad PNG filter {kind}")
        if y % step == 0:
            counts.update(zip(*(row[c::bpp] for c in range(bpp)), strict=True))
        prev = row
    return counts
