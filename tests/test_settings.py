"""Settings (SPEC §1): flags > environment > file > defaults, and every invalid value stops
start-up with one clear line naming the key, and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import ROOT, backends_toml

import nexus


def load(tmp_path: Path, toml: str = "", env: dict | None = None, overrides: dict | None = None):
    path = tmp_path / "nexus.toml"
    path.write_text(toml)
    return nexus.load_settings(path, env or {}, overrides or {})


def test_defaults_without_any_file():
    settings = nexus.load_settings(None, {}, {})
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 8000
    assert settings.discovery.enabled is True
    assert settings.health_check.failure_threshold == 3
    assert settings.routing.strategy == "smart"
    assert settings.routing.max_retries == 2
    assert settings.logging.log_content is False
    assert settings.backends == []


def test_precedence_flags_over_env_over_file(tmp_path):
    toml = '[server]\nport = 9001\nhost = "127.0.0.2"\n[logging]\nlevel = "warning"\n'
    from_file = load(tmp_path, toml)
    assert (from_file.server.port, from_file.server.host) == (9001, "127.0.0.2")
    from_env = load(tmp_path, toml, env={"NEXUS_PORT": "9002", "NEXUS_DISCOVERY": "false"})
    assert from_env.server.port == 9002
    assert from_env.server.host == "127.0.0.2"
    assert from_env.discovery.enabled is False
    from_flag = load(
        tmp_path, toml, env={"NEXUS_PORT": "9002"}, overrides={("server", "port"): 9003}
    )
    assert from_flag.server.port == 9003
    assert from_flag.logging.level == "warning"


def test_config_file_lookup_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert nexus.config_file_path(None, {}) is None
    (tmp_path / "nexus.toml").write_text("")
    assert nexus.config_file_path(None, {}) == Path("nexus.toml")
    assert nexus.config_file_path(None, {"NEXUS_CONFIG": "/x.toml"}) == Path("/x.toml")
    assert nexus.config_file_path("/y.toml", {"NEXUS_CONFIG": "/x.toml"}) == Path("/y.toml")


def test_backend_defaults_and_url_normalisation(tmp_path):
    toml = """
