"""The dashboard (`assets/dashboard.html`) in a real headless Chromium.

Two sites serve it. `NexusSite` is the real Nexus in front of mock backends: requests go
through `/v1/chat/completions`. `StatsSite` is a small aiohttp app on 127.0.0.1 that serves
the page and the `/v1/stats` contract from in-memory data, for what a real Nexus cannot be
made to do on demand (a budget, per-key usage, a missing stream, hostile model names). Both
offer `url`, `backend_names`, `model_names` and `async send_request(model) -> request id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from browser import Chromium, png_colour_counts, png_size
from conftest import backends_toml, free_port

DASHBOARD = Path(__file__).resolve().parent.parent / "assets" / "dashboard.html"
STREAM_MAX_EVENTS = 300  # one a second: a stream never outlives a test by much
DESKTOP = (1280, 800)
PHONE = (390, 844)


# -- the data behind /v1/stats ---------------------------------------------------------------


def build_stats() -> dict[str, Any]:
    """A Nexus with a local GPU box, a laptop that is down, and a cloud backend."""
    now = time.time()
    backends = [
        {
            "name": "gpu-box",
            "type": "ollama",
            "url": "http://10.0.0.5:11434",
            "status": "healthy",
            "zone": "restricted",
            "tier": 2,
            "priority": 10,
            "requests": 0,
            "pending": 1,
            "avg_latency_ms": 412.0,
            "avg_ttft_ms": 95.0,
            "error_rate": 0.0,
            "models": ["llama3:8b", "qwen2.5-coder:7b", "llava:13b"],
        },
        {
            "name": "laptop",
            "type": "llamacpp",
            "url": "http://10.0.0.9:8080",
            "status": "unhealthy",
            "zone": "restricted",
            "tier": 1,
            "priority": 50,
            "requests": 0,
            "pending": 0,
            "avg_latency_ms": None,
            "avg_ttft_ms": None,
            "error_rate": 0.25,
            "models": ["llama3:8b"],
        },
        {
            "name": "openai",
            "type": "openai",
            "url": "https://api.openai.com",
            "status": "healthy",
            "zone": "open",
            "tier": 4,
            "priority": 90,
            "requests": 0,
            "pending": 0,
            "avg_latency_ms": 980.5,
            "avg_ttft_ms": 310.0,
            "error_rate": 0.01,
            "models": ["gpt-4o"],
        },
    ]
    models = [
        {
            "name": "llama3:8b",
            "requests": 0,
            "backends": ["gpu-box", "laptop"],
            "context_length": 8192,
            "capabilities": {"vision": False, "tools": True, "json_mode": True},
        },
        {
            "name": "qwen2.5-coder:7b",
            "requests": 0,
            "backends": ["gpu-box"],
            "context_length": 32768,
            "capabilities": {"vision": False, "tools": True, "json_mode": None},
        },
        {
            "name": "llava:13b",
            "requests": 0,
            "backends": ["gpu-box"],
            "context_length": 4096,
            "capabilities": {"vision": True, "tools": None, "json_mode": None},
        },
        {
            "name": "gpt-4o",
            "requests": 0,
            "backends": ["openai"],
            "context_length": 128000,
            "capabilities": {"vision": True, "tools": True, "json_mode": True},
        },
    ]
    stats: dict[str, Any] = {
        "uptime_seconds": 3725.0,
        "version": "0.1.0",
        "requests": {"total": 0, "success": 0, "errors": 0},
        "backends": backends,
        "models": models,
        "recent": [],
        "budget": None,
        "keys": [],
    }
    # A few minutes of history, so the chart has something to draw from the start.
    history = [("llama3:8b", "gpu-box", 200), ("gpt-4o", "openai", 200), ("llama3:8b", None, 503)]
    for i in range(24):
        model, backend, status = history[i % len(history)]
        record_request(stats, model, backend, status, at=now - 240 + i * 10, latency=300 + 40 * i)
    return stats


def record_request(
    stats: dict[str, Any],
    model: str,
    backend: str | None,
    status: int = 200,
    at: float | None = None,
    latency: float = 250.0,
) -> str:
    """Add a finished request to `stats` the way Nexus accounts for one; return its id."""
    request_id = "req-" + uuid.uuid4().hex[:12]
    stats["recent"].append(
        {
            "time": time.time() if at is None else at,
            "id": request_id,
            "model": model,
            "backend": backend,
            "status": status,
            "latency_ms": latency,
            "tokens": {"prompt": 42, "completion": 128}
            if status == 200
            else {"prompt": None, "completion": None},
            "route_reason": "capability-match" if backend else None,
        }
    )
    del stats["recent"][:-100]
    totals = stats["requests"]
    totals["total"] += 1
    totals["success" if status < 400 else "errors"] += 1
    for b in stats["backends"]:
        if b["name"] == backend:
            b["requests"] += 1
    for m in stats["models"]:
        if m["name"] == model:
            m["requests"] += 1
    return request_id


class StatsSite:
    """The dashboard at `/` with `/v1/stats` and `/v1/stats/stream` over in-memory stats."""

    def __init__(self, stream: bool = True) -> None:
        self.stats = build_stats()
        self.stream = stream
        self.url = ""
        self._stop = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def backend_names(self) -> list[str]:
        return [b["name"] for b in self.stats["backends"]]

    @property
    def model_names(self) -> list[str]:
        return [m["name"] for m in self.stats["models"]]

    async def send_request(self, model: str) -> str:
        backend = next(b["name"] for b in self.stats["backends"] if model in b["models"])
        return record_request(self.stats, model, backend, latency=180.0)

    def add_model(self, name: str, backend: str) -> None:
        self.stats["models"].append(
            {"name": name, "requests": 0, "backends": [backend], "context_length": None,
             "capabilities": {"vision": None, "tools": None, "json_mode": None}}
        )  # fmt: skip
        next(b for b in self.stats["backends"] if b["name"] == backend)["models"].append(name)

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(body=DASHBOARD.read_bytes(), content_type="text/html")

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        if not self.stream:
            return web.json_response(
                {"error": {"message": "not found", "type": "invalid_request_error",
                           "param": None, "code": "not_found"}},
                status=404,
            )  # fmt: skip
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(STREAM_MAX_EVENTS):
                await resp.write(f"data: {json.dumps(self.stats)}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
                    break
        return resp

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/v1/stats", self._stats)
        app.router.add_get("/v1/stats/stream", self._stream)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/"

    async def stop(self) -> None:
        self._stop.set()
        if self._runner:
            await self._runner.cleanup()


class NexusSite:
    """A running Nexus (from the shared `nexus_factory`) and the mock backends behind it."""

    def __init__(self, url: str, backend_names: list[str], model_names: list[str]) -> None:
        self.url = url
        self.backend_names = backend_names
        self.model_names = model_names

    async def send_request(self, model: str) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(self.url + "v1/chat/completions", json=body) as resp,
        ):
            assert resp.status == 200, await resp.text()
            return resp.headers["X-Request-Id"]


@pytest.fixture
async def nexus_dashboard(backend_factory: Any, nexus_factory: Any) -> NexusSite:
    gpu = await backend_factory(
        "ollama", {"llama3:8b": {"context": 8192}, "llava:13b": {"context": 4096}}, name="gpu-box"
    )
    vllm = await backend_factory("vllm", {"qwen2.5-coder:7b": {"context": 32768}}, name="vl")
    nx = await nexus_factory(backends_toml(gpu, vllm))
    return NexusSite(
        nx.url + "/", ["gpu-box", "vl"], ["llama3:8b", "llava:13b", "qwen2.5-coder:7b"]
    )


@pytest.fixture
async def dashboard() -> AsyncIterator[StatsSite]:
    site = StatsSite(stream=True)
    await site.start()
    yield site
    await site.stop()


@pytest.fixture
async def dashboard_without_stream() -> AsyncIterator[StatsSite]:
    site = StatsSite(stream=False)
    await site.start()
    yield site
    await site.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Chromium]:
    async with Chromium() as b:
        yield b


# -- helpers ---------------------------------------------------------------------------------

PAGE_TEXT = "document.body.innerText"


async def open_dashboard(browser: Chromium, site: StatsSite) -> None:
    await browser.set_viewport(*DESKTOP)
    await browser.navigate(site.url)
    await browser.wait_for("document.querySelectorAll('#backends tbody tr').length > 0")


async def wait_for_request_row(browser: Chromium, request_id: str) -> None:
    await browser.wait_for(
        f"!!document.querySelector('#recent tbody tr[data-id={json.dumps(request_id)}]')",
        timeout=8,
    )


def assert_only_own_origin(browser: Chromium, site: StatsSite) -> None:
    origin = site.url.rstrip("/")
    assert any(u.startswith(origin + "/v1/stats") for u in browser.requested_urls)
    outside = [
        u
        for u in browser.requested_urls
        if not (u == origin or u.startswith(origin + "/") or u.startswith(("data:", "about:")))
    ]
    assert outside == [], f"the page requested URLs outside Nexus: {outside}"


def assert_not_blank(png: bytes, width: int) -> Counter[tuple[int, ...]]:
    assert png_size(png)[0] == width
    counts = png_colour_counts(png, step=3)
    top = counts.most_common(1)[0][1]
    assert len(counts) > 50, f"only {len(counts)} colours: the page looks blank"
    assert top / sum(counts.values()) < 0.95, "one colour covers almost all the screenshot"
    return counts


# -- tests -----------------------------------------------------------------------------------


def test_page_is_one_small_self_contained_file() -> None:
    html = DASHBOARD.read_text()
    assert len(html.encode()) < 32_000  # small: no framework, no fonts, no images
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", html, re.I)
    assert not re.search(r"@import|@font-face|<link[^>]+stylesheet", html, re.I)
    assert ".innerHTML" not in html and "insertAdjacentHTML" not in html
    # The live feed is read with fetch, which can send the admin key; never a cookie.
    assert "EventSource" not in html and "document.cookie" not in html


async def check_live_dashboard(
    site: StatsSite | NexusSite, browser: Chromium, tmp_path: Path, model: str
) -> str:
    """Load the page, see every backend and model, see a new request arrive without a reload,
    screenshot it at desktop and phone widths in light and dark mode; return the page text."""
    await open_dashboard(browser, site)
    await browser.wait_for("document.body.dataset.transport === 'live'")
    text = await browser.evaluate(PAGE_TEXT)
    for name in site.backend_names + site.model_names:
        assert name in text
    header = await browser.evaluate(
        "[...document.querySelectorAll('#models thead th')].map(t => t.textContent)"
    )
    assert header[3:] == site.backend_names

    await browser.evaluate("window.loadedOnce = true")
    request_id = await site.send_request(model)
    await wait_for_request_row(browser, request_id)
    first_row = await browser.evaluate("document.querySelector('#recent tbody tr').dataset.id")
    assert first_row == request_id, "the newest request is listed first"
    assert await browser.evaluate("window.loadedOnce === true"), "the page reloaded"

    shots = {}
    for label, (width, height), mobile in (("desktop", DESKTOP, False), ("phone", PHONE, True)):
        await browser.set_viewport(width, height, mobile=mobile)
        for scheme in ("light", "dark"):
            await browser.set_color_scheme(scheme)
            await asyncio.sleep(0.3)  # let layout and the chart settle
            png = await browser.screenshot()
            (tmp_path / f"dashboard-{label}-{scheme}.png").write_bytes(png)
            shots[label, scheme] = assert_not_blank(png, width)
        overflow = await browser.evaluate("document.documentElement.scrollWidth")
        assert overflow <= width, f"{label}: page is {overflow} px wide in a {width} px screen"
    for label in ("desktop", "phone"):
        light = shots[label, "light"].most_common(1)[0][0]
        dark = shots[label, "dark"].most_common(1)[0][0]
        assert sum(light[:3]) > 600 and sum(dark[:3]) < 150, "dark mode follows the system"

    assert_only_own_origin(browser, site)
    assert browser.console_errors == []
    return await browser.evaluate(PAGE_TEXT)


async def test_nexus_dashboard_shows_backends_models_and_requests_live(
    nexus_dashboard: NexusSite, browser: Chromium, tmp_path: Path
) -> None:
    await check_live_dashboard(nexus_dashboard, browser, tmp_path, "qwen2.5-coder:7b")


async def test_budget_keys_and_totals_from_the_stats_contract(
    dashboard: StatsSite, browser: Chromium, tmp_path: Path
) -> None:
    dashboard.stats["budget"] = {
        "monthly_limit_usd": 50.0,
        "spent_usd": 31.2,
        "status": "soft_limit",
    }
    dashboard.stats["keys"] = [{"name": "ci-runner", "requests": 12, "spent_usd": 0.42}]
    text = await check_live_dashboard(dashboard, browser, tmp_path, "qwen2.5-coder:7b")
    assert "$31.20 spent" in text and "soft limit" in text and "ci-runner" in text
    assert not await browser.evaluate("document.getElementById('budget').hidden")
    total = await browser.evaluate("document.getElementById('t-total').textContent")
    assert total == str(dashboard.stats["requests"]["total"])


async def test_falls_back_to_polling_when_the_stream_is_unavailable(
    dashboard_without_stream: StatsSite, browser: Chromium
) -> None:
    site = dashboard_without_stream
    await open_dashboard(browser, site)
    await browser.wait_for("document.body.dataset.transport === 'polling'")
    text = await browser.evaluate(PAGE_TEXT)
    for name in site.backend_names + site.model_names:
        assert name in text
    assert await browser.evaluate("document.getElementById('budget').hidden")
    assert await browser.evaluate("document.getElementById('keys').hidden")

    await browser.evaluate("window.loadedOnce = true")
    request_id = await site.send_request("gpt-4o")
    await wait_for_request_row(browser, request_id)
    assert await browser.evaluate("window.loadedOnce === true"), "the page reloaded"
    assert_only_own_origin(browser, site)


async def test_names_from_the_network_are_shown_as_text_never_as_markup(
    dashboard: StatsSite, browser: Chromium
) -> None:
    hostile = '<img src="/injected.png" onerror="window.injected=1">'
    dashboard.add_model(hostile, "gpu-box")
    await open_dashboard(browser, dashboard)
    request_id = await dashboard.send_request(hostile)
    await wait_for_request_row(browser, request_id)
    assert hostile in await browser.evaluate(PAGE_TEXT)
    assert await browser.evaluate("document.querySelectorAll('main img').length") == 0
    assert await browser.evaluate("window.injected === undefined")
    assert not [u for u in browser.requested_urls if "injected" in u]


async def test_an_unhealthy_backend_says_why(
    backend_factory: Any, nexus_factory: Any, browser: Chromium
) -> None:
    gpu = await backend_factory("ollama", {"llama3:8b": {"context": 8192}}, name="gpu-box")
    dead = f'[[backends]]\nname = "laptop"\nurl = "http://127.0.0.1:{free_port()}"\n'
    nx = await nexus_factory(backends_toml(gpu) + dead, wait=False)
    await nx.wait_healthy(1)
    site = NexusSite(nx.url + "/", ["gpu-box", "laptop"], ["llama3:8b"])
    await open_dashboard(browser, site)
    rows = "[...document.querySelectorAll('#backends tbody tr')]"
    why = f"{rows}.map(r => [r.cells[0].textContent, r.cells[1].textContent])"
    await browser.wait_for(f"{why}.some(([n, s]) => s.includes('connection refused'))")
    shown = dict(await browser.evaluate(why))
    laptop = next(v for k, v in shown.items() if k.startswith("laptop"))
    gpu_box = next(v for k, v in shown.items() if k.startswith("gpu-box"))
    assert laptop == "unhealthycould not connect: connection refused"
    assert gpu_box == "healthy"
    assert browser.console_errors == []


# -- with [auth] keys: the page asks for an admin key --------------------------------------

ADMIN_KEY, USER_KEY = "sk-dash-admin-5e1f0a", "sk-dash-user-77b2c4"
KEYS_ENV = {"NEXUS_DASH_ADMIN": ADMIN_KEY, "NEXUS_DASH_USER": USER_KEY}
KEYS_TOML = """[auth]
api_keys = [
  { name = "ops", key_env = "NEXUS_DASH_ADMIN", admin = true },
  { name = "app", key_env = "NEXUS_DASH_USER" },
]
"""


async def enter_key(browser: Chromium, key: str) -> None:
    await browser.evaluate(
        f"document.getElementById('key').value = {json.dumps(key)};"
        "document.getElementById('login').requestSubmit()"
    )


async def login_message(browser: Chromium, text: str) -> None:
    await browser.wait_for(
        f"document.getElementById('login-msg').textContent.includes({json.dumps(text)})"
        " && !document.getElementById('login').hidden"
    )


async def test_with_keys_the_page_asks_for_an_admin_key_and_then_goes_live(
    backend_factory: Any, nexus_factory: Any, browser: Chromium
) -> None:
    gpu = await backend_factory("ollama", {"llama3:8b": {"context": 8192}}, name="gpu-box")
    nx = await nexus_factory(KEYS_TOML + backends_toml(gpu), env=KEYS_ENV)
    await browser.set_viewport(*DESKTOP)
    await browser.navigate(nx.url + "/")
    # The page loads without a key, and holds no data until an admin key is given.
    await login_message(browser, "admin key")
    assert await browser.evaluate("document.body.dataset.transport") == "locked"
    assert await browser.evaluate("document.querySelectorAll('#backends tbody tr').length") == 0
    assert "gpu-box" not in await browser.evaluate(PAGE_TEXT)
    await enter_key(browser, "sk-not-a-key-at-all")
    await login_message(browser, "refused")
    await enter_key(browser, USER_KEY)
    await login_message(browser, "Not an admin key")
    assert await browser.evaluate("document.querySelectorAll('#backends tbody tr').length") == 0

    await enter_key(browser, ADMIN_KEY)
    await browser.wait_for("document.body.dataset.transport === 'live'")
    assert await browser.evaluate("document.getElementById('login').hidden")
    await browser.wait_for("document.querySelectorAll('#backends tbody tr').length === 1")
    assert "gpu-box" in await browser.evaluate(PAGE_TEXT)
    # Live updates arrive on the key-carrying stream: a new request shows without a reload.
    await browser.evaluate("window.loadedOnce = true")
    body = {"model": "llama3:8b", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/chat/completions", json=body, headers=headers) as resp,
    ):
        assert resp.status == 200
        request_id = resp.headers["X-Request-Id"]
    await wait_for_request_row(browser, request_id)
    assert await browser.evaluate("window.loadedOnce === true"), "the page reloaded"
    assert await browser.evaluate("document.body.dataset.transport") == "live"
    assert await browser.evaluate("document.cookie") == ""
    assert browser.console_errors == []
    # A reload in the same tab keeps the key (session storage); a new browser would ask again.
    await browser.navigate(nx.url + "/")
    await browser.wait_for("document.body.dataset.transport === 'live'")


async def test_models_with_a_context_below_32k_are_marked_too_small_for_coding_agents(
    dashboard: StatsSite, browser: Chromium
) -> None:
    """Claude Code's opening request alone is about 22k tokens: an 8k or 4k model cannot take
    it, a 32k one can. The mark shows once per row, on a desktop and on a phone."""
    dashboard.add_model("mystery", "gpu-box")  # no context reported: not marked
    await open_dashboard(browser, dashboard)
    await browser.wait_for("document.querySelectorAll('#models tbody tr').length >= 5")
    marks = (
        "Object.fromEntries([...document.querySelectorAll('#models tbody tr')].map(tr => ["
        "tr.querySelector('td span').textContent,"
        "tr.innerText.split('too small for coding agents').length - 1]))"
    )
    expected = {"llama3:8b": 1, "llava:13b": 1, "qwen2.5-coder:7b": 0, "gpt-4o": 0, "mystery": 0}
    assert await browser.evaluate(marks) == expected
    await browser.set_viewport(*PHONE, mobile=True)
    await asyncio.sleep(0.3)  # let the layout switch to cards
    assert await browser.evaluate(marks) == expected
    title = await browser.evaluate("document.querySelector('#models .small-ctx').title")
    assert "32k" in title and "22k" in title
