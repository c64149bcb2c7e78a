"""GET /metrics (SPEC §7): Prometheus text exposition format 0.0.4, read back by a small parser
written here, and the counters, histograms and gauges checked against real traffic."""

from __future__ import annotations

import asyncio
import math
import re

import aiohttp
from aiohttp import web
from conftest import backends_toml, cloud_env

import nexus

FAMILIES = {
    "nexus_requests_total": "counter",
    "nexus_errors_total": "counter",
    "nexus_fallbacks_total": "counter",
    "nexus_request_duration_seconds": "histogram",
    "nexus_ttft_seconds": "histogram",
    "nexus_tokens_total": "counter",
    "nexus_backends_total": "gauge",
    "nexus_backends_healthy": "gauge",
    "nexus_models_available": "gauge",
    "nexus_queue_depth": "gauge",
    "nexus_budget_spending_usd": "gauge",
}

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"^({NAME})(?:\{{(.*)\}})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    labels = []
    pos = 0
    while pos < len(text):
        match = LABEL.match(text, pos)
        assert match, f"bad labels {text!r} at {pos}"
        value = re.sub(r'\\[\\"n]', lambda m: UNESCAPE[m.group(0)], match.group(2))
        labels.append((match.group(1), value))
        pos = match.end()
        if pos < len(text):
            assert text[pos] == ",", f"bad labels {text!r}"
            pos += 1
    return tuple(sorted(labels))


class Metrics:
    """A parsed exposition: families with their HELP and TYPE, and every sample."""

    def __init__(self, text: str) -> None:
        assert text.endswith("\n")
        self.types: dict[str, str] = {}
        self.helps: dict[str, str] = {}
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name, _, help_text = line[7:].partition(" ")
                assert help_text and name not in self.helps
                self.helps[name] = help_text
            elif line.startswith("# TYPE "):
                name, kind = line[7:].split(" ")
                assert kind in ("counter", "gauge", "histogram") and name not in self.types
                self.types[name] = kind
            else:
                assert not line.startswith("#"), line
                match = SAMPLE.match(line)
                assert match, f"not a sample line: {line!r}"
                name, labels, value = match.group(1), parse_labels(match.group(2) or ""), None
                value = float(match.group(3))
                key = (name, labels)
                assert key not in self.samples, f"duplicate sample {line!r}"
                self.samples[key] = value
                assert self.family_of(name), f"{name} has no TYPE line before it"

    def family_of(self, name: str) -> str | None:
        if name in self.types:
            return name
        for suffix in ("_bucket", "_sum", "_count"):
            base = name.removesuffix(suffix)
            if base != name and self.types.get(base) == "histogram":
                return base
        return None

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}

    def histogram(self, name: str) -> tuple[list[tuple[float, float]], float, float]:
        buckets = sorted(
            (float(dict(labels)["le"]), v) for labels, v in self.series(name + "_bucket").items()
        )
        return buckets, self.value(name + "_sum"), self.value(name + "_count")


