"""Policy (SPEC §6): privacy zones, overflow, tiers and the monthly budget, each rule through
the HTTP API with local and cloud mock backends on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from conftest import settings_from

import nexus

ROOT = Path(__file__).resolve().parent.parent


# --- prices and the budget's state -------------------------------------------------------------


def test_price_table_covers_current_openai_and_anthropic_models():
    table = nexus.load_price_table()
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3", "gpt-5", "gpt-4", "gpt-3.5-turbo"):
        assert model in table, model
    for model in ("claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5", "claude-3-5-haiku"):
        assert model in table, model
    for price in table.values():
        assert price.input >= 0 and price.output >= 0
    raw = json.loads((ROOT / "assets" / "prices.json").read_text())
    assert raw["unit"] == "USD per million tokens"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai/gpt-4o", "gpt-4o"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4.1-mini", "gpt-4.1-mini"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
    ],
)
def test_price_lookup_by_id_then_longest_dated_prefix(model, expected):
    table = nexus.load_price_table()
    assert nexus.price_for(model, {}) == table[expected]


def test_unknown_model_has_no_price():
    assert nexus.price_for("llama3:8b", {}) is None
    assert nexus.price_for("gpt-4oo", {}) is None
    # A newer version is not priced as an older one it happens to extend.
    assert nexus.price_for("claude-opus-4-9", {}) is None


def test_config_prices_override_the_table():
    override = {"gpt-4o": nexus.Price(input=1.0, output=2.0)}
    assert nexus.price_for("gpt-4o-2024-08-06", override) == nexus.Price(1.0, 2.0)
    assert nexus.price_for("gpt-4o-mini", override) == nexus.load_price_table()["gpt-4o-mini"]


def test_cost_is_tokens_times_price_per_million():
    price = nexus.Price(input=2.5, output=10.0)
    assert nexus.cost_usd(price, nexus.TokenUsage(1000, 500)) == pytest.approx(0.0025 + 0.005)
    assert nexus.format_usd(0.0075) == "0.0075"
    assert nexus.format_usd(0.0) == "0"
    assert nexus.format_usd(5e-8) == "0.00000005"


def test_cached_prompt_tokens_cost_their_own_price():
    price = nexus.Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75)
    usage = nexus.TokenUsage(prompt=10_000, completion=0, cached=8_000, cache_write=1_000)
    expected = (1_000 * 3.0 + 8_000 * 0.3 + 1_000 * 3.75) / 1e6
    assert nexus.cost_usd(price, usage) == pytest.approx(expected)
    no_cache_prices = nexus.Price(input=3.0, output=15.0)
    assert nexus.cost_usd(no_cache_prices, usage) == pytest.approx(10_000 * 3.0 / 1e6)


def test_budget_prices_in_config_are_validated(tmp_path):
    good = '[routing.budget]\nprices = { "gpt-4o" = { input = 2.5, output = 10 } }\n'
    settings = settings_from(good, tmp_path)
    assert settings.routing.budget.prices["gpt-4o"] == {"input": 2.5, "output": 10}
    for bad, key in [
        ('prices = { "gpt-4o" = 3 }', "routing.budget.prices.gpt-4o"),
        ('prices = { "gpt-4o" = { input = 1 } }', "routing.budget.prices.gpt-4o.output"),
        ('prices = { "gpt-4o" = { input = -1, output = 1 } }', "routing.budget.prices.gpt-4o"),
        ('prices = { "gpt-4o" = { input = 1, output = "x" } }', "routing.budget.prices.gpt-4o"),
        ('prices = { "x" = { input = 1, output = 1, cached = 1 } }', "routing.budget.prices.x"),
        ('prices = { "x" = { input = 1, output = 1, cache_write = -2 } }', "prices.x.cache_write"),
    ]:
        with pytest.raises(nexus.ConfigError) as caught:
            settings_from(f"[routing.budget]\n{bad}\n", tmp_path)
        assert key in str(caught.value), bad


def budget(limit: float = 10.0, soft: float = 75.0, action: str = "shift_local") -> nexus.Budget:
    settings = nexus.BudgetSettings(
        monthly_limit_usd=limit, soft_limit_percent=soft, hard_limit_action=action
    )
    return nexus.Budget(settings)


def test_budget_status_moves_normal_soft_hard():
    state = budget(10.0, 75.0)
    assert state.status == "normal"
    state.charge(7.49)
    assert state.status == "normal"
    state.charge(0.01)
    assert state.status == "soft_limit"
    state.charge(2.5)
    assert state.status == "hard_limit"
    assert state.spent_usd == pytest.approx(10.0)
    assert state.snapshot() == {
        "monthly_limit_usd": 10.0,
        "spent_usd": 10.0,
        "status": "hard_limit",
        "soft_limit_percent": 75.0,
        "hard_limit_action": "shift_local",
        "month": state.month,
    }


def test_budget_starts_again_each_calendar_month():
    state = budget(10.0)
    state.charge(11.0)
    assert state.status == "hard_limit"
    next_month = dt.datetime(2031, 1, 1, 0, 0, 1, tzinfo=dt.UTC)
    state.roll(next_month)
    assert state.month == "2031-01"
    assert state.spent_usd == 0.0
    assert state.status == "normal"


def test_no_budget_means_no_status_but_spend_is_still_counted():
    state = nexus.Budget(None)
    assert not state.enabled
    state.charge(3.0)
    assert state.spent_usd == 3.0
    assert state.status == "normal"
    assert state.snapshot() is None


def test_seconds_until_the_month_resets():
    now = dt.datetime(2030, 12, 31, 23, 59, 0, tzinfo=dt.UTC)
    assert nexus.seconds_to_next_month(now) == 60


async def test_stats_report_the_budget(nexus_factory):
    import aiohttp

    nx = await nexus_factory("[routing.budget]\nmonthly_limit_usd = 20.0\n")
    nx.app[nexus.BUDGET].charge(1.5)
    async with aiohttp.ClientSession() as session, session.get(nx.url + "/v1/stats") as resp:
        stats = await resp.json()
    assert stats["budget"]["monthly_limit_usd"] == 20.0
    assert stats["budget"]["spent_usd"] == 1.5
    assert stats["budget"]["status"] == "normal"
    unlimited = await nexus_factory("")
    async with aiohttp.ClientSession() as session, session.get(unlimited.url + "/v1/stats") as r:
        assert (await r.json())["budget"] is None


# --- privacy zones ------------------------------------------------------------------------------

SECRET = "TOP-SECRET-PROJECT-HELIOS"


async def post_chat(nx, model: str, messages=None, headers=None, stream: bool = False):
    import aiohttp

    body = {
        "model": model,
        "messages": messages or [{"role": "user", "content": f"about {SECRET}"}],
        "stream": stream,
    }
    async with aiohttp.ClientSession() as session:
        url = nx.url + "/v1/chat/completions"
        async with session.post(url, json=body, headers=headers or {}) as resp:
            text = await resp.text()
            document = None
            if not stream:
                document = json.loads(text)
            return resp.status, resp.headers, document if document is not None else text


async def recorded_cloud(backend_factory, models, name="cloud", priority=0):
    """A cloud mock behind a ByteRecorder: every byte sent to its socket is kept."""
    from conftest import ByteRecorder

    cloud = await backend_factory("openai", models, name=name)
    recorder = await ByteRecorder(cloud.server.port).start()
    return cloud, recorder


def toml_for(entries: list[tuple], extra: str = "") -> str:
    """[[backends]] from (mock, url, {settings}) and the rest of the file."""
    from conftest import key_variable

    lines = []
    for mock, url, settings in entries:
        lines += [
            "[[backends]]",
            f'name = "{mock.name}"',
            f'url = "{url}"',
            f'type = "{mock.kind}"',
        ]
        if mock.kind in ("openai", "anthropic"):
            lines.append(f'api_key_env = "{key_variable(mock)}"')
        lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    return "\n".join(lines) + "\n" + extra


async def start(nexus_factory, entries, extra=""):
    from conftest import cloud_env

    return await nexus_factory(toml_for(entries, extra), env=cloud_env(*(e[0] for e in entries)))


RESTRICTED = '[[routing.policies]]\nmodel_pattern = "internal-*"\nprivacy = "restricted"\n'


async def test_restricted_request_never_reaches_an_open_backend(backend_factory, nexus_factory):
    local = await backend_factory("ollama", {"internal-llm": {}}, name="gpu")
    cloud, recorder = await recorded_cloud(backend_factory, {"internal-llm": {}})
    nx = await start(
        nexus_factory,
        [(local, local.url, {"priority": 90}), (cloud, recorder.url, {"priority": 0})],
        RESTRICTED + '[routing]\naliases = { "helios" = "internal-llm" }\n',
    )
    for model in ("internal-llm", "helios"):
        status, headers, _ = await post_chat(nx, model)
        assert status == 200
        assert headers["X-Nexus-Backend"] == "gpu"
        assert headers["X-Nexus-Privacy-Zone"] == "restricted"
        assert headers["X-Nexus-Route-Reason"] == "privacy-requirement"
    # Nothing local can serve: 503 naming the zone, and still nothing crossed.
    local.healthy = False
    nx.backend("gpu").status = "unhealthy"
    status, headers, document = await post_chat(nx, "internal-llm")
    assert status == 503
    assert document["error"]["context"]["privacy_zone_required"] == "restricted"
    assert cloud.received == []
    assert b"POST" not in recorder.data and SECRET.encode() not in recorder.data
    await recorder.stop()


async def test_restricted_under_failover_and_fallback(backend_factory, nexus_factory):
    from aiohttp import web

    first = await backend_factory("vllm", {"internal-llm": {}}, name="gpu-a")
    second = await backend_factory("vllm", {"internal-small": {}}, name="gpu-b")
    cloud, recorder = await recorded_cloud(
        backend_factory, {"internal-llm": {}, "internal-small": {}}
    )
    extra = RESTRICTED + '[routing]\nfallbacks = { "internal-llm" = ["internal-small"] }\n'
    nx = await start(
        nexus_factory,
        [(first, first.url, {}), (second, second.url, {}), (cloud, recorder.url, {})],
        extra,
    )

    async def broken(request, body):
        return web.json_response({"error": "boom"}, status=500)

    # gpu-a fails on every retry: the request goes on, but only to restricted backends.
    first.behaviours.extend([broken] * 3)
    status, headers, _ = await post_chat(nx, "internal-llm")
    assert status == 200
    assert headers["X-Nexus-Backend"] == "gpu-b"
    assert headers["X-Nexus-Fallback-Model"] == "internal-small"
    second.behaviours.extend([broken] * 3)
    first.behaviours.extend([broken] * 3)
    status, _, _ = await post_chat(nx, "internal-llm", stream=True)
    assert cloud.received == []
    assert b"POST" not in recorder.data and SECRET.encode() not in recorder.data
    await recorder.stop()


async def test_restricted_model_only_in_the_cloud_is_503(backend_factory, nexus_factory):
    cloud, recorder = await recorded_cloud(backend_factory, {"internal-llm": {}})
    nx = await start(nexus_factory, [(cloud, recorder.url, {})], RESTRICTED)
    status, _, document = await post_chat(nx, "internal-llm")
    assert status == 503
    assert document["error"]["context"]["privacy_zone_required"] == "restricted"
    assert "restricted" in document["error"]["message"]
    assert b"POST" not in recorder.data
    await recorder.stop()


# --- overflow -----------------------------------------------------------------------------------

LOCAL_FIRST = '[[routing.policies]]\nmodel_pattern = "*"\noverflow = "{overflow}"\n'
HISTORY = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": f"Earlier: {SECRET}"},
    {"role": "assistant", "content": f"Noted {SECRET}."},
    {"role": "user", "content": "What is 2+2?"},
]


async def test_overflow_block_keeps_local_work_local(backend_factory, nexus_factory):
    local = await backend_factory("ollama", {"llama3": {}}, name="gpu")
    cloud, recorder = await recorded_cloud(backend_factory, {"llama3": {}, "gpt-4o": {}})
    nx = await start(
        nexus_factory,
        [(local, local.url, {}), (cloud, recorder.url, {})],
        LOCAL_FIRST.format(overflow="block"),
    )
    status, headers, _ = await post_chat(nx, "llama3", HISTORY)
    assert status == 200 and headers["X-Nexus-Backend"] == "gpu"
    nx.backend("gpu").status = "unhealthy"
    status, headers, document = await post_chat(nx, "llama3", HISTORY)
    assert status == 503
    assert "overflow" in document["error"]["message"]
    assert b"POST" not in recorder.data
    # A model only the cloud serves was never local: it is not overflow.
    status, headers, _ = await post_chat(nx, "gpt-4o")
    assert status == 200 and headers["X-Nexus-Backend"] == "cloud"
    assert "X-Nexus-Context-Scrubbed" not in headers
    await recorder.stop()


async def test_overflow_scrub_sends_only_system_prompt_and_last_user_turn(
    backend_factory, nexus_factory
):
    local = await backend_factory("ollama", {"llama3": {}}, name="gpu")
    cloud, recorder = await recorded_cloud(backend_factory, {"llama3": {}})
    nx = await start(
        nexus_factory,
        [(local, local.url, {"priority": 90}), (cloud, recorder.url, {"priority": 0})],
        LOCAL_FIRST.format(overflow="scrub"),
    )
    status, headers, _ = await post_chat(nx, "llama3", HISTORY)
    assert headers["X-Nexus-Backend"] == "gpu"  # local first, whatever the priorities
    assert "X-Nexus-Context-Scrubbed" not in headers
    nx.backend("gpu").status = "unhealthy"
    for stream in (False, True):
        status, headers, _ = await post_chat(nx, "llama3", HISTORY, stream=stream)
        assert status == 200
        assert headers["X-Nexus-Backend"] == "cloud"
        assert headers["X-Nexus-Context-Scrubbed"] == "true"
        assert cloud.received[-1][1]["messages"] == [HISTORY[0], HISTORY[3]]
    assert SECRET.encode() not in recorder.data
    await recorder.stop()


async def test_without_a_policy_zones_mix_by_score(backend_factory, nexus_factory):
    local = await backend_factory("ollama", {"llama3": {}}, name="gpu")
    cloud = await backend_factory("openai", {"llama3": {}}, name="cloud")
    nx = await start(
        nexus_factory, [(local, local.url, {"priority": 90}), (cloud, cloud.url, {"priority": 0})]
    )
    _status, headers, _ = await post_chat(nx, "llama3", HISTORY)
    assert headers["X-Nexus-Backend"] == "cloud"
    assert cloud.received[-1][1]["messages"] == HISTORY


# --- tiers --------------------------------------------------------------------------------------

TIER3 = '[[routing.policies]]\nmodel_pattern = "coder*"\nmin_tier = 3\n'


async def test_min_tier_is_strict_and_503_names_it(backend_factory, nexus_factory):
    small = await backend_factory("vllm", {"coder": {}}, name="small")
    unset = await backend_factory("vllm", {"coder": {}}, name="unset")
    nx = await start(
        nexus_factory, [(small, small.url, {"tier": 2}), (unset, unset.url, {})], TIER3
    )
    status, _, document = await post_chat(nx, "coder")
    assert status == 503
    assert document["error"]["context"]["required_tier"] == 3
    assert small.received == [] and unset.received == []
    # Flexible: a lower tier only because nothing meets the minimum; the best one left.
    status, headers, _ = await post_chat(nx, "coder", headers={"X-Nexus-Flexible": "true"})
    assert status == 200 and headers["X-Nexus-Backend"] == "small"


async def test_flexible_never_downgrades_when_the_tier_is_available(backend_factory, nexus_factory):
    small = await backend_factory("vllm", {"coder": {}}, name="small")
    big = await backend_factory("vllm", {"coder": {}}, name="big")
    nx = await start(
        nexus_factory,
        [
            (small, small.url, {"tier": 2, "priority": 0}),
            (big, big.url, {"tier": 4, "priority": 99}),
        ],
        TIER3,
    )
    for _ in range(4):
        for flexible in ({}, {"X-Nexus-Flexible": "true"}):
            status, headers, _ = await post_chat(nx, "coder", headers=flexible)
            assert status == 200 and headers["X-Nexus-Backend"] == "big"
    assert small.received == []


# --- budget -------------------------------------------------------------------------------------


def budget_toml(action: str = "shift_local", limit: float = 10.0) -> str:
    return (
        f"[routing.budget]\nmonthly_limit_usd = {limit}\nsoft_limit_percent = 50\n"
        f'hard_limit_action = "{action}"\n'
        'prices = { "llama3" = { input = 1.0, output = 2.0 } }\n'
    )


async def mixed(backend_factory, nexus_factory, action: str = "shift_local", extra: str = ""):
    local = await backend_factory("ollama", {"llama3": {}}, name="gpu")
    cloud = await backend_factory("openai", {"llama3": {}, "gpt-4o": {}}, name="cloud")
    nx = await start(
        nexus_factory,
        [(local, local.url, {"priority": 90}), (cloud, cloud.url, {"priority": 0})],
        budget_toml(action) + extra,
    )
    return nx, local, cloud


async def test_budget_header_and_soft_limit_deprioritises_cloud(backend_factory, nexus_factory):
    nx, _local, _cloud = await mixed(backend_factory, nexus_factory)
    status, headers, _ = await post_chat(nx, "llama3")
    assert status == 200 and headers["X-Nexus-Backend"] == "cloud"
    assert headers["X-Nexus-Budget-Status"] == "normal"
    # llama3 has its price in the config: 10 prompt and 3 completion tokens at 1 and 2 USD/M.
    assert headers["X-Nexus-Cost-Estimated"] == nexus.format_usd((10 * 1.0 + 3 * 2.0) / 1e6)
    nx.app[nexus.BUDGET].charge(5.0)  # half of 10: the soft limit
    status, headers, _ = await post_chat(nx, "llama3")
    assert status == 200 and headers["X-Nexus-Backend"] == "gpu"
    assert headers["X-Nexus-Budget-Status"] == "soft_limit"
    assert headers["X-Nexus-Cost-Estimated"] == "0"
    _status, headers, _ = await post_chat(nx, "gpt-4o")  # only the cloud serves it: still served
    assert headers["X-Nexus-Backend"] == "cloud"


async def test_hard_limit_shift_local(backend_factory, nexus_factory):
    nx, _local, cloud = await mixed(
        backend_factory, nexus_factory, extra='[routing]\nfallbacks = { "gpt-4o" = ["llama3"] }\n'
    )
    nx.app[nexus.BUDGET].charge(10.0)
    status, headers, _ = await post_chat(nx, "llama3")
    assert status == 200 and headers["X-Nexus-Backend"] == "gpu"
    assert headers["X-Nexus-Budget-Status"] == "hard_limit"
    status, headers, _ = await post_chat(nx, "gpt-4o")  # shifted to its local fallback
    assert status == 200 and headers["X-Nexus-Backend"] == "gpu"
    assert headers["X-Nexus-Fallback-Model"] == "llama3"
    assert all(path != "/v1/chat/completions" for path in cloud.received_paths())


async def test_hard_limit_never_a_silent_cut(backend_factory, nexus_factory):
    nx, _local, cloud = await mixed(backend_factory, nexus_factory)
    nx.app[nexus.BUDGET].charge(10.0)
    status, headers, document = await post_chat(nx, "gpt-4o")  # nothing local serves it
    assert status == 429
    assert document["error"]["code"] == "budget_exceeded"
    assert "budget" in document["error"]["message"]
    assert int(headers["Retry-After"]) > 0
    assert headers["X-Nexus-Budget-Status"] == "hard_limit"
    assert cloud.received == []


async def test_hard_limit_block_cloud_does_not_substitute(backend_factory, nexus_factory):
    nx, _local, cloud = await mixed(
        backend_factory,
        nexus_factory,
        "block_cloud",
        extra='[routing]\nfallbacks = { "gpt-4o" = ["llama3"] }\n',
    )
    nx.app[nexus.BUDGET].charge(10.0)
    status, headers, _ = await post_chat(nx, "llama3")
    assert status == 200 and headers["X-Nexus-Backend"] == "gpu"
    status, _, document = await post_chat(nx, "gpt-4o")
    assert status == 429 and document["error"]["code"] == "budget_exceeded"
    assert cloud.received == []


async def test_hard_limit_block_all_and_warn(backend_factory, nexus_factory):
    nx, local, cloud = await mixed(backend_factory, nexus_factory, "block_all")
    nx.app[nexus.BUDGET].charge(10.0)
    status, _, document = await post_chat(nx, "llama3")
    assert status == 429 and document["error"]["code"] == "budget_exceeded"
    assert local.received == [] and cloud.received == []
    warned, _, _ = await mixed(backend_factory, nexus_factory, "warn")
    warned.app[nexus.BUDGET].charge(10.0)
    status, headers, _ = await post_chat(warned, "gpt-4o")
    assert status == 200 and headers["X-Nexus-Budget-Status"] == "hard_limit"


# --- properties over random worlds ------------------------------------------------------------

from hypothesis import example, given  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

POLICY_MODELS = ("internal-a", "internal-b", "public")
world_backend = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["ollama", "vllm", "openai", "anthropic"]),
        "zone": st.sampled_from(["restricted", "open", ""]),
        "tier": st.integers(0, 5),
        "status": st.sampled_from(["healthy", "healthy", "unhealthy"]),
        "priority": st.integers(0, 100),
        "in_flight": st.integers(0, 3),
        "max_concurrent": st.integers(0, 2),
        "models": st.lists(st.sampled_from(POLICY_MODELS), min_size=1, max_size=3, unique=True),
    }
)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    specs=st.lists(world_backend, max_size=8),
    model=st.sampled_from(POLICY_MODELS),
    min_tier=st.integers(0, 5),
    flexible=st.booleans(),
    overflow=st.sampled_from(["block", "scrub"]),
    budget_status=st.sampled_from(["normal", "soft_limit", "hard_limit"]),
    action=st.sampled_from(nexus.BUDGET_ACTIONS),
)
@example(  # a flexible request under block_cloud: the fallback's higher tier does not count
    specs=[
        {
            "type": "ollama",
            "zone": "restricted",
            "tier": t,
            "status": "healthy",
            "priority": 0,
            "in_flight": 0,
            "max_concurrent": 0,
            "models": [m],
        }
        for t, m in ((0, "internal-a"), (1, "internal-b"))
    ],
    model="internal-a",
    min_tier=1,
    flexible=True,
    overflow="block",
    budget_status="hard_limit",
    action="block_cloud",
)
def test_policy_holds_in_every_world(
    specs, model, min_tier, flexible, overflow, budget_status, action
):
    registry = nexus.Registry()
    for i, spec in enumerate(specs):
        spec = dict(spec)
        cloud = spec["type"] in nexus.CLOUD_TYPES
        zone = spec.pop("zone") or ("open" if cloud else "restricted")
        models = {m: nexus.Model(id=m) for m in spec.pop("models")}
        backend = nexus.Backend(name=f"b{i}", url=f"http://127.0.0.1:1/{i}", zone=zone, **spec)
        backend.models = models
        registry.backends[backend.name] = backend
    registry.reindex()
    s = nexus.Settings()
    s.routing.fallbacks = {"internal-a": ["internal-b", "public"]}
    s.routing.policies = [
        nexus.PolicySettings(model_pattern="internal-*", privacy="restricted", min_tier=min_tier),
        nexus.PolicySettings(model_pattern="*", overflow=overflow),
    ]
    s.routing.budget = nexus.BudgetSettings(monthly_limit_usd=1.0, hard_limit_action=action)
    needs = nexus.RequestNeeds(model=model, flexible=flexible, budget_status=budget_status)
    try:
        decision = nexus.route(needs, registry, s)
    except nexus.NexusError as exc:
        assert exc.status in (404, 429, 503)
        return
    hard = budget_status == "hard_limit"
    assert not (hard and action == "block_all")
    # block_cloud at the hard limit serves the model asked for, never a fallback: a backend
    # of a fallback model does not meet the tier for this request.
    cut = hard and action == "block_cloud"
    served = [model] if cut else [model, *s.routing.fallbacks.get(model, [])]
    tier_met = any(
        b.tier >= min_tier
        and b.zone == "restricted"
        and b.status == "healthy"
        and not (hard and action in ("shift_local", "block_cloud") and b.is_cloud)
        for m in served
        for b in registry.by_model.get(m, ())
    )
    for attempt in decision.attempts:
        backend = attempt.backend
        if model.startswith("internal-"):
            assert backend.zone == "restricted"  # under failover and fallback too
            if not flexible or tier_met:
                assert backend.tier >= min_tier
        if hard and action in ("shift_local", "block_cloud"):
            assert not backend.is_cloud
        if attempt.scrub:
            assert backend.zone == "open" and overflow == "scrub"
        if overflow == "block" and not model.startswith("internal-"):
            local_first = any(b.zone == "restricted" for b in registry.by_model.get(model, ()))
            assert not (local_first and backend.zone == "open")


async def test_shift_local_waits_for_a_busy_local_backend(backend_factory, nexus_factory):
    import asyncio

    nx, local, cloud = await mixed(backend_factory, nexus_factory)
    nx.backend("gpu").max_concurrent = 1

    async def slow(request, body):
        await asyncio.sleep(0.3)
        return await local.chat_answer(request, body)

    local.behaviours += [slow, slow]
    nx.app[nexus.BUDGET].charge(10.0)
    results = await asyncio.gather(post_chat(nx, "llama3"), post_chat(nx, "llama3"))
    assert [r[0] for r in results] == [200, 200]
    assert [r[1]["X-Nexus-Backend"] for r in results] == ["gpu", "gpu"]
    assert local.max_in_flight == 1  # the second waited in the queue: never past the limit
    assert cloud.received == []


async def test_overflow_block_waits_for_a_busy_local_backend(backend_factory, nexus_factory):
    import asyncio

    local = await backend_factory("ollama", {"llama3": {}}, name="gpu")
    cloud, recorder = await recorded_cloud(backend_factory, {"llama3": {}})
    nx = await start(
        nexus_factory,
        [(local, local.url, {"max_concurrent": 1}), (cloud, recorder.url, {})],
        LOCAL_FIRST.format(overflow="block"),
    )

    async def slow(request, body):
        await asyncio.sleep(0.3)
        return await local.chat_answer(request, body)

    local.behaviours += [slow, slow]
    results = await asyncio.gather(post_chat(nx, "llama3"), post_chat(nx, "llama3"))
    assert [r[1]["X-Nexus-Backend"] for r in results] == ["gpu", "gpu"]
    assert local.max_in_flight == 1
    assert b"POST" not in recorder.data
    await recorder.stop()