[[backends]]
url = "http://10.0.0.5:11434/v1/"
type = "ollama"
[[backends]]
name = "cloud"
url = "https://api.openai.com/v1"
type = "openai"
api_key_env = "OPENAI_API_KEY"
"""
    settings = load(tmp_path, toml, env={"OPENAI_API_KEY": "sk-secret"})
    local, cloud = settings.backends
    assert local.url == "http://10.0.0.5:11434"
    assert local.name == "10.0.0.5:11434"
    assert local.zone == "restricted"
    assert cloud.url == "https://api.openai.com"
    assert cloud.zone == "open"


@pytest.mark.parametrize(
    ("toml", "env", "key"),
    [
        ("[server\nport = 1", {}, "config"),
        ("[server]\nport = 70000", {}, "server.port"),
        ('[server]\nport = "eighty"', {}, "server.port"),
        ("[server]\nportt = 80", {}, "server.portt"),
        ("[server]\nmax_body_mb = 0", {}, "server.max_body_mb"),
        ('[[backends]]\nurl = "http://h:1"\ntype = "ollamma"', {}, "backends[0].type"),
        ('[[backends]]\nurl = "ftp://h"', {}, "backends[0].url"),
        ('[[backends]]\nurl = "http://h:notaport"', {}, "backends[0].url"),
        ('[[backends]]\nurl = "http://h:1"\npriority = 101', {}, "backends[0].priority"),
        ('[[backends]]\nurl = "http://h:1"\nzone = "dmz"', {}, "backends[0].zone"),
        (
            '[[backends]]\nurl = "https://api.openai.com"\ntype = "openai"\n'
            'api_key_env = "MISSING_KEY"',
            {},
            "backends[0].api_key_env",
        ),
        ('[[backends]]\nurl = "https://x"\ntype = "anthropic"', {}, "backends[0].api_key_env"),
        (
            '[[backends]]\nname = "a"\nurl = "http://h:1"\n[[backends]]\nname = "a"\n'
            'url = "http://h:2"',
            {},
            "backends[1].name",
        ),
        ('[routing]\naliases = { "a" = "b", "b" = "a" }', {}, "routing.aliases.a"),
        ('[routing]\nstrategy = "fastest"', {}, "routing.strategy"),
        ("[routing]\nweights = { speed = 1 }", {}, "routing.weights.speed"),
        ('[routing]\nfallbacks = { "a" = "b" }', {}, "routing.fallbacks.a"),
        ('[[routing.policies]]\nprivacy = "secret"', {}, "routing.policies[0].privacy"),
        ('[routing.budget]\nhard_limit_action = "panic"', {}, "routing.budget.hard_limit_action"),
        ('[logging]\nformat = "xml"', {}, "logging.format"),
        ("[health_check]\nenabled = 1", {}, "health_check.enabled"),
        ('[auth]\napi_keys = [{ name = "a", key_env = "NO_SUCH_VAR" }]', {}, "auth.api_keys[0]"),
        ("", {"NEXUS_PORT": "abc"}, "NEXUS_PORT"),
        ("", {"NEXUS_PORT": "0"}, "NEXUS_PORT"),
        ("", {"NEXUS_DISCOVERY": "maybe"}, "NEXUS_DISCOVERY"),
        ("", {"NEXUS_LOG_FORMAT": "xml"}, "NEXUS_LOG_FORMAT"),
    ],
)
def test_invalid_settings_name_the_key(tmp_path, toml, env, key):
    with pytest.raises(nexus.ConfigError) as caught:
        load(tmp_path, toml, env=env)
    assert key in str(caught.value)


def run_nexus(*args: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, str(ROOT / "nexus.py"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_start_up_error_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "bad.toml").write_text('[[backends]]\nurl = "http://h:1"\ntype = "nope"\n')
    result = run_nexus("serve", "-c", str(tmp_path / "bad.toml"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "backends[0].type" in lines[0] and "nope" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_env_value_exits_2(tmp_path):
    result = run_nexus("serve", env={"NEXUS_PORT": "99999"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "NEXUS_PORT" in result.stderr and "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = run_nexus("serve", "-c", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "not found" in result.stderr


def test_invalid_flag_value_exits_2(tmp_path):
    result = run_nexus("serve", "-p", "eighty", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_credentials_in_a_backend_url_are_refused_without_echoing_them(tmp_path):
    toml = '[[backends]]\nurl = "http://alice:hunter2@10.0.0.5:11434"\ntype = "ollama"\n'
    with pytest.raises(nexus.ConfigError) as caught:
        load(tmp_path, toml)
    message = str(caught.value)
    assert "backends[0].url" in message
    assert "credentials do not belong in the URL; use api_key_env" in message
    assert "hunter2" not in message and "alice" not in message


def test_default_backend_name_is_host_and_port(tmp_path):
    toml = '[[backends]]\nurl = "http://[::1]:11434"\ntype = "ollama"\n'
    assert load(tmp_path, toml).backends[0].name == "[::1]:11434"
    toml = '[[backends]]\nurl = "https://api.example.com/v1"\ntype = "generic"\n'
    assert load(tmp_path, toml).backends[0].name == "api.example.com"


async def test_a_partial_weights_table_keeps_the_other_weights(
    tmp_path, backend_factory, nexus_factory
):
    """`weights = { latency = 10 }` changes the latency weight only: priority still counts."""
    assert load(tmp_path, "[routing]\nweights = { latency = 10 }").routing.weights == {
        "priority": 50.0,
        "load": 30.0,
        "latency": 10,
    }
    first = await backend_factory("generic", {"m": {}}, name="first")
    second = await backend_factory("generic", {"m": {}}, name="second")
    toml = "[routing]\nweights = { latency = 10 }\n"
    nx = await nexus_factory(
        toml + backends_toml(first, second, first={"priority": 10}, second={"priority": 90})
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        for _ in range(6):
            async with session.post(nx.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                assert resp.headers["X-Nexus-Backend"] == "first"
    assert (len(first.received), len(second.received)) == (6, 0)
