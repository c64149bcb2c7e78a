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
    state = budget()
    now = dt.datetime(2030, 12, 31, 23, 59, 0, tzinfo=dt.UTC)
    assert state.seconds_to_reset(now) == 60


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