async def scrape(nx, key: str | None = None) -> Metrics:
    """What Prometheus reads; a key goes as Prometheus sends `authorization: {credentials}`."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(nx.url + "/metrics", headers=headers) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        metrics = Metrics(await resp.text())
    for name, kind in FAMILIES.items():
        assert metrics.types.get(name) == kind, name
        assert name in metrics.helps, name
    for name in ("nexus_request_duration_seconds", "nexus_ttft_seconds"):
        buckets, _, count = metrics.histogram(name)
        bounds = [le for le, _ in buckets]
        assert bounds[-1] == math.inf and len(bounds) >= 10
        assert bounds[0] <= 0.01 and bounds[-2] >= 60  # from a cache hit to a long generation
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{name} buckets are not cumulative"
        assert counts[-1] == count
    return metrics


async def post(nx, payload: dict, path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + path, json=payload) as resp,
    ):
        return resp.status, await resp.read()


def chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


async def test_fresh_nexus_exposes_every_family(backend_factory, nexus_factory):
    backend = await backend_factory("ollama", {"a": {}, "b": {}}, name="gpu")
    nx = await nexus_factory(backends_toml(backend))
    metrics = await scrape(nx)
    assert metrics.value("nexus_backends_total") == 1
    assert metrics.value("nexus_backends_healthy") == 1
    assert metrics.value("nexus_models_available") == 2
    assert metrics.value("nexus_queue_depth") == 0
    assert metrics.value("nexus_budget_spending_usd") == 0
    assert metrics.value("nexus_fallbacks_total") == 0
    assert metrics.series("nexus_requests_total") == {}
    assert metrics.histogram("nexus_request_duration_seconds")[2] == 0
    # Scraping is not an inference request: it moves no counter.
    again = await scrape(nx)
    assert again.series("nexus_requests_total") == {}


async def test_counters_move_with_requests_and_errors(backend_factory, nexus_factory):
    good = await backend_factory("vllm", {"m": {}}, name="good")
    bad = await backend_factory("generic", {"flaky": {}}, name="bad")
    nx = await nexus_factory(backends_toml(good, bad))

    async def fail(request: web.Request, body: dict) -> web.Response:
        return web.json_response({"error": "boom"}, status=500)

    bad.behaviours = [fail] * 5
    assert (await post(nx, chat("m")))[0] == 200
    status, body = await post(nx, chat("m", stream=True))
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert (await post(nx, chat("no-such-model")))[0] == 404
    assert (await post(nx, chat("flaky")))[0] == 502
    assert (await post(nx, {"model": "m", "prompt": "x"}, "/v1/completions"))[0] == 200

    metrics = await scrape(nx)
    assert metrics.series("nexus_requests_total") == {
        (("backend", "good"), ("model", "m"), ("status", "200")): 3,
        (("backend", ""), ("model", ""), ("status", "404")): 1,  # never routed: no name
        (("backend", "bad"), ("model", "flaky"), ("status", "502")): 1,
    }
    assert metrics.series("nexus_errors_total") == {
        (("type", "model_not_found"),): 1,
        (("type", "backend_failed"),): 1,
    }
    _, seconds, count = metrics.histogram("nexus_request_duration_seconds")
    assert count == 5 and 0 < seconds < 5
    _, ttft_seconds, ttft_count = metrics.histogram("nexus_ttft_seconds")
    assert ttft_count == 1 and 0 < ttft_seconds < 5  # only the stream has a first token
    # The mock reports usage: chat 10 prompt + 3 completion tokens (twice: Nexus asks vLLM for
    # usage in a stream), completions 3 + 4.
    assert metrics.value("nexus_tokens_total", type="prompt") == 23
    assert metrics.value("nexus_tokens_total", type="completion") == 10

    # More traffic moves the same counters further; nothing is reset by scraping.
    assert (await post(nx, chat("m")))[0] == 200
    later = await scrape(nx)
    key = (("backend", "good"), ("model", "m"), ("status", "200"))
    assert later.series("nexus_requests_total")[key] == 4
    assert later.histogram("nexus_request_duration_seconds")[2] == 6
    assert later.value("nexus_tokens_total", type="prompt") == 33


async def test_bad_request_is_counted_once(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}})
    nx = await nexus_factory(backends_toml(backend))
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/chat/completions", data=b"{not json") as resp,
    ):
        assert resp.status == 400
    metrics = await scrape(nx)
    assert metrics.series("nexus_errors_total") == {(("type", "invalid_request"),): 1}
    assert sum(metrics.series("nexus_requests_total").values()) == 1


async def test_fallback_is_counted_when_a_fallback_model_serves(backend_factory, nexus_factory):
    big = await backend_factory("generic", {"big": {}}, name="big")
    small = await backend_factory("generic", {"small": {}}, name="small")
    toml = '[routing]\nfallbacks = { "big" = ["small"] }\n'
    nx = await nexus_factory(toml + backends_toml(big, small))

    async def fail(request: web.Request, body: dict) -> web.Response:
        return web.json_response({"error": "out of memory"}, status=503)

    big.behaviours = [fail] * 5
    status, _ = await post(nx, chat("big"))
    assert status == 200
    assert (await post(nx, chat("small")))[0] == 200  # asked for directly: not a fallback
    metrics = await scrape(nx)
    assert metrics.value("nexus_fallbacks_total") == 1
    key = (("backend", "small"), ("model", "big"), ("status", "200"))
    assert metrics.series("nexus_requests_total")[key] == 1


async def test_gauges_follow_backend_health(backend_factory, nexus_factory):
    one = await backend_factory("vllm", {"x": {}}, name="one")
    two = await backend_factory("vllm", {"y": {}, "z": {}}, name="two")
    toml = "[health_check]\nfailure_threshold = 1\ninterval_seconds = 3600\n"
    nx = await nexus_factory(toml + backends_toml(one, two))
    metrics = await scrape(nx)
    assert metrics.value("nexus_backends_total") == 2
    assert metrics.value("nexus_backends_healthy") == 2
    assert metrics.value("nexus_models_available") == 3

    two.healthy = False
    await nexus.poll_backend(nx.app, nx.backend("two"))
    metrics = await scrape(nx)
    assert metrics.value("nexus_backends_total") == 2
    assert metrics.value("nexus_backends_healthy") == 1
    assert metrics.value("nexus_models_available") == 1


async def test_label_values_are_escaped(backend_factory, nexus_factory):
    weird = 'we"ird\\name\nline'
    backend = await backend_factory("generic", {weird: {}}, name="odd")
    nx = await nexus_factory(backends_toml(backend))
    assert (await post(nx, chat(weird)))[0] == 200
    metrics = await scrape(nx)  # the parser rejects raw quotes and newlines in label values
    key = (("backend", "odd"), ("model", weird), ("status", "200"))
    assert metrics.series("nexus_requests_total") == {key: 1}


def test_escaping_rules():
    assert nexus.escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert nexus.escape_label("plain") == "plain"


async def test_budget_gauge_is_the_months_spend(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}})
    nx = await nexus_factory("[routing.budget]\nmonthly_limit_usd = 10\n" + backends_toml(backend))
    assert (await scrape(nx)).value("nexus_budget_spending_usd") == 0
    nx.app[nexus.BUDGET].charge(0.25)
    nx.app[nexus.BUDGET].charge(0.5)
    assert (await scrape(nx)).value("nexus_budget_spending_usd") == 0.75


async def test_cloud_spend_moves_the_budget_gauge(backend_factory, nexus_factory):
    cloud = await backend_factory("openai", {"gpt-4o": {}}, name="oai")
    toml = "[routing.budget]\nmonthly_limit_usd = 10\n" + backends_toml(cloud)
    nx = await nexus_factory(toml, env=cloud_env(cloud))
    assert (await post(nx, chat("gpt-4o")))[0] == 200
    metrics = await scrape(nx)
    async with aiohttp.ClientSession() as session, session.get(nx.url + "/v1/stats") as resp:
        spent = (await resp.json())["budget"]["spent_usd"]
    assert spent > 0
    assert abs(metrics.value("nexus_budget_spending_usd") - spent) < 1e-6


async def test_queue_depth_counts_requests_waiting_for_a_slot(backend_factory, nexus_factory):
    backend = await backend_factory("generic", {"m": {}}, name="one")
    backend.reply = "one two three four five"
    backend.chunk_delay = 0.3  # each answer holds the only slot for about 1.5 s
    nx = await nexus_factory(backends_toml(backend, one={"max_concurrent": 1}))
    requests = [asyncio.create_task(post(nx, chat("m", stream=True))) for _ in range(3)]
    depth = 0.0
    for _ in range(40):  # one answer in progress, two waiting
        await asyncio.sleep(0.05)
        depth = (await scrape(nx)).value("nexus_queue_depth")
        if depth == 2:
            break
    assert depth == 2
    assert [status for status, _ in await asyncio.gather(*requests)] == [200, 200, 200]
    assert (await scrape(nx)).value("nexus_queue_depth") == 0


async def test_with_keys_prometheus_scrapes_with_an_admin_key(
    backend_factory, nexus_factory, monkeypatch
):
    backend = await backend_factory("ollama", {"a": {}}, name="gpu")
    keys = {"NEXUS_METRICS_SCRAPER": "sk-scrape-31337", "NEXUS_METRICS_APP": "sk-app-4242"}
    toml = (
        "[auth]\napi_keys = [\n"
        '  { name = "prometheus", key_env = "NEXUS_METRICS_SCRAPER", admin = true },\n'
        '  { name = "app", key_env = "NEXUS_METRICS_APP" },\n]\n'
    )
    nx = await nexus_factory(toml + backends_toml(backend), env=keys)
    async with aiohttp.ClientSession() as session:
        for headers, status in (
            ({}, 401),
            ({"Authorization": "Bearer sk-wrong"}, 401),
            ({"Authorization": "Bearer sk-app-4242"}, 403),
        ):
            async with session.get(nx.url + "/metrics", headers=headers) as resp:
                assert resp.status == status
                assert "nexus_backends_total" not in await resp.text()
    metrics = await scrape(nx, "sk-scrape-31337")
    assert metrics.value("nexus_backends_total") == 1
