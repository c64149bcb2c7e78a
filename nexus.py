"""Nexus: one OpenAI-compatible endpoint in front of every LLM server you run.

Nexus is a control plane. It finds inference servers (Ollama, vLLM, llama.cpp, LM Studio, exo,
any OpenAI-compatible server, and cloud APIs when configured), knows which models each serves
and what they can do, routes every request to the best healthy backend, fails over when one
dies and enforces policy. It never runs a model and keeps no user data: all state is
operational (health, load, counters) and lives in memory, except the month's spend when a
monthly limit is set (the ledger, nexus.db).

This file is the whole program. It needs aiohttp, zeroconf and tiktoken, and uses uvloop where
it is installed (not on Windows). It reads top to bottom in the order a request travels; each
section's banner says what it owns and what it must not do.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import bisect
import collections
import concurrent.futures
import contextlib
import datetime as dt
import email.utils
import fnmatch
import functools
import gc
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

import aiohappyeyeballs  # comes with aiohttp: dual-stack connects (RFC 8305)
import ifaddr  # comes with zeroconf: the machine's interfaces, for announcing
import tiktoken
from aiohttp import web

try:  # optional: not built for Windows, where the standard loop serves
    import uvloop
except ImportError:
    uvloop = None
from zeroconf import IPVersion, NonUniqueNameException, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

__version__ = "0.1.0"

log = logging.getLogger("nexus")


def asset_path(name: str) -> Path:
    """Where an embedded asset lives: beside this file, or inside the one-file bundle."""
    base = Path(getattr(sys, "_MEIPASS", Path(__file__).resolve().parent))
    return base / "assets" / name


# ==============================================================================================
# Errors
# Owns: the one exception type every layer raises and the OpenAI error envelope it becomes.
# Must not: format responses anywhere else; handlers raise, the middleware answers.
# ==============================================================================================

# The OpenAI error type of each status Nexus answers with on its own account.
ERROR_TYPES = {
    **dict.fromkeys((400, 401, 404, 409), "invalid_request_error"),
    403: "permission_error",
    429: "rate_limit_error",
    501: "not_implemented",
    503: "service_unavailable",
}
# The codes whose type is not their status's: a spent budget is a quota, not a rate limit.
CODE_TYPES = {"budget_exceeded": "insufficient_quota", "key_budget_exceeded": "insufficient_quota"}


@dataclass(eq=False, repr=False)
class NexusError(Exception):
    """An error that becomes an OpenAI-format error response; `headers` go out with it."""

    status: int
    type: str
    code: str | None
    message: str
    param: str | None = None
    context: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @classmethod
    def of(cls, status: int, code: str | None, message: str, *rest: Any, **kw: Any) -> NexusError:
        type_ = CODE_TYPES.get(code or "") or ERROR_TYPES[status]
        return cls(status, type_, code, message, *rest, **kw)

    def envelope(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.context is not None:
            error["context"] = self.context
        return {"error": error}


def bad_request(message: str, param: str | None = None) -> NexusError:
    """The plain 400 for a request that breaks a rule, naming the field (param) at fault."""
    return NexusError.of(400, "invalid_request", message, param)


class ConfigError(Exception):
    """An invalid setting at `key`: a dotted path, variable or flag. Start-up exits with code 2."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"invalid setting {key}: {problem}")
        self.key = key


# ==============================================================================================
# Settings
# Owns: defaults, the TOML file, NEXUS_* variables and CLI flags, merged in that order of
# precedence (flags win) and validated before anything starts.
# Must not: change while Nexus runs, except by a reload (see Reload), which validates a whole
# new Settings first and then swaps its sections in, all in one step.
# ==============================================================================================

LOCAL_TYPES = ("ollama", "vllm", "llamacpp", "lmstudio", "exo", "generic")
CLOUD_TYPES = ("openai", "anthropic")
BACKEND_TYPES = LOCAL_TYPES + CLOUD_TYPES
STRATEGIES = ("smart", "round_robin", "priority_only", "random")
BUDGET_ACTIONS = ("warn", "shift_local", "block_cloud", "block_all")
MAX_ALIAS_HOPS = 3
LOG_LEVELS = tuple(name.lower() for name in logging.getLevelNamesMapping())
WEIGHTS = {"priority": 50.0, "load": 30.0, "latency": 20.0}  # the routing score's, and defaults


def setting(default: Any, **rules: Any) -> Any:
    """A settings field with the rules check_setting holds its value to (positive, non_negative,
    min and max or below, choices) and env, the NEXUS_* variable that sets it."""
    return field(default=default, metadata=rules)


@dataclass(slots=True)
class ServerSettings:
    """[server]: where Nexus listens, how long it waits on backends, what it accepts."""

    host: str = setting("0.0.0.0", env="NEXUS_HOST")
    port: int = setting(8000, min=1, max=65535, env="NEXUS_PORT")
    request_timeout_seconds: float = setting(300.0, positive=True)
    connect_timeout_seconds: float = setting(5.0, positive=True)
    first_byte_timeout_seconds: float = setting(60.0, positive=True)
    stream_idle_timeout_seconds: float = setting(30.0, positive=True)
    max_body_mb: float = setting(10.0, positive=True)
    watch_config: bool = True  # reload when the config file changes (SIGHUP always reloads)
    data_dir: str = setting("", env="NEXUS_DATA_DIR")  # the ledger's (monthly limits only)


@dataclass(slots=True)
class DiscoverySettings:
    """[discovery]: whether backends are found without configuration, and kept once lost."""

    enabled: bool = setting(True, env="NEXUS_DISCOVERY")
    grace_period_seconds: float = setting(60.0, non_negative=True)


@dataclass(slots=True)
class HealthSettings:
    """[health_check]: how often backends are polled and how many polls flip their state."""

    enabled: bool = setting(True, env="NEXUS_HEALTH_CHECK")
    interval_seconds: float = setting(30.0, positive=True)
    timeout_seconds: float = setting(5.0, positive=True)
    failure_threshold: int = setting(3, positive=True)
    recovery_threshold: int = setting(2, positive=True)


@dataclass(slots=True)
class PolicySettings:
    """One [[routing.policies]] entry: the zone, minimum tier and overflow of matching models."""

    model_pattern: str = "*"
    privacy: str = setting("open", choices=("restricted", "open"))
    min_tier: int = setting(0, min=0, max=5)
    overflow: str = setting("block", choices=("block", "scrub"))


@dataclass(slots=True)
class BudgetSettings:
    """[routing.budget]: the monthly cloud limit, what happens at it, and price overrides."""

    monthly_limit_usd: float = setting(0.0, non_negative=True)
    soft_limit_percent: float = setting(75.0, min=0, max=100)
    hard_limit_action: str = setting("shift_local", choices=BUDGET_ACTIONS)
    prices: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RoutingSettings:
    """[routing]: the strategy, retries, score weights, aliases, fallbacks, policies and budget."""

    strategy: str = setting("smart", choices=STRATEGIES)
    max_retries: int = setting(2, non_negative=True)
    weights: dict[str, float] = field(default_factory=WEIGHTS.copy)
    aliases: dict[str, str] = field(default_factory=dict)
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    policies: list[PolicySettings] = field(default_factory=list)
    budget: BudgetSettings | None = None
    session_affinity: bool = True  # a conversation's turns stay where its prompt cache is


@dataclass(slots=True)
class QueueSettings:
    """[queue]: whether requests wait for a busy backend, how many and for how long."""

    enabled: bool = True
    max_size: int = setting(100, non_negative=True)
    max_wait_seconds: float = setting(30.0, non_negative=True)


@dataclass(slots=True)
class LifecycleSettings:
    """[lifecycle]: what loads through the lifecycle API (SPEC §5.1) may take, and how long."""

    vram_headroom_percent: float = setting(20.0, min=0, below=100)  # of vram_gb, left free
    timeout_seconds: float = setting(300.0, positive=True)  # for a load, unload or migration


@dataclass(slots=True)
class LoggingSettings:
    """[logging]: level, format (pretty or json) and whether prompts may be logged."""

    level: str = setting("info", choices=LOG_LEVELS, any_case=True, env="NEXUS_LOG_LEVEL")
    format: str = setting("pretty", choices=("pretty", "json"), env="NEXUS_LOG_FORMAT")
    log_content: bool = False


@dataclass(slots=True)
class ApiKeySettings:
    """One [[auth.api_keys]] entry: a key's name, its variable, limits and allow-list."""

    name: str = ""
    key_env: str = ""
    monthly_limit_usd: float = setting(0.0, non_negative=True)
    rpm: int = setting(0, non_negative=True)
    tpm: int = setting(0, non_negative=True)
    models: list[str] = field(default_factory=list)
    admin: bool = False
    digest: bytes = field(default=b"", init=False, repr=False, compare=False)  # of key_env's key


@dataclass(slots=True)
class AuthSettings:
    """[auth]: the API keys; none configured means no key is asked for."""

    api_keys: list[ApiKeySettings] = field(default_factory=list)


@dataclass(slots=True)
class BackendSettings:
    """One [[backends]] entry: a server Nexus is told about, with its zone, tier and limits."""

    name: str = ""
    url: str = ""
    type: str = setting("generic", choices=BACKEND_TYPES)
    priority: int = setting(50, min=0, max=100)
    zone: str = setting("", choices=("restricted", "open"))  # "": by type
    tier: int = setting(0, min=0, max=5)
    max_concurrent: int = setting(0, non_negative=True)
    api_key_env: str = ""
    rpm: int = setting(0, non_negative=True)  # requests a minute it is sent at most; 0: no limit
    vram_gb: float = setting(0.0, non_negative=True)  # what loads may fill; 0: not declared


@dataclass(slots=True)
class Settings:
    """Every setting, by section: what load_settings returns and a reload replaces."""

    server: ServerSettings = field(default_factory=ServerSettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    health_check: HealthSettings = field(default_factory=HealthSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    backends: list[BackendSettings] = field(default_factory=list)


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# What a value must be, by the type of its setting's default, in the words of the message.
SCALAR_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _parse_env_value(var: str, text: str, default: Any) -> Any:
    """A NEXUS_* variable's text as the type of the setting it sets."""
    if isinstance(default, bool):
        word = text.strip().lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
    elif isinstance(default, int):
        with contextlib.suppress(ValueError):
            return int(text)
    else:
        return text
    raise ConfigError(var, f"expected {SCALAR_WORDS[type(default)]}, got {text!r}")


def config_file_path(cli_path: str | None, env: dict[str, str]) -> Path | None:
    """The config file: --config, else $NEXUS_CONFIG, else ./nexus.toml when it exists."""
    if cli_path or env.get("NEXUS_CONFIG"):
        return Path(cli_path or env["NEXUS_CONFIG"])
    local = Path("nexus.toml")
    return local if local.is_file() else None


def check_setting(key: str, value: Any, rules: Mapping[str, Any]) -> None:
    """One value against the rules in its field's metadata (see setting())."""
    if rules.get("positive") and value <= 0:
        raise ConfigError(key, f"must be greater than 0, got {value}")
    if rules.get("non_negative") and value < 0:
        raise ConfigError(key, f"must not be negative, got {value}")
    if "max" in rules and not rules["min"] <= value <= rules["max"]:
        raise ConfigError(key, f"expected {rules['min']}-{rules['max']}, got {value}")
    if "below" in rules and not rules["min"] <= value < rules["below"]:
        raise ConfigError(key, f"expected {rules['min']}-{rules['below'] - 1}, got {value}")
    choices = rules.get("choices")
    if choices and (value.lower() if rules.get("any_case") else value) not in choices:
        words = " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
        raise ConfigError(key, f"expected {words}, got {value!r}")


def check_fields(obj: Any, key: str, skip: tuple[str, ...] = ()) -> None:
    """Check every field of a settings dataclass, and the sections in it, against its rules."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        sub = f"{key}.{f.name}" if key else f.name
        if f.name in skip:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                if is_dataclass(item):
                    check_fields(item, f"{sub}[{i}]")
        elif is_dataclass(value):
            check_fields(value, sub)
        else:
            check_setting(sub, value, f.metadata)


def validate_price(key: str, price: Any) -> None:
    """A configured price: { input = USD, output = USD } per million tokens, both needed."""
    if not isinstance(price, dict):
        raise ConfigError(key, "expected { input = USD, output = USD } per million tokens")
    known = ("input", "output", "cached_input", "cache_write")
    for name in price:
        if name not in known:
            raise ConfigError(f"{key}.{name}", f"unknown key (expected {', '.join(known)})")
    for name in known:
        if name in ("input", "output") and name not in price:
            raise ConfigError(f"{key}.{name}", "is required (USD per million tokens)")
        value = price.get(name, 0)  # the cache prices may be left out
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{key}.{name}", f"expected a number of 0 or more, got {value!r}")


def key_digest(secret: str) -> bytes:
    """The SHA-256 of a key: all Nexus keeps of it, and what a presented key is compared to."""
    return hashlib.sha256(secret.encode()).digest()


def validate_api_keys(auth: AuthSettings, env: dict[str, str]) -> None:
    """Each key needs a name and a set variable, names and keys unique; only its digest is kept."""
    names: dict[str, str] = {}
    digests: dict[bytes, str] = {}
    for i, k in enumerate(auth.api_keys):
        key = f"auth.api_keys[{i}]"
        if not k.name:
            raise ConfigError(f"{key}.name", "is required")
        if k.name in names:
            raise ConfigError(f"{key}.name", f"duplicate key name {k.name!r} (see {names[k.name]})")
        names[k.name] = key
        if not k.key_env:
            raise ConfigError(f"{key}.key_env", "is required")
        if not env.get(k.key_env):
            raise ConfigError(f"{key}.key_env", f"variable {k.key_env} is not set")
        check_fields(k, key)
        k.digest = key_digest(env[k.key_env])
        if k.digest in digests:
            raise ConfigError(f"{key}.key_env", f"holds the same key as {digests[k.digest]}")
        digests[k.digest] = key


def normalise_url(url: str) -> str:
    """A backend URL is the server's root: no trailing slash, no trailing /v1."""
    url = url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc:  # checked first: the message must not repeat the password
        raise ValueError("credentials do not belong in the URL; use api_key_env")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port") from None
    return url.removesuffix("/v1")


def validate_backend(b: BackendSettings, key: str, env: dict[str, str]) -> None:
    """Check one backend's settings and fill in what defaults from others (name, zone)."""
    check_setting(f"{key}.type", b.type, {"choices": BACKEND_TYPES})
    try:
        b.url = normalise_url(b.url)
    except ValueError as exc:
        raise ConfigError(f"{key}.url", str(exc)) from None
    if not b.name:
        b.name = urllib.parse.urlsplit(b.url).netloc  # host:port (it holds no credentials)
    if not b.zone:
        b.zone = "open" if b.type in CLOUD_TYPES else "restricted"
    check_fields(b, key)
    if b.type in CLOUD_TYPES and not b.api_key_env:
        raise ConfigError(f"{key}.api_key_env", f"a {b.type} backend needs api_key_env")
    if b.api_key_env and not env.get(b.api_key_env):
        raise ConfigError(f"{key}.api_key_env", f"variable {b.api_key_env} is not set")


def check_alias_cycles(aliases: dict[str, str]) -> None:
    """Refuse an alias that leads back to itself or takes more than MAX_ALIAS_HOPS hops."""
    for start in aliases:
        seen = [start]
        while seen[-1] in aliases:
            seen.append(aliases[seen[-1]])
            if seen[-1] in seen[:-1]:
                raise ConfigError(f"routing.aliases.{start}", f"alias cycle {' -> '.join(seen)}")
        if len(seen) > MAX_ALIAS_HOPS + 1:
            problem = f"alias chain longer than {MAX_ALIAS_HOPS} hops: {' -> '.join(seen)}"
            raise ConfigError(f"routing.aliases.{start}", problem)


def validate_settings(s: Settings, env: dict[str, str]) -> None:
    """Every rule that one value's type cannot express. The first problem found is raised."""
    check_fields(s, "", skip=("auth", "backends"))  # those two after their defaults are set
    for name, weight in s.routing.weights.items():  # the defaults' three first
        if name not in WEIGHTS:
            raise ConfigError(f"routing.weights.{name}", "unknown weight")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"routing.weights.{name}", "must be a number of 0 or more")
    for alias, target in s.routing.aliases.items():
        if not isinstance(target, str) or not target:
            raise ConfigError(f"routing.aliases.{alias}", "must name a model")
    check_alias_cycles(s.routing.aliases)
    for model, chain in s.routing.fallbacks.items():
        if not isinstance(chain, list) or not all(isinstance(m, str) for m in chain):
            raise ConfigError(f"routing.fallbacks.{model}", "must be a list of model names")
    if s.routing.budget is not None:
        for model, price in s.routing.budget.prices.items():
            validate_price(f"routing.budget.prices.{model}", price)
    validate_api_keys(s.auth, env)
    names: set[str] = set()
    for i, backend in enumerate(s.backends):
        validate_backend(backend, f"backends[{i}]", env)
        if backend.name in names:
            raise ConfigError(f"backends[{i}].name", f"duplicate backend name {backend.name!r}")
        names.add(backend.name)


def resolve_alias(model: str, aliases: dict[str, str]) -> str:
    """Follow aliases up to MAX_ALIAS_HOPS; cycles and longer chains were rejected at start-up."""
    for _ in range(MAX_ALIAS_HOPS):
        if model not in aliases:
            return model
        model = aliases[model]
    return model


def model_chain(model: str, routing: RoutingSettings) -> list[str]:
    """The models a request naming `model` may be served by: its alias's target, then fallbacks."""
    model_id = resolve_alias(model, routing.aliases)
    fallbacks = routing.fallbacks.get(model_id)
    if not fallbacks:  # the usual case, on every request: no copies
        return [model_id]
    return list(dict.fromkeys([model_id, *fallbacks]))


def _build(cls: type, table: Any, key: str) -> Any:
    """Build a settings dataclass from a TOML table: unknown keys and wrong types are errors."""
    if not isinstance(table, dict):
        raise ConfigError(key, f"expected a table, got {table!r}")
    obj = cls()
    known = {f.name for f in fields(cls) if f.init}
    types = get_type_hints(cls)
    for name, value in table.items():
        sub = f"{key}.{name}" if key else name
        if name not in known:
            raise ConfigError(sub, "unknown key")
        setattr(obj, name, _convert_field(sub, value, getattr(obj, name), types[name]))
    return obj


def _convert_field(key: str, value: Any, default: Any, kind: Any) -> Any:
    """One TOML value, checked and converted: a section (X, X | None, list[X]) or a value."""
    section = next((t for t in (kind, *get_args(kind)) if is_dataclass(t)), None)
    if section is not None and isinstance(default, list):
        if not isinstance(value, list):
            raise ConfigError(key, "expected a list of tables")
        return [_build(section, item, f"{key}[{i}]") for i, item in enumerate(value)]
    if section is not None:
        return _build(section, value, key)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a table, got {value!r}")
        return {**default, **value}  # a partial table (routing.weights) keeps the other defaults
    if isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"expected a list of strings, got {value!r}")
        return value
    scalar = type(default)  # a value: of its default's type, though an int will do for a float
    accepted = int | float if scalar is float else scalar
    if isinstance(value, bool) is not (scalar is bool) or not isinstance(value, accepted):
        raise ConfigError(key, f"expected {SCALAR_WORDS[scalar]}, got {value!r}")
    return float(value) if scalar is float else value


def load_settings(
    path: Path | None,
    env: dict[str, str],
    overrides: dict[tuple[str, str], Any],
    read: Callable[[Path], str] | None = None,
) -> Settings:
    """Defaults < TOML file < NEXUS_* variables < CLI overrides, then validation. `read` reads
    the file when a plain read will not do (a reload reads it its own way)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(read(path) if read else path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("config", f"file {path} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("config", f"cannot read {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    settings = _build(Settings, raw, "")
    for section in (getattr(settings, f.name) for f in fields(settings)):
        for f in fields(section) if is_dataclass(section) else ():
            var = f.metadata.get("env")
            if var in env:
                value = _parse_env_value(var, env[var], getattr(section, f.name))
                setattr(section, f.name, value)
                check_setting(var, value, f.metadata)
    for (section, name), value in overrides.items():
        setattr(getattr(settings, section), name, value)
    validate_settings(settings, env)
    return settings


# ==============================================================================================
# App keys
# Owns: the names of what the app, each request and each response carry (aiohttp's typed keys).
# Must not: hold values. A key's type is its annotation, so a key may name a class defined below.
# ==============================================================================================

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
REGISTRY: web.AppKey[Registry] = web.AppKey("registry")
STATS: web.AppKey[Stats] = web.AppKey("stats")
CLIENT: web.AppKey[BackendPool] = web.AppKey("client")
QUEUE: web.AppKey[WaitQueue] = web.AppKey("queue")
BACKGROUND: web.AppKey[dict] = web.AppKey("background")  # tasks, health_loop, next_health_check
BUDGET: web.AppKey[Budget] = web.AppKey("budget")  # the month's cloud spend
STOPPING: web.AppKey[asyncio.Event] = web.AppKey("stopping")  # set at shutdown: live feeds end
SESSIONS: web.AppKey[SessionTable] = web.AppKey("sessions")  # each session's last backend
KEYS: web.AppKey[list] = web.AppKey("keys")  # an ApiKey per [auth] key; empty: no auth
LEDGER: web.AppKey[Ledger] = web.AppKey("ledger")  # the month's usage (nexus.db with a limit)
LIFECYCLE: web.AppKey[Lifecycle] = web.AppKey("lifecycle")  # load/unload/migrate (SPEC §5.1)

REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")
RECORD: web.RequestKey[RequestRecord] = web.RequestKey("record")
API_KEY: web.RequestKey[ApiKey] = web.RequestKey("api_key")  # the caller's, once authenticated
TOKENS_CHARGED: web.RequestKey[int] = web.RequestKey("tokens_charged")  # tpm taken up front
STREAMING: web.RequestKey[web.StreamResponse] = web.RequestKey("streaming")  # prepared stream
# A backend's 4xx refusal of the request, for a door that writes errors in its own API's shape.
REFUSAL: web.ResponseKey[NexusError] = web.ResponseKey("refusal")


# ==============================================================================================
# Request shapes
# Owns: what a request is while Nexus serves it: its record (for stats and its log line, never
# any content), the attempt in flight, and a failed attempt. Used from Auth down.
# Must not: act; the sections below do.
# ==============================================================================================


@dataclass(eq=False)
class AttemptFailed(Exception):
    """An attempt failed before any byte reached the client; another attempt may serve."""

    error: NexusError
    skip_model: bool = False  # a context-length refusal: go on to the fallback models
    silent: bool = False  # it timed out: not asked again for this request
    retry_after: float | None = None  # a 429 said when to come back


@dataclass(slots=True)
class RequestRecord:
    """What Nexus remembers of one request for stats and its log line. Never any content."""

    id: str
    model: str
    endpoint: str
    started: float
    backend: str | None = None
    status: int = 0
    route_reason: str | None = None
    retries: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    fallback: bool = False  # a fallback model is being tried (it served, if the status is good)
    usage: TokenUsage | None = None  # as the backend reported it (or Nexus counted it)
    cost_usd: float | None = None  # what the answer cost (cloud backends), charged to the budget
    key: str | None = None  # the name of the caller's API key, when keys are configured
    sent: float = 0.0  # when the attempt on `backend` was sent: its latency starts there
    session: int | None = None  # the session key's hash (SPEC §3.7), never its text
    followed: str | None = None  # the backend of the session's last turn, when routing kept it


@dataclass(slots=True)
class InFlight:
    """A request on its way on one attempt: what it sends where, and how its answer goes back."""

    request: web.Request
    record: RequestRecord
    attempt: Attempt
    body: dict[str, Any]  # the request as the internal chat request: the prompt Nexus counts
    url: str
    payload: bytes  # what the backend is sent
    native: bool  # the backend speaks the door's own API: its answer goes back as it is
    stream: bool
    strip_usage: bool  # the usage chunk was Nexus's question, not the client's: not relayed
    reason: str  # why routing chose this attempt (X-Nexus-Route-Reason)
    deadline: float  # the loop time by which the request must be done
    fmt: OpenAIFormat  # the front door the client came through


# ==============================================================================================
# World model
# Owns: what Nexus knows about backends and models. One Backend per server, one Model per
# model a backend serves, the Registry that indexes them by model id, and the TokenBucket that
# paces a backend's requests (and, in Auth, a key's).
# Must not: do I/O. Health and discovery change it; routing reads it.
# ==============================================================================================


class TokenBucket:
    """`per_minute` units a minute, refilled continuously, holding at most a minute's worth.
    A larger amount waits for a full bucket and runs it into debt: served, not refused forever."""

    __slots__ = ("level", "per_minute", "updated")

    def __init__(self, per_minute: float, now: float) -> None:
        self.per_minute = float(per_minute)
        self.level = self.per_minute
        self.updated = now

    def refill(self, now: float) -> None:
        elapsed = max(now - self.updated, 0.0)
        self.level = min(self.per_minute, self.level + elapsed * self.per_minute / 60.0)
        self.updated = max(now, self.updated)

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken; 0 when it can be taken now."""
        self.refill(now)
        missing = min(amount, self.per_minute) - self.level
        return missing * 60.0 / self.per_minute if missing > 1e-9 else 0.0

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def adjust(self, extra: float, now: float) -> None:
        """Charge `extra` more (or give back, when negative): real usage replacing an estimate."""
        self.refill(now)
        self.level = min(self.per_minute, self.level - extra)


@dataclass(slots=True)
class Model:
    """A model as one backend serves it. A capability of None means the backend did not say."""

    id: str
    context_length: int | None = None
    vision: bool | None = None
    tools: bool | None = None
    json_mode: bool | None = None
    size: int | None = None  # bytes, where the backend says (Ollama's /api/tags): what a load takes


# A Backend's attributes that come from its [[backends]] entry (its rpm becomes its rpm_bucket);
# everything else on it (health, load, latency) is what Nexus learns, and a reload keeps it.
BACKEND_SETTINGS = tuple(f.name for f in fields(BackendSettings) if f.name != "rpm")


@dataclass(slots=True, eq=False)
class Backend:
    """One inference server: its settings, its health, its load and its observed speed."""

    name: str
    url: str
    type: str
    priority: int = 50
    zone: str = "restricted"
    tier: int = 0
    max_concurrent: int = 0
    api_key_env: str = ""
    source: str = "static"  # static | discovered | admin
    status: str = "unknown"  # unknown | healthy | unhealthy
    fail_streak: int = 0
    ok_streak: int = 0
    models: dict[str, Model] = field(default_factory=dict)
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    latency_ema_ms: float | None = None
    ttft_ema_ms: float | None = None
    last_error: str = ""
    lost_at: float | None = None
    rpm_bucket: TokenBucket | None = None  # [[backends]] rpm: how fast it may be sent requests
    vram_gb: float = 0.0
    # Models in memory now and the bytes each holds (Ollama's /api/ps), read with each health
    # poll; None: the backend does not say (vLLM, llama.cpp, ...), so whatever it serves is warm.
    loaded: dict[str, int] | None = None
    # Counts the lifecycle's own reads of `loaded`: a poll whose /api/ps went out before one of
    # them holds an older state and leaves `loaded` as the lifecycle read it.
    loaded_reads: int = 0
    loading: frozenset[str] = frozenset()  # being loaded by the lifecycle: not yet a candidate
    draining: frozenset[str] = frozenset()  # migrating away: a candidate only after every other
    model_in_flight: dict[str, int] = field(default_factory=dict)  # requests on it, per model

    @property
    def is_cloud(self) -> bool:
        """Whether the backend is a cloud API (its spend counts against budgets)."""
        return self.type in CLOUD_TYPES

    def at_capacity(self) -> bool:
        return 0 < self.max_concurrent <= self.in_flight

    def is_warm(self, model_id: str) -> bool:
        """Whether the model is in memory here, as far as the backend says (SPEC §3 step 8)."""
        return self.loaded is None or model_id in self.loaded

    @classmethod
    def from_settings(cls, b: BackendSettings, source: str = "static") -> Backend:
        """A Backend for one [[backends]] entry (or one the admin API adds)."""
        kept = {name: getattr(b, name) for name in BACKEND_SETTINGS}
        bucket = TokenBucket(b.rpm, time.monotonic()) if b.rpm else None
        return cls(**kept, source=source, rpm_bucket=bucket)

    def public(self) -> dict[str, Any]:
        """The admin/CLI view of a backend. Never includes a key, only the variable's name."""
        view = {name: getattr(self, name) for name in ("name", "url", "type", "status", "zone")}
        view.update(tier=self.tier or None, priority=self.priority, source=self.source)
        failure = self.last_error if self.status != "healthy" else ""  # refused, HTTP 401...
        view.update(models=sorted(self.models), last_error=failure or None)
        return view


@dataclass(slots=True, eq=False, repr=False)
class Registry:
    """All known backends, and for each model id the backends that serve it."""

    backends: dict[str, Backend] = field(default_factory=dict)
    by_model: dict[str, list[Backend]] = field(default_factory=dict)
    # (backend, model) pairs a lifecycle operation is loading or draining now: while there are
    # none, routing does not look at Backend.loading and .draining at all.
    moving: int = 0

    def add(self, backend: Backend) -> None:
        self.backends[backend.name] = backend
        self.reindex()

    def remove(self, name: str) -> Backend | None:
        backend = self.backends.pop(name, None)
        if backend is not None:
            self.reindex()
        return backend

    def find_url(self, url: str) -> Backend | None:
        return next((b for b in self.backends.values() if b.url == url), None)

    def set_models(self, backend: Backend, models: dict[str, Model]) -> None:
        if models != backend.models:
            backend.models = models
            self.reindex()

    def reindex(self) -> None:
        index: dict[str, list[Backend]] = {}
        for backend in self.backends.values():
            for model_id in backend.models:
                index.setdefault(model_id, []).append(backend)
        self.by_model = index

    def healthy(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.status == "healthy"]


def loaded_on(registry: Registry, model_id: str) -> list[str]:
    """Names of the healthy local backends that have the model in memory, or that serve it and
    do not say what they hold (they keep what they serve loaded): `/v1/models`' `loaded_on`."""
    return sorted(
        b.name
        for b in registry.by_model.get(model_id, ())
        if b.status == "healthy" and not b.is_cloud and b.is_warm(model_id)
    )


# ==============================================================================================
# Requests
# Owns: reading a client payload into what routing needs (model, capabilities, size).
# Must not: touch the network or the registry.
# ==============================================================================================

# A prompt's size in tokens is estimated from its characters; exact counting is for cost and
# for prompts near a context limit, never on the routing hot path.
CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 1600  # what an image of unknown size is counted as (about a megapixel)
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators of one message in a chat template
SYSTEM_ROLES = ("system", "developer")  # the roles that carry a system prompt
JSON_DECODER = json.JSONDecoder()
# Where clients name their session, first found first after the body's prompt_cache_key (SPEC
# §3.7); Codex writes session_id. Claude Code also names it in Anthropic's metadata.user_id,
# which the Messages door carries as the chat request's `user`.
SESSION_HEADERS = ("X-Nexus-Session", "session-id", "session_id", "X-Claude-Code-Session-Id")


@dataclass(slots=True)
class RequestNeeds:
    """What a request requires of a backend, read from its payload alone."""

    model: str
    vision: bool = False
    tools: bool = False
    json_mode: bool = False
    prompt_tokens: int = 0
    max_tokens: int | None = None
    high_priority: bool = False
    flexible: bool = False  # X-Nexus-Flexible: a lower tier only when none meets min_tier
    budget_status: str = "normal"  # the month's budget as the request came in
    prompt_param: str = "messages"  # the field holding the prompt, named by a too-long error
    last_backend: str | None = None  # where its session's last turn was served (SPEC §3.7)


def parse_json(data: bytes) -> Any:
    """json.loads(data) for the hot path (bodies, answers, stream chunks): UTF-8 without
    surrounding whitespace skips the encoding sniffing and whitespace matching it does first."""
    try:
        text = data.decode()
        value, end = JSON_DECODER.raw_decode(text)
        if end == len(text):  # raw_decode stops after the first value
            return value
    except ValueError:
        pass
    return json.loads(data)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or the 400 a client expects."""
    try:
        body = parse_json(raw)
    except ValueError:  # UnicodeDecodeError is one
        raise bad_request("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def require_model(body: dict[str, Any]) -> str:
    """The body's model, a non-empty string, or a 400 naming the field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter (a string)", "model")
    return model


def optional_int(body: dict[str, Any], name: str) -> int | None:
    """The body's non-negative integer field, None when absent, or a 400 naming it."""
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise bad_request(f"{name} must be a non-negative integer", name)
    return value


def chat_needs(body: dict[str, Any], image_tokens: int = 0) -> RequestNeeds:
    """What a chat completion needs of a backend: checks its shape, estimates its prompt from
    the characters of every text, tool call and tool definition, and `image_tokens` per image
    (the doors count IMAGE_TOKENS; OpenAI's chat routes by text alone)."""
    model = require_model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array", "messages")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise bad_request("stream must be a boolean", "stream")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_request("tools must be an array", "tools")
    chars = len(json.dumps(tools)) if tools else 0
    images = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{i}] must be an object", f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    chars += len(part["text"])
                elif kind in ("image_url", "image", "input_image"):
                    images += 1
        elif content is not None:
            raise bad_request(f"messages[{i}].content must be a string or an array", "messages")
        calls = message.get("tool_calls")
        if calls is not None and (
            not isinstance(calls, list)
            or not all(isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls)
        ):
            problem = "tool_calls must be an array of objects, each with a function object"
            raise bad_request(problem, f"messages[{i}].tool_calls")
        for call in calls or ():
            for part in (call["function"].get("name"), call["function"].get("arguments")):
                if isinstance(part, str):
                    chars += len(part)
    max_tokens = optional_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens")
    format_ = body.get("response_format")
    json_mode = isinstance(format_, dict) and format_.get("type") in ("json_object", "json_schema")
    framing = MESSAGE_OVERHEAD_TOKENS * len(messages)
    return RequestNeeds(
        model=model,
        vision=images > 0,
        tools=bool(tools),
        json_mode=json_mode,
        prompt_tokens=chars // CHARS_PER_TOKEN + image_tokens * images + framing,
        max_tokens=max_tokens,
    )


def completion_needs(body: dict[str, Any]) -> RequestNeeds:
    """What a legacy completion needs of a backend: checks its prompt, estimates its size."""
    model = require_model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars = len(prompt)
    elif isinstance(prompt, list):
        chars = sum(len(p) for p in prompt if isinstance(p, str))
    else:
        raise bad_request("prompt must be a string or an array of strings", "prompt")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise bad_request("stream must be a boolean", "stream")
    suffix = body.get("suffix")
    chars += len(suffix) if isinstance(suffix, str) else 0
    max_tokens = optional_int(body, "max_tokens")
    return RequestNeeds(
        model, prompt_tokens=chars // CHARS_PER_TOKEN, max_tokens=max_tokens, prompt_param="prompt"
    )


def embedding_needs(body: dict[str, Any]) -> RequestNeeds:
    """What an embeddings request needs of a backend: checks its input, estimates its size."""
    model = require_model(body)
    data = body.get("input")
    if isinstance(data, str):
        chars = len(data)
    elif isinstance(data, list) and data:
        chars = sum(len(x) for x in data if isinstance(x, str))
    else:
        raise bad_request("input must be a string or a non-empty array", "input")
    return RequestNeeds(model=model, prompt_tokens=chars // CHARS_PER_TOKEN, prompt_param="input")


def part_texts(parts: list[Any]) -> list[str]:
    """The texts of a message's content parts (an image is known by the text around it)."""
    return [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)]


def claude_session(user_id: Any) -> str | None:
    """The session_id in Claude Code's metadata.user_id (JSON, or the older form's tail), if any."""
    if not isinstance(user_id, str):
        return None
    if user_id.startswith("{"):
        try:
            found = json.loads(user_id)
        except ValueError:
            return None
        session = found.get("session_id") if isinstance(found, dict) else None
        return session if isinstance(session, str) and session else None
    _, mark, session = user_id.rpartition("_session_")  # user_<hash>_account_<uuid>_session_<uuid>
    return session if mark and session else None


def session_key(headers: Mapping[str, str], body: dict[str, Any]) -> tuple[int, bool] | None:
    """A request's session as a hash per model (no text is kept), and whether it may follow the
    session's last backend: the first key of SPEC §3.7, else the conversation's opening (system
    prompt and first user turn), followed only from the second turn on so that one prompt sent
    by many clients still spreads. None for no session and no conversation (an embedding)."""
    model = body.get("model")
    model = model if isinstance(model, str) else ""
    named = body.get("prompt_cache_key")
    if not isinstance(named, str) or not named:
        found = (headers.get(name) for name in SESSION_HEADERS)
        named = next(filter(None, found), None) or claude_session(body.get("user"))
    if named is not None:
        return hash(("session", model, named)), True
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    opening: list[Any] = ["opening", model]
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role in SYSTEM_ROLES or role == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = tuple(part_texts(content))
            opening.append(content if isinstance(content, str | tuple) else None)
            if role == "user":
                return hash(tuple(opening)), i + 1 < len(messages)
    return None


# ==============================================================================================
# Tokens
# Owns: exact OpenAI encodings built from the BPE files in assets/, checked against the SHA-256
# tiktoken publishes for them; an encoding (tens of MB) loads on first use, once per process.
# Must not: download anything or use tiktoken's cache; nor count on the routing hot path.
# ==============================================================================================

APPROXIMATE_ENCODING = "cl100k_base"  # for models whose tokenizer Nexus does not have
# Chat prompts are counted as OpenAI bills them: each message costs its role and content plus
# a few tokens of framing, and every reply is primed with a few more.
CHAT_MESSAGE_TOKENS = 3
CHAT_REPLY_TOKENS = 3
# Texts longer than this (or any text while its encoding is not loaded yet) are counted in a
# worker thread: exact counting must never hold up the event loop.
EXACT_INLINE_CHARS = 20_000
# An estimate within this range of a context length may be wrong about fitting: characters
# over four undercounts CJK text and emoji up to several times, overcounts plain English.
NEAR_LIMIT_RANGE = (0.25, 2.0)
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"""
    r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"""
    r"""[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True, slots=True)
class EncodingSpec:
    """What defines one tiktoken encoding besides its merge ranks."""

    sha256: str  # of assets/<name>.tiktoken, as published by tiktoken
    pattern: str
    special_tokens: dict[str, int]


ENCODINGS: dict[str, EncodingSpec] = {
    "o200k_base": EncodingSpec(
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pattern=_O200K_PATTERN,
        special_tokens={"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    ),
    "cl100k_base": EncodingSpec(
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pattern=_CL100K_PATTERN,
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
}

_loaded_encodings: dict[str, tiktoken.Encoding] = {}
_encoding_lock = threading.Lock()  # counting may run in worker threads


def read_bpe_ranks(path: Path, sha256: str) -> dict[bytes, int]:
    """Parse a .tiktoken file (base64 token, space, rank per line) after checking its hash."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path.name}: SHA-256 mismatch, the embedded file is damaged")
    # The hash pins the content: splitting on whitespace is safe, and faster than line by line.
    fields = data.split()
    return dict(zip(map(binascii.a2b_base64, fields[0::2]), map(int, fields[1::2]), strict=True))


def load_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding ("o200k_base" or "cl100k_base"), built once from the embedded file."""
    if name in _loaded_encodings:
        return _loaded_encodings[name]
    if name not in ENCODINGS:
        raise KeyError(f"unknown encoding {name!r}; known: {', '.join(ENCODINGS)}")
    spec = ENCODINGS[name]
    with _encoding_lock:
        if name not in _loaded_encodings:
            encoding = tiktoken.Encoding(
                name,
                pat_str=spec.pattern,
                mergeable_ranks=read_bpe_ranks(asset_path(f"{name}.tiktoken"), spec.sha256),
                special_tokens=spec.special_tokens,
            )
            # tiktoken keeps the ranks only to pickle the encoding; its Rust core has its own copy.
            encoding._mergeable_ranks = {}
            _loaded_encodings[name] = encoding
    return _loaded_encodings[name]


def encoding_for_model(model: str) -> tuple[str, bool]:
    """(encoding name, exact) for a model id by tiktoken's table, any provider prefix ignored."""
    try:
        name = tiktoken.encoding_name_for_model(model.rsplit("/", 1)[-1])
    except KeyError:
        return APPROXIMATE_ENCODING, False
    if name == "o200k_harmony":  # gpt-oss's: o200k_base but for special tokens
        name = "o200k_base"
    return (name, True) if name in ENCODINGS else (APPROXIMATE_ENCODING, False)


def count_tokens(text: str, model: str) -> tuple[int, bool]:
    """Token count of plain text for a model, and whether the count is exact."""
    name, exact = encoding_for_model(model)
    return len(load_encoding(name).encode_ordinary(text)), exact


def tokenizer_for(backend_type: str, model: str) -> tuple[str, bool]:
    """(encoding, exact) for a model on a type of backend: exact only on OpenAI's own API (a
    local server's model names say nothing certain of its tokenizer)."""
    return encoding_for_model(model) if backend_type == "openai" else (APPROXIMATE_ENCODING, False)


def tool_call_texts(calls: Any) -> list[str]:
    """The name and arguments of each tool call, one text per call."""
    texts = []
    for call in calls or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            texts.append(f"{function.get('name') or ''}{function.get('arguments') or ''}")
    return texts


def payload_texts(endpoint: str, payload: dict[str, Any]) -> tuple[list[str], int]:
    """The texts of a request that become prompt tokens, and the tokens of framing around them."""
    if endpoint != "chat":
        value = payload.get("prompt" if endpoint == "completions" else "input")
        items = value if isinstance(value, list) else [value]
        return [v for v in items if isinstance(v, str)], 0
    texts: list[str] = []
    messages = payload.get("messages") or []
    for message in messages:
        if not isinstance(message, dict):
            continue
        texts.append(str(message.get("role") or ""))
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(part_texts(content))
        texts.extend(tool_call_texts(message.get("tool_calls")))
    if payload.get("tools"):
        texts.append(json.dumps(payload["tools"]))
    return texts, CHAT_MESSAGE_TOKENS * len(messages) + CHAT_REPLY_TOKENS


def count_texts(texts: list[str], encoding: str) -> int:
    """The exact tokens of texts in an encoding (loaded on first use; blocking)."""
    encoder = load_encoding(encoding)
    return sum(len(encoder.encode_ordinary(text)) for text in texts)


async def count_texts_async(texts: list[str], encoding: str) -> int:
    """count_texts, in a worker thread when the texts are long or the encoding not loaded."""
    if encoding in _loaded_encodings and sum(map(len, texts)) <= EXACT_INLINE_CHARS:
        return count_texts(texts, encoding)
    return await asyncio.to_thread(count_texts, texts, encoding)


async def refine_prompt_tokens(
    endpoint: str, body: dict[str, Any], needs: RequestNeeds, registry: Registry, settings: Settings
) -> None:
    """Count the prompt exactly when its estimate is near the context length of a backend that
    could serve it with an exact tokenizer; else no encoding is loaded and the estimate stays."""
    low, high = NEAR_LIMIT_RANGE
    for model in model_chain(needs.model, settings.routing):
        for backend in registry.by_model.get(model, ()):
            context = backend.models[model].context_length
            if not context or not low * context <= needs.prompt_tokens <= high * context:
                continue
            encoding, exact = tokenizer_for(backend.type, model)
            if exact:
                texts, framing = payload_texts(endpoint, body)
                needs.prompt_tokens = await count_texts_async(texts, encoding) + framing
                return


def answer_texts(endpoint: str, answer: dict[str, Any]) -> list[str]:
    """The generated texts of a whole answer (or of one stream chunk), for counting."""
    texts: list[str] = []
    for choice in answer.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if endpoint == "completions":
            texts.append(str(choice.get("text") or ""))
            continue
        message = choice.get("message") or choice.get("delta") or {}
        if not isinstance(message, dict):
            continue
        for key in ("content", "reasoning_content"):
            if isinstance(message.get(key), str):
                texts.append(message[key])
        if message.get("tool_calls"):
            texts.extend(tool_call_texts(message["tool_calls"]))
    return texts


# ==============================================================================================
# Policy
# Owns: what cloud work costs (the embedded price table, overridable per model) and the month's
# spend against the budget. The spend is counted here; the Ledger below keeps it across
# restarts when a monthly limit is set.
# Must not: do I/O beyond reading the embedded price table once, or decide routes (routing
# reads the budget's status; the proxy charges it).
# ==============================================================================================

# What may follow a priced model id: a dated snapshot or "-latest" (gpt-4o-2024-08-06,
# gpt-4-0613, claude-sonnet-4-5-20250929). Anything else is another model, priced on its own.
SNAPSHOT_SUFFIX = re.compile(r"-(latest|\d{4}|\d{8}|\d{4}-\d{2}-\d{2})(-preview)?")


@dataclass(frozen=True, slots=True)
class Price:
    """What a model costs, in USD per million tokens: input, output, and prompt tokens read
    from or written to the provider's prompt cache (None: they cost the input price)."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None


@dataclass(slots=True)
class TokenUsage:
    """One answer's tokens as its backend reported (or Nexus counted) them, in any API's terms."""

    prompt: int = 0  # every prompt token, cached ones included
    completion: int = 0
    cached: int = 0  # of the prompt, read from the provider's prompt cache
    cache_write: int = 0  # of the prompt, written to it

    def as_chat(self) -> dict[str, Any]:
        """Chat's usage: cached tokens inside prompt_tokens, told apart in its details."""
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        }
        if self.cached or self.cache_write:
            details = {"cached_tokens": self.cached, "cache_creation_tokens": self.cache_write}
            out["prompt_tokens_details"] = details
        return out

    def as_anthropic(self) -> dict[str, int]:
        """Anthropic's usage: input_tokens without the cached ones, which are given apart."""
        return {
            "input_tokens": max(self.prompt - self.cached - self.cache_write, 0),
            "output_tokens": self.completion,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cached,
        }

    def as_responses(self, reasoning: int = 0) -> dict[str, Any]:
        """The Responses API's usage: input_tokens with the cached ones, told apart in details."""
        details = {"cached_tokens": self.cached, "cache_write_tokens": self.cache_write}
        return {
            "input_tokens": self.prompt,
            "input_tokens_details": details,
            "output_tokens": self.completion,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": self.prompt + self.completion,
        }


def token_count(value: Any) -> int | None:
    """A usage field's value when it is a count (a non-negative int), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def token_counts(fields: Any, *names: str) -> list[int]:
    """The counts of a usage object's named fields, 0 for each absent or not a count."""
    fields = fields if isinstance(fields, dict) else {}
    return [token_count(fields.get(name)) or 0 for name in names]


def usage_from(usage: Any) -> TokenUsage | None:
    """Any API's usage (chat, Responses, Anthropic, Ollama) as TokenUsage; None if it counts 0."""
    if not isinstance(usage, dict):
        return None
    if "prompt_eval_count" in usage or "eval_count" in usage:
        found = TokenUsage(*token_counts(usage, "prompt_eval_count", "eval_count"))
    elif "prompt_tokens" in usage or "completion_tokens" in usage:
        details = usage.get("prompt_tokens_details")
        found = TokenUsage(
            *token_counts(usage, "prompt_tokens", "completion_tokens"),
            *token_counts(details, "cached_tokens", "cache_creation_tokens"),
        )
    elif isinstance(details := usage.get("input_tokens_details"), dict):
        found = TokenUsage(
            *token_counts(usage, "input_tokens", "output_tokens"),
            *token_counts(details, "cached_tokens", "cache_write_tokens"),
        )
    else:  # Anthropic's: its input_tokens leave out the cached ones
        found = TokenUsage(
            *token_counts(usage, "input_tokens", "output_tokens"),
            *token_counts(usage, "cache_read_input_tokens", "cache_creation_input_tokens"),
        )
        found.prompt += found.cached + found.cache_write
    return found if found.prompt or found.completion else None


def answer_tokens(chars: int) -> int:
    """An answer's tokens estimated from its characters, rounded up: any text counts as one."""
    return -(-chars // CHARS_PER_TOKEN)


def usage_or_estimate(usage: Any, prompt: int, completion: int) -> TokenUsage:
    """The usage a backend reported, or the estimates when it reported none."""
    return usage_from(usage) or TokenUsage(prompt, completion)


@functools.cache
def load_price_table() -> dict[str, Price]:
    """The embedded price table (assets/prices.json), read once."""
    data = json.loads(asset_path("prices.json").read_text(encoding="utf-8"))
    return {model: Price(**entry) for model, entry in data["models"].items()}


def price_for(model: str, overrides: dict[str, Price]) -> Price | None:
    """The price of a model id: configured prices first, then the table; None if unpriced."""
    model = model.rsplit("/", 1)[-1]
    for table in (overrides, load_price_table()):
        if model in table:
            return table[model]
        extended = [
            known
            for known in table
            if model.startswith(known) and SNAPSHOT_SUFFIX.fullmatch(model[len(known) :])
        ]
        if extended:
            return table[max(extended, key=len)]
    return None


def cost_usd(price: Price, usage: TokenUsage) -> float:
    """What an answer cost at a price: fresh, cached and cache-written prompt tokens and output."""
    cached_price = price.input if price.cached_input is None else price.cached_input
    write_price = price.input if price.cache_write is None else price.cache_write
    fresh = max(usage.prompt - usage.cached - usage.cache_write, 0)
    paid = fresh * price.input + usage.cached * cached_price + usage.cache_write * write_price
    return (paid + usage.completion * price.output) / 1_000_000


def format_usd(usd: float) -> str:
    """A cost for the X-Nexus-Cost-Estimated header: plain decimal, no exponent."""
    return f"{usd:.8f}".rstrip("0").rstrip(".") or "0"


def month_of(now: dt.datetime) -> str:
    """The UTC calendar month of a moment as YYYY-MM: the budgets' and the ledger's key."""
    return f"{now.year:04d}-{now.month:02d}"


def next_month_start(now: dt.datetime) -> dt.datetime:
    """Midnight UTC on the 1st of the month after `now`'s: when monthly limits start again."""
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return dt.datetime(year, month, 1, tzinfo=dt.UTC)


def seconds_to_next_month(now: dt.datetime | None = None) -> int:
    """Whole seconds (at least 1) until monthly limits start again: a refusal's Retry-After."""
    now = now or dt.datetime.now(dt.UTC)
    return max(int((next_month_start(now) - now).total_seconds()), 1)


class Budget:
    """The current calendar month's cloud spend (UTC months) and where it stands against the
    configured limit: normal, soft_limit (cloud deprioritised) or hard_limit (the action)."""

    def __init__(self, settings: BudgetSettings | None) -> None:
        self.configure(settings)
        self.month = month_of(dt.datetime.now(dt.UTC))
        self._spent_usd = 0.0

    def configure(self, settings: BudgetSettings | None) -> None:
        """The limit and the prices (none: no limit); a reload sets new ones, the spend stays."""
        self.settings = settings or BudgetSettings()
        self.monthly_limit_usd = self.settings.monthly_limit_usd
        self.prices = {model: Price(**entry) for model, entry in self.settings.prices.items()}

    @property
    def enabled(self) -> bool:
        return self.monthly_limit_usd > 0

    @property
    def spent_usd(self) -> float:
        self.roll()
        return self._spent_usd

    def roll(self, now: dt.datetime | None = None) -> None:
        """Start the count again when a new month has begun."""
        month = month_of(now or dt.datetime.now(dt.UTC))
        if month != self.month:
            self.month, self._spent_usd = month, 0.0

    def start_from(self, spent_usd: float) -> None:
        """Begin the month from what the ledger holds for it (spent before this start)."""
        self.roll()
        self._spent_usd = spent_usd

    def charge(self, usd: float) -> None:
        """Add a cloud answer's cost, logging when the status changes."""
        self.roll()
        before = self.status
        self._spent_usd += usd
        if self.status != before:
            line = "budget %s: %.4f of %.2f USD spent this month (%s)"
            log.warning(line, self.status, self._spent_usd, self.monthly_limit_usd, self.month)

    @property
    def status(self) -> str:
        """normal, soft_limit or hard_limit, by this month's spend against the limit."""
        if not self.enabled:
            return "normal"
        spent = self.spent_usd
        if spent >= self.monthly_limit_usd:
            return "hard_limit"
        soft = self.monthly_limit_usd * self.settings.soft_limit_percent / 100
        return "soft_limit" if spent >= soft else "normal"

    def snapshot(self) -> dict[str, Any] | None:
        """The budget in /v1/stats; None when no limit is configured."""
        if not self.enabled:
            return None
        return {
            "monthly_limit_usd": self.monthly_limit_usd,
            "spent_usd": round(self.spent_usd, 6),
            "status": self.status,
            "soft_limit_percent": self.settings.soft_limit_percent,
            "hard_limit_action": self.settings.hard_limit_action,
            "month": self.month,
        }


def policy_for(model: str, routing: RoutingSettings) -> PolicySettings | None:
    """The first [[routing.policies]] entry whose model_pattern matches the model or an alias."""
    names = [model]
    while names[-1] in routing.aliases and len(names) <= MAX_ALIAS_HOPS:
        names.append(routing.aliases[names[-1]])
    for policy in routing.policies:
        if any(fnmatch.fnmatchcase(name, policy.model_pattern) for name in names):
            return policy
    return None


@dataclass(slots=True)
class RouteRules:
    """What policy and budget allow one request, resolved once per route. A request under an
    open policy is local-first when a restricted backend serves its model or a fallback (healthy
    or not): its attempts on open backends are overflow, removed ("block") or kept after every
    restricted one and scrubbed ("scrub"). A request no policy matches may use either zone."""

    restricted_only: bool = False  # privacy = "restricted"
    overflow: str | None = None  # block | scrub, for a local-first request
    min_tier: int = 0
    no_cloud: bool = False  # the hard budget limit keeps cloud backends out
    cloud_last: bool = False  # the soft budget limit: cloud only after every local backend
    lowered_tier: bool = False  # min_tier met nowhere, a flexible request takes the best left
    excluded: set[str] = field(default_factory=set)  # why backends were left out

    def refuses_any(self) -> bool:
        """Whether allows() can refuse any backend (most requests carry no policy)."""
        return (
            self.restricted_only or self.overflow == "block" or self.no_cloud or self.min_tier > 0
        )

    def allows(self, backend: Backend) -> bool:
        """Whether a backend may serve the request; a refusal records why in `excluded`."""
        if self.restricted_only and backend.zone != "restricted":
            reason = "privacy"
        elif self.overflow == "block" and backend.zone != "restricted":
            reason = "overflow"
        elif self.no_cloud and backend.is_cloud:
            reason = "budget"
        elif backend.tier < self.min_tier:  # an unset tier (0) meets no minimum
            reason = "tier"
        else:
            return True
        self.excluded.add(reason)
        return False


def monthly_limit_spent(code: str, message: str, limit: str) -> NexusError:
    """The 429 for a request a spent monthly limit refuses; Retry-After is when it starts again."""
    text = f"{message}; the {limit} starts again on the 1st of next month (UTC)."
    return NexusError.of(429, code, text, headers={"Retry-After": str(seconds_to_next_month())})


def budget_exceeded(needs: RequestNeeds, action: str, why: str) -> NexusError:
    """The hard budget limit's clear refusal."""
    message = (
        f"The monthly cloud budget is spent and routing.budget.hard_limit_action is "
        f"{action!r}: {why}. Model '{needs.model}' was not sent anywhere"
    )
    return monthly_limit_spent("budget_exceeded", message, "budget")


def route_rules(
    needs: RequestNeeds, chain: list[str], registry: Registry, settings: Settings
) -> RouteRules:
    """What the matching policy and the budget allow a request (raises when the budget says no)."""
    policy = policy_for(needs.model, settings.routing)
    rules = RouteRules(cloud_last=needs.budget_status == "soft_limit")
    if policy is not None:
        rules.restricted_only = policy.privacy == "restricted"
        rules.min_tier = policy.min_tier
        local_first = any(
            b.zone == "restricted" for m in chain for b in registry.by_model.get(m, ())
        )
        if not rules.restricted_only and local_first:
            rules.overflow = policy.overflow
    budget = settings.routing.budget
    if budget is not None and needs.budget_status == "hard_limit":
        if budget.hard_limit_action == "block_all":
            raise budget_exceeded(needs, "block_all", "every request is refused")
        rules.no_cloud = budget.hard_limit_action in ("shift_local", "block_cloud")
    return rules


# ==============================================================================================
# Ledger
# Owns: the month's usage (cloud spend, requests, tokens) in total and per key, counted in
# memory on the event loop; and, only when a monthly limit is set, nexus.db in the data
# directory: read once at start, written by one worker thread at most once a second.
# Must not: touch the disk on the event loop, keep any prompt, answer or key (key names only),
# or stop Nexus serving: a ledger it cannot use is warned about, and counting goes on in memory.
# ==============================================================================================

LEDGER_FILE = "nexus.db"
LEDGER_FLUSH_SECONDS = 1.0  # a crash loses at most this much of the month's counts
LEDGER_BUSY_SECONDS = 0.5  # how long the worker waits for a lock; never the event loop
LEDGER_CLOSE_SECONDS = 5.0  # at shutdown, for each of the last write and the close
TOTAL_ROW = ""  # the row of everyone's usage (a key's name is never empty)
SQLITE_MAGIC = b"SQLite format 3\x00"
MONTH_PATTERN = re.compile(r"\d{4}-(0[1-9]|1[0-2])")
LEDGER_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS usage (month TEXT NOT NULL, key TEXT NOT NULL, "
    "spent_usd REAL NOT NULL, requests INTEGER NOT NULL, tokens INTEGER NOT NULL, "
    "PRIMARY KEY (month, key))"
)
LEDGER_UPSERT = (
    "INSERT OR REPLACE INTO usage (month, key, spent_usd, requests, tokens) VALUES (?, ?, ?, ?, ?)"
)

UsageRow = list[float]  # [spent_usd, requests, tokens] of one key (or the total) in one month
SavedRow = tuple[str, str, float, int, int]  # (month, key, spent_usd, requests, tokens)


def data_directory(configured: str, env: dict[str, str], platform: str = sys.platform) -> Path:
    """Where nexus.db lives: the configured data_dir, else the platform's user data directory."""
    if configured:
        return Path(configured).expanduser()
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    if platform == "win32":
        return Path(env.get("LOCALAPPDATA") or home / "AppData" / "Local") / "nexus"
    if platform == "darwin":
        return home / "Library" / "Application Support" / "nexus"
    return Path(env.get("XDG_DATA_HOME") or home / ".local" / "share") / "nexus"


def ledger_wanted(settings: Settings) -> bool:
    """Whether a monthly limit is configured: only then does Nexus write anything to disk."""
    budget, keys = settings.routing.budget or BudgetSettings(), settings.auth.api_keys
    return budget.monthly_limit_usd > 0 or any(key.monthly_limit_usd > 0 for key in keys)


def month_at(now: float) -> tuple[str, float]:
    """The UTC month a time.time() falls in, and the time.time() at which the next begins."""
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    return month_of(moment), next_month_start(moment).timestamp()


class LedgerError(Exception):
    """nexus.db cannot be used: missing directory, unwritable, locked, not a database."""


class LedgerCorrupt(LedgerError):
    """nexus.db no longer holds a SQLite database (something wrote over it)."""


def ledger_problem(exc: BaseException) -> str:
    """An OSError or sqlite3 error in words, with what to do about a lock."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if "locked" in text:
        text += ": another Nexus process is using it"
    return text


class LedgerFile:
    """nexus.db as the ledger's one worker thread uses it (never the event loop): opened with
    SQLite's exclusive lock, so a second Nexus given the same directory is refused at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: Any = None  # a sqlite3.Connection while the file is open
        self.identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        # Every row known, so that a file deleted meanwhile is written whole again, and
        # which of them the file does not hold yet (a write failed, or it was never written).
        self.known: dict[tuple[str, str], SavedRow] = {}
        self.unsaved: set[tuple[str, str]] = set()

    def open(self) -> None:
        """Open nexus.db with SQLite's exclusive lock and write-ahead log, making it if needed."""
        import sqlite3  # only a Nexus with a monthly limit pays for loading SQLite

        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise LedgerError(f"{self.path.parent} is not a directory")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=LEDGER_BUSY_SECONDS,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                # One process owns the file for as long as it runs, and the write-ahead log's
                # index lives in its memory (no shared-memory file to map).
                conn.execute("PRAGMA locking_mode = EXCLUSIVE")
                if str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower() != "wal":
                    raise sqlite3.OperationalError("cannot use write-ahead logging")
                conn.execute("BEGIN IMMEDIATE")  # the lock is taken now, not at the first charge
                conn.execute(LEDGER_SCHEMA)
                conn.execute("COMMIT")
            except BaseException:
                conn.close()
                raise
            stat = os.stat(self.path)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(ledger_problem(exc)) from exc
        self.conn, self.identity = conn, (stat.st_dev, stat.st_ino)

    def read(self, month: str) -> dict[str, UsageRow]:
        """The month's rows by key name (TOTAL_ROW: everyone's)."""
        import sqlite3

        if self.conn is None:
            self.open()
        query = "SELECT key, spent_usd, requests, tokens FROM usage WHERE month = ?"
        try:
            found = self.conn.execute(query, (month,)).fetchall()
        except sqlite3.Error as exc:
            raise LedgerError(ledger_problem(exc)) from exc
        for row in found:
            self.known.setdefault((month, row[0]), (month, *row))
        return {key: [float(usd), int(n), int(tokens)] for key, usd, n, tokens in found}

    def replaced(self) -> bool:
        """Whether nexus.db was deleted or replaced since opened; LedgerCorrupt if overwritten."""
        try:
            stat = os.stat(self.path)
            with open(self.path, "rb") as file:
                head = file.read(len(SQLITE_MAGIC))
        except OSError:
            return True
        if (stat.st_dev, stat.st_ino) != self.identity:
            return True
        if head != SQLITE_MAGIC:
            raise LedgerCorrupt("it is no longer a SQLite database")
        return False

    def write(self, rows: list[SavedRow]) -> bool:
        """Write the rows that changed and any a failed write left behind (each a month's total
        so far: writing it again does no harm); True when a file deleted or replaced was remade."""
        import sqlite3

        for row in rows:
            self.known[row[:2]] = row
            self.unsaved.add(row[:2])
        made_again = self.conn is not None and self.replaced()
        if made_again:
            self.close()
            self.unsaved.update(self.known)
        if self.conn is None:
            self.open()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(LEDGER_UPSERT, [self.known[k] for k in self.unsaved])
            self.conn.execute("COMMIT")
            self.unsaved.clear()
        except sqlite3.Error as exc:
            self.close()  # a failed write leaves the connection unsure: open it afresh
            raise LedgerError(ledger_problem(exc)) from exc
        return made_again

    def close(self) -> None:
        """Close the file; on a clean close SQLite folds its write-ahead log into nexus.db."""
        import sqlite3

        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


class Ledger:
    """The month's usage in total and per key: counted in memory, kept in nexus.db with a limit."""

    def __init__(self, path: Path | None) -> None:
        self.path = path  # None: no monthly limit, nothing is written
        self.file: LedgerFile | None = None  # set while nexus.db is in use
        self.rows: dict[str, dict[str, UsageRow]] = {}  # month -> key name -> row
        self.month, self.month_ends = month_at(time.time())
        self.current = self.rows.setdefault(self.month, {})
        self.changed: dict[tuple[str, str], UsageRow] = {}  # rows counted since the last write
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.flush_handle: asyncio.TimerHandle | None = None
        self.writing: asyncio.Future | None = None
        self.problem: str | None = None  # the last problem warned about, not repeated

    @property
    def persistent(self) -> bool:
        """Whether counts are kept in nexus.db (else in memory only)."""
        return self.file is not None

    async def open(self) -> None:
        """Read this month from nexus.db; when it cannot be used, warn and count in memory."""
        if self.path is None:
            return
        self.executor = concurrent.futures.ThreadPoolExecutor(1, "nexus-ledger")
        file = LedgerFile(self.path)
        try:
            saved = await self.in_worker(file.read, self.month)
        except LedgerError as exc:
            unusable = "ledger %s cannot be used (%s): this month's spend is counted in memory only"
            log.warning(unusable + ", and a restart forgets it", self.path, exc)
            return
        self.file = file
        self.current.update(saved)
        usd, requests, _ = saved.get(TOTAL_ROW, [0.0, 0, 0])
        so_far = "ledger %s: %.4f USD spent and %d requests so far in %s"
        log.info(so_far, self.path, usd, requests, self.month)

    async def in_worker(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, call, *args)

    def spent(self, key: str) -> float:
        """This month's spend of a key (TOTAL_ROW: everyone's), for the budgets to start from."""
        return self.current.get(key, [0.0])[0]

    def add(self, key: str, usd: float, requests: int, tokens: int) -> None:
        """Count usage for a key (or TOTAL_ROW) this month; the file follows within a second."""
        now = time.time()
        if now >= self.month_ends:
            self.month, self.month_ends = month_at(now)
            self.current = self.rows.setdefault(self.month, {})
        row = self.current.get(key)
        if row is None:
            row = self.current[key] = [0.0, 0, 0]
        row[0] += usd
        row[1] += requests
        row[2] += tokens
        if self.file is not None:
            self.changed[self.month, key] = row
            if self.flush_handle is None:
                self.flush_later()

    def count(self, record: RequestRecord) -> None:
        """One request answered: its tokens in the total, and its cost too under its key."""
        tokens = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
        self.add(TOTAL_ROW, 0.0, 1, tokens)
        if record.key is not None:
            self.add(record.key, record.cost_usd or 0.0, 1, tokens)

    def take_changed(self) -> list[SavedRow]:
        """The rows counted since the last write, as they stand now (copies for the worker)."""
        rows = [(m, k, row[0], int(row[1]), int(row[2])) for (m, k), row in self.changed.items()]
        self.changed.clear()
        return rows

    def flush_later(self) -> None:
        self.flush_handle = asyncio.get_running_loop().call_later(LEDGER_FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Hand every row to the worker thread (one write at a time)."""
        self.flush_handle = None
        if self.file is None:
            return
        if self.writing is not None and not self.writing.done():
            self.flush_later()
            return
        loop = asyncio.get_running_loop()
        self.writing = loop.run_in_executor(self.executor, self.file.write, self.take_changed())
        self.writing.add_done_callback(self.written)

    def written(self, future: asyncio.Future) -> None:
        """After a write: say once what went wrong (or that it is right again), and retry."""
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            if future.result():
                log.warning("ledger %s was deleted or replaced: written anew", self.path)
            elif self.problem is not None:
                log.info("ledger %s is written again", self.path)
            self.problem = None
            return
        problem = str(exc)
        corrupt = isinstance(exc, LedgerCorrupt)
        if problem != self.problem:
            unwritable = "ledger %s cannot be written (%s): counting in memory%s"
            retrying = "" if corrupt else ", retrying every second"
            log.warning(unwritable, self.path, problem, retrying)
        self.problem = problem
        if corrupt:
            self.file = None  # another program's file now: leave it alone
        elif self.flush_handle is None:
            self.flush_later()

    async def month_rows(self, month: str) -> dict[str, UsageRow]:
        """A month's rows: as counted here (any month this process has seen), else from the file."""
        if month in self.rows:
            return {key: list(row) for key, row in self.rows[month].items()}
        if self.file is None:
            return {}
        try:
            return await self.in_worker(self.file.read, month)
        except LedgerError as exc:
            log.warning("ledger %s cannot be read (%s)", self.path, exc)
            return {}

    async def close(self) -> None:
        """Write what is left and close the file (SIGTERM loses nothing), in seconds at most."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        file, self.file = self.file, None
        if file is not None:
            try:
                if self.writing is not None:  # its outcome was handled by written()
                    _, pending = await asyncio.wait([self.writing], timeout=LEDGER_CLOSE_SECONDS)
                    if pending:
                        raise TimeoutError
                rows = self.take_changed()
                await asyncio.wait_for(self.in_worker(file.write, rows), LEDGER_CLOSE_SECONDS)
                await asyncio.wait_for(self.in_worker(file.close), LEDGER_CLOSE_SECONDS)
            except (LedgerError, TimeoutError) as exc:
                problem = str(exc) or "the disk did not answer"
                log.warning("ledger %s: the last counts were not written (%s)", self.path, problem)
        if self.executor is not None:
            self.executor.shutdown(wait=False)


# ==============================================================================================
# Routing
# Owns: the decision, which backends to try for a request and in what order. Pure functions
# over the registry and settings: no awaits, no I/O, easy to property-test.
# Must not: know any backend type's quirks.
# ==============================================================================================

ROUND_ROBIN = itertools.count()
# The reasons session affinity may replace: a failover or a privacy rule says more.
AFFINITY_REASONS = ("capability-match", "capacity-overflow")
SESSIONS_MAX = 10_000  # sessions remembered; beyond that the least recently served go first
SESSION_IDLE_SECONDS = 3600.0  # a session not served for an hour is forgotten
LATENCY_SCALE_MS = 10_000.0  # observed latency counts in full from 10 s up
CAPABILITIES = ("vision", "tools", "json_mode")  # what a request may need and a model lack
# What a 503 calls each failed need, how many backends its message names (the rest are
# counted) and how many its error.context lists.
NEED_WORDS = {"vision": "vision", "tools": "tools", "json_mode": "JSON mode", "context": "context"}
MAX_NAMED_BACKENDS = 8
MAX_LISTED_SHORTFALLS = 100


@dataclass(slots=True)
class Attempt:
    """One try of a route: this backend, asked for this model."""

    backend: Backend
    model: str
    fallback: bool = False
    max_tokens: int | None = None  # set when max_tokens had to be lowered to fit
    alone: bool = False  # the only candidate for its model: the proxy may ask it again
    scrub: bool = False  # overflow to an open backend: only system prompt and last user turn


@dataclass(slots=True)
class RouteDecision:
    """The plan for a request: the attempts in order, and why the first was chosen."""

    model: str
    attempts: list[Attempt]
    reason: str = "capability-match"
    all_full: bool = False  # the first servable model's candidates are all full: wait in queue


class SessionTable:
    """Which backend served each session's last turn (SPEC §3.7), by session-key hash: no text.
    Least recently served first, so both bounds (size and idle time) drop from the front."""

    __slots__ = ("entries", "hits", "moves", "new")

    def __init__(self) -> None:
        self.entries: collections.OrderedDict[int, tuple[str, float]] = collections.OrderedDict()
        self.hits = 0  # turns served by the backend of the session's last turn
        self.moves = 0  # turns of a known session served elsewhere
        self.new = 0  # turns without a session to follow: first turns, one-off requests

    def backend_of(self, key: int, now: float) -> str | None:
        """The backend a session's last turn went to, unless it has been idle too long."""
        entry = self.entries.get(key)
        if entry is None or now - entry[1] > SESSION_IDLE_SECONDS:
            return None
        return entry[0]

    def note(self, key: int, backend: str, followed: str | None, now: float) -> None:
        """A turn served by `backend`; `followed` is the backend its routing tried to keep."""
        if followed is None:
            self.new += 1
        elif followed == backend:
            self.hits += 1
        else:
            self.moves += 1
        entries = self.entries
        entries[key] = (backend, now)
        entries.move_to_end(key)
        if len(entries) > SESSIONS_MAX:  # idle ones go when counted: backend_of ignores them
            entries.popitem(last=False)

    def tracked(self, now: float) -> int:
        """How many sessions are remembered, once those idle too long are dropped."""
        entries = self.entries
        while entries and now - next(iter(entries.values()))[1] > SESSION_IDLE_SECONDS:
            entries.popitem(last=False)
        return len(entries)

    def snapshot(self, now: float) -> dict[str, int]:
        """The session counts for /v1/stats."""
        return dict(tracked=self.tracked(now), hits=self.hits, moves=self.moves, new=self.new)


def meets_needs(model: Model, needs: RequestNeeds) -> bool:
    """A capability the backend does not report is assumed present; a reported absence excludes.
    The prompt fits when it leaves room for at least one token of answer."""
    return not (
        (needs.vision and model.vision is False)
        or (needs.tools and model.tools is False)
        or (needs.json_mode and model.json_mode is False)
        or (model.context_length and needs.prompt_tokens >= model.context_length)
    )


def fits_entirely(model: Model, needs: RequestNeeds) -> bool:
    """Whether the prompt plus max_tokens fits the model's context (unknown sizes fit)."""
    if not model.context_length or needs.max_tokens is None:
        return True
    return needs.prompt_tokens + needs.max_tokens <= model.context_length


def scorer(weights: dict[str, float]) -> Callable[[Backend], float]:
    """The smart strategy's score for these weights, lower is better: priority, load and speed.
    A backend never measured counts as fast, so that new backends get traffic and a measurement."""
    # The weights are read once here, not per backend: this runs for every candidate.
    per_priority = weights.get("priority", 0.0) / 100.0
    per_load = weights.get("load", 0.0)
    per_ms = weights.get("latency", 0.0) / LATENCY_SCALE_MS

    def score(backend: Backend) -> float:
        load = backend.in_flight / (backend.max_concurrent or 10)
        latency = backend.latency_ema_ms
        ttft = backend.ttft_ema_ms
        if latency is None:
            latency = ttft or 0.0
        elif ttft is not None:
            latency = (latency + ttft) / 2
        return (
            per_priority * backend.priority
            + per_load * (load if load < 1.0 else 1.0)
            + per_ms * (latency if latency < LATENCY_SCALE_MS else LATENCY_SCALE_MS)
        )

    return score


def warm_first(backends: list[Backend], model_id: str) -> None:
    """Within each priority, backends with the model in memory go before cold ones (a load takes
    seconds to minutes), in that priority's places (SPEC §3 step 8); allocates only if mixed."""
    cold = 0
    for backend in backends:
        if backend.loaded is not None and model_id not in backend.loaded:
            cold += 1
    if cold == 0 or cold == len(backends):
        return
    priority = backends[0].priority
    if all(b.priority == priority for b in backends):  # the usual case: one stable sort
        backends.sort(key=lambda b: not b.is_warm(model_id))
        return
    places: dict[int, list[int]] = {}
    for i, backend in enumerate(backends):
        places.setdefault(backend.priority, []).append(i)
    for indices in places.values():
        group = sorted((backends[i] for i in indices), key=lambda b: not b.is_warm(model_id))
        for i, backend in zip(indices, group, strict=True):
            backends[i] = backend


def candidates_for(
    model_id: str, needs: RequestNeeds, registry: Registry, settings: Settings, rules: RouteRules
) -> list[Backend]:
    """Healthy backends serving the model that meet the request's needs and pass its policy,
    best first; none the lifecycle API is loading the model on."""
    found = [
        backend
        for backend in registry.by_model.get(model_id, ())
        if backend.status == "healthy" and meets_needs(backend.models[model_id], needs)
    ]
    if registry.moving:
        found = [backend for backend in found if model_id not in backend.loading]
    if rules.refuses_any():
        found = [backend for backend in found if rules.allows(backend)]
    if len(found) < 2:
        return found
    # The strategy's order, ties rotating round-robin so that equal backends share the work.
    shift = next(ROUND_ROBIN) % len(found)
    if shift:
        found = found[shift:] + found[:shift]
    strategy = settings.routing.strategy
    if strategy == "random":
        random.shuffle(found)
    elif strategy == "priority_only":
        found.sort(key=operator.attrgetter("priority"))
    elif strategy == "smart":
        found.sort(key=scorer(settings.routing.weights))
    # Stable sorts, each a rule over the ones before: the session's backend, warm before cold,
    # draining last, max_tokens fitting entirely, local before cloud at the budget's soft
    # limit, restricted before open for a local-first request, best tier for a lowered one.
    if needs.last_backend is not None:
        for i, backend in enumerate(found):
            if backend.name == needs.last_backend:
                if i:
                    found.insert(0, found.pop(i))
                break
    warm_first(found, model_id)
    if registry.moving:
        found.sort(key=lambda b: model_id in b.draining)
    if needs.max_tokens is not None:
        found.sort(key=lambda b: not fits_entirely(b.models[model_id], needs))
    if rules.cloud_last:
        found.sort(key=lambda b: b.is_cloud)
    if rules.overflow is not None:
        found.sort(key=lambda b: b.zone != "restricted")
    if rules.lowered_tier:
        found.sort(key=lambda b: -b.tier)
    return found


def passed_over_full(ranked: list[Backend], chosen: Backend, settings: Settings) -> bool:
    """Whether a backend at capacity would have been chosen before `chosen` if it had room."""
    strategy = settings.routing.strategy
    full = [b for b in ranked if b.at_capacity()]
    if strategy == "smart":
        score = scorer(dict(settings.routing.weights, load=0.0))
        return any(score(b) < score(chosen) for b in full)
    if strategy == "priority_only":
        return any(b.priority < chosen.priority for b in full)
    return ranked[0].at_capacity()


def model_not_found(
    model: str, registry: Registry, settings: Settings, key: ApiKey | None = None
) -> NexusError:
    """404 listing the models there are, or only those the caller's key may use."""
    available = sorted(set(registry.by_model) | set(settings.routing.aliases))
    if key is not None:
        available = [m for m in available if key.may_use(m, settings.routing.aliases)]
    listed = ", ".join(available[:50]) if available else "none (no backend is serving a model)"
    message = (
        f"The model '{model}' does not exist or is not served by any backend. "
        f"Available models: {listed}"
    )
    return NexusError.of(404, "model_not_found", message, param="model")


def context_length_exceeded(prompt: int, largest: int, how: str, param: str | None) -> NexusError:
    """OpenAI's context_length_exceeded, with both sizes in `context` for other doors' words."""
    message = (
        f"This model's maximum context length is {largest} tokens, however you requested "
        f"{prompt} tokens ({how}). Serve it with a larger context, or add a fallback with one."
    )
    context = {"prompt_tokens": prompt, "context_length": largest}
    return NexusError.of(400, "context_length_exceeded", message, param=param, context=context)


def prompt_too_long(needs: RequestNeeds, chain: list[str], registry: Registry) -> NexusError | None:
    """The 400 for a prompt no backend of the model or its fallbacks could hold, healthy or
    not (waiting cannot make it fit), or None when one could or does not report its context."""
    largest = 0  # route() asks only for a chain some backend serves: it ends above 0
    for model_id in chain:
        for backend in registry.by_model.get(model_id, ()):
            context = backend.models[model_id].context_length
            if not context or needs.prompt_tokens < context:
                return None
            largest = max(largest, context)
    how = (
        f"{needs.prompt_tokens} in the prompt, before any answer; no backend serving "
        f"'{needs.model}' or its fallbacks has a larger context"
    )
    return context_length_exceeded(needs.prompt_tokens, largest, how, needs.prompt_param)


def shortfalls(needs: RequestNeeds, chain: list[str], registry: Registry) -> list[dict[str, Any]]:
    """Why each backend of the model and its fallbacks is no candidate now: the needs its model
    fails (meets_needs() spelt out, which stays allocation-free), "down", "busy" or "loading"."""
    found = []
    for model_id in chain:
        for backend in registry.by_model.get(model_id, ()):
            model = backend.models[model_id]
            failed = [n for n in CAPABILITIES if getattr(needs, n) and getattr(model, n) is False]
            if model.context_length and needs.prompt_tokens >= model.context_length:
                failed.append("context")
            if backend.status != "healthy":
                failed.append("down")
            elif backend.at_capacity():
                failed.append("busy")
            elif model_id in backend.loading:
                failed.append("loading")
            if failed:
                entry = {"backend": backend.name, "model": model_id, "failed": failed}
                if "context" in failed:
                    entry["context_length"] = model.context_length
                found.append(entry)
    return found


def shortfall_reason(needs: RequestNeeds, found: list[dict[str, Any]]) -> str:
    """What failed: the needs no healthy backend meets, then each backend's ("gpu2: no vision")."""
    if not found:
        return "no backend serving it can take it now"
    named = []
    for entry in found[:MAX_NAMED_BACKENDS]:
        words = []
        for failed in entry["failed"]:
            if failed == "context":
                words.append(f"a context of {entry['context_length']} tokens")
            else:
                words.append("no " + NEED_WORDS[failed] if failed in NEED_WORDS else failed)
        named.append(f"{entry['backend']}: {', '.join(words)}")
    per_backend = "; ".join(named)
    if len(found) > MAX_NAMED_BACKENDS:
        per_backend += f"; and {len(found) - MAX_NAMED_BACKENDS} more"
    if all(entry["failed"] == ["down"] for entry in found):
        return f"every backend serving it is down ({per_backend})"
    healthy_fails = [e["failed"] for e in found if "down" not in e["failed"]]
    needed = [need for need in NEED_WORDS if any(need in fails for fails in healthy_fails)]
    if not needed:
        return f"the backends that could serve it are down or busy ({per_backend})"
    words = " and ".join(
        f"a context over {needs.prompt_tokens} tokens" if n == "context" else NEED_WORDS[n]
        for n in needed
    )
    return f"it needs {words}, which no healthy backend serving it has ({per_backend})"


def set_eta(error: NexusError, eta: int | None) -> None:
    """Put the seconds until a retry may succeed in the error's context and Retry-After."""
    error.context["eta_seconds"] = eta  # a no_backend_available error always has a context
    if eta is not None:
        error.headers["Retry-After"] = str(eta)


def unavailable(
    message: str,
    registry: Registry,
    backends: list[dict[str, Any]],
    eta: int | None = None,
    required_tier: int | None = None,
    privacy_zone_required: str | None = None,
) -> NexusError:
    """The actionable 503: the nodes up, what was required, what each backend lacked, any ETA."""
    context = {
        "available_nodes": [b.name for b in registry.healthy()],
        "eta_seconds": None,
        "required_tier": required_tier,
        "privacy_zone_required": privacy_zone_required,
        "backends": backends,
    }
    error = NexusError.of(503, "no_backend_available", message, context=context)
    set_eta(error, eta)
    return error


def no_capacity(
    needs: RequestNeeds, chain: list[str], registry: Registry, rules: RouteRules
) -> NexusError:
    """The 503 for a request nothing can serve now, saying which need failed and where."""
    model_id = chain[0]
    serving = registry.by_model.get(model_id, [])
    healthy = [b for b in serving if b.status == "healthy"]
    excluded = rules.excluded
    required_tier = rules.min_tier if "tier" in excluded else None
    found = shortfalls(needs, chain, registry)
    if "privacy" in excluded:
        why = "its policy is privacy = restricted and no restricted backend can serve it"
    elif "overflow" in excluded:
        why = (
            "its local backends cannot serve it and its policy blocks overflow to open "
            'backends (overflow = "block")'
        )
    elif required_tier is not None:
        why = (
            f"no backend of tier {required_tier} or above can serve it (min_tier; send "
            "X-Nexus-Flexible: true to accept a lower tier when none is available)"
        )
    elif healthy and all(model_id in b.loading for b in healthy):
        names = ", ".join(b.name for b in healthy)
        why = f"it is being loaded on {names} (model lifecycle); try again once it is loaded"
    elif serving or found:
        why = shortfall_reason(needs, found)
    else:
        why = "no backend serves it"
    return unavailable(
        f"No backend can serve model '{needs.model}' now: {why}.",
        registry,
        found[:MAX_LISTED_SHORTFALLS],
        required_tier=required_tier,
        privacy_zone_required="restricted" if excluded & {"privacy", "overflow"} else None,
    )


def route(needs: RequestNeeds, registry: Registry, settings: Settings) -> RouteDecision:
    """Plan the attempts for a request: the model's candidates, then its fallbacks', each cut to
    1 + max_retries backends, free ones first. 404 for a model nothing serves or names, 400 for
    a prompt no backend can hold, 503 (saying why) when nothing can serve it now."""
    chain = model_chain(needs.model, settings.routing)
    model_id = chain[0]
    if not any(m in registry.by_model for m in chain):
        raise model_not_found(needs.model, registry, settings)
    rules = route_rules(needs, chain, registry, settings)
    budget = settings.routing.budget
    full_chain = chain
    if rules.no_cloud and budget is not None and budget.hard_limit_action == "block_cloud":
        chain = chain[:1]  # block_cloud keeps cloud work out without serving another model
    ranked_models = [(m, candidates_for(m, needs, registry, settings, rules)) for m in chain]
    if rules.min_tier and needs.flexible and not any(r for _, r in ranked_models):
        rules.min_tier = 0  # nothing meets the tier anywhere: the flexible request takes less
        rules.lowered_tier = True
        ranked_models = [(m, candidates_for(m, needs, registry, settings, rules)) for m in chain]
    decision = RouteDecision(model=model_id, attempts=[])
    per_model = settings.routing.max_retries + 1
    for position, (candidate_model, ranked) in enumerate(ranked_models):
        if not ranked:
            continue
        free = [b for b in ranked if not b.at_capacity()]
        if not decision.attempts:  # the first servable model decides the reason and queueing
            decision.all_full = not free
            if position > 0 and registry.by_model.get(model_id):
                if not any(b.status == "healthy" for b in registry.by_model[model_id]):
                    decision.reason = "failover"
            elif rules.excluded & {"privacy", "overflow"}:
                decision.reason = "privacy-requirement"
            elif free and len(free) < len(ranked) and passed_over_full(ranked, free[0], settings):
                decision.reason = "capacity-overflow"
            if free and free[0].name == needs.last_backend and decision.reason in AFFINITY_REASONS:
                decision.reason = "session-affinity"
        if len(free) < len(ranked):
            ranked = free + [b for b in ranked if b.at_capacity()]
        alone = len(ranked) == 1
        for backend in ranked[:per_model]:
            model = backend.models[candidate_model]
            max_tokens = None
            if not fits_entirely(model, needs):
                max_tokens = max(model.context_length - needs.prompt_tokens, 1)
            attempt = Attempt(backend, candidate_model, position > 0, max_tokens, alone=alone)
            attempt.scrub = rules.overflow == "scrub" and backend.zone != "restricted"
            decision.attempts.append(attempt)
    if not decision.attempts:
        if (too_long := prompt_too_long(needs, full_chain, registry)) is not None:
            raise too_long
        if "budget" in rules.excluded and budget is not None:
            why = "cloud backends are off and no local backend can serve it now"
            raise budget_exceeded(needs, budget.hard_limit_action, why)
        raise no_capacity(needs, chain, registry, rules)
    return decision


# ==============================================================================================
# Auth
# Owns: API keys (each read from its variable once, at start), who may call what (model
# allow-lists; admin keys for the operations views and admin API), the rpm and tpm buckets of
# keys and backends, and each key's usage and monthly spend.
# Must not: let a key leave this section. Only a SHA-256 digest of each is kept; logs, errors,
# stats and pages name a key by its name, never show it.
# ==============================================================================================

# What shows backend URLs, key names and spend: with keys, only an admin key may see it.
ADMIN_PATHS = ("/v1/stats", "/v1/stats/stream", "/v1/usage", "/metrics", "/v1/backends")
# A request carrying one of these came through a proxy: its peer address is the proxy's.
PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def retry_after_header(wait: float) -> str:
    """Whole seconds, rounded up, so that a client waiting that long is let through."""
    return str(max(math.ceil(wait - 1e-9), 1))


def rate_limited(what: str, wait: float) -> NexusError:
    """The 429 for a key or backend over its rpm or tpm, with an honest Retry-After."""
    retry = retry_after_header(wait)
    message = f"Rate limit reached for {what}. Try again in {retry} s."
    return NexusError.of(429, "rate_limit_exceeded", message, headers={"Retry-After": retry})


@dataclass(slots=True, eq=False)
class ApiKey:
    """One configured key: its name, what it may do, its buckets and its usage so far."""

    name: str
    digest: bytes = field(repr=False)
    models: list[str] = field(default_factory=list)
    admin: bool = False
    rpm: int = 0
    tpm: int = 0
    monthly_limit_usd: float = 0.0
    requests_bucket: TokenBucket | None = field(default=None, repr=False)
    tokens_bucket: TokenBucket | None = field(default=None, repr=False)
    requests: int = 0
    tokens: int = 0
    rate_limited: int = 0
    spent_usd: float = 0.0  # on cloud backends in `month`, priced like the global budget
    month: str = ""

    def roll_month(self, month: str) -> float:
        """Begin `month` (a UTC month, like the budget's) from 0 if it is new; its spend so far."""
        if month != self.month:
            self.month, self.spent_usd = month, 0.0
        return self.spent_usd

    def may_use(self, model: str, aliases: dict[str, str]) -> bool:
        """Whether the allow-list names the model, or the model an alias of it leads to."""
        if not self.models:
            return True
        target = resolve_alias(model, aliases)
        return any(fnmatch.fnmatchcase(m, glob) for glob in self.models for m in (model, target))


def api_keys(auth: AuthSettings) -> list[ApiKey]:
    """The ApiKey of each configured key, with its rpm and tpm buckets full."""
    now = time.monotonic()
    keys = []
    for k in auth.api_keys:
        key = ApiKey(k.name, k.digest, list(k.models), k.admin, k.rpm, k.tpm, k.monthly_limit_usd)
        key.requests_bucket = TokenBucket(k.rpm, now) if k.rpm else None
        key.tokens_bucket = TokenBucket(k.tpm, now) if k.tpm else None
        keys.append(key)
    return keys


def admin_forbidden(key: ApiKey) -> NexusError:
    """The 403 for a key without admin = true on an admin path."""
    message = f"The key '{key.name}' may not use this; it needs a key with admin = true."
    return NexusError.of(403, "admin_forbidden", message)


def unauthorized(message: str) -> NexusError:
    """The 401 for a missing or unknown key, asking for a Bearer token."""
    headers = {"WWW-Authenticate": 'Bearer realm="nexus"'}
    return NexusError.of(401, "invalid_api_key", message, headers=headers)


def backend_turn(backend: Backend, now: float) -> NexusError | None:
    """Take one request from a backend's rpm bucket; a 429 to give when it is empty."""
    bucket = backend.rpm_bucket
    if bucket is not None:
        if wait := bucket.wait(1, now):
            what = f"backend {backend.name}: {bucket.per_minute:g} requests per minute"
            return rate_limited(what, wait)
        bucket.take(1, now)
    return None


# The steps as the app takes them: the middleware authenticates, the proxy admits and filters
# the route, the middleware settles when the answer is out.


def authenticate_request(request: web.Request) -> None:
    """Find the caller's key when keys are configured and the path needs one: 401 when it is
    missing or wrong, 403 on an admin path for a key not admin; logged, never with the key."""
    keys, path = request.app[KEYS], request.path
    # Ollama's API needs a key too, but for its version, which (like /health) stays open.
    if not keys or path == "/api/version":
        return
    if not path.startswith(("/v1/", "/api/")) and path != "/metrics":
        return
    # OpenAI clients send `Authorization: Bearer`, Anthropic's `x-api-key`.
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    presented = token.strip() if scheme.lower() == "bearer" else ""
    presented = presented or request.headers.get("x-api-key", "").strip()
    given = key_digest(presented)
    found = None
    # Constant time: every key compared (equal-length digests), whichever matches.
    for key in keys:
        if hmac.compare_digest(given, key.digest):
            found = key
    if not presented:
        error = unauthorized(
            "No API key provided. Send it as 'Authorization: Bearer <key>' (or 'x-api-key: <key>')."
        )
    elif found is None:
        error = unauthorized("The API key provided is not valid.")
    elif not found.admin and (path in ADMIN_PATHS or path.startswith("/v1/backends/")):
        error = admin_forbidden(found)
    else:
        request[API_KEY] = found
        return
    rid, remote = request[REQUEST_ID], request.remote
    fields = {"request_id": rid, "path": path, "remote": remote, "status": error.status}
    message = f"request {rid} to {path} from {remote} refused: {error.message}"
    log.warning("%s", message, extra={"fields": fields})
    raise error


def check_model(request: web.Request, model: str, must_exist: bool = False) -> None:
    """404 for a model the caller's key may not use (listing only the models it may use) or,
    when it `must_exist`, one that no backend serves, nor its alias's target or fallbacks."""
    key = request.get(API_KEY)
    if not must_exist and (key is None or not key.models):
        return
    settings, registry = request.app[SETTINGS], request.app[REGISTRY]
    allowed = key is None or key.may_use(model, settings.routing.aliases)
    if not allowed or not any(m in registry.by_model for m in model_chain(model, settings.routing)):
        raise model_not_found(model, registry, settings, key)


def admit_request(request: web.Request, needs: RequestNeeds) -> None:
    """Before routing: the key's model allow-list, then its rpm and tpm (429 when over); nothing
    is taken from its buckets unless every limit lets the request through."""
    key = request.get(API_KEY)
    if key is None:
        return
    check_model(request, needs.model)
    now = time.monotonic()
    # The prompt estimate is charged up front; settle_request() puts the real usage in its place.
    charged = needs.prompt_tokens if key.tokens_bucket is not None else 0
    if key.requests_bucket is not None and (wait := key.requests_bucket.wait(1, now)):
        key.rate_limited += 1
        raise rate_limited(f"key '{key.name}': {key.rpm} requests per minute", wait)
    if key.tokens_bucket is not None and (wait := key.tokens_bucket.wait(charged, now)):
        key.rate_limited += 1
        raise rate_limited(f"key '{key.name}': {key.tpm} tokens per minute", wait)
    if key.requests_bucket is not None:
        key.requests_bucket.take(1, now)
    if key.tokens_bucket is not None:
        key.tokens_bucket.take(charged, now)
    request[TOKENS_CHARGED] = charged


def allowed_attempts(
    request: web.Request, decision: RouteDecision, needs: RequestNeeds
) -> RouteDecision:
    """The route without the fallback models the caller's key may not use and, once the key
    has spent its monthly limit, without cloud backends (like the budget's shift_local)."""
    key = request.get(API_KEY)
    if key is None:
        return decision
    aliases = request.app[SETTINGS].routing.aliases
    attempts = [
        a for a in decision.attempts if a.model == decision.model or key.may_use(a.model, aliases)
    ]
    if not attempts:
        raise no_capacity(needs, [decision.model], request.app[REGISTRY], RouteRules())
    if 0 < key.monthly_limit_usd <= key.roll_month(month_of(dt.datetime.now(dt.UTC))):
        attempts = [a for a in attempts if not a.backend.is_cloud]
    if not attempts:
        why = (
            f"Key '{key.name}' has spent its monthly limit of {key.monthly_limit_usd:g} USD, so "
            f"cloud backends are off for it and no local backend can serve model '{needs.model}' "
            "now"
        )
        raise monthly_limit_spent("key_budget_exceeded", why, "limit")
    decision.attempts = attempts
    return decision


def settle_request(request: web.Request, record: RequestRecord, status: int) -> None:
    """Once answered: the request counts for its key (by name) and real usage corrects its tpm
    charge (an unanswered request costs nothing; an answer without usage keeps the estimate)."""
    key = request.get(API_KEY)
    if key is None:
        return
    record.key = key.name
    key.requests += 1
    if record.cost_usd:
        key.roll_month(month_of(dt.datetime.now(dt.UTC)))
        key.spent_usd += record.cost_usd
    used = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
    key.tokens += used
    if key.tokens_bucket is not None:
        charged = request.get(TOKENS_CHARGED, 0)
        if status >= 400 or record.backend is None:
            used = 0
        elif record.prompt_tokens is None and record.completion_tokens is None:
            used = charged
        key.tokens_bucket.adjust(used - charged, time.monotonic())


def may_see_model(request: web.Request, model: str) -> bool:
    """Whether the caller's key (if any) may see a model in the model lists."""
    key = request.get(API_KEY)
    return key is None or key.may_use(model, request.app[SETTINGS].routing.aliases)


# ==============================================================================================
# Backend connections
# Owns: HTTP/1.1 to the backends: connections opened, kept alive, reused and closed; requests
# written; answers parsed (status, headers, a body framed by Content-Length, chunked coding or
# the connection's end) and read as they arrive, with reading paused while a reader lags.
# Must not: know backend types or APIs. Adapters say what to send; the proxy what to do next.
# ==============================================================================================
# Why not aiohttp's client: a request through its ClientSession costs more CPU than all the rest
# of the relay (the README has the figures). Backends speak JSON and SSE: Nexus asks for no
# compression (and decodes gzip or deflate sent anyway), follows no redirects (a clear error
# instead) and sends one request at a time per connection.

BACKEND_HEAD_MAX = 16 * 1024  # an answer's status line and headers
BACKEND_CHUNK_LINE_MAX = 1024  # a chunk's size line, extensions included
BACKEND_BUFFER_HIGH = 256 * 1024  # unread body bytes at which reading the socket pauses
BACKEND_DECODED_BLOCK_MAX = 64 * 1024 * 1024  # what one compressed network read may become
# An idle connection older than this is closed, not reused: a request is never sent twice (a
# backend may have acted on it), local servers close idle ones after 5 s, and a new connection
# costs them well under a millisecond (a TLS handshake to a cloud costs more).
BACKEND_KEEPALIVE_SECONDS = 4.0  # http
BACKEND_TLS_KEEPALIVE_SECONDS = 60.0  # https
BACKEND_DRAIN_SECONDS = 2.0  # how long a finished stream's last bytes are waited for
BACKEND_HAPPY_EYEBALLS_DELAY = 0.25  # RFC 8305: the next address is tried this much later
BACKEND_USER_AGENT = f"nexus/{__version__}"

Origin = tuple[str, str, int]  # scheme, host, port: which connections can serve a URL
BARE_LF_HEAD = "answered a head whose lines end in a bare LF, not CRLF"


class BackendHTTPError(Exception):
    """A backend connection that failed: refused, cut short, or answering something not HTTP."""


class BackendConnectTimeout(BackendHTTPError, TimeoutError):
    """A backend that did not take the connection in time: a 504 like a silent one, not retried."""


@functools.lru_cache(maxsize=4096)
def request_start(method: str, url: str) -> tuple[Origin, str]:
    """A request's origin and its first lines, which are the same for every request to a URL."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise BackendHTTPError(f"has a bad port in its URL {url}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BackendHTTPError(f"has a URL Nexus cannot reach: {url}")
    try:
        host = parts.hostname.encode("idna").decode()
    except UnicodeError:  # an empty label, or one longer than 63 characters
        raise BackendHTTPError(f"has a host name Nexus cannot use: {url}") from None
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    if port is not None:
        host += f":{port}"
    target = urllib.parse.quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += f"?{parts.query}"
    origin = (parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80))
    return origin, (
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {BACKEND_USER_AGENT}\r\n"
        "Accept-Encoding: identity\r\n"
    )


def encode_request(
    method: str, url: str, headers: dict[str, str], body: bytes, keep_alive: bool
) -> tuple[Origin, bytes]:
    """A request's bytes for HTTP/1.1: the start line, headers and body, and its origin."""
    origin, start = request_start(method, url)
    lines = [start]
    for name, value in headers.items():
        if "\n" in value or "\r" in value:  # would end the header early: another header, smuggled
            raise BackendHTTPError(f"the {name} header to send holds a line break")
        lines.append(f"{name}: {value}\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    if body or method != "GET":
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    return origin, "".join(lines).encode() + body


def body_decoder(coding: str | None) -> Any:
    """A body's decoder for its Content-Encoding: None, a gzip decompressor or True (deflate)."""
    if coding is None:
        return None
    coding = coding.strip().lower()
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(31)
    if coding == "deflate":
        return True
    if coding in ("", "identity"):
        return None
    raise BackendHTTPError(f"answered a body in an encoding Nexus cannot decode: {coding[:40]}")


@dataclass(slots=True, eq=False, repr=False)
class BackendConnection(asyncio.Protocol):
    """One connection to a backend and the answer it is reading, one request at a time.

    Its head is in when BackendPool.request() returns it (header names lower-case); a broken
    connection or an answer not HTTP raises BackendHTTPError from the wait that meets it."""

    pool: BackendPool
    origin: Origin
    transport: asyncio.Transport | None = None  # set once connected
    rest: bytes = b""  # bytes received and not parsed yet: part of a head or a chunk line
    body: collections.deque[bytes] = field(default_factory=collections.deque)  # not read yet
    buffered: int = 0  # the size of `body`
    # idle (between answers), head, length, chunked, trailer, close (ends with the
    # connection), done (the whole answer is in)
    state: str = "idle"
    left: int = 0  # body bytes still to come (length), or of this chunk; -1: its CRLF next
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    decoder: Any = None  # for a body compressed although Nexus asked for none: body_decoder()
    keep_alive: bool = True
    error: BackendHTTPError | None = None
    waiter: asyncio.Future[None] | None = None
    paused: bool = False
    collect: bool = False  # read() takes the whole body: no pausing for it
    drain: bool = False  # released before its answer's last bytes: back to the pool with them
    drain_timer: asyncio.TimerHandle | None = None  # closes it if they never come
    whole: bool = False  # set by a reader that saw its answer's last event
    pipelined: bool = False  # a second request was sent with the first: its answer follows
    closed: bool = False
    idle_since: float = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """asyncio's callback: parse what arrived; a malformed answer fails the request."""
        if self.rest:
            data, self.rest = self.rest + data, b""
        try:
            self.parse(data)
        except BackendHTTPError as exc:
            self.fail(exc)
        except Exception:  # a parsing case not foreseen: still the backend's answer, not a crash
            log.debug("unparsable answer from a backend", exc_info=True)
            self.fail(BackendHTTPError("answered something Nexus cannot parse"))
        if self.state == "done" and self.drain:
            self.drain = False
            self.drain_timer.cancel()  # type: ignore[union-attr]
            self.drain_timer = None
            self.release()
        self.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        """asyncio's callback: the connection closed; an answer cut short fails."""
        self.closed = True
        self.pool.open.discard(self)
        if self.state == "close" and exc is None:  # a reset cuts an answer short; a FIN ends it
            self.state = "done"
        elif self.state not in ("idle", "done") and self.error is None:
            silent = self.state == "head" and not self.rest
            where = "without answering" if silent else "in the middle of its answer"
            self.error = BackendHTTPError(f"closed the connection {where}")
        self.wake()

    def parse(self, data: bytes) -> None:
        """Parse received bytes: the head, then the body by its framing."""
        pos, end = 0, len(data)
        while pos < end:
            state = self.state
            if state == "length" or (state == "chunked" and self.left > 0):
                take = min(self.left, end - pos)
                self.add_body(data[pos : pos + take] if pos or take < end else data)
                pos += take
                self.left -= take
                if not self.left:
                    if state == "length":
                        self.state = "done"
                    else:
                        self.left = -1
            elif state == "chunked" and self.left < 0:  # the CRLF after a chunk's data
                if end - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise BackendHTTPError("answered a malformed chunk")
                pos += 2
                self.left = 0
            elif state in ("chunked", "trailer"):  # a chunk's size line, or a trailer line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > BACKEND_CHUNK_LINE_MAX:
                        raise BackendHTTPError("answered a malformed chunk")
                    break
                line = data[pos:eol]
                pos = eol + 2
                if state == "trailer":
                    if not line:
                        self.state = "done"
                    continue
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                    raise BackendHTTPError("answered a malformed chunk")
                self.left = int(size, 16)
                if not self.left:
                    self.state = "trailer"
            elif state == "close":
                self.add_body(data[pos:] if pos else data)
                pos = end
            elif state == "head":
                head_end = data.find(b"\r\n\r\n", pos)
                if head_end < 0:
                    if end - pos > BACKEND_HEAD_MAX:
                        raise BackendHTTPError("answered a head too long")
                    if data.find(b"\n\n", pos) >= 0:
                        raise BackendHTTPError(BARE_LF_HEAD)
                    break
                self.read_head(data[pos:head_end])
                pos = head_end + 4
            elif self.pipelined:  # done: the next answer's first bytes, kept for it
                break
            else:  # idle or done: bytes nobody asked for; the answer had, if any, is whole
                self.keep_alive = False
                self.transport.abort()  # type: ignore[union-attr]
                return
        if pos < end:
            self.rest = data[pos:]

    def read_head(self, head: bytes) -> None:
        """Parse the status line and headers, and set up the body's framing and decoding."""
        text = head.decode("latin-1")  # latin-1: any byte, one character each
        if text.count("\n") != text.count("\r\n"):
            raise BackendHTTPError(BARE_LF_HEAD)
        lines = text.split("\r\n")
        first = lines[0]
        code = first[9:12]
        if (
            not first.startswith("HTTP/1.")
            or not (code.isascii() and code.isdigit())
            or first[12:13] not in " "
        ):
            raise BackendHTTPError("answered something that is not HTTP")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or "\0" in value:
                raise BackendHTTPError("answered a malformed header")
            name, value = name.strip().lower(), value.strip()
            if name in headers:  # repeated: one list, as HTTP says; never two body lengths
                if name == "content-length":
                    raise BackendHTTPError("answered more than one Content-Length")
                value = f"{headers[name]}, {value}"
            headers[name] = value
        status = int(code)
        if status < 200:
            return  # an interim answer (100 Continue): the real one follows
        if 300 <= status < 400 and status != 304:
            where = headers.get("location", "")[:200] or "no Location given"
            raise BackendHTTPError(
                f"answered a redirect ({status}) to {where}; Nexus follows none: "
                "set the backend's url to where it points"
            )
        self.keep_alive = first[7:8] == "1" and "close" not in headers.get("connection", "").lower()
        self.decoder = body_decoder(headers.get("content-encoding"))
        coding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if status in (204, 304):
            self.state = "done"
        elif coding is not None:
            if length is not None:  # both: chunked rules, and the connection is not trusted
                self.keep_alive = False
            if coding.lower().rstrip().endswith("chunked"):
                self.state, self.left = "chunked", 0
            else:  # another coding last: the body ends with the connection
                self.state, self.keep_alive = "close", False
        elif length is not None:
            if not (length.isascii() and length.isdigit()):
                raise BackendHTTPError("answered a bad Content-Length")
            self.left = int(length)
            self.state = "length" if self.left else "done"
        else:
            self.state, self.keep_alive = "close", False
        self.status, self.headers = status, headers  # last: a head that fails sets no status

    def add_body(self, block: bytes) -> None:
        """Queue a block of body (decoded), pausing the socket while the reader lags."""
        if self.drain:
            return  # the reader is gone; only the answer's end is awaited
        if self.decoder is not None:
            block = self.decode(block)
            if not block:
                return  # a compressed header, or a block that completes nothing yet
        self.body.append(block)
        self.buffered += len(block)
        if self.buffered >= BACKEND_BUFFER_HIGH and not self.paused and not self.collect:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def decode(self, block: bytes) -> bytes:
        """Decompress a block of a gzip or deflate body, refusing one that expands too far."""
        decoder = self.decoder
        if decoder is True:  # deflate: zlib-wrapped as HTTP says, or raw as some servers send
            head = int.from_bytes(block[:2])
            wrapped = len(block) < 2 or (block[0] & 0x0F == 8 and head % 31 == 0)
            decoder = self.decoder = zlib.decompressobj(15 if wrapped else -15)
        try:
            data = decoder.decompress(block, BACKEND_DECODED_BLOCK_MAX)
        except zlib.error:
            coding = self.headers.get("content-encoding") or "compressed"
            raise BackendHTTPError(f"answered a {coding} body that does not decode") from None
        if decoder.unconsumed_tail:  # a few kB that would be gigabytes: not an API's answer
            raise BackendHTTPError("answered a compressed body that expands too far")
        return data

    def fail(self, error: BackendHTTPError) -> None:
        """Record the first error and abort the connection."""
        if self.error is None:
            self.error = error
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Wait for the next bytes or the end; raise the connection's error if it has one."""
        if self.error is not None:
            raise self.error
        self.waiter = self.pool.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def send(self, data: bytes) -> None:
        """Write a request and wait for its answer's head; on any failure, close."""
        self.state, self.status, self.error, self.whole = "head", 0, None, False
        self.transport.write(data)  # type: ignore[union-attr]
        try:
            while not self.status:
                await self.wait()
        except BaseException:  # cancelled or timed out too: the answer is not for anyone now
            self.close()
            raise

    async def follow(self) -> None:
        """Wait for the head of the answer to the request sent after the last (pipelined)."""
        self.pipelined = False
        self.state, self.status, self.error, self.whole = "head", 0, None, False
        if self.rest:  # some of it came with the last answer
            self.data_received(b"")
        while not self.status:
            await self.wait()

    @property
    def complete(self) -> bool:
        """Whether the whole answer is in, so read() will not wait."""
        return self.state == "done"

    def take(self) -> bytes:
        """All body bytes buffered so far, resuming the socket."""
        body = self.body
        data = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        self.resume()
        return data

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    async def readany(self) -> bytes:
        """The body bytes that have arrived, waiting for some; b"" at the answer's end."""
        while not self.body:
            # An answer framed by its connection's end is whole once that closes, even when
            # Nexus closed it over a broken body: its error still comes first.
            if self.state == "done" and self.error is None:
                return b""
            await self.wait()
        return self.take()

    async def read(self, limit: int = 0) -> bytes:
        """The whole body; with a limit, its first `limit` bytes, as soon as they are in."""
        self.collect = True
        self.resume()
        while self.state != "done" and not (limit and self.buffered >= limit):
            await self.wait()
        data = self.take() if self.body else b""
        return data[:limit] if limit else data

    def release(self) -> None:
        """Back to the pool if its answer was read to its end (or is `whole`, once its last bytes
        come); closed otherwise, which tells the backend to stop."""
        reusable = self.keep_alive and not self.closed and self.error is None
        if self.state == "done" and reusable:
            self.state, self.collect = "idle", False
            self.take()  # anything unread goes, and reading resumes if it was paused
            self.pool.put(self)
        elif self.whole and reusable and self.state in ("chunked", "trailer"):
            self.drain = True
            self.take()
            self.drain_timer = self.pool.loop.call_later(BACKEND_DRAIN_SECONDS, self.end_drain)
        else:
            self.close()

    def end_drain(self) -> None:
        """The drain's time is up: close the connection instead of reusing it."""
        self.drain_timer = None
        if self.drain:  # the last bytes never came
            self.drain = False
            self.close()

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.close()


def is_address(host: str) -> bool:
    """Whether a host is an IP address (one address to connect to), not a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False  # a name, or an IPv6 address with a zone, which the resolver reads
    return True


async def open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A TCP socket connected to host:port, racing a name's IPv6 and IPv4 addresses (RFC 8305)."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    sock = await aiohappyeyeballs.start_connection(
        infos, happy_eyeballs_delay=BACKEND_HAPPY_EYEBALLS_DELAY, loop=loop
    )
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # requests go out whole, at once
    return sock


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy that https connections are tunnelled through (CONNECT)."""

    host: str
    port: int
    authorization: str | None  # a Proxy-Authorization value, from the proxy URL's user:password


def https_proxy(proxies: dict[str, str]) -> Proxy | None:
    """The proxy for https backends from HTTPS_PROXY (or https_proxy), the way curl reads it."""
    url = proxies.get("https")
    if not url:
        return None
    parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
    try:
        port = parts.port or 80
    except ValueError:
        port = 0
    if parts.scheme != "http" or not parts.hostname or not port:
        raise BackendHTTPError(  # its value may hold a password: not shown
            "cannot use HTTPS_PROXY: expected http://[user:password@]host:port"
        )
    authorization = None
    if parts.username is not None:
        credentials = urllib.parse.unquote(f"{parts.username}:{parts.password or ''}").encode()
        authorization = "Basic " + binascii.b2a_base64(credentials, newline=False).decode()
    return Proxy(parts.hostname, port, authorization)


async def open_tunnel(
    loop: asyncio.AbstractEventLoop, proxy: Proxy, host: str, port: int
) -> socket.socket:
    """A socket connected to host:port through the proxy's CONNECT tunnel."""
    sock = await open_socket(loop, proxy.host, proxy.port)
    try:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        head += f"User-Agent: {BACKEND_USER_AGENT}\r\n"
        if proxy.authorization:
            head += f"Proxy-Authorization: {proxy.authorization}\r\n"
        await loop.sock_sendall(sock, (head + "\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:  # nothing follows it before the TLS handshake
            data = await loop.sock_recv(sock, 4096)
            if not data or len(answer) > BACKEND_HEAD_MAX:
                raise BackendHTTPError(f"the proxy {proxy.host} gave no tunnel to {authority}")
            answer += data
        status = answer.split(b"\r\n", 1)[0].decode("latin-1")
        if status[9:12] != "200" or not answer.endswith(b"\r\n\r\n"):
            raise BackendHTTPError(
                f"the proxy {proxy.host} refused a tunnel to {authority}: {status[:100]}"
            )
    except BaseException:
        sock.close()
        raise
    return sock


def keepalive_seconds(origin: Origin) -> float:
    """How long an idle connection to this origin may be reused."""
    return BACKEND_TLS_KEEPALIVE_SECONDS if origin[0] == "https" else BACKEND_KEEPALIVE_SECONDS


@functools.cache
def tls_context() -> ssl.SSLContext:
    """Certificates for https backends, made on first use: the system's, plus certifi's bundle
    for a one-file build whose OpenSSL cannot find the system's (on another OS or distro)."""
    context = ssl.create_default_context()
    with contextlib.suppress(ImportError, OSError):
        import certifi

        context.load_verify_locations(certifi.where())
    return context


class BackendPool:
    """Every connection to every backend; idle ones kept per origin, newest reused first."""

    def __init__(self, connect_timeout: float, tls: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.tls = tls  # for https backends; None: the system's certificates (tls_context)
        self.loop = asyncio.get_running_loop()
        self.idle: dict[Origin, collections.deque[BackendConnection]] = {}
        self.open: set[BackendConnection] = set()
        self.closing = False
        # HTTPS_PROXY for https backends (clouds), except hosts NO_PROXY names; http backends,
        # the local servers, are reached directly. Read once, as Nexus starts.
        self.proxies = urllib.request.getproxies_environment()
        self.proxy_error: BackendHTTPError | None = None
        try:
            self.https_proxy = https_proxy(self.proxies)
        except BackendHTTPError as exc:  # every https connection says so
            self.https_proxy, self.proxy_error = None, exc

    async def request(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes = b"",
        keep_alive: bool = True,
    ) -> BackendConnection:
        """Send a request; the connection carrying its answer, once the answer's head is in."""
        origin, data = encode_request(method, url, headers, body, keep_alive)
        conn = self.reuse(origin) if keep_alive else None
        if conn is None:
            conn = await self.connect(origin)
        await conn.send(data)  # once: a failure is the attempt's, however soon it comes
        return conn

    async def fetch(
        self, method: str, url: str, headers: dict[str, str], body: bytes = b"", limit: int = 0
    ) -> tuple[int, bytes]:
        """A poll's whole answer (its first `limit` bytes) on a connection closed after it."""
        conn = await self.request(method, url, headers, body, keep_alive=False)
        try:
            return conn.status, await conn.read(limit)
        finally:
            conn.close()

    async def fetch_then(
        self,
        url: str,
        then: str,
        headers: dict[str, str],
        limit: int,
        grace: float,
        pipelined: bool = True,
    ) -> tuple[tuple[int, bytes], tuple[int, bytes] | Exception | None]:
        """Two GETs' answers on one connection, the second sent with the first (pipelined) or
        after its answer: its failure returned, None when past `grace`. A timer, not
        asyncio.wait_for, bounds the second: a task of its own would cost more than the read."""
        origin, data = encode_request("GET", url, headers, b"", True)
        then_data = encode_request("GET", then, headers, b"", False)[1]
        conn = await self.connect(origin)
        conn.pipelined = pipelined
        try:
            await conn.send(data + then_data if pipelined else data)
            first = conn.status, await conn.read(limit)
        finally:
            reusable = conn.complete and conn.keep_alive and not conn.closed
            if not reusable:
                conn.close()
        if not reusable:  # a server that keeps no connection: asked again on one of its own
            try:
                second = self.fetch("GET", then, headers, limit=limit)
                return first, await asyncio.wait_for(second, grace)
            except TimeoutError:
                return first, None
            except (OSError, BackendHTTPError) as exc:
                return first, exc
        deadline = self.loop.time() + grace
        timer = self.loop.call_at(deadline, conn.close)
        try:
            await (conn.follow() if pipelined else conn.send(then_data))
            return first, (conn.status, await conn.read(limit))
        except (OSError, BackendHTTPError) as exc:
            return first, None if self.loop.time() >= deadline else exc
        finally:
            timer.cancel()
            conn.close()

    def reuse(self, origin: Origin) -> BackendConnection | None:
        """An idle connection to the origin that is still fresh, or None."""
        idle = self.idle.get(origin)
        if not idle:
            return None
        oldest = self.loop.time() - keepalive_seconds(origin)
        while idle:
            conn = idle.pop()
            if conn.idle_since < oldest:  # the rest are older still
                for stale in (conn, *idle):
                    stale.close()
                idle.clear()
            elif not conn.closed and conn.keep_alive and not conn.transport.is_closing():  # type: ignore[union-attr]
                return conn
        return None

    def put(self, conn: BackendConnection) -> None:
        """Keep a connection whose answer ended cleanly, for the origin's next request."""
        now = self.loop.time()
        conn.idle_since = now
        idle = self.idle.get(conn.origin)
        if idle is None:
            idle = self.idle[conn.origin] = collections.deque()
        while idle and now - idle[0].idle_since > keepalive_seconds(conn.origin):
            idle.popleft().close()  # the oldest, idle past its keep-alive limit
        idle.append(conn)

    async def connect(self, origin: Origin) -> BackendConnection:
        """Open a new connection to an origin (through HTTPS_PROXY for https when set)."""
        scheme, host, port = origin
        tls = (self.tls or tls_context()) if scheme == "https" else None
        factory = functools.partial(BackendConnection, self, origin)
        try:
            async with asyncio.timeout(self.connect_timeout):
                proxy = self.proxy_for(origin)
                if proxy is None and is_address(host):  # nothing to race: the loop's own connect
                    _, conn = await self.loop.create_connection(factory, host, port, ssl=tls)
                else:
                    if proxy is None:
                        sock = await open_socket(self.loop, host, port)
                    else:
                        sock = await open_tunnel(self.loop, proxy, host, port)
                    try:
                        _, conn = await self.loop.create_connection(
                            factory, sock=sock, ssl=tls, server_hostname=host if tls else None
                        )
                    except BaseException:
                        sock.close()
                        raise
        except TimeoutError:
            raise BackendConnectTimeout(
                f"timed out connecting ({self.connect_timeout:g} s, server.connect_timeout_seconds)"
            ) from None
        except OSError as exc:  # refused, unreachable, no such host, certificate refused
            why = str(exc.strerror or exc)  # in the same words whichever event loop runs
            if isinstance(exc, ConnectionRefusedError):
                why = "connection refused"
            elif isinstance(exc, socket.gaierror):
                why = f"no such host ({why})"
            raise BackendHTTPError(f"could not connect: {why}") from None
        if self.closing:  # Nexus stopped while this connection was being made
            conn.close()
            raise BackendHTTPError("Nexus is shutting down")
        self.open.add(conn)
        return conn

    def proxy_for(self, origin: Origin) -> Proxy | None:
        if origin[0] != "https":
            return None
        if self.proxy_error is not None:
            raise self.proxy_error
        if self.https_proxy is None:
            return None
        bypass = urllib.request.proxy_bypass_environment(origin[1], self.proxies)
        return None if bypass else self.https_proxy

    def close(self) -> None:
        self.closing = True
        for conn in list(self.open):
            conn.close()
        self.idle.clear()


class SseLines:
    """The non-blank lines of an SSE body as they arrive, read a network block at a time."""

    __slots__ = ("content", "lines", "partial")

    def __init__(self, content: BackendConnection) -> None:
        self.content = content
        self.lines: collections.deque[bytes] = collections.deque()
        self.partial = b""

    def buffered(self) -> bytes | None:
        """The next line if it has arrived already, else None."""
        return self.lines.popleft() if self.lines else None

    async def readline(self) -> bytes:
        """The next line (without its end), waiting for it; b"" at the end of the body."""
        while not self.lines:
            block = await self.content.readany()
            if not block:
                line, self.partial = self.partial.strip(), b""
                return line
            parts = (self.partial + block).split(b"\n") if self.partial else block.split(b"\n")
            self.partial = parts.pop()
            self.lines.extend(line for line in parts if line and line != b"\r")
        return self.lines.popleft()


# ==============================================================================================
# Backend adapters
# Owns: every quirk of every backend type: where its model list and health live, how its
# capabilities and context lengths are reported, which headers it needs.
# Must not: make routing decisions. The router sees only Backend and Model.
# ==============================================================================================

JSON_HEADERS = {"Content-Type": "application/json"}
DONE_EVENT = b"data: [DONE]\n\n"  # the end of an OpenAI-style event stream
ENDPOINT_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
POLL_MAX_BODY = 32 * 1024 * 1024  # a poll's answer cut here fails as not JSON, not as memory


class BackendReplyError(Exception):
    """A backend answered a poll with a status or body that is not what its type sends."""


def status_problem(status: int, path: str) -> str:
    """A poll's answer that is not 200, as the reason a backend is down."""
    if status in (401, 403):
        return f"HTTP {status} on {path}: a key is missing or refused (api_key_env)"
    if status in (404, 405):
        return f"HTTP {status} on {path}: not an LLM server (or not of its configured type)"
    return f"HTTP {status} on {path}"


def json_answer(status: int, answer: bytes, path: str) -> Any:
    """A backend's JSON answer from `path`; any other answer raises."""
    if status != 200:
        raise BackendReplyError(status_problem(status, path))
    try:
        return json.loads(answer)
    except ValueError:
        raise BackendReplyError(f"not an LLM server: {path} answered something not JSON") from None


async def fetch_json(
    pool: BackendPool, method: str, url: str, headers: dict[str, str], payload: Any = None
) -> Any:
    """Send a request to a backend and return its JSON answer; any other answer raises."""
    body = b""
    if payload is not None:
        body, headers = json.dumps(payload).encode(), {**headers, **JSON_HEADERS}
    status, answer = await pool.fetch(method, url, headers, body, limit=POLL_MAX_BODY)
    return json_answer(status, answer, urllib.parse.urlsplit(url).path)


def positive_int(value: Any) -> int | None:
    """A value when it is a positive int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def object_of(value: Any) -> dict[str, Any]:
    """The value if it is a JSON object, else an empty one (a field of the wrong shape)."""
    return value if isinstance(value, dict) else {}


def listed_models(data: Any, path: str) -> dict[str, dict[str, Any]]:
    """The entries of an OpenAI-style model list (from `path`) by id; an answer with none raises."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BackendReplyError(f"not an LLM server: {path} has no data list")
    entries = (entry for entry in data["data"] if isinstance(entry, dict))
    return {entry["id"]: entry for entry in entries if isinstance(entry.get("id"), str)}


def models_from_openai_list(data: Any) -> dict[str, Model]:
    """Models from an OpenAI-style `/v1/models` answer, with whatever context length it gives."""
    models = {}
    for name, entry in listed_models(data, "/v1/models").items():
        context = (
            positive_int(entry.get("max_model_len"))
            or positive_int(entry.get("context_length"))
            or positive_int(entry.get("context_window"))
            or positive_int(object_of(entry.get("meta")).get("n_ctx_train"))
        )
        models[name] = Model(id=name, context_length=context)
    return models


class OpenAICompatibleAdapter:
    """Any server that speaks OpenAI's API: `/v1/models` is both its health and its model list."""

    stream_usage = False  # it honours stream_options.include_usage, so Nexus can count tokens
    # Whether requests and answers are translated (another API than OpenAI's): then the adapter
    # has answer() and error_body() too. When not, the proxy relays bytes as they are.
    translates = False
    api = "openai"  # the API the backend speaks
    health_path = ""  # where the type says it is up (200) before its model list is read
    models_path = "/v1/models"

    def headers(self, backend: Backend) -> dict[str, str]:
        """What every request and poll carries (a new dict): the Bearer key, if it has one."""
        key = os.environ.get(backend.api_key_env) if backend.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def request_body(self, payload: dict[str, Any]) -> bytes:
        return json.dumps(payload).encode()

    def stream_reader(self, content: BackendConnection, model: str) -> Any:
        """A stream's chat SSE lines: an SseLines, or a translator with its readline, buffered."""
        return SseLines(content)

    def url(self, backend: Backend, endpoint: str) -> str:
        return backend.url + ENDPOINT_PATHS[endpoint]

    async def check_health(self, pool: BackendPool, backend: Backend) -> None:
        """Fail unless the type's health endpoint, where it has one, answers 200."""
        if self.health_path:
            url = backend.url + self.health_path
            status, _ = await pool.fetch("GET", url, self.headers(backend), limit=POLL_MAX_BODY)
            if status != 200:
                raise BackendReplyError(status_problem(status, self.health_path))

    async def poll(self, pool: BackendPool, backend: Backend) -> dict[str, Model]:
        await self.check_health(pool, backend)
        url = backend.url + self.models_path
        return models_from_openai_list(await fetch_json(pool, "GET", url, self.headers(backend)))

    async def command(
        self, pool: BackendPool, backend: Backend, path: str, payload: Any, done: Iterable[str] = ()
    ) -> None:
        """POST a command (load, unload): not 200 fails in its words, unless a 400 in `done`."""
        headers = {**self.headers(backend), **JSON_HEADERS}
        url, body = backend.url + path, json.dumps(payload).encode()
        status, answer = await pool.fetch("POST", url, headers, body, limit=POLL_MAX_BODY)
        if status == 200:
            return
        why = answer[:200].decode("utf-8", "replace").strip() or "no reason given"
        with contextlib.suppress(ValueError, KeyError, TypeError):
            error = json.loads(answer)["error"]  # llama-server's is an object, Ollama's a string
            why = str((error.get("message") if isinstance(error, dict) else error) or why)
        if status == 400 and why in done:
            return
        raise BackendReplyError(f"{path} answered HTTP {status}: {why[:200]}")

    def manages_models(self, backend: Backend) -> bool:
        """Whether the backend's own API loads and unloads models (SPEC §5.1): then its adapter
        has loaded_models() (the bytes each model in memory holds), load() and unload()."""
        return False


class VllmAdapter(OpenAICompatibleAdapter):
    """vLLM: `/health` says it is up; `/v1/models` carries `max_model_len`."""

    stream_usage = True
    health_path = "/health"


class OpenAICloudAdapter(OpenAICompatibleAdapter):
    """OpenAI's API (or any cloud speaking it): Bearer key read from the environment."""

    stream_usage = True


def router_statuses(data: Any) -> dict[str, dict[str, Any]]:
    """Each model's status in a llama-server router's `/v1/models`; none from a server of one."""
    entries = object_of(data).get("data")
    return {
        e["id"]: e["status"]
        for e in (entries if isinstance(entries, list) else ())
        if isinstance(e, dict)
        and isinstance(e.get("id"), str)
        and isinstance(e.get("status"), dict)
    }


def router_loaded(data: Any) -> dict[str, int] | None:
    """The models a llama-server router runs (sizes unknown: 0); None from a server of one."""
    statuses = router_statuses(data)
    loaded = {model: 0 for model, status in statuses.items() if status.get("value") == "loaded"}
    return loaded if statuses else None


ROUTER_CHECK_SECONDS = 0.25  # how often a loading router model's status is read
ROUTER_DONE_ANSWERS = ("model is already running", "model is not running")


class LlamaCppAdapter(OpenAICompatibleAdapter):
    """llama.cpp's llama-server: `/health`, `/props` for `n_ctx` and modalities, `/v1/models`.
    In router mode (started without a model) it runs models on demand, told by `/models/load`."""

    stream_usage = True
    health_path = "/health"

    def manages_models(self, backend: Backend) -> bool:
        """Whether it is a llama-server in router mode (its last poll said what it runs)."""
        return backend.loaded is not None

    async def loaded_models(self, pool: BackendPool, backend: Backend) -> dict[str, int] | None:
        url = backend.url + "/v1/models"
        return router_loaded(await fetch_json(pool, "GET", url, self.headers(backend)))

    async def load(self, pool: BackendPool, backend: Backend, model: str, keep_alive: Any) -> None:
        """Ask the router to load a model and wait until its status says loaded."""
        await self.command(pool, backend, "/models/load", {"model": model}, ROUTER_DONE_ANSWERS)
        while True:  # the router starts the model's server; its status says how that went
            data = await fetch_json(pool, "GET", backend.url + "/v1/models", self.headers(backend))
            status = router_statuses(data).get(model, {})
            if status.get("value") == "loaded":
                return
            if status.get("failed"):
                raise BackendReplyError(f"the model's server exited ({status.get('exit_code')})")
            await asyncio.sleep(ROUTER_CHECK_SECONDS)

    async def unload(self, pool: BackendPool, backend: Backend, model: str) -> None:
        """Ask the router to unload a model ("not running" is done already)."""
        await self.command(pool, backend, "/models/unload", {"model": model}, ROUTER_DONE_ANSWERS)

    async def poll(self, pool: BackendPool, backend: Backend) -> dict[str, Model]:
        await self.check_health(pool, backend)
        props = await fetch_json(pool, "GET", backend.url + "/props", self.headers(backend))
        data = await fetch_json(pool, "GET", backend.url + "/v1/models", self.headers(backend))
        models = models_from_openai_list(data)
        backend.loaded = router_loaded(data)
        props = object_of(props)
        settings = object_of(props.get("default_generation_settings"))
        n_ctx = positive_int(props.get("n_ctx")) or positive_int(settings.get("n_ctx"))
        vision = object_of(props.get("modalities")).get("vision")
        for model in models.values():
            model.context_length = n_ctx or model.context_length
            if isinstance(vision, bool):
                model.vision = vision
        return models


class LmStudioAdapter(OpenAICompatibleAdapter):
    """LM Studio: `/api/v0/models` says each model's type (vlm), context, tool use and state."""

    async def poll(self, pool: BackendPool, backend: Backend) -> dict[str, Model]:
        data = await fetch_json(pool, "GET", backend.url + "/api/v0/models", self.headers(backend))
        entries = listed_models(data, "/api/v0/models")
        models = {}
        for name, entry in entries.items():
            caps = entry.get("capabilities")
            models[name] = Model(
                id=name,
                context_length=positive_int(entry.get("max_context_length")),
                vision=entry.get("type") == "vlm",
                tools=("tool_use" in caps) if isinstance(caps, list) else None,
            )
        # Each model's state, "loaded" or "not-loaded", where this LM Studio says.
        states = {e["id"]: e["state"] for e in entries.values() if isinstance(e.get("state"), str)}
        loaded = {model: 0 for model, state in states.items() if state == "loaded"}
        backend.loaded = loaded if states else None
        return models


OLLAMA_SHOWS_AT_ONCE = 8
# How long a poll waits for /api/ps once the model list is in: a slow one keeps the last known
# state, and never fails the poll.
OLLAMA_PS_GRACE_SECONDS = 1.0


class OllamaAdapter(OpenAICompatibleAdapter):
    """Ollama: models from `/api/tags`, each described once by `/api/show`, loaded in `/api/ps`."""

    stream_usage = True
    api = "ollama"  # its own API too: /api/* requests are sent to it as they are

    def manages_models(self, backend: Backend) -> bool:
        return True

    def __init__(self) -> None:
        self.details: dict[tuple[str, str, str], Model] = {}
        self.one_by_one: set[str] = set()  # servers (or proxies) that drop pipelined requests

    async def poll(self, pool: BackendPool, backend: Backend) -> dict[str, Model]:
        """The model list (/api/tags, /api/show), and /api/ps after it into `backend.loaded`."""
        reads = backend.loaded_reads
        pipelined = backend.url not in self.one_by_one
        tags, ps = await pool.fetch_then(
            backend.url + "/api/tags",
            backend.url + "/api/ps",
            self.headers(backend),
            POLL_MAX_BODY,
            OLLAMA_PS_GRACE_SECONDS,
            pipelined,
        )
        if ps is None and pipelined:  # unanswered: asked after the list's answer from now on
            self.one_by_one.add(backend.url)
        path = urllib.parse.urlsplit(backend.url).path
        models = await self.models(pool, backend, json_answer(*tags, path + "/api/tags"))
        if ps is not None and backend.loaded_reads == reads:
            try:
                if isinstance(ps, Exception):
                    raise ps
                backend.loaded = self.loaded_in(ps, path)
            except (OSError, BackendHTTPError, BackendReplyError) as exc:  # it does not say: warm
                log.debug("backend %s: /api/ps: %r", backend.name, exc)
                backend.loaded = None
        return models

    async def loaded_models(self, pool: BackendPool, backend: Backend) -> dict[str, int] | None:
        """The models in memory, from /api/ps, with the bytes each holds."""
        url, headers = backend.url + "/api/ps", self.headers(backend)
        answer = await pool.fetch("GET", url, headers, limit=POLL_MAX_BODY)
        return self.loaded_in(answer, urllib.parse.urlsplit(backend.url).path)

    def loaded_in(self, answer: tuple[int, bytes], path: str) -> dict[str, int]:
        """The bytes each model in memory holds, by an /api/ps answer under the URL's `path`."""
        entries = self.entries(json_answer(*answer, path + "/api/ps"), "/api/ps: no models list")
        return {
            name: positive_int(entry.get("size_vram")) or positive_int(entry.get("size")) or 0
            for name, entry in entries.items()
        }

    @staticmethod
    def entries(data: Any, problem: str) -> dict[str, dict[str, Any]]:
        """The entries of an /api/tags or /api/ps answer by model name; `problem` if none."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise BackendReplyError(problem)
        entries = (entry for entry in data["models"] if isinstance(entry, dict))
        named = ((entry.get("model") or entry.get("name"), entry) for entry in entries)
        return {name: entry for name, entry in named if isinstance(name, str) and name}

    async def load(self, pool: BackendPool, backend: Backend, model: str, keep_alive: Any) -> None:
        """Load a model for keep_alive (0: unload it), by /api/generate with no prompt."""
        payload = {"model": model, "keep_alive": keep_alive, "stream": False}
        await self.command(pool, backend, "/api/generate", payload)

    async def unload(self, pool: BackendPool, backend: Backend, model: str) -> None:
        """Unload a model: load it for no time (keep_alive 0)."""
        await self.load(pool, backend, model, 0)

    async def models(self, pool: BackendPool, backend: Backend, data: Any) -> dict[str, Model]:
        """Ollama's models from its /api/tags answer, each described once by /api/show."""
        entries = self.entries(data, "not an LLM server: /api/tags has no models list")
        keys = {name: (backend.url, name, str(e.get("digest", ""))) for name, e in entries.items()}
        # Shows not known yet are asked in parallel, a few at a time: one after the other, an
        # Ollama with many models would not answer its first poll within the health timeout.
        limit = asyncio.Semaphore(OLLAMA_SHOWS_AT_ONCE)

        async def learn(key: tuple[str, str, str]) -> None:
            """Describe one model by /api/show and remember it by its digest."""
            async with limit:
                model = await self.show(pool, backend, key[1])
                model.size = positive_int(entries[key[1]].get("size"))  # one digest, one size
                self.details[key] = model

        shows = [asyncio.ensure_future(learn(k)) for k in set(keys.values()) - self.details.keys()]
        try:
            await asyncio.gather(*shows)
        finally:  # one failed (or the poll timed out): the others stop with the poll
            for show in shows:
                show.cancel()
        return {name: self.details[key] for name, key in keys.items()}

    async def show(self, pool: BackendPool, backend: Backend, name: str) -> Model:
        """One model's context length and capabilities, from /api/show."""
        url, headers = backend.url + "/api/show", self.headers(backend)
        try:
            info = object_of(await fetch_json(pool, "POST", url, headers, {"model": name}))
        except BackendReplyError:
            return Model(id=name)
        model_info = object_of(info.get("model_info"))
        lengths = (value for key, value in model_info.items() if key.endswith(".context_length"))
        model = Model(id=name, context_length=positive_int(next(lengths, None)))
        caps = info.get("capabilities")
        if isinstance(caps, list):
            model.vision = "vision" in caps
            model.tools = "tools" in caps
        return model


ANTHROPIC_VERSION = "2023-06-01"
ANTHROPIC_DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; a chat request may omit it
# Fields a chat request may carry that mean the same in a Messages request.
ANTHROPIC_NATIVE_FIELDS = ("top_p", "top_k", "metadata", "thinking", "service_tier")
# tool_choice in chat's words and in Anthropic's (whose choices are {"type": ...} objects).
TOOL_CHOICE_PAIRS = (("auto", "auto"), ("required", "any"), ("none", "none"))
# Chat's finish_reason and Anthropic's stop_reason for the same ending, both ways: the first
# pair that names a reason says what it becomes in the other API.
STOP_REASON_PAIRS = (
    ("stop", "end_turn"),
    ("stop", "stop_sequence"),
    ("stop", "pause_turn"),
    ("length", "max_tokens"),
    ("length", "model_context_window_exceeded"),
    ("tool_calls", "tool_use"),
    ("function_call", "tool_use"),
    ("content_filter", "refusal"),
)
FINISH_REASONS = {stop: finish for finish, stop in reversed(STOP_REASON_PAIRS)}
STOP_REASONS = {finish: stop for finish, stop in reversed(STOP_REASON_PAIRS)}


def add_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Append blocks to Anthropic's turns, merging into the last turn when the role repeats."""
    if not blocks:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def anthropic_image(url: Any, index: int) -> dict[str, Any]:
    """An OpenAI image_url as an Anthropic image block: base64 data URLs or plain URLs."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"messages[{index}]: image_url needs a url", "messages")
    if not url.startswith("data:"):
        return {"type": "image", "source": {"type": "url", "url": url}}
    head, _, data = url.partition(",")
    if not data or ";base64" not in head:
        raise bad_request(f"messages[{index}]: expected a base64 data URL", "messages")
    source = {"type": "base64", "media_type": head[5:].split(";")[0], "data": data}
    return {"type": "image", "source": source}


def anthropic_blocks(content: Any, index: int) -> list[dict[str, Any]]:
    """Chat message content (a string or parts) as Messages blocks, but empty text (refused)."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    blocks = []
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            blocks.append(anthropic_image(url, index))
        else:
            what = f"messages[{index}]: content of type {kind!r}"
            raise bad_request(f"{what} cannot be sent to an anthropic backend", "messages")
    return blocks


def tool_arguments(arguments: Any) -> dict[str, Any]:
    """A tool call's arguments (a JSON string in chat) as an object; malformed ones become {}."""
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments)
    except (TypeError, ValueError):  # no arguments, or not JSON
        return {}
    return value if isinstance(value, dict) else {}


def new_block_id(prefix: str) -> str:
    """A fresh random id with a prefix, for blocks and messages Nexus names itself."""
    return prefix + os.urandom(12).hex()


def tool_use_block(call: Any) -> dict[str, Any] | None:
    """A chat tool call as an Anthropic tool_use block (its id kept); None if it is no call."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return None
    function = call["function"]
    return {
        "type": "tool_use",
        "id": call.get("id") or new_block_id("toolu_"),
        "name": function.get("name") or "",
        "input": tool_arguments(function.get("arguments")),
    }


def chat_call(call_id: str | None, name: str, arguments: Any) -> dict[str, Any]:
    """A tool call as a chat assistant message carries it, its arguments as JSON text."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_tool_call(block: dict[str, Any], arguments: str) -> dict[str, Any]:
    """An Anthropic tool_use block as a chat tool call (its id kept) with these arguments."""
    return chat_call(block.get("id") or new_block_id("toolu_"), block.get("name") or "", arguments)


def anthropic_tool(tool: Any) -> dict[str, Any]:
    """An OpenAI function tool as an Anthropic tool (name, description, input_schema)."""
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request("tools: each tool needs a function with a name", "tools")
    out: dict[str, Any] = {
        "name": function["name"],
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if isinstance(function.get("description"), str):
        out["description"] = function["description"]
    return out


def tool_choice_for(api: str, choice: Any) -> Any:
    """A tool_choice in `api`'s terms ("anthropic" or "chat") from the other API's (None: none)."""
    if choice is None:
        return None
    if api == "anthropic":
        for chat, anthropic in TOOL_CHOICE_PAIRS:
            if choice == chat:
                return {"type": anthropic}
        if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            return {"type": "tool", "name": choice["function"].get("name", "")}
        raise bad_request("tool_choice: expected auto, required, none or a function", "tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    for chat, anthropic in TOOL_CHOICE_PAIRS:
        if kind == anthropic:
            return chat
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request("tool_choice: expected auto, any, none or tool (with a name)", "tool_choice")


def chat_to_anthropic(chat: dict[str, Any]) -> dict[str, Any]:
    """A chat request as a Messages request: system messages in `system`, turns of a role merged."""
    max_tokens = chat.get("max_completion_tokens") or chat.get("max_tokens")
    max_tokens = max_tokens or ANTHROPIC_DEFAULT_MAX_TOKENS
    out: dict[str, Any] = {"model": chat["model"], "max_tokens": max_tokens}
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(chat["messages"]):
        role = message.get("role")
        blocks = anthropic_blocks(message.get("content"), i)
        if role in ("system", "developer"):
            system.extend(block["text"] for block in blocks if "text" in block)
        elif role == "tool":
            call_id = str(message.get("tool_call_id") or "")
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
            if blocks:
                result["content"] = blocks
            add_turn(turns, "user", [result])
        elif role == "assistant":
            calls = map(tool_use_block, message.get("tool_calls") or ())
            add_turn(turns, "assistant", blocks + [block for block in calls if block is not None])
        else:
            add_turn(turns, "user", blocks)
    if system:
        out["system"] = "\n\n".join(system)
    out["messages"] = turns
    if isinstance(chat.get("stream"), bool):
        out["stream"] = chat["stream"]
    temperature = chat.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        out["temperature"] = min(float(temperature), 1.0)  # OpenAI's scale goes to 2, this to 1
    stop = chat.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if isinstance(stop, list) and stop:
        out["stop_sequences"] = stop
    out.update({name: chat[name] for name in ANTHROPIC_NATIVE_FIELDS if name in chat})
    if isinstance(chat.get("user"), str) and "metadata" not in out:
        out["metadata"] = {"user_id": chat["user"]}
    tools = chat.get("tools")
    if tools:
        out["tools"] = [anthropic_tool(tool) for tool in tools]
        choice = tool_choice_for("anthropic", chat.get("tool_choice"))
        if chat.get("parallel_tool_calls") is False:
            choice = dict(choice or {"type": "auto"}, disable_parallel_tool_use=True)
        if choice is not None:
            out["tool_choice"] = choice
    return out


def anthropic_to_chat(message: dict[str, Any]) -> dict[str, Any]:
    """A Messages answer as a chat completion (thinking as reasoning_content)."""
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            reasoning.append(block["thinking"])
        elif kind == "tool_use":
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            calls.append(chat_tool_call(block, arguments))
    content = "".join(texts) or (None if calls else "")
    reply: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning:
        reply["reasoning_content"] = "".join(reasoning)
    if calls:
        reply["tool_calls"] = calls
    finish = FINISH_REASONS.get(message.get("stop_reason"), "stop")
    chat: dict[str, Any] = {
        "id": str(message.get("id") or new_block_id("msg_")),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": message.get("model") or "",
        "choices": [{"index": 0, "message": reply, "finish_reason": finish}],
    }
    usage = usage_from(message.get("usage"))
    if usage is not None:
        chat["usage"] = usage.as_chat()
    return chat


class AnthropicStream:
    """A Messages event stream read as chat-completion SSE lines by SseLines' readline() and
    buffered(), so the proxy relays it like any other; an error event is a broken connection."""

    def __init__(self, content: BackendConnection, model: str) -> None:
        self.content = SseLines(content)
        self.pending: collections.deque[bytes] = collections.deque()
        self.id = new_block_id("msg_")
        self.model = model
        self.created = int(time.time())
        self.tools: dict[int, int] = {}  # content block index -> tool call index
        self.usage: dict[str, Any] = {}
        self.done = False

    async def readline(self) -> bytes:
        """The next chat SSE line, translated from Anthropic's events; b"" at the end."""
        while not self.pending:
            if self.done:
                return b""
            line = await self.content.readline()
            if not line:
                return b""
            if not line.startswith(b"data:"):
                continue  # event names, blank separators
            try:
                event = json.loads(line[5:])
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            chunks = self.feed(event)
            self.pending.extend(b"data: " + json.dumps(c).encode() + b"\n" for c in chunks)
            if self.done:
                self.pending.append(DONE_EVENT)
        return self.pending.popleft()

    def buffered(self) -> bytes | None:
        return self.pending.popleft() if self.pending else None

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The chat chunks one Anthropic stream event becomes."""
        kind = event.get("type")
        index = event.get("index") if isinstance(event.get("index"), int) else 0
        if kind == "message_start":
            message = object_of(event.get("message"))
            self.id = str(message.get("id") or self.id)
            self.model = str(message.get("model") or self.model)
            self.usage.update(object_of(message.get("usage")))
            return [self.chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            block = object_of(event.get("content_block"))
            if block.get("type") == "tool_use":
                position = self.tools.setdefault(index, len(self.tools))
                call = {"index": position, **chat_tool_call(block, "")}
                return [self.chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self.chunk({"content": block["text"]})]
            return []
        if kind == "content_block_delta":
            delta = object_of(event.get("delta"))
            if delta.get("type") == "text_delta":
                return [self.chunk({"content": delta.get("text", "")})]
            if delta.get("type") == "input_json_delta":
                position = self.tools.get(index, 0)
                call = {"index": position, "function": {"arguments": delta.get("partial_json")}}
                return [self.chunk({"tool_calls": [call]})]
            if delta.get("type") == "thinking_delta":
                return [self.chunk({"reasoning_content": delta.get("thinking", "")})]
            return []
        if kind == "message_delta":
            self.usage.update(object_of(event.get("usage")))
            reason = object_of(event.get("delta")).get("stop_reason")
            return [self.chunk({}, FINISH_REASONS.get(str(reason), "stop"))]
        if kind == "message_stop":
            self.done = True
            usage = usage_from(self.usage)
            if usage is None:
                return []
            return [{**self.chunk({}), "choices": [], "usage": usage.as_chat()}]
        if kind == "error":
            message = object_of(event.get("error")).get("message")
            raise BackendHTTPError(str(message or "the stream reported an error"))
        return []  # ping, content_block_stop, and events added to the API later


class AnthropicAdapter(OpenAICompatibleAdapter):
    """Anthropic's Messages API, chat translated both ways; health is the model list (no tokens)."""

    translates = True
    stream_usage = True  # every Messages stream reports usage
    api = "anthropic"
    models_path = "/v1/models?limit=1000"  # the list is paged, 20 by default

    def headers(self, backend: Backend) -> dict[str, str]:
        key = os.environ.get(backend.api_key_env, "")
        return {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}

    def url(self, backend: Backend, endpoint: str) -> str:
        """The Messages endpoint; other endpoints are a 400."""
        if endpoint != "chat":
            message = f"Backend {backend.name} (anthropic) serves chat completions only."
            raise NexusError.of(400, "unsupported_endpoint", message)
        return backend.url + "/v1/messages"

    def request_body(self, payload: dict[str, Any]) -> bytes:
        return json.dumps(chat_to_anthropic(payload)).encode()

    def answer(self, parsed: dict[str, Any]) -> dict[str, Any]:
        return anthropic_to_chat(parsed)

    def error_body(self, answer: bytes) -> bytes:
        """A 4xx answer as the client will get it: OpenAI's error envelope, its message kept."""
        try:
            error = json.loads(answer)["error"]
            message = str(error.get("message") or "the backend refused the request")
        except (ValueError, KeyError, TypeError, AttributeError):  # not an error document
            return answer
        envelope = {"message": message, "type": error.get("type"), "param": None, "code": None}
        return json.dumps({"error": envelope}).encode()

    def stream_reader(self, content: BackendConnection, model: str) -> AnthropicStream:
        return AnthropicStream(content, model)


ADAPTERS: dict[str, OpenAICompatibleAdapter] = {
    "generic": OpenAICompatibleAdapter(),
    "exo": OpenAICompatibleAdapter(),
    "vllm": VllmAdapter(),
    "llamacpp": LlamaCppAdapter(),
    "lmstudio": LmStudioAdapter(),
    "ollama": OllamaAdapter(),
    "openai": OpenAICloudAdapter(),
    "anthropic": AnthropicAdapter(),
}


# ==============================================================================================
# Health
# Owns: the per-backend state machine (unknown -> healthy/unhealthy, thresholds against
# flapping) and the poll loop that refreshes status and model lists.
# Must not: spend tokens. Polls use model-list and health endpoints only.
# ==============================================================================================

# user:password@ of a URL a backend's error text repeats (Nexus refuses such URLs itself).
URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s@]*@")
# Polls in flight at once: any home lab in one round, yet not a thousand connections at once.
POLLS_AT_ONCE = 64


def record_success(backend: Backend, settings: HealthSettings) -> None:
    """Count a good poll: unknown turns healthy, unhealthy after recovery_threshold of them."""
    backend.fail_streak = 0
    backend.ok_streak += 1
    if backend.status == "unhealthy" and backend.ok_streak < settings.recovery_threshold:
        return
    if backend.status != "healthy":
        log.info("backend %s is healthy", backend.name)
        backend.status = "healthy"


def record_failure(backend: Backend, settings: HealthSettings, reason: str) -> None:
    """Count a failed poll: unknown turns unhealthy, healthy after failure_threshold of them."""
    backend.ok_streak = 0
    backend.fail_streak += 1
    # Shown without a URL's credentials or the backend's own key, whatever the failure repeated.
    shown = URL_CREDENTIALS.sub("", reason)
    secret = os.environ.get(backend.api_key_env) if backend.api_key_env else None
    backend.last_error = shown.replace(secret, "[redacted]") if secret else shown
    if backend.status == "healthy" and backend.fail_streak < settings.failure_threshold:
        return
    if backend.status != "unhealthy":
        log.warning("backend %s is unhealthy: %s", backend.name, backend.last_error)
        backend.status = "unhealthy"


def describe_failure(exc: BaseException) -> str:
    """Why a poll or a request failed, in the words /v1/backends and the dashboard show."""
    if isinstance(exc, BackendConnectTimeout):
        return "timed out connecting"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, BackendHTTPError | BackendReplyError):
        return str(exc)[:200]
    return f"{type(exc).__name__}: {exc}"[:200]


async def poll_backend(app: web.Application, backend: Backend) -> None:
    """One health poll: the type's own endpoints, bounded by the health timeout."""
    settings = app[SETTINGS].health_check
    try:
        async with asyncio.timeout(settings.timeout_seconds):
            models = await ADAPTERS[backend.type].poll(app[CLIENT], backend)
    except Exception as exc:  # any failure of a poll is the backend's, never Nexus's
        record_failure(backend, settings, describe_failure(exc))
        return
    if backend.name in app[REGISTRY].backends:
        app[REGISTRY].set_models(backend, models)
    record_success(backend, settings)


async def first_poll(app: web.Application, backend: Backend) -> None:
    """A new backend's first poll (its models); without health checks it is trusted as healthy."""
    await poll_backend(app, backend)
    if not app[SETTINGS].health_check.enabled:
        backend.status = "healthy"


async def health_loop(app: web.Application) -> None:
    """Poll every backend once per interval, in parallel. A poll never outlives its timeout."""
    interval = app[SETTINGS].health_check.interval_seconds
    slots = asyncio.Semaphore(POLLS_AT_ONCE)

    async def poll(backend: Backend) -> None:
        async with slots:
            await poll_backend(app, backend)

    while True:
        await asyncio.gather(*(poll(backend) for backend in app[REGISTRY].backends.values()))
        app[BACKGROUND]["next_health_check"] = time.monotonic() + interval
        await asyncio.sleep(interval)


# ==============================================================================================
# Discovery
# Owns: finding backends without configuration (mDNS browsing, probing well-known local
# ports), announcing this Nexus, and adding, keeping and (after the grace period) removing
# discovered backends.
# Must not: slow start-up, change static or admin backends, or add a Nexus (itself or another).
# ==============================================================================================

MDNS_SERVICE_TYPES = ("_ollama._tcp.local.", "_llm._tcp.local.")
NEXUS_SERVICE_TYPE = "_llm._tcp.local."
NEXUS_TYPE = "nexus"  # TXT type of a Nexus announcement, and what detection says of a Nexus
MDNS_RESOLVE_TIMEOUT_MS = 3000
MDNS_STOP_TIMEOUT_SECONDS = 3.0
TXT_VALUE_MAX = 255  # one TXT string holds at most 255 bytes; anything longer is garbage
# Ollama, LM Studio, llama.cpp, vLLM, exo: what a server there is gets detected, not assumed.
LOCAL_PORTS = (11434, 1234, 8080, 8000, 52415)
EXO_PORT = 52415
PROBE_TIMEOUT_SECONDS = 1.0
PROBE_MAX_BODY = 4 * 1024 * 1024
ProbeAnswer = tuple[int, dict[str, Any]]  # a status and the JSON object answered (else {})


async def probe_json(pool: BackendPool, url: str, timeout: float) -> ProbeAnswer | None:
    """GET url within timeout: its status and JSON object (or {}); None if nothing answered."""
    try:
        async with asyncio.timeout(timeout):
            status, body = await pool.fetch("GET", url, {}, limit=PROBE_MAX_BODY)
    except (BackendHTTPError, TimeoutError, ValueError) as exc:
        log.debug("probe %s: %s", url, describe_failure(exc))
        return None
    with contextlib.suppress(ValueError):  # a page, garbage or a cut-off body: not JSON
        answer = json.loads(body)
        if isinstance(answer, dict):
            return status, answer
    return status, {}


def answered_list(answer: ProbeAnswer | None, key: str) -> bool:
    """Whether a probe's answer was a 200 JSON object holding a list under `key`."""
    return answer is not None and answer[0] == 200 and isinstance(answer[1].get(key), list)


async def is_nexus(pool: BackendPool, url: str, timeout: float) -> bool:
    """Whether a Nexus answers at url: its `/health` has Nexus's fields."""
    health = await probe_json(pool, url + "/health", timeout)
    return health is not None and {"version", "backends"} <= health[1].keys()


async def detect_backend_type(
    pool: BackendPool, url: str, timeout: float = PROBE_TIMEOUT_SECONDS
) -> str | None:
    """What answers at url (a server's root): a backend type, "nexus", or None if no LLM server.
    Each probe is bounded by timeout; when nothing answers the first, the search ends."""
    on_exo_port = urllib.parse.urlsplit(url).port == EXO_PORT
    if not on_exo_port:  # exo also speaks other dialects; on its own port it is exo
        answer = await probe_json(pool, url + "/api/tags", timeout)
        if answer is None:
            return None
        if answered_list(answer, "models"):  # a Nexus answers Ollama's API too
            return NEXUS_TYPE if await is_nexus(pool, url, timeout) else "ollama"
        answer = await probe_json(pool, url + "/props", timeout)
        if answer is not None and "default_generation_settings" in answer[1]:
            return "llamacpp"
        if answered_list(await probe_json(pool, url + "/api/v0/models", timeout), "data"):
            return "lmstudio"
    answer = await probe_json(pool, url + "/v1/models", timeout)
    if not answered_list(answer, "data"):
        return None
    if await is_nexus(pool, url, timeout):
        return NEXUS_TYPE
    if on_exo_port:
        return "exo"
    entries = [e for e in answer[1]["data"] if isinstance(e, dict)]
    return "vllm" if any("max_model_len" in e for e in entries) else "generic"


def txt_text(service: str, properties: dict[bytes, bytes | None], key: str) -> str | None:
    """One TXT value as clean text, or None when missing or garbage (logged, never raised)."""
    raw = properties.get(key.encode())
    if raw is None:
        return None
    text = ""
    with contextlib.suppress(UnicodeDecodeError):
        text = raw.decode("utf-8").strip() if len(raw) <= TXT_VALUE_MAX else ""
    if not text or not text.isprintable():
        log.debug("mDNS service %r: TXT %s %r ignored", service, key, raw[:40])
        return None
    return text


def clean_api_path(service: str, value: str | None) -> str:
    """TXT `api_path` as a plain URL path without a trailing slash; "" for the root or garbage."""
    if value is None:
        return ""
    if not value.startswith("/") or "//" in value or any(c in value for c in " ?#%\\@"):
        log.debug("mDNS service %r: TXT api_path %r ignored", service, value)
        return ""
    return value.rstrip("/")


def service_host(info: AsyncServiceInfo) -> str | None:
    """Where to reach a resolved service: IPv4 first, then a routable IPv6 address."""
    if v4 := info.parsed_addresses(IPVersion.V4Only):
        return v4[0]
    for text in info.parsed_addresses(IPVersion.V6Only):
        # A link-local IPv6 address needs an interface scope that URLs carry badly.
        if not ipaddress.IPv6Address(text).is_link_local:
            return f"[{text}]"
    return None


def announce_addresses(host: str) -> list[str]:
    """IPv4 addresses to announce this Nexus at: the bound one, or every non-loopback one."""
    if host not in ("0.0.0.0", "", "::"):
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return []
        return [host] if address.version == 4 and not address.is_loopback else []
    ipv4 = (ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4)
    return sorted({ip for ip in ipv4 if not ipaddress.IPv4Address(ip).is_loopback})


def unique_name(base: str, taken: Container[str]) -> str:
    """base, or the first of base-2, base-3, ... that is not taken."""
    if base not in taken:
        return base
    return next(f"{base}-{n}" for n in itertools.count(2) if f"{base}-{n}" not in taken)


@dataclass(slots=True)
class MdnsService:
    """What one mDNS announcement says: its instance name, where it answers, its TXT type."""

    name: str
    url: str
    type_hint: str | None


@dataclass(eq=False, repr=False)
class MdnsDiscovery:
    """Browses mDNS for LLM servers, reports what comes and goes, and announces this Nexus.
    On zeroconf's defaults (every interface, IPv4); a Nexus (TXT type=nexus) is never reported."""

    on_found: Callable[[str, str, str | None], Awaitable[None]]
    on_lost: Callable[[str], None]
    announce_port: int
    announce_host: str
    services: dict[str, MdnsService] = field(default_factory=dict)  # by full mDNS name
    resolving: dict[str, asyncio.Task] = field(default_factory=dict)  # by full mDNS name
    zeroconf: AsyncZeroconf | None = None
    browser: AsyncServiceBrowser | None = None
    own: AsyncServiceInfo | None = None

    async def start(self) -> None:
        """Browse, then announce (which takes a second of mDNS probing). Failures only log."""
        try:
            self.zeroconf = AsyncZeroconf()
        except (OSError, RuntimeError) as exc:  # RuntimeError: no interface to listen on
            log.warning("mDNS discovery unavailable: %s", exc)
            return
        self.browser = AsyncServiceBrowser(
            self.zeroconf.zeroconf, list(MDNS_SERVICE_TYPES), handlers=[self.on_change]
        )
        await self.announce()

    async def stop(self) -> None:
        """Stop browsing, withdraw the announcement, close the sockets."""
        for task in self.resolving.values():
            task.cancel()
        self.resolving.clear()
        if self.zeroconf is None:
            return
        if self.browser is not None:
            await self.browser.async_cancel()
        await self.zeroconf.async_close()  # also says goodbye for our announcement
        self.zeroconf = None

    async def announce(self) -> None:
        """Announce this Nexus by mDNS on the machine's non-loopback IPv4 addresses."""
        addresses = announce_addresses(self.announce_host)
        if not addresses:
            log.debug("not announcing Nexus by mDNS: no non-loopback IPv4 address")
            return
        instance = f"Nexus on {socket.gethostname()}"[:63]
        info = AsyncServiceInfo(
            NEXUS_SERVICE_TYPE,
            f"{instance}.{NEXUS_SERVICE_TYPE}",
            port=self.announce_port,
            properties={"type": NEXUS_TYPE, "api_path": "/v1", "version": __version__},
            parsed_addresses=addresses,
        )
        self.own = info  # before registering: our own announcement may be seen at once
        try:
            # A second Nexus with the same host name becomes "Nexus on host (2)".
            await self.zeroconf.async_register_service(info, allow_name_change=True)
        except (NonUniqueNameException, OSError) as exc:
            log.warning("could not announce Nexus by mDNS: %s", exc)
            self.own = None
            return
        log.info("announcing Nexus by mDNS as %r on port %d", info.name, self.announce_port)

    def on_change(
        self, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        """Zeroconf's callback: resolve a service that appeared, lose one that left."""
        if self.own is not None and name.lower() == self.own.name.lower():
            log.debug("mDNS service %r is this Nexus; skipped", name)
            return
        if (previous := self.resolving.pop(name, None)) is not None:
            previous.cancel()
        if state_change is ServiceStateChange.Removed:
            self.lose(name)
            return
        task = asyncio.create_task(self.resolve(service_type, name))
        self.resolving[name] = task
        task.add_done_callback(lambda done: self.resolved(name, done))

    def resolved(self, name: str, task: asyncio.Task) -> None:
        """A resolve task is done: forget it, and log what it failed with."""
        if self.resolving.get(name) is task:
            del self.resolving[name]
        if not task.cancelled() and task.exception() is not None:
            log.warning("mDNS service %r: %s", name, describe_failure(task.exception()))

    async def resolve(self, service_type: str, name: str) -> None:
        """Resolve a service to an address and port, and report what it is."""
        assert self.zeroconf is not None
        if name in self.services:
            instance = self.services[name].name
        else:  # the instance part of the name, made unique when another type announces it too
            taken = {s.name for s in self.services.values()}
            instance = unique_name(name.removesuffix("." + service_type), taken)
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self.zeroconf.zeroconf, MDNS_RESOLVE_TIMEOUT_MS):
            log.debug("mDNS service %r did not resolve in time; ignored", instance)
            return
        props = info.properties if isinstance(info.properties, dict) else {}
        type_hint = (txt_text(instance, props, "type") or "").lower() or None
        if type_hint == NEXUS_TYPE:
            log.debug("mDNS service %r is a Nexus; not a backend", instance)
            self.lose(name)  # in case it served as a backend before
            return
        if type_hint is not None and type_hint not in LOCAL_TYPES:
            log.debug("mDNS service %r: unknown TXT type %r ignored", instance, type_hint)
            type_hint = None
        if type_hint is None and service_type == "_ollama._tcp.local.":
            type_hint = "ollama"
        host = service_host(info)
        if host is None or not info.port:
            log.debug("mDNS service %r has no usable address or port; ignored", instance)
            return
        api_path = clean_api_path(instance, txt_text(instance, props, "api_path"))
        service = MdnsService(instance, f"http://{host}:{info.port}{api_path}", type_hint)
        await self.report(name, service)

    async def report(self, name: str, service: MdnsService) -> None:
        """Report a service that is new or changed. It counts as reported only once on_found
        returns: cancelled midway (the name changed again), the next event reports it anew."""
        if self.services.get(name) != service:
            await self.on_found(service.name, service.url, service.type_hint)
            self.services[name] = service

    def lose(self, name: str) -> None:
        """A service left: report its backend as lost."""
        service = self.services.pop(name, None)
        if service is not None:
            log.debug("mDNS service %r left", service.name)
            self.on_lost(service.name)


async def cancel_all(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel the tasks and wait until each has ended (how it ended is not raised here)."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def log_task_failure(task: asyncio.Task) -> None:
    """Log a discovery task that died of an exception (a cancelled one is no failure)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("discovery stopped", exc_info=task.exception())


class Discovery:
    """Keeps discovered backends in the registry: what mDNS and probing find, once checked to be
    an LLM server and not a Nexus (a static or admin backend's URL is left to it). One that
    vanishes turns unknown, and is removed after the grace period unless it comes back first."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        server = app[SETTINGS].server
        self.names: dict[str, str] = {}  # name as reported (mDNS instance, probed URL) -> backend
        self.probed: set[str] = set()  # reported names that came from probing (their URLs)
        self.unverified: dict[str, tuple[str, str | None]] = {}  # did not answer: retried
        self.removals: dict[str, asyncio.Task] = {}  # backend name -> its pending removal
        self.tasks: list[asyncio.Task] = []
        self.mdns = MdnsDiscovery(self.found, self.lost, server.port, server.host)

    def start(self) -> None:
        """Start mDNS and probing as background tasks: nothing here waits on the network."""
        self.tasks = [asyncio.create_task(job) for job in (self.mdns.start(), self.probe_loop())]
        for task in self.tasks:
            task.add_done_callback(log_task_failure)

    async def stop(self) -> None:
        """Cancel probing and pending removals, then stop mDNS (browsing and the announcement)."""
        await cancel_all(self.tasks + list(self.removals.values()))
        try:
            async with asyncio.timeout(MDNS_STOP_TIMEOUT_SECONDS):
                await self.mdns.stop()
        except TimeoutError:
            log.warning("mDNS did not stop within %gs", MDNS_STOP_TIMEOUT_SECONDS)

    async def probe_loop(self) -> None:
        """Probe the well-known local ports at start, then once per health interval."""
        while True:
            try:
                await self.probe_round()
            except Exception:  # a bug in one round must not end probing for good
                log.exception("probing local ports failed")
            await asyncio.sleep(self.app[SETTINGS].health_check.interval_seconds)

    async def probe_round(self) -> None:
        """Probe the local ports but Nexus's own: add what answers (not a Nexus), lose the rest."""
        # Backends that are up are not probed again; a probed one down and silent has vanished.
        backends = self.app[REGISTRY].backends.values()
        settled = {b.url for b in backends if b.status != "unhealthy" and not b.lost_at}
        own_port = self.app[SETTINGS].server.port
        urls = [f"http://127.0.0.1:{port}" for port in LOCAL_PORTS if port != own_port]
        urls = [url for url in urls if url not in settled]
        kinds = await asyncio.gather(*(detect_backend_type(self.app[CLIENT], u) for u in urls))
        found = set()
        for url, kind in zip(urls, kinds, strict=True):
            if kind == NEXUS_TYPE:
                log.debug("probe: %s is a Nexus; not a backend", url)
            elif kind is not None:
                found.add(url)
                await self.add(url, url, kind, f"local-{kind}")
                self.probed.add(url)
        for url in self.probed - found - settled:
            self.lost(url)
        for name, (url, type_hint) in list(self.unverified.items()):
            await self.found(name, url, type_hint)

    async def found(self, name: str, url: str, type_hint: str | None) -> None:
        """A server announced itself as name at url: check what it is, then add it."""
        self.unverified.pop(name, None)
        try:
            url = normalise_url(url)
        except ValueError as exc:
            log.debug("discovered %r: %s; ignored", name, exc)
            return
        if await self.update_existing(name, url):
            return
        kind = await detect_backend_type(self.app[CLIENT], url)
        if kind is None:
            log.debug("discovered %r at %s is not an LLM server (yet); ignored", name, url)
            self.unverified[name] = (url, type_hint)
            return
        if kind == NEXUS_TYPE:
            log.debug("discovered %r at %s is a Nexus; not a backend", name, url)
            return
        # The announced type is trusted where detection can only say "OpenAI-compatible".
        await self.add(name, url, type_hint if kind == "generic" and type_hint else kind, name)

    async def update_existing(self, name: str, url: str) -> bool:
        """Whether url is a backend already (or one removed through the admin API, which stays
        removed), bringing that backend up to date."""
        registry = self.app[REGISTRY]
        mapped = self.names.get(name)
        previous = registry.backends.get(mapped) if mapped is not None else None
        if mapped is not None and previous is None:
            log.debug("discovered %r at %s was removed through the admin API; skipped", name, url)
            return True
        if previous is not None and previous.source == "discovered" and previous.url != url:
            log.info("backend %s moved from %s to %s", previous.name, previous.url, url)
            registry.remove(previous.name)  # moved: replaced by what is added next
            del self.names[name]
        backend = registry.find_url(url)
        if backend is None:
            return False
        if backend.source != "discovered":
            log.debug("discovered %r at %s is already backend %s; skipped", name, url, backend.name)
        elif backend.status == "unknown" and not self.app[SETTINGS].health_check.enabled:
            await first_poll(self.app, backend)  # its first poll was cut short: no other comes
        elif backend.lost_at is not None:
            self.names[name] = backend.name
            backend.lost_at = None
            if (removal := self.removals.pop(backend.name, None)) is not None:
                removal.cancel()
            log.info("backend %s is back", backend.name)
            await first_poll(self.app, backend)
        return True

    async def add(self, name: str, url: str, kind: str, wanted: str) -> None:
        """Add a discovered server as a backend under a unique name, and poll it at once."""
        registry = self.app[REGISTRY]
        if await self.update_existing(name, url):  # it may have been added while detection ran
            return
        # A name safe in headers, logs and URLs.
        safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in wanted)
        unique = unique_name(safe.strip("-")[:63] or "backend", registry.backends)
        backend = Backend(name=unique, url=url, type=kind, source="discovered")
        registry.add(backend)
        self.names[name] = unique
        log.info("backend %s discovered (%s, %s)", unique, kind, url)
        await first_poll(self.app, backend)

    def lost(self, name: str) -> None:
        """What name reported has vanished: out of routing now, removed after the grace period."""
        self.unverified.pop(name, None)
        backend = self.app[REGISTRY].backends.get(self.names.get(name, ""))
        if backend is None or backend.source != "discovered" or backend.lost_at is not None:
            return
        grace = self.app[SETTINGS].discovery.grace_period_seconds
        backend.lost_at = time.time()
        backend.status = "unknown"
        backend.ok_streak = backend.fail_streak = 0
        log.info("backend %s vanished; removed in %gs unless it comes back", backend.name, grace)
        self.removals[backend.name] = asyncio.create_task(self.remove_later(backend, grace))

    async def remove_later(self, backend: Backend, grace: float) -> None:
        """After the grace period, remove a lost backend unless it came back."""
        await asyncio.sleep(grace)
        self.removals.pop(backend.name, None)
        registry = self.app[REGISTRY]
        if registry.backends.get(backend.name) is not backend or backend.lost_at is None:
            return
        if backend.status == "healthy":  # lost made it unknown: a health poll has answered since
            backend.lost_at = None
            log.info("backend %s is back", backend.name)
        else:
            registry.remove(backend.name)
            self.names = {key: name for key, name in self.names.items() if name != backend.name}
            log.info("backend %s removed: gone for %gs", backend.name, grace)


# ==============================================================================================
# Model lifecycle
# Owns: loading, unloading and migrating models on backends (SPEC §5.1): the operations that
# run in the background, one per model and backend at a time, bounded by
# [lifecycle] timeout_seconds; the VRAM headroom check; what routing is told meanwhile.
# Must not: pull or delete model files, or know a backend's API (its adapter loads and unloads).
# ==============================================================================================

OPERATIONS_KEPT = 256  # finished operations still answered at /v1/operations/{id}
LIFECYCLE_CHECK_SECONDS = 0.25  # how often /api/ps is read until it shows the new state
DRAIN_CHECK_SECONDS = 0.05  # how often a migration looks whether the source is idle
DEFAULT_KEEP_ALIVE = -1  # a model loaded through Nexus stays until it is unloaded
GIB = 1024**3


@dataclass(slots=True, eq=False)
class Operation:
    """One load, unload or migration: what it does, where it is, and why it failed if it did."""

    id: str
    kind: str  # load | unload | migrate
    model: str
    backend: str  # where the model is loaded or unloaded; a migration's target
    source: str | None = None  # a migration's source
    status: str = "in_progress"  # in_progress | completed | failed
    step: str = ""
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    held: list[tuple[Backend, str]] = field(default_factory=list)  # (backend, loading|draining)

    def backends(self) -> list[str]:
        """The backends the operation works on: the target, and a migration's source."""
        return [self.backend] if self.source is None else [self.source, self.backend]

    def public(self) -> dict[str, Any]:
        """What /v1/operations/{id} and the CLI show."""
        view: dict[str, Any] = {"operation_id": self.id, "type": self.kind, "model_id": self.model}
        if self.source is None:
            view["backend_id"] = self.backend
        else:
            view.update(source_backend_id=self.source, target_backend_id=self.backend)
        view.update(status=self.status, step=self.step, error=self.error)
        view["created_at"] = round(self.created, 3)
        view["finished_at"] = round(self.finished, 3) if self.finished is not None else None
        return view


OperationWork = Callable[[Operation], Awaitable[None]]  # what an operation does, step by step


def withhold(registry: Registry, backend: Backend, kind: str, model: str) -> None:
    """Tell routing the model is loading (`kind` "loading") or draining here."""
    current: frozenset[str] = getattr(backend, kind)
    if model not in current:
        setattr(backend, kind, current | {model})
        registry.moving += 1


def give_back(registry: Registry, backend: Backend, kind: str, model: str) -> None:
    """Undo withhold(): the backend is an ordinary candidate for the model again."""
    current: frozenset[str] = getattr(backend, kind)
    if model in current:
        setattr(backend, kind, current - {model})
        registry.moving -= 1


def op_fields(op: Operation) -> dict[str, Any]:
    """An operation's fields for a JSON log line."""
    return {"fields": {k: v for k, v in op.public().items() if v is not None}}


class Lifecycle:
    """The lifecycle operations: those running (one per model and backend at a time) and the
    last OPERATIONS_KEPT, each a task of its own bounded by the lifecycle timeout."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.operations: dict[str, Operation] = {}  # oldest first
        self.running: dict[tuple[str, str], Operation] = {}  # by (model, backend name)
        self.tasks: set[asyncio.Task] = set()

    def check_free(self, model: str, *backends: Backend) -> None:
        """409 when an operation on the model is running on one of the backends."""
        for backend in backends:
            if (busy := self.running.get((model, backend.name))) is not None:
                message = (
                    f"Operation {busy.id} ({busy.kind} of {model}) is still running on "
                    f"{backend.name}; wait for it (GET /v1/operations/{busy.id})."
                )
                context = {"operation_id": busy.id}
                raise NexusError.of(409, "operation_in_progress", message, context=context)

    def start(self, op: Operation, work: OperationWork, timeout: float) -> None:
        """Record an operation as running and start its work in the background."""
        for name in op.backends():
            self.running[op.model, name] = op
        self.operations[op.id] = op
        finished = [k for k, o in self.operations.items() if o.status != "in_progress"]
        for key in finished[: max(len(finished) - OPERATIONS_KEPT, 0)]:
            del self.operations[key]
        log.info("operation %s: %s of %s started", op.id, op.kind, op.model, extra=op_fields(op))
        task = asyncio.create_task(self.run(op, work, timeout))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, op: Operation, work: OperationWork, timeout: float) -> None:
        """Do an operation's work within its timeout, then free what it held and log its end."""
        try:
            async with asyncio.timeout(timeout) as limit:
                await work(op)
            op.status = "completed"
        except asyncio.CancelledError:
            op.error = f"{op.step}: Nexus stopped before it was done"
            raise
        except BackendReplyError as exc:  # the backend's own words
            op.error = f"{op.step}: {exc}"
        except Exception as exc:  # the backend's failure, told in the operation
            if isinstance(exc, TimeoutError) and limit.expired():
                op.error = f"{op.step}: not done within {timeout:g} s (lifecycle.timeout_seconds)"
            else:
                op.error = f"{op.step}: {describe_failure(exc)}"
        finally:
            if op.status == "in_progress":
                op.status = "failed"
            op.finished = time.time()
            for backend, kind in op.held:
                give_back(self.registry, backend, kind, op.model)
            op.held.clear()
            for name in op.backends():
                if self.running.get((op.model, name)) is op:
                    del self.running[op.model, name]
            took = op.finished - op.created
            what = f"operation {op.id}: {op.kind} of {op.model}"
            if op.status == "completed":
                log.info("%s completed in %.1f s", what, took, extra=op_fields(op))
            else:
                log.warning("%s failed after %.1f s: %s", what, took, op.error, extra=op_fields(op))

    async def stop(self) -> None:
        await cancel_all(self.tasks)


def lifecycle_backend(registry: Registry, name: Any, param: str) -> Backend:
    """The named backend, if its type can load and unload models: 404 / 501 otherwise."""
    if not isinstance(name, str) or not name:
        raise bad_request(f"{param} is required (a backend's name, as /v1/backends lists)", param)
    backend = registry.backends.get(name)
    if backend is None:
        known = ", ".join(sorted(registry.backends)[:50]) or "none"
        message = f"No backend {name!r}. Backends: {known}"
        raise NexusError.of(404, "backend_not_found", message, param=param)
    if not ADAPTERS[backend.type].manages_models(backend):
        message = (
            f"Backend {name} is of type {backend.type}, whose API offers no way to load or "
            "unload a model; Nexus does that on ollama backends and llama-servers in router "
            "mode (started without a model)."
        )
        raise NexusError.of(501, "lifecycle_unsupported", message, param=param)
    return backend


def lifecycle_model(backend: Backend, model: Any, aliases: dict[str, str]) -> str:
    """The model id on this backend (an alias leads to its model): 404 when it has no such
    model. Nexus never pulls one."""
    if not isinstance(model, str) or not model:
        raise bad_request("model_id is required", "model_id")
    model_id = resolve_alias(model, aliases)
    if model_id not in backend.models:
        message = (
            f"Backend {backend.name} has no model '{model}' (Nexus never pulls models: pull it "
            f"on the backend first). Its models: {', '.join(sorted(backend.models)) or 'none'}"
        )
        raise NexusError.of(404, "model_not_found", message, param="model_id")
    return model_id


def vram_missing(backend: Backend, model_id: str, headroom_percent: float) -> tuple[float, str]:
    """Bytes a load of the model would take out of the headroom, and why in words; 0 when it
    fits, is loaded already, or the backend declares no vram_gb."""
    if not backend.vram_gb or backend.is_warm(model_id):
        return 0.0, ""
    used = sum((backend.loaded or {}).values())
    used += sum(backend.models[m].size or 0 for m in backend.loading if m in backend.models)
    size = backend.models[model_id].size or 0
    total = backend.vram_gb * GIB
    free_after = total - used - size
    headroom = total * headroom_percent / 100
    if free_after >= headroom:
        return 0.0, ""
    missing = headroom - free_after
    why = (
        f"Loading {model_id} ({size / GIB:.1f} GB) on {backend.name} would leave "
        f"{max(free_after, 0) / GIB:.1f} GB of its {backend.vram_gb:g} GB free, less than the "
        f"{headroom_percent:g}% headroom ({headroom / GIB:.1f} GB): {missing / GIB:.1f} GB "
        f"missing. Unload a model there first."
    )
    return missing, why


async def read_loaded(app: web.Application, backend: Backend) -> None:
    """Read /api/ps into `backend.loaded`, counted so that an older poll's read leaves it be."""
    backend.loaded = await ADAPTERS[backend.type].loaded_models(app[CLIENT], backend)
    backend.loaded_reads += 1


async def refresh_loaded(app: web.Application, backend: Backend) -> None:
    """Read what the backend holds now (the last poll may be seconds old); kept as it was when
    the backend does not answer in time."""
    try:
        async with asyncio.timeout(app[SETTINGS].health_check.timeout_seconds):
            await read_loaded(app, backend)
    except Exception as exc:  # the operation itself will tell what is wrong with the backend
        log.debug("backend %s: /api/ps: %s", backend.name, describe_failure(exc))


async def until_state(app: web.Application, backend: Backend, model: str, loaded: bool) -> None:
    """Read /api/ps until it shows the model loaded (or gone), as routing will see it."""
    while True:
        await read_loaded(app, backend)
        if (backend.loaded is None or model in backend.loaded) == loaded:
            return
        await asyncio.sleep(LIFECYCLE_CHECK_SECONDS)


async def load_step(app: web.Application, op: Operation, backend: Backend, keep_alive: Any) -> None:
    """Load on the backend, which is no candidate for the model until /api/ps shows it."""
    op.step = f"loading on {backend.name}"
    await ADAPTERS[backend.type].load(app[CLIENT], backend, op.model, keep_alive)
    await until_state(app, backend, op.model, loaded=True)
    if (backend, "loading") in op.held:
        op.held.remove((backend, "loading"))
        give_back(app[REGISTRY], backend, "loading", op.model)


async def unload_step(app: web.Application, op: Operation, backend: Backend) -> None:
    """Unload from the backend and wait until /api/ps no longer shows it."""
    op.step = f"unloading from {backend.name}"
    await ADAPTERS[backend.type].unload(app[CLIENT], backend, op.model)
    await until_state(app, backend, op.model, loaded=False)


async def drain_step(app: web.Application, op: Operation, source: Backend, target: Backend) -> None:
    """Wait until the source has no request for the model in flight, sending it new ones only
    after every other candidate; a target that goes down meanwhile ends the migration."""
    op.step = f"waiting for {source.name} to finish its requests"
    withhold(app[REGISTRY], source, "draining", op.model)
    op.held.append((source, "draining"))
    while source.model_in_flight.get(op.model, 0):
        if target.status == "unhealthy":
            raise BackendReplyError(f"{target.name} went down; {source.name} keeps the model")
        await asyncio.sleep(DRAIN_CHECK_SECONDS)


def start_operation(
    app: web.Application,
    kind: str,
    model: str,
    target: Backend,
    source: Backend | None,
    work: OperationWork,
) -> Operation:
    """Begin an operation: a backend about to load the model stops being a candidate for it
    at once, before the task first runs."""
    source_name = source.name if source is not None else None
    op = Operation("op-" + os.urandom(8).hex(), kind, model, target.name, source_name)
    if kind != "unload" and not target.is_warm(model):
        withhold(app[REGISTRY], target, "loading", model)
        op.held.append((target, "loading"))
    app[LIFECYCLE].start(op, work, app[SETTINGS].lifecycle.timeout_seconds)
    return op


# ==============================================================================================
# The door interface and attempt outcomes
# Owns: what the proxy asks of every front door (OpenAIFormat, NativeStream), and what an
# attempt's outcome tells the backend's health, its latency averages and the session table.
# Must not: send anything; the proxy below does.
# ==============================================================================================

EMA_WEIGHT = 0.2  # of a new measure in a backend's latency and TTFT averages


class OpenAIFormat:
    """A front door: how the clients of one API are served, one instance per request (it may
    keep state across chunks). A backend that speaks the door's own API (native_api) is sent the
    client's own request (native_body, at native_path) and its answer goes back untranslated,
    through native_stream(). This base is OpenAI's chat API, also the internal request."""

    # Whether the usage chunk Nexus asked the backend for reaches chunk(); OpenAI's format strips
    # it for a client that did not ask, a translating format may need it (token counts).
    keeps_usage = False
    native_api: str | None = None
    native_path = ""
    content_type = "text/event-stream"  # a stream's: SSE, or NDJSON for Ollama's API
    prompt_param = "messages"  # the request field a too-long prompt's error names
    native_body: dict[str, Any]

    @staticmethod
    def chat_request(body: dict[str, Any]) -> dict[str, Any]:
        """The client's request as the internal chat request (a 400 names what is wrong)."""
        return body

    @staticmethod
    def error_document(error: NexusError) -> dict[str, Any]:
        """An error, before any answer began, as this API writes it."""
        return error.envelope()

    def body(self, answer: bytes, parsed: dict[str, Any]) -> bytes:
        """A whole chat answer in this door's shape."""
        return answer

    def chunk(self, data: bytes, chunk: dict[str, Any]) -> bytes:
        """One chat stream chunk in this door's stream."""
        return b"data: " + data + b"\n\n"

    def error(self, endpoint: str, model: str, message: str) -> bytes:
        """The last chunk of a stream Nexus had to cut: finish_reason "error" and the reason."""
        text = endpoint == "completions"
        choice: dict[str, Any] = {"index": 0, "text": ""} if text else {"index": 0, "delta": {}}
        choice["finish_reason"] = "error"
        chunk = {
            "id": "nexus-error",
            "object": "text_completion" if text else "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "error": {"message": message, "type": "backend_error", "code": "stream_interrupted"},
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def end(self) -> bytes:
        return DONE_EVENT

    def answer_usage(self, parsed: dict[str, Any]) -> Any:
        """A native whole answer's usage object (usage_from reads it)."""
        return parsed.get("usage")

    def native_stream(self) -> NativeStream:
        """A reader for one attempt's stream from a backend that speaks native_api."""
        raise NotImplementedError


class NativeStream:
    """One attempt's stream in the client's own API, from a backend that speaks it, relayed
    line by line; one per attempt, so a failed attempt leaves nothing for the next one."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] = {}  # as the stream's lines report it (usage_from reads it)
        self.failed = False  # the backend's own error was relayed: the stream's last word

    def line(self, line: bytes) -> tuple[bytes, str | None]:
        """The bytes to send for one line (b"" holds it back), and "end" when it ends the
        answer, "error" when the backend reported an error, else None."""
        raise NotImplementedError

    def error(self, endpoint: str, model: str, message: str) -> bytes:
        """The last words of a stream Nexus had to cut, in the API's own way."""
        raise NotImplementedError

    def end(self) -> bytes:
        """Nothing: the backend's own last line ended the stream."""
        return b""


def note_failure(flight: InFlight, why: str) -> None:
    """Count a failure against the backend: its errors, and its health when that is checked."""
    backend, health = flight.attempt.backend, flight.request.app[SETTINGS].health_check
    backend.errors += 1
    if health.enabled:
        record_failure(backend, health, why)


def attempt_failure(flight: InFlight, status: int, why: str) -> AttemptFailed:
    """Count a failed attempt against the backend's health and make the error it may end in."""
    note_failure(flight, why)
    kind = "timeout" if status == 504 else "backend_error"
    code = "backend_timeout" if status == 504 else "backend_failed"
    message = f"Backend {flight.attempt.backend.name} failed: {why}."
    return AttemptFailed(NexusError(status, kind, code, message), silent=status == 504)


def note_success(flight: InFlight) -> None:
    """A request served: the backend's latency and TTFT averages (from the attempt's send, not
    the request's arrival), its health, and the session's backend."""
    app, record, backend = flight.request.app, flight.record, flight.attempt.backend
    elapsed_ms = (time.perf_counter() - record.sent) * 1000
    ema = backend.latency_ema_ms
    backend.latency_ema_ms = elapsed_ms if ema is None else ema + EMA_WEIGHT * (elapsed_ms - ema)
    if record.ttft_ms is not None:  # the client's wait for the first byte, from its request
        ttft_ms = record.ttft_ms - (record.sent - record.started) * 1000
        ema = backend.ttft_ema_ms
        backend.ttft_ema_ms = ttft_ms if ema is None else ema + EMA_WEIGHT * (ttft_ms - ema)
    if app[SETTINGS].health_check.enabled:
        record_success(backend, app[SETTINGS].health_check)
    if record.session is not None:
        app[SESSIONS].note(record.session, backend.name, record.followed, time.monotonic())


# ==============================================================================================
# Cost settlement
# Owns: what an answer from a cloud backend cost: the usage it reported (or Nexus's own count of
# prompt and answer when it reported none) times the model's price, charged to the budget.
# Must not: decide prices or limits (Policy does) or keep any prompt or answer text.
# ==============================================================================================

UNPRICED_WARNED: set[str] = set()  # the models without a price already warned about


def note_usage(record: RequestRecord, usage: Any) -> None:
    """Note the token usage an answer reported on the request's record."""
    found = usage_from(usage)
    if found is not None:
        record.usage = found
        record.prompt_tokens = found.prompt or record.prompt_tokens
        record.completion_tokens = found.completion or record.completion_tokens


async def count_usage(flight: InFlight, answered: list[str] | None = None) -> TokenUsage:
    """Nexus's own count of the prompt and the texts answered so far, in the attempt's tokenizer."""
    encoding, _ = tokenizer_for(flight.attempt.backend.type, flight.attempt.model)
    texts, framing = payload_texts(flight.record.endpoint, flight.body)
    prompt = await count_texts_async(texts, encoding) + framing
    return TokenUsage(prompt, await count_texts_async(answered, encoding) if answered else 0)


def charge_cost(flight: InFlight, counted: TokenUsage | None) -> str:
    """Charge the usage (as Nexus `counted` it, if not reported) times the price to the budget."""
    record, model = flight.record, flight.attempt.model
    if counted is not None:
        record.usage = counted
        record.prompt_tokens, record.completion_tokens = counted.prompt, counted.completion
    app = flight.request.app
    price = price_for(model, app[BUDGET].prices)
    if price is None:
        if model not in UNPRICED_WARNED:
            UNPRICED_WARNED.add(model)
            log.warning(
                "no price for model %s: its cost is not counted against the budget; "
                "add it under [routing.budget] prices",
                model,
            )
        return "unknown"
    record.cost_usd = cost_usd(price, record.usage)
    app[BUDGET].charge(record.cost_usd)
    app[LEDGER].add(TOTAL_ROW, record.cost_usd, 0, 0)
    return format_usd(record.cost_usd)


async def prompt_cost(flight: InFlight) -> str:
    """A stream's cost header: its prompt's cost. The whole cost is charged when it ends."""
    price = price_for(flight.attempt.model, flight.request.app[BUDGET].prices)
    return "unknown" if price is None else format_usd(cost_usd(price, await count_usage(flight)))


async def settle_cost(flight: InFlight, answered: list[str]) -> str:
    """Charge what a cloud answer cost, counting its tokens when the backend reported none."""
    counted = None if flight.record.usage is not None else await count_usage(flight, answered)
    return charge_cost(flight, counted)


def settle_cost_now(flight: InFlight, answered: list[str]) -> None:
    """settle_cost without awaiting, for a stream its client left (the handler may be being
    cancelled): counted if the encoding is loaded already, else estimated from characters."""
    counted = None
    if flight.record.usage is None:
        encoding, _ = tokenizer_for(flight.attempt.backend.type, flight.attempt.model)
        texts, framing = payload_texts(flight.record.endpoint, flight.body)
        if encoding in _loaded_encodings:
            prompt = count_texts(texts, encoding) + framing
            counted = TokenUsage(prompt, count_texts(answered, encoding))
        else:
            prompt = sum(map(len, texts)) // CHARS_PER_TOKEN + framing
            counted = TokenUsage(prompt, answer_tokens(sum(map(len, answered))))
    charge_cost(flight, counted)


# ==============================================================================================
# Stream relay
# Owns: the one stream relay: a backend's stream to the client chunk by chunk as it arrives, in
# the client's API (written by its door), its waits bounded, and every stream ended honestly.
# Must not: retry once the first byte went out, or translate (doors and adapters do that).
# ==============================================================================================

NO_DELTA: dict[str, Any] = {}  # a chunk choice without a delta is well formed


async def start_stream(
    request: web.Request, headers: dict[str, str], content_type: str = "text/event-stream"
) -> web.StreamResponse:
    """Send a stream's status and headers; the chunks follow."""
    response = web.StreamResponse(status=200, headers=headers)
    response.content_type = content_type
    response.headers["Cache-Control"] = "no-cache"
    await response.prepare(request)
    request[STREAMING] = response
    return response


def chat_line(
    line: bytes,
    record: RequestRecord,
    fmt: OpenAIFormat,
    strip_usage: bool,
    local_model: str | None,
    answered: list[str] | None,
) -> tuple[bytes, str | None]:
    """One line of a chat stream as the door writes it (b"" for nothing: a separator, comment,
    malformed chunk or a usage chunk the client did not ask for), and "end" for [DONE],
    "finish" for the chunk with the finish reason, else None. Usage is noted on the way."""
    if not line.startswith(b"data:"):
        return b"", None  # blank separators, comments, event names
    data = line[5:].strip()
    if data == b"[DONE]":
        return b"", "end"
    try:
        chunk = parse_json(data)
    except ValueError:
        return b"", None  # a malformed chunk is dropped; the stream goes on
    # So is one of the wrong shape: the chunk, each choice and its delta must be objects.
    if type(chunk) is not dict:
        return b"", None
    choices = chunk.get("choices")
    if choices is not None and type(choices) is not list:
        return b"", None
    for choice in choices or ():
        if type(choice) is not dict or type(choice.get("delta", NO_DELTA)) is not dict:
            return b"", None
    usage = chunk.get("usage")
    if usage:
        note_usage(record, usage)
        if strip_usage:
            if not choices:
                return b"", None
            del chunk["usage"]
            data = b""
    if local_model is not None and chunk.get("model", local_model) != local_model:
        chunk["model"] = local_model  # the stream names the model that served
        data = b""
    if not data:
        data = json.dumps(chunk).encode()
    if answered is not None and choices:
        answered.extend(answer_texts(record.endpoint, chunk))
    finish = choices and choices[0].get("finish_reason")
    return fmt.chunk(data, chunk), "finish" if finish else None


async def next_stream_line(
    flight: InFlight, reader: Any, started: bool, limits: WaitLimits
) -> tuple[bytes, str]:
    """A stream's next line within its limits; at the end, b"" and why it ended early ("" for
    its plain end). Before anything was sent, a failure raises AttemptFailed instead, so the
    request may still be served by the next attempt."""
    until = limits.read_by() if started else limits.first_byte_by
    try:
        line = await limits.wait(reader.readline(), until)
    except TimeoutError:
        if not started:
            raise attempt_failure(flight, 504, "sent no data in time") from None
        if asyncio.get_running_loop().time() >= limits.deadline:
            return b"", "the request took longer than server.request_timeout_seconds"
        return b"", "the backend stalled"
    except BackendHTTPError as exc:
        if not started:
            raise attempt_failure(flight, 502, describe_failure(exc)) from None
        return b"", "the backend connection broke"
    if not line and not started:
        raise attempt_failure(flight, 502, "ended the stream before any data")
    return line, ""


async def end_stream(
    flight: InFlight,
    writer: OpenAIFormat | NativeStream,
    response: web.StreamResponse,
    answered: list[str] | None,
    problem: str,
    pending: list[bytes],
) -> bool:
    """A relayed stream's accounts and its last words, added to `pending`: its cost (a cut
    stream's too), then a success, or a failure the door's error ends. True once settled."""
    record, attempt = flight.record, flight.attempt
    if answered is not None:
        if pending:
            await response.write(b"".join(pending))
            pending.clear()
        await settle_cost(flight, answered)
    if problem:
        record.status = 502
        note_failure(flight, problem)
        pending.append(writer.error(record.endpoint, attempt.model, problem + "."))
    else:
        record.status = 200
        note_success(flight)
    pending.append(writer.end())
    return True


async def relay_stream(
    flight: InFlight, upstream: BackendConnection, headers: dict[str, str], limits: WaitLimits
) -> web.StreamResponse:
    """Relay a stream as it arrives, in the client's API (chat chunks written by its door, or a
    native backend's own lines). A failure may be retried elsewhere until the first byte is out;
    after it, Nexus ends the stream itself, the door's way."""
    request, record, attempt, fmt = flight.request, flight.record, flight.attempt, flight.fmt
    backend = attempt.backend
    adapter = ADAPTERS[backend.type]
    native = fmt.native_stream() if flight.native else None
    reader = SseLines(upstream) if flight.native else adapter.stream_reader(upstream, attempt.model)
    writer = native or fmt  # what writes the stream's last words
    answered: list[str] | None = [] if backend.is_cloud else None  # to count, if no usage
    local_model = None if backend.is_cloud else attempt.model  # what local chunks must name
    strip_usage = flight.strip_usage
    response: web.StreamResponse | None = None
    finished = settled = False
    problem = ""
    pending: list[bytes] = []  # chunks that arrived together go out in one write
    try:
        while not (native is not None and finished):
            line = reader.buffered()
            if line is None:
                if pending:
                    await response.write(b"".join(pending))  # type: ignore[union-attr]
                    pending.clear()
                line, problem = await next_stream_line(flight, reader, response is not None, limits)
            if not line:
                if not finished and not problem:
                    problem = "the backend ended the stream before the answer was complete"
                break
            if native is not None:
                out, kind = native.line(line)
            else:
                out, kind = chat_line(line, record, fmt, strip_usage, local_model, answered)
            if kind is not None:
                if kind == "error":
                    if response is None:
                        raise attempt_failure(flight, 502, "reported an error")
                    problem = "the backend reported an error mid-stream"
                finished = True
                upstream.whole = kind == "end"  # its connection may serve the next request
                if kind == "end" and native is None:
                    break  # [DONE]
            if not out:
                continue
            if response is None:
                record.ttft_ms = (time.perf_counter() - record.started) * 1000
                response = await start_stream(request, headers, fmt.content_type)
            pending.append(out)
        if native is not None:
            note_usage(record, native.usage)
        if response is None:  # [DONE] with no chunk at all: an empty answer, but an honest one
            response = await start_stream(request, headers, fmt.content_type)
        settled = await end_stream(flight, writer, response, answered, problem, pending)
        await response.write_eof(b"".join(pending))
    except ConnectionError:
        record.status = 499  # the client went away: the backend request ends with this one
        upstream.close()
        if response is None:
            raise
    except Exception:
        if response is None:
            raise  # nothing sent yet: the request ends in a plain error answer
        last_words = writer.error(record.endpoint, attempt.model, "Nexus hit an internal error.")
        pending += (last_words, writer.end())  # a bug met mid-stream: the stream ends honestly
        log.exception("unexpected error relaying a stream from %s", backend.name)
        record.status = 500
        with contextlib.suppress(ConnectionError):
            await response.write(b"".join(pending))
            await response.write_eof()
    finally:
        if answered is not None and response is not None and not settled:
            if native is not None:
                note_usage(record, native.usage)
            settle_cost_now(flight, answered)  # the client left: no await
    return response


# ==============================================================================================
# Proxy: queue and attempts
# Owns: a request from admission to its answer: its record, the wait for a slot, the attempts in
# routing's order, retries before the first byte, a whole answer or the hand-over to the relay.
# Must not: choose backends (routing did) or know backend quirks (adapters do).
# ==============================================================================================

# How each backend says a prompt (with max_tokens) is over its context, lower-cased; anything
# vaguer ("too long") also matches 400s about a field's length, which are the client's to fix.
CONTEXT_ERROR_MARKERS = (
    "context_length_exceeded",  # OpenAI's code
    "maximum context length",  # vLLM, OpenAI: "This model's maximum context length is 8192..."
    "exceeds the context window",  # OpenAI: "Your input exceeds the context window..."
    "exceed_context_size_error",  # llama.cpp server's type
    "exceeds the available context size",  # llama.cpp server's message
    "exceeds the context length",  # Ollama: "the input length exceeds the context length"
    "prompt is too long:",  # Anthropic: "prompt is too long: 208310 tokens > 200000 maximum"
)
# The sizes in the words of a too-long refusal: llama.cpp's, then OpenAI's and vLLM's.
CONTEXT_SIZE_PATTERNS = (
    re.compile(r"\((?P<prompt>\d+) tokens\) exceeds the available context size \((?P<context>\d+)"),
    re.compile(
        r"(?s)maximum context length is (?P<context>\d+) tokens.{0,40}?"
        r"requested (?P<prompt>\d+) tokens"
    ),
)
# Retries on the same backend (only when it is the only candidate) wait a little first; a
# 429's Retry-After is honoured up to a limit, a longer one sends the request elsewhere.
RETRY_BACKOFF_SECONDS = (0.25, 1.0)
MAX_RETRY_AFTER_SECONDS = 10.0
OPENAI_FORMAT = OpenAIFormat()  # the door of OpenAI's own API: bytes pass through


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(float(value), 0.0)
    with contextlib.suppress(TypeError, ValueError):
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    return None


def new_request_id() -> str:
    """A fresh request id, as X-Request-Id and the log line carry it."""
    return "req-" + os.urandom(8).hex()


def response_headers(flight: InFlight, budget: Budget) -> dict[str, str]:
    """The X-Nexus-* headers that tell a client which backend served, why, and the budget."""
    attempt, backend = flight.attempt, flight.attempt.backend
    headers = {
        "X-Request-Id": flight.record.id,
        "X-Nexus-Backend": backend.name,
        "X-Nexus-Backend-Type": "cloud" if backend.is_cloud else "local",
        "X-Nexus-Route-Reason": flight.reason,
        "X-Nexus-Privacy-Zone": backend.zone,
        "X-Nexus-Cost-Estimated": "0",
    }
    if attempt.fallback:
        headers["X-Nexus-Fallback-Model"] = attempt.model
    if attempt.max_tokens is not None:
        headers["X-Nexus-Max-Tokens-Clamped"] = str(attempt.max_tokens)
    if attempt.scrub:
        headers["X-Nexus-Context-Scrubbed"] = "true"
    if budget.enabled:
        headers["X-Nexus-Budget-Status"] = budget.status
    return headers


def is_context_error(status: int, text: str) -> bool:
    """Whether a backend's 400 or 413 says the prompt is over the model's context."""
    lowered = text.lower()
    return status in (400, 413) and any(marker in lowered for marker in CONTEXT_ERROR_MARKERS)


def backend_context_error(backend: Backend, text: str) -> NexusError:
    """A backend's own too-long refusal as the context error, with the sizes if it gave them."""
    how = f"as backend {backend.name} counted them"
    with contextlib.suppress(ValueError, AttributeError):
        error = object_of(json.loads(text).get("error"))
        prompt, context = error.get("n_prompt_tokens"), error.get("n_ctx")
        if isinstance(prompt, int) and isinstance(context, int):
            return context_length_exceeded(prompt, context, how, None)
    for pattern in CONTEXT_SIZE_PATTERNS:
        if match := pattern.search(text):
            return context_length_exceeded(int(match["prompt"]), int(match["context"]), how, None)
    return NexusError(400, "invalid_request_error", "context_length_exceeded", text[:500])


def scrubbed_user_turn(messages: list[Any]) -> list[Any]:
    """The last user turn of a Messages conversation that says something itself, without its
    tool results (the API refuses one without the assistant's tool_use it answers)."""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    for message in reversed(users):
        content = message.get("content")
        if not isinstance(content, list):
            return [message]  # plain text
        said = [b for b in content if not (isinstance(b, dict) and b.get("type") == "tool_result")]
        if said:
            return [dict(message, content=said)]
    return users[-1:]


def attempt_request(
    fmt: OpenAIFormat, endpoint: str, body: dict, raw: bytes, attempt: Attempt, ask_usage: bool
) -> tuple[str, bytes, bool]:
    """Where an attempt goes, what it sends, and whether natively (the client's own request); a
    NexusError when the backend's API cannot carry the request."""
    backend = attempt.backend
    adapter = ADAPTERS[backend.type]
    if fmt.native_api == adapter.api:
        native = dict(fmt.native_body, model=attempt.model)
        if attempt.scrub and isinstance(native.get("messages"), list):
            native["messages"] = scrubbed_user_turn(native["messages"])
        return backend.url + fmt.native_path, json.dumps(native).encode(), True
    changes = attempt.max_tokens is not None or ask_usage or attempt.scrub or adapter.translates
    if body["model"] == attempt.model and not changes:
        return adapter.url(backend, endpoint), raw, False  # the client's own bytes
    payload = dict(body, model=attempt.model)
    if attempt.max_tokens is not None:
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        payload[key] = attempt.max_tokens
    if ask_usage:
        payload["stream_options"] = dict(body.get("stream_options") or {}, include_usage=True)
    if attempt.scrub and isinstance(body.get("messages"), list):  # system prompt, last user turn
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        users = [m for m in messages if m.get("role") == "user"]
        payload["messages"] = [m for m in messages if m.get("role") in SYSTEM_ROLES] + users[-1:]
    return adapter.url(backend, endpoint), adapter.request_body(payload), False


class WaitQueue:
    """Requests waiting for a slot, in rank order (high priority, then first come). A freed slot
    wakes them all, in that order, to route again: the first to find one free takes it."""

    def __init__(self) -> None:
        self.waiting: list[tuple[tuple[int, int], asyncio.Event]] = []
        self.arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self.waiting)

    def join(self, high_priority: bool) -> tuple[tuple[int, int], asyncio.Event]:
        entry = ((0 if high_priority else 1, next(self.arrivals)), asyncio.Event())
        bisect.insort(self.waiting, entry, key=lambda e: e[0])
        return entry

    def leave(self, entry: tuple[tuple[int, int], asyncio.Event]) -> None:
        self.waiting.remove(entry)  # it got a slot or gave up

    def wake(self) -> None:
        for _, event in self.waiting:
            event.set()


def route_now(app: web.Application, needs: RequestNeeds) -> RouteDecision:
    """route(); a 503's eta_seconds is when health checks could find a down backend healthy."""
    registry, settings = app[REGISTRY], app[SETTINGS]
    try:
        return route(needs, registry, settings)
    except NexusError as error:
        health, next_check = settings.health_check, app[BACKGROUND].get("next_health_check")
        if error.code == "no_backend_available" and health.enabled and next_check is not None:
            chain = model_chain(needs.model, settings.routing)
            if any(b.status != "healthy" for m in chain for b in registry.by_model.get(m, ())):
                wait = max(next_check - time.monotonic(), 0.0)
                wait += (health.recovery_threshold - 1) * health.interval_seconds
                set_eta(error, max(math.ceil(wait), 1))
        raise


def queue_full(
    app: web.Application, needs: RequestNeeds, decision: RouteDecision, why: str
) -> NexusError:
    """The 503 for a request that found every candidate busy and could not wait."""
    # Its eta: the queue ahead, served at the candidates' pace.
    backends = {a.backend.name: a.backend for a in decision.attempts if not a.fallback}
    slots = sum(b.max_concurrent or 1 for b in backends.values())
    known = [b.latency_ema_ms for b in backends.values() if b.latency_ema_ms is not None]
    per_request = (min(known) / 1000.0) if known else 1.0
    busy = [
        {"backend": a.backend.name, "model": a.model, "failed": ["busy"]}
        for a in decision.attempts[:MAX_LISTED_SHORTFALLS]
        if not a.fallback
    ]
    message = f"Every backend serving model '{needs.model}' is at its max_concurrent and {why}."
    eta = max(math.ceil(per_request * (len(app[QUEUE]) + 1) / max(slots, 1)), 1)
    return unavailable(message, app[REGISTRY], busy, eta=eta)


async def plan_route(app: web.Application, needs: RequestNeeds, deadline: float) -> RouteDecision:
    """Route the request; while every candidate is at max_concurrent, wait in the queue (§3.6)."""
    decision = route_now(app, needs)
    if not decision.all_full:
        return decision
    settings, queue = app[SETTINGS], app[QUEUE]
    if not settings.queue.enabled:
        raise queue_full(app, needs, decision, "the queue is off (queue.enabled = false)")
    if len(queue) >= settings.queue.max_size:
        raise queue_full(app, needs, decision, "the queue is full")
    wait_until = min(asyncio.get_running_loop().time() + settings.queue.max_wait_seconds, deadline)
    entry = queue.join(needs.high_priority)
    try:
        while decision.all_full:
            entry[1].clear()
            try:
                async with asyncio.timeout_at(wait_until):
                    await entry[1].wait()
            except TimeoutError:
                raise queue_full(app, needs, decision, "no slot freed up in time") from None
            decision = route_now(app, needs)
    finally:
        queue.leave(entry)
    return decision


def follow_session(
    request: web.Request, record: RequestRecord, body: dict[str, Any], needs: RequestNeeds
) -> None:
    """Find the request's session (SPEC §3.7) and the backend of its last turn, for routing to
    keep; a model only one backend serves leaves nothing to choose, so nothing is noted."""
    app = request.app
    model = resolve_alias(needs.model, app[SETTINGS].routing.aliases)
    if len(app[REGISTRY].by_model.get(model, ())) < 2:
        return
    found = session_key(request.headers, body)
    if found is None:
        return
    record.session, follows = found
    if follows:
        needs.last_backend = app[SESSIONS].backend_of(record.session, time.monotonic())
        record.followed = needs.last_backend


async def plan_request(
    request: web.Request, endpoint: str, body: dict[str, Any], needs: RequestNeeds
) -> tuple[RequestRecord, RouteDecision, float]:
    """A request's record, admission, session and route (queued if need be), and its deadline."""
    app, settings = request.app, request.app[SETTINGS]
    record = RequestRecord(request[REQUEST_ID], needs.model, endpoint, time.perf_counter())
    request[RECORD] = record
    needs.flexible = request.headers.get("X-Nexus-Flexible", "").lower() == "true"
    needs.high_priority = request.headers.get("X-Nexus-Priority", "").lower() == "high"
    needs.budget_status = app[BUDGET].status
    await refine_prompt_tokens(endpoint, body, needs, app[REGISTRY], settings)
    admit_request(request, needs)
    if settings.routing.session_affinity and endpoint != "embeddings":
        follow_session(request, record, body, needs)
    deadline = asyncio.get_running_loop().time() + settings.server.request_timeout_seconds
    decision = allowed_attempts(request, await plan_route(app, needs, deadline), needs)
    return record, decision, deadline


def request_timed_out(limit: float) -> NexusError:
    """The 504 for a request past server.request_timeout_seconds."""
    message = f"The request took longer than {limit:g} s (server.request_timeout_seconds)."
    return NexusError(504, "timeout", "request_timeout", message)


class WaitLimits:
    """The limits on one attempt's waits for its backend (SPEC §3.5): the answer begins by
    first_byte_by, each later read comes within `idle`, nothing waits past the deadline. One
    timer serves every wait (asyncio.timeout would arm and cancel one per chunk)."""

    __slots__ = ("_late", "_loop", "_task", "_timer", "_until", "deadline", "first_byte_by", "idle")

    def __init__(self, first_byte_by: float, idle: float, deadline: float) -> None:
        self.first_byte_by, self.idle, self.deadline = first_byte_by, idle, deadline
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._until: float | None = None  # the current wait's limit; None between waits
        self._timer: asyncio.TimerHandle | None = None
        self._late = False  # the timer cancelled a wait past its limit

    def read_by(self) -> float:
        """When the next read of a begun answer must have come."""
        return min(self._loop.time() + self.idle, self.deadline)

    async def wait(self, awaitable: Awaitable[Any], until: float) -> Any:
        """The awaitable's result, or TimeoutError once `until` has passed."""
        self._until = until
        if self._timer is None or self._timer.when() > until:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(until, self._check)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._late:
                self._late = False
                if self._task is not None and self._task.uncancel() == 0:  # only ours
                    raise TimeoutError from None
            raise
        finally:
            self._until = None

    def _check(self) -> None:
        """The timer fired: cancel the wait that is past its limit, or re-arm."""
        self._timer = None
        if self._until is None:  # fired between waits: the next wait arms it again
            return
        if self._loop.time() < self._until:  # the limit moved on since the timer was armed
            self._timer = self._loop.call_at(self._until, self._check)
        elif self._task is not None:
            self._late = True
            self._task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def refusal_message(document: dict[str, Any], status: int) -> str:
    """The message of a backend's JSON error answer, wherever its API puts it."""
    error = document["error"]
    for message in (object_of(error).get("message"), error, document.get("message")):
        if isinstance(message, str):
            return message
    return f"The backend refused the request (HTTP {status})."


def upstream_error(flight: InFlight, upstream: BackendConnection, answer: bytes) -> web.Response:
    """A backend's error answer: 5xx and 429 are retried, context overruns fall back, other 4xx
    go back to the client untouched (in an error envelope when they are not a JSON error)."""
    app, backend = flight.request.app, flight.attempt.backend
    adapter = ADAPTERS[backend.type]
    status = upstream.status
    if adapter.translates:
        answer = adapter.error_body(answer)
    text = answer[:2000].decode("utf-8", "replace")
    if status >= 500:
        raise attempt_failure(flight, 502, f"answered HTTP {status}")
    if status == 429:  # alive but busy: not a health failure
        backend.errors += 1
        wait = retry_after_seconds(upstream.headers.get("retry-after"))
        message = f"Backend {backend.name} is rate limited; try again later."
        retry = {"Retry-After": str(math.ceil(wait)) if wait is not None else "1"}
        error = NexusError.of(429, "rate_limited", message, headers=retry)
        raise AttemptFailed(error, retry_after=wait)
    if is_context_error(status, text):
        raise AttemptFailed(backend_context_error(backend, text), skip_model=True)
    flight.record.status = status
    headers = response_headers(flight, app[BUDGET])
    parsed = None
    with contextlib.suppress(ValueError):  # a UnicodeDecodeError too
        parsed = json.loads(answer)
    if isinstance(parsed, dict) and "error" in parsed:
        message = refusal_message(parsed, status)
        mime = upstream.headers.get("content-type", "application/json").split(";")[0]
        response = web.Response(body=answer, status=status, headers=headers, content_type=mime)
    else:  # an HTML page or plain text is never handed to a client as it is (SPEC §4)
        message = text[:500]
        error = NexusError(status, "invalid_request_error", "backend_error", message)
        response = web.json_response(error.envelope(), status=status, headers=headers)
    nexus_headers = {k: v for k, v in headers.items() if k.startswith("X-Nexus-")}
    refusal = NexusError(status, "invalid_request_error", None, message, headers=nexus_headers)
    response[REFUSAL] = refusal
    return response


async def whole_answer(flight: InFlight, status: int, answer: bytes, headers: dict) -> web.Response:
    """A whole answer that succeeded, in the door's shape: usage noted, cost settled."""
    record, attempt, backend = flight.record, flight.attempt, flight.attempt.backend
    adapter = ADAPTERS[backend.type]
    try:
        parsed = parse_json(answer)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise attempt_failure(flight, 502, "answered something that is not JSON")
    if flight.native:
        note_usage(record, flight.fmt.answer_usage(parsed))
    else:
        if adapter.translates:
            parsed = adapter.answer(parsed)
            answer = json.dumps(parsed).encode()
        if not backend.is_cloud and parsed.get("model", attempt.model) != attempt.model:
            parsed["model"] = attempt.model  # the response names the model that served
            answer = json.dumps(parsed).encode()
        note_usage(record, parsed.get("usage"))
    if backend.is_cloud:
        texts = answer_texts(record.endpoint, parsed)
        headers["X-Nexus-Cost-Estimated"] = await settle_cost(flight, texts)
    note_success(flight)
    body = answer if flight.native else flight.fmt.body(answer, parsed)
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


async def send_attempt(flight: InFlight) -> web.StreamResponse:
    """One attempt on one backend, bounded by the first-byte limit until its answer begins."""
    app, record, attempt = flight.request.app, flight.record, flight.attempt
    backend = attempt.backend
    if (busy := backend_turn(backend, time.monotonic())) is not None:
        # Like the backend's own 429: a short wait is waited out when it is the only candidate.
        raise AttemptFailed(busy, retry_after=retry_after_seconds(busy.headers["Retry-After"]))
    headers = ADAPTERS[backend.type].headers(backend)
    headers.update(JSON_HEADERS)
    stream, deadline = flight.stream, flight.deadline
    server = app[SETTINGS].server
    first_byte_by = asyncio.get_running_loop().time() + server.first_byte_timeout_seconds
    limits = WaitLimits(min(first_byte_by, deadline), server.stream_idle_timeout_seconds, deadline)
    backend.in_flight += 1
    per_model = backend.model_in_flight  # what an unload or a migration waits for (§5.1)
    per_model[attempt.model] = per_model.get(attempt.model, 0) + 1
    backend.requests += 1
    record.backend = backend.name
    record.sent = time.perf_counter()
    upstream: BackendConnection | None = None
    try:
        try:
            # A non-streamed answer comes when it is done: only the request's limit bounds it.
            sending = app[CLIENT].request("POST", flight.url, headers, flight.payload)
            upstream = await limits.wait(sending, limits.first_byte_by if stream else deadline)
            if upstream.status >= 400 or not stream:
                reading = upstream.read()
                if not upstream.complete:  # else all of it came with the headers: no wait
                    reading = limits.wait(reading, limits.read_by() if stream else deadline)
                answer = await reading
        except TimeoutError:
            raise attempt_failure(flight, 504, "timed out before answering") from None
        except BackendHTTPError as exc:
            raise attempt_failure(flight, 502, describe_failure(exc)) from None
        if upstream.status >= 400:
            return upstream_error(flight, upstream, answer)
        out_headers = response_headers(flight, app[BUDGET])
        if not stream:
            return await whole_answer(flight, upstream.status, answer, out_headers)
        if backend.is_cloud:  # headers go before the answer: the prompt's cost, estimated
            out_headers["X-Nexus-Cost-Estimated"] = await prompt_cost(flight)
        return await relay_stream(flight, upstream, out_headers, limits)
    finally:
        limits.close()
        backend.in_flight -= 1
        per_model[attempt.model] -= 1
        if upstream is not None:
            upstream.release()  # an answer not read to its end closes its connection
        app[QUEUE].wake()


def retry_pause(flight: InFlight, failure: AttemptFailed, retries: int) -> float | None:
    """The pause before asking the same backend again, or None to go on: only for its model's
    only candidate, healthy, up to routing.max_retries times, if it ends before the deadline."""
    attempt = flight.attempt
    max_retries = flight.request.app[SETTINGS].routing.max_retries
    if not attempt.alone or attempt.backend.status != "healthy" or retries >= max_retries:
        return None
    pause = failure.retry_after
    if pause is None:
        pause = random.uniform(*RETRY_BACKOFF_SECONDS)
    return pause if asyncio.get_running_loop().time() + pause < flight.deadline else None


async def proxy(
    request: web.Request,
    endpoint: str,
    body: dict[str, Any],
    raw: bytes,
    needs: RequestNeeds,
    fmt: OpenAIFormat = OPENAI_FORMAT,
) -> web.StreamResponse:
    """Route a request and try its attempts in order until one answers (SPEC §3.5): before any
    byte reached the client a failure moves on to the next attempt or, see retry_pause, the
    same one again; a backend that stayed silent is not asked again."""
    loop = asyncio.get_running_loop()
    record, decision, deadline = await plan_request(request, endpoint, body, needs)
    stream = body.get("stream") is True and endpoint != "embeddings"
    options = body.get("stream_options")
    client_wants_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    failure: AttemptFailed | None = None
    skip_model: str | None = None
    passed_over: set[str] = set()  # backends not to ask again for this request
    tried = 0
    for attempt in decision.attempts:
        backend = attempt.backend
        if attempt.model == skip_model or backend.name in passed_over:
            continue
        if failure is not None and backend.status != "healthy":
            continue  # it went down while this request was on its way
        reason = decision.reason if attempt is decision.attempts[0] else "failover"
        record.route_reason = reason
        record.fallback = attempt.fallback
        ask_usage = stream and not client_wants_usage and ADAPTERS[backend.type].stream_usage
        try:  # a request this backend's API cannot carry: the next attempt may take it
            url, payload, native = attempt_request(fmt, endpoint, body, raw, attempt, ask_usage)
        except NexusError as error:
            failure = AttemptFailed(error)
            continue
        flight = InFlight(
            request=request,
            record=record,
            attempt=attempt,
            body=body,
            url=url,
            payload=payload,
            native=native,
            stream=stream,
            strip_usage=ask_usage and not fmt.keeps_usage,
            reason=reason,
            deadline=deadline,
            fmt=fmt,
        )
        retries = 0  # of this attempt, on the same backend
        while True:
            if loop.time() >= deadline:
                raise request_timed_out(request.app[SETTINGS].server.request_timeout_seconds)
            record.retries = tried  # the attempts after the first
            tried += 1
            try:
                return await send_attempt(flight)
            except AttemptFailed as exc:
                failure = exc
            if failure.skip_model:
                skip_model = attempt.model
                break
            if failure.silent or (failure.retry_after or 0) > MAX_RETRY_AFTER_SECONDS:
                passed_over.add(backend.name)
                break
            pause = retry_pause(flight, failure, retries)
            if pause is None:
                break
            retries += 1
            await asyncio.sleep(pause)
    assert failure is not None  # the first attempt is always tried
    if failure.error.code == "context_length_exceeded":
        failure.error.param = needs.prompt_param
    raise failure.error


# ==============================================================================================
# Front doors
# Owns: serving a request that came through a door other than OpenAI's chat (SPEC 2.1): its
# body becomes the internal chat request, the proxy routes and sends that, and the door writes
# the answer and any error in its own API's shape, with what the doors share to read chat.
# Must not: know any one API; each door (an OpenAIFormat) does.
# ==============================================================================================


# How a door names a JSON type in its 400s.
JSON_KINDS = {str: "a string", bool: "a boolean", list: "an array", dict: "an object"}


def optional_field(body: dict, name: str, kind: type, where: str = "", param: str = "") -> Any:
    """A field that may be absent (None) or must hold a `kind` (str, bool, list or dict)."""
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise bad_request(f"{where}{name}: must be {JSON_KINDS[kind]}", param or name)
    return value


async def send_through_door(
    request: web.Request, endpoint: str, internal: dict, needs: RequestNeeds, fmt: OpenAIFormat
) -> web.StreamResponse:
    """Send a door's internal request as chat is sent; a backend's refusal becomes an error."""
    response = await proxy(request, endpoint, internal, json.dumps(internal).encode(), needs, fmt)
    if (refusal := response.get(REFUSAL)) is not None:
        raise refusal
    return response


async def serve_door(request: web.Request, door: type[OpenAIFormat]) -> web.StreamResponse:
    """A request through `door`: translated to chat, routed, answered in the door's shape."""
    body = parse_json_body(await request.read())
    chat = door.chat_request(body)
    needs = chat_needs(chat, IMAGE_TOKENS)
    needs.prompt_param = door.prompt_param
    return await send_through_door(request, "chat", chat, needs, door(body, needs))


def merge_flag(values: Iterable[bool | None]) -> bool | None:
    """True if any backend has it, False if every backend reports it absent, None if unknown."""
    seen = set(values)
    if True in seen:
        return True
    return False if seen == {False} else None


def model_entries(registry: Registry, settings: Settings) -> dict[str, dict[str, Any]]:
    """Every model a healthy backend serves, as /v1/models lists it, and each alias to one."""
    entries: dict[str, dict[str, Any]] = {}
    flags = ("vision", "tools", "json_mode")
    for model_id, backends in registry.by_model.items():
        served = [(b, b.models[model_id]) for b in backends if b.status == "healthy"]
        if not served:
            continue
        contexts = [m.context_length for _, m in served if m.context_length]
        entries[model_id] = {
            "id": model_id,
            "object": "model",
            "created": 0,
            "owned_by": served[0][0].type,
            "context_length": max(contexts) if contexts else None,
            "capabilities": {f: merge_flag(getattr(m, f) for _, m in served) for f in flags},
            "backends": sorted(b.name for b, _ in served),
            "loaded_on": loaded_on(registry, model_id),
        }
    for alias in settings.routing.aliases:
        target = resolve_alias(alias, settings.routing.aliases)
        if target in entries and alias not in entries:
            entries[alias] = dict(entries[target], id=alias, alias_of=target)
    return entries


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One named SSE event with its JSON data."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def copy_options(body: dict, chat: dict, names: tuple, kind: str, where: str = "") -> None:
    """Copy the named options a request (or its field `where`) sets; each must be a `kind`."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        # A bool is an int to Python: a boolean must be one, a number must not.
        if isinstance(value, bool) != (kind == "boolean") or not isinstance(value, int | float):
            raise bad_request(f"{where}{name}: must be a {kind}", where.rstrip(".") or name)
        chat[name] = value


def chat_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Chat parts as a message's content: one string, blank-line joined, when all are text."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]  # the usual case, without a pass over the parts
    texts = [part["text"] for part in parts if part["type"] == "text"]
    return "\n\n".join(texts) if len(texts) == len(parts) else parts


def reasoning_of(message: dict[str, Any]) -> str:
    """Reasoning text as backends name it: vLLM, llama.cpp and Ollama differ."""
    value = message.get("reasoning_content")
    if not isinstance(value, str) or not value:
        value = message.get("reasoning")
    return value if isinstance(value, str) else ""


def call_delta(call: dict[str, Any], last: Any) -> tuple[Any, dict[str, Any], str]:
    """A streamed tool call's piece: the call it continues, its function, its argument text."""
    index = call.get("index")
    function = object_of(call.get("function"))
    arguments = function.get("arguments")
    if isinstance(arguments, dict):  # some servers send the whole input as an object
        arguments = json.dumps(arguments)
    key = index if isinstance(index, int) else call.get("id") or last
    return key, function, arguments if isinstance(arguments, str) else ""


def reply_parts(parsed: dict[str, Any]) -> tuple[dict[str, Any], str, str, list[dict[str, Any]]]:
    """A whole answer's first choice, and its reasoning, text (a completion's too), tool calls."""
    choices = parsed.get("choices")
    choice = object_of(choices[0]) if isinstance(choices, list) and choices else {}
    message = object_of(choice.get("message"))
    text = message.get("content") if message else choice.get("text")
    if isinstance(text, list):  # some servers answer with content parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    calls = message.get("tool_calls")
    calls = [call for call in calls if isinstance(call, dict)] if isinstance(calls, list) else []
    return choice, reasoning_of(message), text if isinstance(text, str) else "", calls


class ChatTranslator(OpenAIFormat):
    """What the Messages and Responses doors share: a chat stream, piece by piece to a writer."""

    keeps_usage = True

    def __init__(self, body: dict[str, Any], needs: RequestNeeds) -> None:
        self.native_body = body
        self.model = needs.model
        self.input_estimate = needs.prompt_tokens
        self.started = False
        self.failed = False
        self.usage: Any = None  # as the backend reported it
        self.output_chars = 0
        self.calls: dict[Any, int] = {}  # a chat tool call's index (or id) -> its block or item
        self.last_call: Any = None

    def begin(self, model: Any) -> bytes:
        """The stream's first events, naming the model that serves where the backend says."""
        if not self.started and isinstance(model, str) and model:
            self.model = model
        return self.start()

    def estimated_usage(self, usage: Any) -> TokenUsage:
        return usage_or_estimate(usage, self.input_estimate, answer_tokens(self.output_chars))

    def chunk(self, data: bytes, chunk: dict[str, Any]) -> bytes:
        """One chat chunk (well formed: chat_line drops any other) as the door's events."""
        out = [b"" if self.started else self.begin(chunk.get("model"))]
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        choices = chunk.get("choices")
        if not choices:
            return out[0]
        choice = choices[0]
        delta = choice.get("delta") or {}
        reasoning = reasoning_of(delta)
        if reasoning:
            self.output_chars += len(reasoning)
            out.append(self.content_delta("thinking", reasoning))
        text = delta.get("content")
        if isinstance(text, str) and text:
            self.output_chars += len(text)
            out.append(self.content_delta("text", text))
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, dict):
                out.append(self.tool_call(call))
        if choice.get("finish_reason"):
            out.append(self.finished(choice))
        return b"".join(out)

    def tool_call(self, call: dict[str, Any]) -> bytes:
        """A streamed tool call's head (id, name) or argument fragment."""
        key, function, arguments = call_delta(call, self.last_call)
        self.last_call = key
        out = b"" if key in self.calls else self.open_call(key, call, function)
        if not arguments:
            return out
        self.output_chars += len(arguments)
        return out + self.arguments_delta(self.calls[key], arguments)


# ==============================================================================================
# Anthropic Messages API
# Owns: POST /v1/messages and /v1/messages/count_tokens. A Messages request becomes a chat
# completion, its answer (whole or streamed) becomes a Messages answer, errors take its shape.
# Must not: route or send anything itself; the proxy does, with an AnthropicFormat writing.
# ==============================================================================================

MESSAGES_PATH = "/v1/messages"
# Anthropic's error type for each status; other 4xx are invalid requests, other 5xx api errors.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def anthropic_error(error: NexusError) -> dict[str, Any]:
    """An error as Anthropic's API writes it, for the same status. Claude Code compacts on
    exactly "prompt is too long: N tokens > M maximum" (nothing after it)."""
    other = "api_error" if error.status >= 500 else "invalid_request_error"
    kind = ANTHROPIC_ERROR_TYPES.get(error.status, other)
    message = error.message
    if error.code == "context_length_exceeded" and error.context:
        prompt, context = error.context["prompt_tokens"], error.context["context_length"]
        message = f"prompt is too long: {prompt} tokens > {context} maximum"
    return {"type": "error", "error": {"type": kind, "message": message}}


def system_text(system: Any) -> str:
    """The system prompt: a string, or text blocks joined (their cache_control is Anthropic's)."""
    if system is None or isinstance(system, str):
        return system or ""
    if not isinstance(system, list):
        raise bad_request("system: must be a string or an array of text blocks", "system")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or not isinstance(block.get("text"), str):
            raise bad_request(f"system.{i}: expected a text block", "system")
    return "\n\n".join([block["text"] for block in system])


def unsupported_block(kind: str, where: str) -> NexusError:
    """The 400 for a content block that has no chat equivalent."""
    message = f"{where}: content blocks of type {kind!r} cannot be translated for this backend"
    return bad_request(message, "messages")


def image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    """A Messages image block as a chat image_url part."""
    source = object_of(block.get("source"))
    url = source.get("url") if source.get("type") == "url" else None
    if source.get("type") == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if isinstance(media_type, str) and isinstance(data, str):
            url = f"data:{media_type};base64,{data}"
    if not isinstance(url, str):
        raise bad_request(f"{where}.source: expected a base64 or url image source", "messages")
    return {"type": "image_url", "image_url": {"url": url}}


def chat_tool(tool: Any, where: str) -> dict[str, Any]:
    """A Messages tool definition as a chat function tool."""
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        raise bad_request(f"{where}: a tool needs a name", "tools")
    if tool.get("type") not in (None, "custom") or not isinstance(tool.get("input_schema"), dict):
        raise bad_request(
            f"{where}: tool {tool['name']!r} is one of Anthropic's server tools; only custom "
            "tools (name, description, input_schema) can be served by other backends",
            "tools",
        )
    function: dict[str, Any] = {"name": tool["name"], "parameters": tool["input_schema"]}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def stop_reason_of(
    choice: dict[str, Any], text: str, sequences: list[str], tool_use: bool
) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a chat answer's finish."""
    finish = choice.get("finish_reason")
    if tool_use and finish in (None, "stop", "tool_calls", "function_call"):
        return "tool_use", None
    if finish in (None, "stop"):
        for key in ("stop_reason", "stopping_word", "stop_word"):  # vLLM's, llama.cpp's names
            if choice.get(key) in sequences:
                return "stop_sequence", choice[key]
        for sequence in sequences:  # some servers keep the sequence at the text's end
            if text.endswith(sequence):
                return "stop_sequence", sequence
    return STOP_REASONS.get(finish or "stop", "end_turn"), None


def chat_to_message(
    parsed: dict[str, Any], model: str, sequences: list[str] | None = None, input_estimate: int = 0
) -> dict[str, Any]:
    """A chat completion as a Messages answer: thinking, text, then tool_use blocks."""
    choice, reasoning, text, calls = reply_parts(parsed)
    blocks = [block for block in map(tool_use_block, calls) if block is not None]
    reason, sequence = stop_reason_of(choice, text, sequences or [], bool(blocks))
    if sequence is not None and text.endswith(sequence):
        text = text[: -len(sequence)]  # Anthropic's answers never include the sequence
    content = [{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []
    if text:
        content.append({"type": "text", "text": text})
    content.extend(blocks)
    chars = len(reasoning) + len(text) + sum(len(json.dumps(b["input"])) for b in blocks)
    usage = usage_or_estimate(parsed.get("usage"), input_estimate, answer_tokens(chars))
    return {
        "id": "msg_" + str(parsed.get("id") or new_block_id("")),
        "type": "message",
        "role": "assistant",
        "model": parsed.get("model") or model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage.as_anthropic(),
    }


class AnthropicEvents(NativeStream):
    """An anthropic backend's own event stream, relayed as it is, its usage kept for the cost."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[bytes] = []  # an event's name (and comments), sent with its data line
        self.begun = False  # a data line went out

    def line(self, line: bytes) -> tuple[bytes, str | None]:
        """One line of the event stream: an event name is held until its data line comes."""
        if not line.startswith(b"data:"):
            if self.begun or not line.startswith(b":"):
                self.held.append(line)
            return b"", None
        self.begun = True
        kind = None
        with contextlib.suppress(ValueError):
            event = json.loads(line[5:])
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "message_start":
                self.usage.update(object_of(object_of(event.get("message")).get("usage")))
            elif kind == "message_delta":
                self.usage.update(object_of(event.get("usage")))
        out = b"\n".join([*self.held, line]) + b"\n\n"
        self.held.clear()
        if kind == "error":
            self.failed = True
            return out, "error"
        return out, "end" if kind == "message_stop" else None

    def error(self, endpoint: str, model: str, message: str) -> bytes:
        """An error event, unless the backend's own error event said it already."""
        if self.failed:
            return b""
        self.failed = True
        return sse_event("error", anthropic_error(NexusError(502, "backend_error", None, message)))


def chat_parts(blocks: list[Any], where: str, role: str) -> tuple[list, list, list]:
    """Content blocks as chat parts (text, images), tool calls and "tool" messages, by role."""
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        at = f"{where}.content.{j}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise bad_request(f"{at}: expected a content block with a type", "messages")
        kind = block["type"]
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise bad_request(f"{at}.text: must be a string", "messages")
            parts.append({"type": "text", "text": block["text"]})
        elif role == "assistant" and kind == "tool_use":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise bad_request(f"{at}: a tool_use block needs an id and a name", "messages")
            arguments = {} if block.get("input") is None else block["input"]
            encoded = json.dumps(arguments, ensure_ascii=False)  # a string input stays a string
            calls.append(chat_call(block["id"], block["name"], encoded))
        elif role == "assistant" and kind in ("thinking", "redacted_thinking"):
            continue  # dropped, as chat templates drop earlier reasoning
        elif role != "assistant" and kind == "image":
            parts.append(image_part(block, at))
        elif role == "user" and kind == "tool_result":  # text: a "tool" message; images: user's
            if not isinstance(block.get("tool_use_id"), str):
                raise bad_request(f"{at}.tool_use_id: must be a string", "messages")
            content = block.get("content")
            if isinstance(content, list):
                inner = chat_parts(content, at, "tool")[0]
                parts.extend([part for part in inner if part["type"] != "text"])
                content = "\n\n".join([part["text"] for part in inner if part["type"] == "text"])
            elif content is not None and not isinstance(content, str):
                raise bad_request(f"{at}.content: must be a string or an array", "messages")
            text = content or ""
            if block.get("is_error") is True:
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        elif role == "user" and kind == "document" and isinstance(block.get("source"), dict):
            source = block["source"]
            if source.get("type") != "text" or not isinstance(source.get("data"), str):
                raise unsupported_block("document (other than plain text)", at)
            parts.append({"type": "text", "text": source["data"]})
        else:
            raise unsupported_block(kind, at)
    return parts, calls, results


def chat_turns(turn: Any, where: str) -> list[dict[str, Any]]:
    """One Messages turn as chat messages (a user turn's tool results first, as "tool" ones)."""
    if not isinstance(turn, dict):
        raise bad_request(f"{where}: must be an object", "messages")
    role = turn.get("role")
    if role not in ("user", "assistant"):
        raise bad_request(f"{where}.role: must be 'user' or 'assistant'", "messages")
    content = turn.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content: must be a string or an array of blocks", "messages")
    parts, calls, results = chat_parts(content, where, role)
    if role == "assistant":
        text = chat_content(parts)  # a string: an assistant's parts are all text
        if calls:
            return [{"role": "assistant", "content": text or None, "tool_calls": calls}]
        return [{"role": "assistant", "content": text}]
    if parts:
        results.append({"role": "user", "content": chat_content(parts)})
    return results or [{"role": "user", "content": ""}]


def messages_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request as a chat completion; what only Anthropic's servers read is left out."""
    model = require_model(body)
    max_tokens = positive_int(body.get("max_tokens"))
    if max_tokens is None:
        raise bad_request("max_tokens: a positive integer is required", "max_tokens")
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise bad_request("messages: must be a non-empty array of messages", "messages")
    # A "system" turn among the messages (Claude Code sends its environment so for a model it
    # does not know) joins the system prompt: chat templates refuse a system message later on.
    system = [system_text(body.get("system"))]
    messages: list[dict[str, Any]] = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and turn.get("role") == "system":
            system.append(system_text(turn.get("content")))
        else:
            messages.extend(chat_turns(turn, f"messages.{i}"))
    system_prompt = "\n\n".join([text for text in system if text])
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    chat: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    if "stream" in body:
        if not isinstance(body["stream"], bool):
            raise bad_request("stream: must be a boolean", "stream")
        chat["stream"] = body["stream"]
    copy_options(body, chat, ("temperature", "top_p", "top_k"), "number")  # the same in both APIs
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise bad_request("stop_sequences: must be an array of strings", "stop_sequences")
        if stop:
            chat["stop"] = stop
    metadata = object_of(body.get("metadata"))
    if isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    tools = optional_field(body, "tools", list)
    if tools:
        chat["tools"] = [chat_tool(tool, f"tools.{i}") for i, tool in enumerate(tools)]
        choice = optional_field(body, "tool_choice", dict)
        if choice is not None:
            chat["tool_choice"] = tool_choice_for("chat", choice)
            if choice.get("disable_parallel_tool_use") is True and choice.get("type") != "none":
                chat["parallel_tool_calls"] = False
    return chat


class AnthropicFormat(ChatTranslator):
    """Writes chat answers as Messages answers: whole, or as Anthropic's event stream."""

    native_api = "anthropic"
    native_path = MESSAGES_PATH
    chat_request = staticmethod(messages_to_chat)
    error_document = staticmethod(anthropic_error)
    native_stream = AnthropicEvents

    def __init__(self, body: dict[str, Any], needs: RequestNeeds) -> None:
        super().__init__(body, needs)
        self.stop_sequences: list[str] = list(body.get("stop_sequences") or [])
        self.id = new_block_id("msg_")
        self.index = -1  # the last content block opened
        self.open_kind: str | None = None  # the open block's: thinking, text or tool_use
        self.finish: dict[str, Any] = {}  # the choice that carried the finish reason
        self.text_tail = ""  # the end of the text, to find a stop sequence it ends with

    def body(self, answer: bytes, parsed: dict[str, Any]) -> bytes:
        message = chat_to_message(parsed, self.model, self.stop_sequences, self.input_estimate)
        return json.dumps(message).encode()

    def start(self) -> bytes:
        """message_start and a ping, once, before anything else."""
        if self.started:
            return b""
        self.started = True
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": TokenUsage(self.input_estimate).as_anthropic(),
        }
        start = sse_event("message_start", {"type": "message_start", "message": message})
        return start + sse_event("ping", {"type": "ping"})

    def open(self, block: dict[str, Any]) -> bytes:
        closed = self.close()
        self.index += 1
        self.open_kind = block["type"]
        start = {"type": "content_block_start", "index": self.index, "content_block": block}
        return closed + sse_event("content_block_start", start)

    def close(self) -> bytes:
        if self.open_kind is None:
            return b""
        self.open_kind = None
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": self.index})

    def content_delta(self, kind: str, text: str) -> bytes:
        out = b""
        if self.open_kind != kind:  # a thinking block carries a signature (empty: not Claude's)
            signature = {"signature": ""} if kind == "thinking" else {}
            out = self.open({"type": kind, kind: "", **signature})
        if kind == "text":
            self.text_tail = (self.text_tail + text)[-200:]
        delta = {"type": kind + "_delta", kind: text}
        event = {"type": "content_block_delta", "index": self.index, "delta": delta}
        return out + sse_event("content_block_delta", event)

    def open_call(self, key: Any, call: dict[str, Any], function: dict[str, Any]) -> bytes:
        call_id, name = call.get("id") or new_block_id("toolu_"), function.get("name") or ""
        out = self.open({"type": "tool_use", "id": call_id, "name": name, "input": {}})
        self.calls[key] = self.index
        return out

    def arguments_delta(self, index: int, arguments: str) -> bytes:
        delta = {"type": "input_json_delta", "partial_json": arguments}
        event = {"type": "content_block_delta", "index": index, "delta": delta}
        return sse_event("content_block_delta", event)

    def finished(self, choice: dict[str, Any]) -> bytes:
        self.finish = choice
        return self.close()

    def error(self, endpoint: str, model: str, message: str) -> bytes:
        return self.begin(model) + AnthropicEvents.error(self, endpoint, model, message)

    def end(self) -> bytes:
        """The stream's last events: the open block closed, message_delta, message_stop."""
        if self.failed:
            return b""  # the error event was the stream's last word
        out = self.start() + self.close()
        reason, sequence = stop_reason_of(
            self.finish, self.text_tail, self.stop_sequences, bool(self.calls)
        )
        usage = self.estimated_usage(self.usage).as_anthropic()
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        out += sse_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
        return out + sse_event("message_stop", {"type": "message_stop"})


async def messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages: translated to a chat completion, routed and answered like one."""
    return await serve_door(request, AnthropicFormat)


async def messages_count_tokens(request: web.Request) -> web.Response:
    """POST /v1/messages/count_tokens: the request's input tokens, for a model Nexus serves."""
    body = parse_json_body(await request.read())
    check_model(request, require_model(body), must_exist=True)
    chat = messages_to_chat(dict(body, max_tokens=1))  # count_tokens bodies have no max_tokens
    return web.json_response({"input_tokens": chat_needs(chat, IMAGE_TOKENS).prompt_tokens})


# ==============================================================================================
# OpenAI Responses API
# Owns: POST /v1/responses (SPEC 2.1), what Codex CLI and Cursor's agent speak. A Responses
# request becomes a chat completion; its answer becomes a `response` object, or the Responses
# event stream, event by event as the chat chunks arrive. Errors are OpenAI's envelope.
# Must not: keep conversations (previous_response_id is refused) or offer hosted tools.
# ==============================================================================================

RESPONSES_PATH = "/v1/responses"
JSON_STRING = json.encoder.encode_basestring_ascii  # a str as JSON, as json.dumps writes it
# Why an answer stopped short, by chat finish_reason: the response is "incomplete" then.
INCOMPLETE_REASONS = {"length": "max_output_tokens", "content_filter": "content_filter"}
# The events of a text item's deltas, by the kind of text: its reasoning or its answer.
TEXT_EVENTS = {"thinking": "response.reasoning_text", "text": "response.output_text"}


def input_parts(content: Any, where: str) -> list[dict[str, Any]]:
    """A message's content (a string or its parts) as chat parts: text and image_url."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad_request(f"{where}.content: must be a string or an array of parts", "input")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                raise bad_request(f"{at}.text: must be a string", "input")
            parts.append({"type": "text", "text": text})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image = {"url": part["image_url"]}
            if isinstance(part.get("detail"), str) and part["detail"] != "auto":
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise bad_request(
                f"{at}: parts of type {kind!r} cannot be served here (input_text, output_text "
                "and input_image with an image_url can; files need OpenAI's storage)",
                "input",
            )
    return parts


def add_input_item(messages: list[dict], system: list[str], item: Any, where: str) -> None:
    """One input item as chat messages (or system text)."""
    if not isinstance(item, dict):
        raise bad_request(f"{where}: must be an object", "input")
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            message = f"{where}.role: must be user, assistant, system or developer"
            raise bad_request(message, "input")
        content = chat_content(input_parts(item.get("content"), where))
        if role != "user" and not isinstance(content, str):
            raise bad_request(f"{where}.content: only user messages carry images", "input")
        if role in ("user", "assistant"):
            messages.append({"role": role, "content": content})
        elif content:
            system.append(content)
    elif kind == "function_call":
        call_id, name = item.get("call_id"), item.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise bad_request(f"{where}: a function_call needs a call_id and a name", "input")
        call = chat_call(call_id, name, item.get("arguments", "{}"))
        if messages and messages[-1]["role"] == "assistant":  # the same turn's text and calls
            messages[-1].setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise bad_request(f"{where}.call_id: must be a string", "input")
        output = item.get("output")
        if not isinstance(output, str):
            parts = input_parts(output, where)
            output = "\n\n".join(part["text"] for part in parts if part["type"] == "text")
        messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
    elif kind != "reasoning":  # earlier reasoning is not sent back, as chat templates drop it
        raise bad_request(
            f"{where}.type: items of type {kind!r} cannot be served here (messages, "
            "function_call, function_call_output and reasoning can)",
            "input",
        )


def function_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's function tools; hosted ones (web_search, mcp...) are not offered."""
    found = []
    for i, tool in enumerate(optional_field(body, "tools", list) or ()):
        if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
            raise bad_request(f"tools[{i}]: a tool needs a type", "tools")
        if tool["type"] != "function":
            continue
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad_request(f"tools[{i}].name: a function tool needs a name", "tools")
        optional_field(tool, "parameters", dict, f"tools[{i}].", "tools")
        found.append(tool)
    return found


def chat_function(tool: dict[str, Any]) -> dict[str, Any]:
    """A Responses function tool (flat) as a chat function tool."""
    function: dict[str, Any] = {"name": tool["name"]}
    function["parameters"] = tool.get("parameters") or {"type": "object", "properties": {}}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    if isinstance(tool.get("strict"), bool):
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def responses_tool_choice(choice: Any) -> Any:
    """tool_choice in chat's terms; a choice of a hosted tool leaves the model free (None)."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if not isinstance(choice, dict):
        raise bad_request("tool_choice: expected auto, none, required or an object", "tool_choice")
    if choice.get("type") != "function":
        return None
    if not isinstance(choice.get("name"), str):
        raise bad_request("tool_choice.name: must be a string", "tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def response_text_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """text.format as chat's response_format; None for plain text."""
    form = (optional_field(body, "text", dict) or {}).get("format")
    kind = form.get("type") if isinstance(form, dict) else None
    if form is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise bad_request("text.format.type: must be text, json_object or json_schema", "text")
    if not isinstance(form.get("name"), str) or not isinstance(form.get("schema"), dict):
        raise bad_request("text.format: a json_schema format needs a name and a schema", "text")
    fields = ("name", "schema", "description", "strict")
    return {"type": "json_schema", "json_schema": {f: form[f] for f in fields if f in form}}


def responses_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as the chat completion a backend serves; hosted tools are left out."""
    model = require_model(body)
    for name in ("previous_response_id", "conversation"):
        if body.get(name) is not None:
            why = f"{name}: Nexus keeps no conversations; send the whole conversation in input"
            raise bad_request(why, name)
    instructions = optional_field(body, "instructions", str)
    system = [instructions] if instructions else []
    items = body.get("input")
    messages: list[dict[str, Any]] = []
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list) and items:
        for i, item in enumerate(items):
            add_input_item(messages, system, item, f"input[{i}]")
    else:
        raise bad_request("input: must be a string or a non-empty array of items", "input")
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    if not messages:
        raise bad_request("input: holds no message to answer", "input")
    chat: dict[str, Any] = {"model": model, "messages": messages}
    copy_options(body, chat, ("stream", "parallel_tool_calls"), "boolean")
    copy_options(body, chat, ("temperature", "top_p"), "number")
    if (limit := body.get("max_output_tokens")) is not None:
        if positive_int(limit) is None:
            raise bad_request("max_output_tokens: must be a positive integer", "max_output_tokens")
        chat["max_tokens"] = limit
    for name in ("prompt_cache_key", "user"):  # the cache key is a session key (SPEC 3.7)
        if isinstance(body.get(name), str):
            chat[name] = body[name]
    tools = function_tools(body)
    if tools:
        chat["tools"] = [chat_function(tool) for tool in tools]
        if (choice := responses_tool_choice(body.get("tool_choice"))) is not None:
            chat["tool_choice"] = choice
    else:
        chat.pop("parallel_tool_calls", None)
    if (text_format := response_text_format(body)) is not None:
        chat["response_format"] = text_format
    return chat


def output_text(kind: str, text: str, status: str) -> dict[str, Any]:
    """A Responses output item of text: the answer ("text") or its reasoning ("thinking")."""
    if kind == "thinking":
        item: dict[str, Any] = {"id": new_block_id("rs_"), "type": "reasoning", "summary": []}
        part: dict[str, Any] = {"type": "reasoning_text", "text": text}
    else:
        item = {"id": new_block_id("msg_"), "type": "message", "role": "assistant"}
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {**item, "status": status, "content": [part]}


def output_call(call: dict[str, Any], arguments: str, status: str) -> dict[str, Any]:
    """A chat tool call as a Responses function_call output item (its id kept)."""
    function = object_of(call.get("function"))
    return {
        "id": new_block_id("fc_"),
        "type": "function_call",
        "status": status,
        "call_id": call["id"] if isinstance(call.get("id"), str) else new_block_id("call_"),
        "name": function["name"] if isinstance(function.get("name"), str) else "",
        "arguments": arguments,
    }


def delta_head(kind: str, where: dict[str, Any]) -> bytes:
    """The start of an item's delta events, encoded once: each delta adds its text and number."""
    fields = json.dumps({"type": kind, **where})[1:-1]
    return f"event: {kind}\ndata: {{{fields},".encode()


class ResponsesFormat(ChatTranslator):
    """Writes chat answers as the Responses API does: a `response` object, or its event stream."""

    prompt_param = "input"
    chat_request = staticmethod(responses_to_chat)

    def __init__(self, body: dict[str, Any], needs: RequestNeeds) -> None:
        super().__init__(body, needs)
        self.id = new_block_id("resp_")
        self.created = int(time.time())
        self.sequence = 0
        self.output: list[dict[str, Any]] = []
        self.pieces: dict[int, list[str]] = {}  # an unfinished item's text (or arguments)
        self.open: int | None = None  # the open reasoning or message item
        self.open_kind: str | None = None  # its kind of text: thinking or text
        self.heads: dict[int, bytes] = {}  # the encoded start of each item's delta events
        self.finish: str | None = None

    def response(self, status: str, usage: Any = None, error: Any = None) -> dict[str, Any]:
        """The response object as it stands, echoing what the request asked for."""
        reason = INCOMPLETE_REASONS.get(self.finish or "") if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": self.output,
            "error": error,
            "incomplete_details": {"reason": reason} if reason else None,
            **self.echo,
            "usage": usage,
        }

    @functools.cached_property
    def echo(self) -> dict[str, Any]:
        """What the response repeats of the request, read once: it is the same in every event.
        responses_to_chat has checked the request, but for a tool_choice without tools."""
        body = self.native_body
        choice = body.get("tool_choice")
        return {
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "metadata": object_of(body.get("metadata")),
            "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
            "previous_response_id": None,
            "temperature": body.get("temperature"),
            "top_p": body.get("top_p"),
            "text": {"format": object_of(body.get("text")).get("format") or {"type": "text"}},
            "tool_choice": choice if isinstance(choice, str | dict) else "auto",
            "tools": function_tools(body),
            "truncation": "disabled",
        }

    def status(self) -> str:
        """The response's status once the answer ended (its items' too)."""
        return "incomplete" if self.finish in INCOMPLETE_REASONS else "completed"

    def final_response(self, usage: Any, reasoning_chars: int) -> dict[str, Any]:
        """The response once the answer ended, its usage reported or estimated from characters."""
        found = self.estimated_usage(usage)
        usage = found.as_responses(min(answer_tokens(reasoning_chars), found.completion))
        return self.response(self.status(), usage)

    def body(self, answer: bytes, parsed: dict[str, Any]) -> bytes:
        choice, reasoning, text, calls = reply_parts(parsed)
        self.finished(choice)
        if isinstance(parsed.get("model"), str) and parsed["model"]:
            self.model = parsed["model"]
        status = self.status()
        if reasoning:
            self.output.append(output_text("thinking", reasoning, status))
        if text or not calls:
            self.output.append(output_text("text", text, status))
        for call in calls:
            arguments = object_of(call.get("function")).get("arguments")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments or {}, ensure_ascii=False)
            self.output.append(output_call(call, arguments, "completed"))
            self.output_chars += len(arguments)
        self.output_chars += len(text) + len(reasoning)
        return json.dumps(self.final_response(parsed.get("usage"), len(reasoning))).encode()

    def event(self, kind: str, data: dict[str, Any]) -> bytes:
        data["type"] = kind
        data["sequence_number"] = self.sequence
        self.sequence += 1
        return sse_event(kind, data)

    def start(self) -> bytes:
        """response.created and response.in_progress, once: one response object, encoded once."""
        if self.started:
            return b""
        self.started = True
        response = json.dumps(self.response("in_progress"))
        out = b""
        for kind in ("response.created", "response.in_progress"):
            self.sequence += 1
            out += (
                f'event: {kind}\ndata: {{"response": {response}, "type": "{kind}", '
                f'"sequence_number": {self.sequence - 1}}}\n\n'
            ).encode()
        return out

    def add_item(self, item: dict[str, Any]) -> tuple[int, bytes]:
        """Add an output item; its index and the output_item.added event."""
        index = len(self.output)
        self.output.append(item)
        self.pieces[index] = []
        added = self.event("response.output_item.added", {"output_index": index, "item": item})
        return index, added

    def settle(self, index: int, status: str) -> dict[str, Any]:
        """An item with its whole text (or arguments) and its last status."""
        item = self.output[index]
        text = "".join(self.pieces.pop(index))
        if item["type"] == "function_call":
            item["arguments"] = text
        else:
            item["content"][0]["text"] = text
        item["status"] = status
        return item

    def content_delta(self, kind: str, text: str) -> bytes:
        out = b""
        if self.open_kind != kind:  # a reasoning or message item opens, the open one closes
            out = self.close_open()
            item = output_text(kind, "", "in_progress")
            part = item["content"].pop()  # the item is added empty, then its part
            self.open, added = self.add_item(item)
            self.open_kind = kind
            where = {"item_id": item["id"], "output_index": self.open, "content_index": 0}
            out += added + self.event("response.content_part.added", {**where, "part": part})
            item["content"].append(part)
            fields = {**where, "logprobs": []} if kind == "text" else where
            self.heads[self.open] = delta_head(TEXT_EVENTS[kind] + ".delta", fields)
        return out + self.delta_event(self.open, text)

    def close_open(self) -> bytes:
        if self.open is None:
            return b""
        index, kind = self.open, self.open_kind
        self.open = self.open_kind = None
        item = self.settle(index, self.status())  # cut short, it is as incomplete as the answer
        part = item["content"][0]
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        done = {**where, "text": part["text"]}
        if kind == "text":
            done["logprobs"] = []
        out = self.event(TEXT_EVENTS[kind] + ".done", done)
        out += self.event("response.content_part.done", {**where, "part": part})
        return out + self.event("response.output_item.done", {"output_index": index, "item": item})

    def open_call(self, key: Any, call: dict[str, Any], function: dict[str, Any]) -> bytes:
        out = self.close_open()
        index, added = self.add_item(output_call(call, "", "in_progress"))
        self.calls[key] = index
        where = {"item_id": self.output[index]["id"], "output_index": index}
        self.heads[index] = delta_head("response.function_call_arguments.delta", where)
        return out + added

    def delta_event(self, index: int, text: str) -> bytes:
        """A delta event of an item, its text or its arguments, from its head encoded once."""
        self.pieces[index].append(text)
        head, text_json = self.heads[index], JSON_STRING(text).encode()
        self.sequence += 1
        return b'%s"delta":%s,"sequence_number":%d}\n\n' % (head, text_json, self.sequence - 1)

    def arguments_delta(self, index: int, arguments: str) -> bytes:
        return self.delta_event(index, arguments)

    def finished(self, choice: dict[str, Any]) -> bytes:
        if isinstance(choice.get("finish_reason"), str):
            self.finish = choice["finish_reason"]
        return b""

    def end(self) -> bytes:
        """The stream's last events: every item done, then the response completed or incomplete."""
        if self.failed:
            return b""  # response.failed was the stream's last word
        out = self.start() + self.close_open()
        for index in self.calls.values():
            item = self.settle(index, "completed")
            done = {"item_id": item["id"], "output_index": index, "arguments": item["arguments"]}
            out += self.event("response.function_call_arguments.done", done)
            out += self.event("response.output_item.done", {"output_index": index, "item": item})
        texts = [item["content"][0]["text"] for item in self.output if item["type"] == "reasoning"]
        response = self.final_response(self.usage, sum(map(len, texts)))
        return out + self.event(f"response.{response['status']}", {"response": response})

    def error(self, endpoint: str, model: str, message: str) -> bytes:
        """response.failed, with what was said before the failure, as incomplete."""
        if self.failed:
            return b""
        self.failed = True
        for index in list(self.pieces):
            self.settle(index, "incomplete")
        response = self.response("failed", error={"code": "server_error", "message": message})
        return self.start() + self.event("response.failed", {"response": response})


async def responses(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses: translated to a chat completion, routed and answered like one."""
    return await serve_door(request, ResponsesFormat)


# ==============================================================================================
# Ollama API
# Owns: /api/* (SPEC §2.1), Ollama's own API in front of every backend. A chat, generate or
# embed request becomes an internal one; its answer (whole, or NDJSON) becomes Ollama's; errors
# are {"error": "..."}. The model list, show and ps are answered from the registry.
# Must not: route or send anything itself; the proxy does, with an OllamaFormat writing.
# ==============================================================================================

OLLAMA_PREFIX = "/api/"
# The Ollama release whose API (endpoints, fields) Nexus answers as: clients gate features on it.
OLLAMA_VERSION = "0.13.0"
# Ollama's show names the model's architecture and keys its context length by it; Nexus does
# not know the architecture of every backend's model, so its own name stands in.
OLLAMA_ARCHITECTURE = "nexus"
OLLAMA_INFERENCE_PATHS = {
    "/api/chat": "chat",
    "/api/generate": "chat",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
}
JSON_TEXT = json.encoder.encode_basestring  # a str as JSON, as json.dumps(ensure_ascii=False)
# Ollama's sampling options that mean the same in a chat or completions request.
OLLAMA_SAMPLING = ("temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty")
OLLAMA_ROLES = ("system", "user", "assistant", "tool")
# Base64 images carry no media type; the first bytes of the common formats tell it.
IMAGE_SIGNATURES = (
    ("/9j/", "image/jpeg"),
    ("iVBOR", "image/png"),
    ("R0lGOD", "image/gif"),
    ("UklGR", "image/webp"),
)
NANOSECONDS = 1_000_000_000
# What routing needs, read from each kind of internal request.
NEEDS_READERS = {"chat": chat_needs, "completions": completion_needs, "embeddings": embedding_needs}


@functools.lru_cache(maxsize=4)
def utc_second(whole: int) -> str:
    """A second since the epoch in RFC 3339, UTC, formatted once: every stream line says when."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def ollama_time(seconds: float | None = None) -> str:
    """A time as Ollama writes it (RFC 3339 with microseconds, UTC); now when none is given."""
    now = time.time() if seconds is None else seconds
    whole = int(now)
    return f"{utc_second(whole)}.{int((now - whole) * 1_000_000):06d}Z"


def ollama_shared_fields(body: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """What chat and generate requests share (stream, options, format, think) as chat fields."""
    out["stream"] = optional_field(body, "stream", bool) is not False  # unless told not to
    options = optional_field(body, "options", dict) or {}
    copy_options(options, out, OLLAMA_SAMPLING, "number", "options.")
    stop = options.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request("options.stop: must be an array of strings", "options")
    if stop:
        out["stop"] = stop
    predict = options.get("num_predict")
    if isinstance(predict, bool) or not isinstance(predict, int | None):
        raise bad_request("options.num_predict: must be an integer", "options")
    if predict is not None and predict > 0:  # -1 and -2: until the model stops, fill the context
        out["max_tokens"] = predict
    form = body.get("format")
    if form == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(form, dict):
        schema = {"name": "response", "schema": form}
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif form not in (None, ""):
        raise bad_request('format: must be "json" or a JSON schema object', "format")
    think = body.get("think")
    if isinstance(think, bool):  # what vLLM's and llama.cpp's chat templates read
        out["chat_template_kwargs"] = {"enable_thinking": think}
    elif think in ("low", "medium", "high"):
        out["reasoning_effort"] = think
    elif think is not None:
        raise bad_request('think: must be true, false, "low", "medium" or "high"', "think")
    return out


def ollama_image_parts(images: Any, where: str) -> list[dict[str, Any]]:
    """Ollama's base64 images as chat image parts (data URLs), which routing sees as vision."""
    if not isinstance(images, list | None):
        raise bad_request(f"{where}images: must be an array of base64 strings", "images")
    parts = []
    for i, image in enumerate(images or ()):
        if not isinstance(image, str) or not image:
            raise bad_request(f"{where}images[{i}]: must be a base64 string", "images")
        if not image.startswith("data:"):
            media = next((m for sig, m in IMAGE_SIGNATURES if image.startswith(sig)), "image/png")
            image = f"data:{media};base64,{image}"
        parts.append({"type": "image_url", "image_url": {"url": image}})
    return parts


def ollama_tool_calls(message: dict, where: str, pending: list[tuple[str, str]]) -> list[Any]:
    """An assistant's tool calls as chat's (arguments as JSON text), their ids put in `pending`."""
    out = []
    calls = optional_field(message, "tool_calls", list, where + ".", "messages")
    for j, call in enumerate(calls or ()):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{at}: needs a function with a name", "messages")
        arguments = function.get("arguments")
        if not isinstance(arguments, dict | str | None):
            raise bad_request(f"{at}.function.arguments: must be an object", "messages")
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            call_id = new_block_id("call_")
        pending.append((function["name"], call_id))
        out.append(chat_call(call_id, function["name"], {} if arguments is None else arguments))
    return out


def answered_call_id(message: dict[str, Any], pending: list[tuple[str, str]]) -> str:
    """The id of the tool call a tool message answers: its own, else an open call's, by tool."""
    found = message.get("tool_call_id")
    if isinstance(found, str) and found:
        pending[:] = [p for p in pending if p[1] != found]
        return found
    name = message.get("tool_name") or message.get("name")
    for i, (tool, call_id) in enumerate(pending):
        if tool == name:
            del pending[i]
            return call_id
    return pending.pop(0)[1] if pending else new_block_id("call_")


def ollama_messages(messages: Any) -> list[dict[str, Any]]:
    """Ollama chat messages as chat's: images as parts, tool calls and answers paired by id."""
    if not isinstance(messages, list):
        raise bad_request("messages: must be an array of messages", "messages")
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where}: must be an object", "messages")
        role = message.get("role")
        if role not in OLLAMA_ROLES:
            raise bad_request(f"{where}.role: must be one of {', '.join(OLLAMA_ROLES)}", "messages")
        content = optional_field(message, "content", str, where + ".", "messages") or ""
        chat: dict[str, Any] = {"role": role, "content": content}
        if images := ollama_image_parts(message.get("images"), where + "."):
            chat["content"] = [{"type": "text", "text": content}, *images] if content else images
        if role == "assistant" and (calls := ollama_tool_calls(message, where, pending)):
            chat["tool_calls"] = calls
        elif role == "tool":
            chat["tool_call_id"] = answered_call_id(message, pending)
        out.append(chat)
    return out


def ollama_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """An /api/chat request as the internal chat request (Ollama's tools are chat's, checked)."""
    model = require_model(body)
    chat: dict[str, Any] = {"model": model, "messages": ollama_messages(body.get("messages"))}
    tools = optional_field(body, "tools", list)
    for i, tool in enumerate(tools or ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"tools[{i}]: needs a function with a name", "tools")
    if tools:
        chat["tools"] = [{"type": "function", "function": tool["function"]} for tool in tools]
    return ollama_shared_fields(body, chat)


def ollama_generate_to_internal(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An /api/generate request as chat, or as a completion when raw or with a suffix (FIM)."""
    model = require_model(body)
    prompt = optional_field(body, "prompt", str) or ""
    suffix = optional_field(body, "suffix", str) or ""
    system = optional_field(body, "system", str) or ""
    raw = optional_field(body, "raw", bool)
    images = ollama_image_parts(body.get("images"), "")
    if (raw or suffix) and images:
        raise bad_request("images: not served with raw or suffix (a plain completion)", "images")
    if raw or suffix:
        request: dict[str, Any] = {"model": model, "prompt": prompt}
        if suffix:
            request["suffix"] = suffix
        return "completions", ollama_shared_fields(body, request)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    content: Any = [{"type": "text", "text": prompt}, *images] if images else prompt
    messages.append({"role": "user", "content": content})
    return "chat", ollama_shared_fields(body, {"model": model, "messages": messages})


def ollama_embed_to_internal(body: dict[str, Any], legacy: bool) -> dict[str, Any]:
    """/api/embed (input: text or texts) or the older /api/embeddings (prompt) as embeddings."""
    model = require_model(body)
    if legacy:
        text = body.get("prompt")
        if not isinstance(text, str):
            raise bad_request("prompt: must be a string", "prompt")
        return {"model": model, "input": text}
    value = body.get("input")
    strings = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
    if not isinstance(value, str) and not strings:
        raise bad_request("input: must be a string or a non-empty array of strings", "input")
    out: dict[str, Any] = {"model": model, "input": value}
    if (dimensions := body.get("dimensions")) is not None:
        if positive_int(dimensions) is None:
            raise bad_request("dimensions: must be a positive integer", "dimensions")
        out["dimensions"] = dimensions
    return out


def ollama_calls(calls: Any) -> list[dict[str, Any]]:
    """Chat tool calls as Ollama's: numbered, their arguments as objects, not JSON text."""
    out = []
    for index, call in enumerate(calls if isinstance(calls, list) else ()):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = tool_arguments(function.get("arguments"))
        named = {"index": index, "name": function.get("name") or "", "arguments": arguments}
        out.append({"function": named})
        if isinstance(call.get("id"), str) and call["id"]:
            out[-1]["id"] = call["id"]
    return out


def visible_models(request: web.Request) -> list[dict[str, Any]]:
    """Every model /v1/models lists for this caller, in order."""
    entries = model_entries(request.app[REGISTRY], request.app[SETTINGS])
    return [entries[k] for k in sorted(entries) if may_see_model(request, k)]


def visible_model(request: web.Request, name: str) -> dict[str, Any]:
    """The /v1/models entry of a model the caller may see; 404 otherwise."""
    entries = model_entries(request.app[REGISTRY], request.app[SETTINGS])
    if name not in entries or not may_see_model(request, name):
        key = request.get(API_KEY)
        raise model_not_found(name, request.app[REGISTRY], request.app[SETTINGS], key)
    return entries[name]


def ollama_details(entry: dict[str, Any]) -> dict[str, Any]:
    """A model's details as Ollama lists them: what Nexus knows (the alias's target), no more."""
    return {
        "parent_model": entry.get("alias_of", ""),
        "format": "",
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }


def ollama_model(entry: dict[str, Any], modified_at: str) -> dict[str, Any]:
    """A model as Ollama lists it: size 0 and a digest of the name, as Nexus holds no files."""
    name = entry["id"]
    return {
        "name": name,
        "model": name,
        "modified_at": modified_at,
        "size": 0,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": ollama_details(entry),
    }


def started_at(request: web.Request) -> str:
    """When this Nexus started, as Ollama writes times (the models' modified_at)."""
    uptime = time.monotonic() - request.app[STATS].started
    return ollama_time(time.time() - uptime)


async def ollama_version(request: web.Request) -> web.Response:
    """GET /api/version."""
    return web.json_response({"version": OLLAMA_VERSION})


async def ollama_tags(request: web.Request) -> web.Response:
    """GET /api/tags: the models of /v1/models, aliases included, in Ollama's shape."""
    modified = started_at(request)
    models = [ollama_model(entry, modified) for entry in visible_models(request)]
    return web.json_response({"models": models})


async def ollama_ps(request: web.Request) -> web.Response:
    """GET /api/ps: the models loaded on the fleet now, each with the most bytes one holds."""
    backends = request.app[REGISTRY].backends
    models = []
    for entry in visible_models(request):
        if not entry.get("loaded_on"):
            continue
        model_id = entry.get("alias_of") or entry["id"]
        model = ollama_model(entry, "")
        del model["modified_at"]
        held = [(backends[n].loaded or {}).get(model_id, 0) for n in entry["loaded_on"]]
        model["size"] = model["size_vram"] = max(held, default=0)
        if entry["context_length"]:
            model["context_length"] = entry["context_length"]
        models.append(model)
    return web.json_response({"models": models})


async def ollama_show(request: web.Request) -> web.Response:
    """POST /api/show: a model's details. It has tools unless every backend says no (as routing
    assumes), vision only where one says yes (an image sent to a text model is the worse error)."""
    body = parse_json_body(await request.read())
    name = body.get("model") if body.get("model") is not None else body.get("name")
    if not isinstance(name, str) or not name:
        raise bad_request("model: a model name (a string) is required", "model")
    entry = visible_model(request, name)
    info: dict[str, Any] = {"general.architecture": OLLAMA_ARCHITECTURE, "general.name": name}
    if entry["context_length"]:
        info[f"{OLLAMA_ARCHITECTURE}.context_length"] = entry["context_length"]
    flags = entry["capabilities"]
    offered = [("tools", flags["tools"] is not False), ("vision", flags["vision"] is True)]
    capabilities = ["completion"] + [kind for kind, on in offered if on]
    answer = {"modelfile": "", "parameters": "", "template": "", "details": ollama_details(entry)}
    answer |= {"model_info": info, "capabilities": capabilities, "modified_at": started_at(request)}
    return web.json_response(answer)


async def ollama_management(request: web.Request) -> web.Response:
    """Pull, push, create, copy, delete: Nexus routes to models, it does not keep any."""
    why = (
        "Nexus routes requests to the models its backends serve and does not manage models: "
        "pull, push, create, copy and delete them on the backend itself."
    )
    raise NexusError.of(501, "model_management", why)


class OllamaLines(NativeStream):
    """An Ollama backend's own NDJSON stream, relayed as it is; its done line's counts are usage."""

    def line(self, line: bytes) -> tuple[bytes, str | None]:
        try:
            document = parse_json(line)
        except ValueError:
            return b"", None
        if not isinstance(document, dict):
            return b"", None
        if "error" in document:
            self.failed = True
            return line + b"\n", "error"
        if document.get("done") is True:
            self.usage = document
            return line + b"\n", "end"
        return line + b"\n", None

    def error(self, endpoint: str, model: str, message: str) -> bytes:
        if self.failed:
            return b""
        self.failed = True
        return OllamaFormat.line({"error": message})


class OllamaFormat(OpenAIFormat):
    """Writes answers as Ollama's endpoint `kind` does: whole, or NDJSON ending in a done line;
    streamed tool calls are sent whole when the answer finishes, as Ollama sends them."""

    keeps_usage = True
    native_api = "ollama"
    content_type = "application/x-ndjson"
    native_stream = OllamaLines
    error = OllamaLines.error  # the last words of a stream Nexus had to cut, as a backend's

    def __init__(self, body: dict[str, Any], kind: str) -> None:
        self.native_body = body
        self.native_path = OLLAMA_PREFIX + kind
        self.kind = kind
        self.model = ""  # the model asked for, until the answer names the one that served
        self.input_estimate = 0  # prompt tokens, for a backend that reports no usage
        self.started = time.perf_counter()
        self.first: float | None = None  # when the first answer text came
        self.output_chars = 0
        self.usage: dict[str, Any] | None = None
        self.timings: dict[str, Any] | None = None  # llama.cpp's, on its last chunk
        self.done_reason = "stop"
        self.calls: dict[Any, dict[str, Any]] = {}  # a streamed tool call, by its index or id
        self.last_call: Any = None
        self.failed = False
        self.head_model = ""  # the model named in the encoded head of text lines
        self.head = b""

    @staticmethod
    def error_document(error: NexusError) -> dict[str, Any]:
        return {"error": error.message}

    @staticmethod
    def line(document: dict[str, Any]) -> bytes:
        return json.dumps(document, ensure_ascii=False).encode() + b"\n"

    def piece(self, text: str, thinking: str = "", calls: Any = None, **done: Any) -> dict:
        """One answer object: a stream line, or the last one given `done` (reason and counts)."""
        out: dict[str, Any] = {"model": self.model, "created_at": ollama_time()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            out["message"] = message
        else:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        out["done"] = bool(done)
        out.update(done)
        return out

    def counts(self, reason: str, usage: Any, timings: Any = None) -> dict[str, Any]:
        """The last object's reason, token counts and durations: the backend's, else Nexus's."""
        found = usage_or_estimate(usage, self.input_estimate, answer_tokens(self.output_chars))
        now = time.perf_counter()
        first = self.first or self.started  # a whole answer: its time was all generation
        prompt_seconds, eval_seconds = first - self.started, now - first
        if isinstance(timings, dict):  # llama.cpp's, in milliseconds
            prompt_ms, predicted_ms = timings.get("prompt_ms"), timings.get("predicted_ms")
            if isinstance(prompt_ms, int | float) and isinstance(predicted_ms, int | float):
                prompt_seconds, eval_seconds = prompt_ms / 1000, predicted_ms / 1000
        return {
            "done_reason": reason,
            "total_duration": int((now - self.started) * NANOSECONDS),
            "load_duration": 0,
            "prompt_eval_count": found.prompt,
            "prompt_eval_duration": max(int(prompt_seconds * NANOSECONDS), 1),
            "eval_count": found.completion,
            "eval_duration": max(int(eval_seconds * NANOSECONDS), 1),
        }

    def body(self, answer: bytes, parsed: dict[str, Any]) -> bytes:
        if self.kind in ("embed", "embeddings"):
            return json.dumps(self.embeddings(parsed)).encode()
        self.model = parsed.get("model") or self.model
        choice, thinking, text, calls = reply_parts(parsed)
        self.output_chars = len(text) + len(thinking)
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        done = self.counts(reason, parsed.get("usage"), parsed.get("timings"))
        last = self.piece(text, thinking, ollama_calls(calls), **done)
        return json.dumps(last, ensure_ascii=False).encode()

    def embeddings(self, parsed: dict[str, Any]) -> dict[str, Any]:
        data = parsed.get("data")
        items = [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []
        items.sort(key=lambda d: d.get("index") if isinstance(d.get("index"), int) else 0)
        vectors = [d.get("embedding") for d in items if isinstance(d.get("embedding"), list)]
        if self.kind == "embeddings":
            return {"embedding": vectors[0] if vectors else []}
        return {
            "model": parsed.get("model") or self.model,
            "embeddings": vectors,
            "total_duration": int((time.perf_counter() - self.started) * NANOSECONDS),
            "load_duration": 0,
            "prompt_eval_count": usage_or_estimate(parsed.get("usage"), 0, 0).prompt,
        }

    def chunk(self, data: bytes, chunk: dict[str, Any]) -> bytes:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            self.model = chunk["model"]
        choices = chunk.get("choices")
        if not choices:
            return b""
        choice = choices[0]
        delta = choice.get("delta") or {}
        text = delta.get("content") if delta else choice.get("text")
        text = text if isinstance(text, str) else ""
        thinking = reasoning_of(delta)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            self.gather_call(call)
        out = b""
        if text or thinking:
            if self.first is None:
                self.first = time.perf_counter()
            self.output_chars += len(text) + len(thinking)
            out = self.text_line(text) if not thinking else self.line(self.piece(text, thinking))
        if choice.get("finish_reason"):
            if choice["finish_reason"] == "length":
                self.done_reason = "length"
            out += self.flush_calls()
        return out

    def text_line(self, text: str) -> bytes:
        """The line piece() makes for answer text, from a head encoded once per model (faster)."""
        if self.head_model != self.model:
            self.head_model = self.model
            self.head = b'{"model": ' + JSON_TEXT(self.model).encode() + b', "created_at": "'
        chat = self.kind == "chat"
        field = b'", "message": {"role": "assistant", "content": ' if chat else b'", "response": '
        tail = b'}, "done": false}\n' if chat else b', "done": false}\n'
        parts = (self.head, ollama_time().encode(), field, JSON_TEXT(text).encode(), tail)
        return b"".join(parts)

    def gather_call(self, call: Any) -> None:
        """A streamed tool call's head (id, name) or a fragment of its arguments."""
        if not isinstance(call, dict):
            return
        key, function, arguments = call_delta(call, self.last_call)
        self.last_call = key
        gathered = self.calls.setdefault(key, {"id": None, "name": "", "arguments": []})
        if call.get("id") and not gathered["id"]:
            gathered["id"] = call["id"]
        if isinstance(function.get("name"), str) and function["name"]:
            gathered["name"] = function["name"]
        if arguments:
            gathered["arguments"].append(arguments)
            self.output_chars += len(arguments)

    def flush_calls(self) -> bytes:
        """The line with the tool calls gathered so far (Ollama sends them whole)."""
        if not self.calls:
            return b""
        gathered = self.calls.values()
        calls = [chat_call(c["id"], c["name"], "".join(c["arguments"])) for c in gathered]
        self.calls.clear()
        if self.first is None:
            self.first = time.perf_counter()
        return self.line(self.piece("", "", ollama_calls(calls)))

    def answer_usage(self, parsed: dict[str, Any]) -> dict[str, Any]:
        """A native whole answer carries its counts at the top (usage_from reads them)."""
        return parsed

    def end(self) -> bytes:
        if self.failed:
            return b""  # the error line was the stream's last word
        out = self.flush_calls()  # first: it may be the first answer, which counts() times
        done = self.counts(self.done_reason, self.usage, self.timings)
        return out + self.line(self.piece("", **done))


def ollama_loaded(request: web.Request, body: dict[str, Any], kind: str) -> web.Response:
    """Ollama's load (or unload) request: done at once, as backends load models themselves."""
    fmt = OllamaFormat(body, kind)
    fmt.model = require_model(body)
    optional_field(body, "stream", bool)
    visible_model(request, fmt.model)
    unload = body.get("keep_alive") in (0, "0", "0s", "0m")  # Ollama's way to unload
    return web.json_response(fmt.piece("", done_reason="unload" if unload else "load"))


async def ollama_inference(request: web.Request) -> web.StreamResponse:
    """POST /api/chat, generate, embed and embeddings: translated, routed and answered."""
    body = parse_json_body(await request.read())
    kind = request.path.removeprefix(OLLAMA_PREFIX)
    if kind == "chat":
        if body.get("messages") in (None, []):
            return ollama_loaded(request, body, kind)
        endpoint, internal = "chat", ollama_to_chat(body)
    elif kind == "generate":
        if body.get("prompt") in (None, "") and not body.get("suffix") and not body.get("images"):
            return ollama_loaded(request, body, kind)
        endpoint, internal = ollama_generate_to_internal(body)
    else:
        endpoint, internal = "embeddings", ollama_embed_to_internal(body, kind == "embeddings")
    fmt = OllamaFormat(body, kind)
    needs = NEEDS_READERS[endpoint](internal)
    fmt.model, fmt.input_estimate = needs.model, needs.prompt_tokens
    return await send_through_door(request, endpoint, internal, needs, fmt)


def add_ollama_routes(app: web.Application) -> None:
    """The /api/* routes; other paths under /api/ are 404s in Ollama's shape."""
    app.router.add_get("/api/version", ollama_version)
    app.router.add_get("/api/tags", ollama_tags)
    app.router.add_get("/api/ps", ollama_ps)
    app.router.add_post("/api/show", ollama_show)
    for path in OLLAMA_INFERENCE_PATHS:
        app.router.add_post(path, ollama_inference)
    for verb in ("pull", "push", "create", "copy", "delete", "blobs/{digest}"):
        app.router.add_route("*", OLLAMA_PREFIX + verb, ollama_management)


# ==============================================================================================
# HTTP handlers
# Owns: the API of SPEC §2. Each handler reads and checks its input, then hands over to the
# proxy or answers from the registry and stats.
# Must not: build error responses itself (raise NexusError) or talk to backends directly.
# ==============================================================================================


def openai_handler(endpoint: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The handler of an OpenAI endpoint: the client's own request is routed and sent."""
    needs_of = NEEDS_READERS[endpoint]

    async def handler(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = parse_json_body(raw)
        return await proxy(request, endpoint, body, raw, needs_of(body))

    return handler


chat_completions = openai_handler("chat")  # POST /v1/chat/completions
completions = openai_handler("completions")  # POST /v1/completions
embeddings = openai_handler("embeddings")  # POST /v1/embeddings


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the models the caller may use."""
    return web.json_response({"object": "list", "data": visible_models(request)})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model_id}."""
    return web.json_response(visible_model(request, request.match_info["model_id"]))


async def health(request: web.Request) -> web.Response:
    """GET /health: the fleet's status in one word, Nexus's version and uptime."""
    registry = request.app[REGISTRY]
    total, healthy = len(registry.backends), len(registry.healthy())
    status = "healthy" if total and healthy == total else "degraded" if healthy else "unhealthy"
    answer = {
        "status": status,
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - request.app[STATS].started, 1),
        "backends": {"total": total, "healthy": healthy, "unhealthy": total - healthy},
        "models": len(model_entries(registry, request.app[SETTINGS])),
    }
    return web.json_response(answer)


def require_admin(request: web.Request) -> None:
    """Admit an admin key when keys are configured; else only a caller on loopback, not proxied."""
    if request.app[KEYS]:
        key = request.get(API_KEY)  # the middleware has checked it is a valid key
        if key is None:
            raise unauthorized("The admin API needs an admin key.")
        if not key.admin:
            raise admin_forbidden(key)
        return
    peer = request.remote or ""
    proxied = [name for name in PROXY_HEADERS if name in request.headers]
    if peer not in ("127.0.0.1", "::1") and not peer.startswith("127."):
        why = "The admin API only answers requests from this machine (loopback)."
    elif proxied:
        why = (
            f"The admin API only answers requests from this machine, and this one came through "
            f"a proxy ({proxied[0]}); configure [auth] keys to use it from elsewhere."
        )
    else:
        return
    raise NexusError.of(403, "admin_forbidden", why)


async def list_backends(request: web.Request) -> web.Response:
    """GET /v1/backends."""
    backends = request.app[REGISTRY].backends.values()
    return web.json_response({"object": "list", "data": [b.public() for b in backends]})


async def add_backend(request: web.Request) -> web.Response:
    """POST /v1/backends (admin): register a backend while Nexus runs."""
    require_admin(request)
    body = parse_json_body(await request.read())
    app = request.app
    url = body.get("url")
    if not isinstance(url, str):
        raise bad_request("url is required (the server's root, e.g. http://host:11434)", "url")
    for name in ("name", "type"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise bad_request(f"{name} must be a string", name)
    priority = body.get("priority", 50)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise bad_request("priority must be an integer 0-100", "priority")
    kind = body.get("type")
    if kind is None:
        try:
            url = normalise_url(url)
        except ValueError as exc:
            raise bad_request(str(exc), "url") from None
        timeout = app[SETTINGS].health_check.timeout_seconds
        kind = await detect_backend_type(app[CLIENT], url, timeout)
        if kind is None:
            why = f"No LLM server answered at {url}; check the URL or pass type."
            raise bad_request(why, "url")
    settings = BackendSettings(name=body.get("name") or "", url=url, type=kind, priority=priority)
    try:
        validate_backend(settings, "backend", dict(os.environ))
    except ConfigError as exc:
        raise bad_request(str(exc), exc.key.split(".")[-1]) from None
    registry = app[REGISTRY]
    if settings.name in registry.backends:
        raise NexusError.of(409, "backend_exists", f"{settings.name} already exists")
    if registry.find_url(settings.url):
        raise NexusError.of(409, "backend_exists", f"{settings.url} is already a backend")
    backend = Backend.from_settings(settings, source="admin")
    registry.add(backend)
    await first_poll(app, backend)
    log.info("backend %s added (%s, %s)", backend.name, backend.type, backend.url)
    return web.json_response(backend.public(), status=201)


async def remove_backend(request: web.Request) -> web.Response:
    """DELETE /v1/backends/{name} (admin)."""
    require_admin(request)
    name = request.match_info["name"]
    if request.app[REGISTRY].remove(name) is None:
        raise NexusError.of(404, "backend_not_found", f"No backend {name!r}")
    log.info("backend %s removed", name)
    return web.json_response({"name": name, "deleted": True})


def lifecycle_response(op: Operation, status: int = 202) -> web.Response:
    """An operation as JSON, with the X-Nexus-Lifecycle-* headers."""
    headers = {"X-Nexus-Lifecycle-Status": op.status, "X-Nexus-Lifecycle-Operation": op.id}
    return web.json_response(op.public(), status=status, headers=headers)


def keep_alive_of(body: dict[str, Any]) -> Any:
    """How long a loaded model stays (seconds or a duration such as "30m"); default: for good."""
    keep_alive = body.get("keep_alive", DEFAULT_KEEP_ALIVE)
    if isinstance(keep_alive, bool) or not isinstance(keep_alive, int | float | str):
        raise bad_request('keep_alive must be seconds or a duration such as "30m"', "keep_alive")
    return keep_alive


async def check_loadable(app: web.Application, model_id: str, *backends: Backend) -> None:
    """409 while an operation on the model runs; 400 when a load would eat into VRAM headroom."""
    target = backends[-1]
    app[LIFECYCLE].check_free(model_id, *backends)
    await refresh_loaded(app, target)
    app[LIFECYCLE].check_free(model_id, *backends)  # another may have begun while it was read
    headroom = app[SETTINGS].lifecycle.vram_headroom_percent
    missing, why = vram_missing(target, model_id, headroom)
    if missing > 0:
        context = {"missing_gb": round(missing / GIB, 2), "backend_id": target.name}
        raise NexusError.of(400, "insufficient_vram", why, param="model_id", context=context)


async def load_model(request: web.Request) -> web.Response:
    """POST /v1/models/load {model_id, backend_id}: 202 and an operation (SPEC §5.1)."""
    require_admin(request)
    app = request.app
    body = parse_json_body(await request.read())
    backend = lifecycle_backend(app[REGISTRY], body.get("backend_id"), "backend_id")
    model_id = lifecycle_model(backend, body.get("model_id"), app[SETTINGS].routing.aliases)
    keep_alive = keep_alive_of(body)
    await check_loadable(app, model_id, backend)
    work = functools.partial(load_step, app, backend=backend, keep_alive=keep_alive)
    return lifecycle_response(start_operation(app, "load", model_id, backend, None, work))


async def unload_model(request: web.Request) -> web.Response:
    """DELETE /v1/models/{model_id}?backend_id=...: 202 and an operation; 409 while in use."""
    require_admin(request)
    app = request.app
    backend = lifecycle_backend(app[REGISTRY], request.query.get("backend_id"), "backend_id")
    model_id = lifecycle_model(backend, request.match_info["model_id"], {})
    app[LIFECYCLE].check_free(model_id, backend)
    if in_flight := backend.model_in_flight.get(model_id, 0):
        why = (
            f"{backend.name} has {in_flight} request(s) for {model_id} in flight; unload it once "
            "they are done, or migrate it (POST /v1/models/migrate), which waits for them."
        )
        raise NexusError.of(409, "model_in_use", why)
    work = functools.partial(unload_step, app, backend=backend)
    return lifecycle_response(start_operation(app, "unload", model_id, backend, None, work))


async def migrate_model(request: web.Request) -> web.Response:
    """POST /v1/models/migrate {model_id, source_backend_id, target_backend_id}: the target
    loads while the source serves; the source unloads once it has nothing in flight."""
    require_admin(request)
    app = request.app
    body = parse_json_body(await request.read())
    registry = app[REGISTRY]
    source = lifecycle_backend(registry, body.get("source_backend_id"), "source_backend_id")
    target = lifecycle_backend(registry, body.get("target_backend_id"), "target_backend_id")
    if source is target:
        raise bad_request("source and target are the same backend", "target_backend_id")
    model_id = lifecycle_model(source, body.get("model_id"), app[SETTINGS].routing.aliases)
    lifecycle_model(target, model_id, {})
    keep_alive = keep_alive_of(body)
    await check_loadable(app, model_id, source, target)

    async def work(op: Operation) -> None:
        await load_step(app, op, target, keep_alive)
        await drain_step(app, op, source, target)
        await unload_step(app, op, source)

    return lifecycle_response(start_operation(app, "migrate", model_id, target, source, work))


async def get_operation(request: web.Request) -> web.Response:
    """GET /v1/operations/{id}: where an operation is (in_progress, completed, failed: why)."""
    require_admin(request)
    op_id = request.match_info["operation_id"]
    op = request.app[LIFECYCLE].operations.get(op_id)
    if op is None:
        kept = f"the last {OPERATIONS_KEPT} finished ones are kept"
        raise NexusError.of(404, "operation_not_found", f"No operation {op_id!r} ({kept}).")
    return lifecycle_response(op, status=200)


async def dashboard(request: web.Request) -> web.StreamResponse:
    """GET /: the bundled dashboard page."""
    path = asset_path("dashboard.html")
    if not path.is_file():
        raise NexusError(404, "not_found_error", "not_found", "The dashboard is not bundled.")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


# ==============================================================================================
# Logging
# Owns: Nexus's log: its formats (pretty or JSON lines), the request lines, and the secrets
# kept out of every line.
# Must not: log a prompt, an answer or a key.
# ==============================================================================================


def request_fields(record: RequestRecord, status: int, latency_ms: float) -> dict[str, Any]:
    """A request line's fields, as a JSON log line carries them."""
    return {
        "request_id": record.id,
        "endpoint": record.endpoint,
        "model": record.model,
        "backend": record.backend,
        "status": status,
        "latency_ms": latency_ms,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "route_reason": record.route_reason,
        "retries": record.retries,
        "fallback": record.fallback,
        "key": record.key,
    }


@functools.lru_cache(maxsize=4)
def second_stamp(second: int, layout: str, utc: bool) -> str:
    """A log line's time to the second: the same for every line in that second."""
    return time.strftime(layout, time.gmtime(second) if utc else time.localtime(second))


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a library's malformed call: keep what it said
            message = f"{record.msg} {record.args}"
        line: dict[str, Any] = {
            "time": self.stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)

    def request_line(
        self, created: float, message: str, record: RequestRecord, status: int, latency_ms: float
    ) -> str:
        line = {"time": self.stamp(created), "level": "info", "logger": log.name}
        line["message"] = message
        line.update(request_fields(record, status, latency_ms))
        return json.dumps(line, default=str)

    @staticmethod
    def stamp(created: float) -> str:
        second = second_stamp(int(created), "%Y-%m-%dT%H:%M:%S", True)
        return f"{second}.{int(created % 1 * 1000):03d}Z"


class PrettyLogFormatter(logging.Formatter):
    """`2026-01-01 12:00:00,123 INFO    message`: logging's own layout, in local time."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s")

    def request_line(
        self, created: float, message: str, record: RequestRecord, status: int, latency_ms: float
    ) -> str:
        """One request's log line: the message (the fields are in it already)."""
        stamp = second_stamp(int(created), "%Y-%m-%d %H:%M:%S", False)
        return f"{stamp},{int(created % 1 * 1000):03d} INFO    {message}"


class RedactingFormatter(logging.Formatter):
    """Masks every key Nexus knows of in another formatter's line (an exception's, a URL's)."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self.inner = inner
        self.secrets = sorted(set(secrets), key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(self.inner.format(record))

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text


class LogHandler(logging.StreamHandler):
    """stderr through the configured formatter, keys masked. Each inference request's line (the
    hot path) skips the logger's dispatch and its LogRecord: the same line, for less work."""

    def __init__(self, formatter: JsonLogFormatter | PrettyLogFormatter, secrets: list[str]):
        super().__init__(sys.stderr)
        self.request_formatter = formatter  # writes the request lines; .formatter redacts
        self.redacting = RedactingFormatter(formatter, secrets)
        self.setFormatter(self.redacting)

    def write_request_line(
        self, message: str, record: RequestRecord, status: int, latency_ms: float
    ) -> None:
        line = self.request_formatter.request_line(time.time(), message, record, status, latency_ms)
        text = self.redacting.redact(line)  # before the lock: the lock guards the write only
        # stderr closed or gone: like logging's own handlers, go on serving
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.stream.write(text + "\n")


def known_secrets(settings: Settings, env: dict[str, str]) -> list[str]:
    """The values of every variable the settings read a key from."""
    names = [b.api_key_env for b in settings.backends] + [k.key_env for k in settings.auth.api_keys]
    values = [env.get(name, "") for name in names if name]
    # A value this short is no key, and masking it would garble ordinary words.
    return [value for value in values if len(value) >= 8]


def log_uncaught(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    """Log an exception nothing caught (sys.excepthook), instead of a bare traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    log.critical("Nexus stopped on an unexpected error", exc_info=(kind, value, tb))


def setup_logging(settings: Settings, env: dict[str, str]) -> None:
    """Every line on stderr, ours and other libraries', in the configured format."""
    inner = JsonLogFormatter() if settings.logging.format == "json" else PrettyLogFormatter()
    handler = LogHandler(inner, known_secrets(settings, env))
    # Nothing Nexus logs uses the caller's file, thread or process: skipping them makes each
    # record cheaper (logging's own documented optimisation).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.logging.level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # Python's warnings become log lines too
    sys.excepthook = log_uncaught


# ==============================================================================================
# Stats
# Owns: counters, the last 100 requests (metadata only) and the one log line per request.
# Must not: keep any prompt or answer text, or any key.
# ==============================================================================================

RECENT_REQUESTS = 100
RecentRequest = tuple[float, RequestRecord, int, float]  # time.time(), record, status, seconds
STATS_PUSH_SECONDS = 1.0
CONTENT_LOG_CHARS = 10_000
# Latency buckets in seconds, from a cached answer on loopback to a long generation on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)
# The error kind counted for an answer that carries no error code of Nexus's own (a backend's
# 4xx passed through, a stream cut after its first byte).
ERROR_KINDS = {
    400: "invalid_request",
    401: "authentication",
    403: "permission",
    404: "not_found",
    413: "request_too_large",
    429: "rate_limited",
    499: "client_disconnected",
    500: "internal_error",
    502: "backend_failed",
    503: "no_backend_available",
    504: "backend_timeout",
}
# A model's fields in /v1/stats, and their value for a model no healthy backend serves now.
MODEL_STATS = {"backends": (), "context_length": None, "capabilities": None, "loaded_on": ()}


class Histogram:
    """Observations in seconds, counted per bucket (not cumulative: the exposition sums them)."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds


class Stats:
    """Request counters since start and the most recent requests, for /v1/stats and /metrics."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.total = self.success = self.errors = self.fallbacks = 0
        self.per_model: collections.Counter[str] = collections.Counter()
        self.recent: collections.deque[RecentRequest] = collections.deque(maxlen=RECENT_REQUESTS)
        self.by_outcome: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.error_kinds: collections.Counter[str] = collections.Counter()
        self.tokens = {"prompt": 0, "completion": 0}
        self.duration, self.ttft = Histogram(), Histogram()

    def record(self, record: RequestRecord, status: int, seconds: float, error: str | None) -> None:
        """Count a finished request and keep its record among the recent ones."""
        self.total += 1
        if status < 400:
            self.success += 1
            if record.fallback:
                self.fallbacks += 1
        else:
            self.errors += 1
            self.error_kinds[error or ERROR_KINDS.get(status, f"http_{status}")] += 1
        if record.backend is None:  # never routed (unknown model, bad request): the name a
            # client sent is not a label, or any client could grow these without bound
            self.by_outcome["", "", status] += 1
        else:
            self.per_model[record.model] += 1
            self.by_outcome[record.model, record.backend, status] += 1
        self.duration.observe(seconds)
        if record.ttft_ms is not None:
            self.ttft.observe(record.ttft_ms / 1000)
        self.tokens["prompt"] += record.prompt_tokens or 0
        self.tokens["completion"] += record.completion_tokens or 0
        self.recent.append((time.time(), record, status, seconds))


def recent_entry(when: float, record: RequestRecord, status: int, seconds: float) -> dict[str, Any]:
    """One of the most recent requests as /v1/stats lists it."""
    return {
        "time": when,
        "id": record.id,
        "model": record.model,
        "backend": record.backend,
        "status": status,
        "latency_ms": round(seconds * 1000, 2),
        "tokens": {"prompt": record.prompt_tokens, "completion": record.completion_tokens},
        "route_reason": record.route_reason,
        "key": record.key,
    }


def backend_stats(b: Backend) -> dict[str, Any]:
    """One backend as /v1/stats lists it: its public view (but its source), load and latency."""
    entry = b.public()
    del entry["source"]
    return entry | {
        "requests": b.requests,
        "pending": b.in_flight,
        "avg_latency_ms": round(b.latency_ema_ms, 2) if b.latency_ema_ms else None,
        "avg_ttft_ms": round(b.ttft_ema_ms, 2) if b.ttft_ema_ms else None,
        "error_rate": round(b.errors / b.requests, 4) if b.requests else 0.0,
    }


def key_spending(key: ApiKey) -> float:
    """What a key spent this month."""
    return key.roll_month(month_of(dt.datetime.now(dt.UTC)))


def stats_snapshot(app: web.Application) -> dict[str, Any]:
    """/v1/stats as a dict: the fleet, the counters and the recent requests."""
    stats = app[STATS]
    entries = model_entries(app[REGISTRY], app[SETTINGS])
    models = []
    for name in sorted(set(entries) | set(stats.per_model)):
        entry = entries.get(name, {})
        shown = {key: entry.get(key, empty) for key, empty in MODEL_STATS.items()}
        models.append({"name": name, "requests": stats.per_model.get(name, 0)} | shown)
    return {
        "version": __version__,
        "uptime_seconds": round(time.monotonic() - stats.started, 1),
        "requests": {"total": stats.total, "success": stats.success, "errors": stats.errors},
        "backends": [backend_stats(b) for b in app[REGISTRY].backends.values()],
        "models": models,
        "recent": [recent_entry(*entry) for entry in stats.recent],
        "budget": app[BUDGET].snapshot(),
        "sessions": app[SESSIONS].snapshot(time.monotonic()),
        "keys": [
            {
                "name": k.name,
                "requests": k.requests,
                "tokens": k.tokens,
                "rate_limited": k.rate_limited,
                "spent_usd": round(key_spending(k), 6),
                "monthly_limit_usd": k.monthly_limit_usd or None,
            }
            for k in app[KEYS]
        ],
    }


async def get_stats(request: web.Request) -> web.Response:
    """GET /v1/stats."""
    return web.json_response(stats_snapshot(request.app))


async def stream_stats(request: web.Request) -> web.StreamResponse:
    """The dashboard's live feed: the /v1/stats document once a second, as Server-Sent Events."""
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    stopping = request.app[STOPPING]
    with contextlib.suppress(ConnectionError):
        while not stopping.is_set():
            payload = json.dumps(stats_snapshot(request.app)).encode()
            await response.write(b"data: " + payload + b"\n\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), STATS_PUSH_SECONDS)
    return response


def usage_entry(row: UsageRow | None, limit: float) -> dict[str, Any]:
    """One ledger row as /v1/usage shows it."""
    row = row or [0.0, 0, 0]
    return {
        "spent_usd": round(row[0], 6),
        "requests": int(row[1]),
        "tokens": int(row[2]),
        "monthly_limit_usd": limit or None,
    }


async def usage(request: web.Request) -> web.Response:
    """GET /v1/usage: a month's spend, requests and tokens per key and in total."""
    app = request.app
    ledger = app[LEDGER]
    month = request.query.get("month") or month_of(dt.datetime.now(dt.UTC))
    if not MONTH_PATTERN.fullmatch(month):
        raise bad_request(f"month must be YYYY-MM (e.g. {ledger.month}), got {month!r}", "month")
    rows = await ledger.month_rows(month)
    limits = {k.name: k.monthly_limit_usd for k in app[KEYS]}
    document = {
        "object": "usage",
        "month": month,
        "source": "ledger" if ledger.persistent else "memory",
        "total": usage_entry(rows.get(TOTAL_ROW), app[BUDGET].monthly_limit_usd),
        "keys": [
            {"name": name} | usage_entry(rows.get(name), limits.get(name, 0.0))
            for name in sorted(set(limits) | set(rows) - {TOTAL_ROW})
        ],
    }
    return web.json_response(document)


def log_request(record: RequestRecord, status: int, seconds: float) -> None:
    """The one line per inference request: metadata only, never content or keys."""
    if not log.isEnabledFor(logging.INFO):
        return
    latency_ms = round(seconds * 1000, 2)
    message = (
        f"request {record.id} {record.endpoint} model={record.model} backend={record.backend} "
        f"status={status} latency_ms={latency_ms} "
        f"tokens={record.prompt_tokens}/{record.completion_tokens} "
        f"reason={record.route_reason} retries={record.retries} key={record.key}"
    )
    handlers = logging.root.handlers
    if len(handlers) == 1 and type(handlers[0]) is LogHandler:  # `nexus serve`'s own
        handlers[0].write_request_line(message, record, status, latency_ms)
    else:  # logging set up by another program (a test capturing records): a record as usual
        log.info("%s", message, extra={"fields": request_fields(record, status, latency_ms)})


def answer_text(response: web.StreamResponse | None) -> str | None:
    """The text of a non-streamed answer: chat's, Anthropic's or the Responses API's shape."""
    if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return None
    answer = None
    with contextlib.suppress(ValueError):
        answer = json.loads(response.body)
    if not isinstance(answer, dict):
        return None
    texts: list[Any] = []
    if isinstance(answer.get("content"), list):  # Anthropic's Messages
        texts = [block.get("text") for block in answer["content"] if isinstance(block, dict)]
    elif isinstance(answer.get("output"), list):  # a Responses API response
        for item in answer["output"]:
            if isinstance(item, dict) and item.get("type") == "message":
                texts += [p.get("text") for p in item.get("content") or () if isinstance(p, dict)]
    elif isinstance(answer.get("choices"), list):
        for choice in answer["choices"]:
            if isinstance(choice, dict):
                said = choice.get("message")
                texts.append(said.get("content") if isinstance(said, dict) else choice.get("text"))
    found = [text for text in texts if isinstance(text, str)]
    return "".join(found) if found else None


async def log_content(
    request: web.Request, record: RequestRecord, response: web.StreamResponse | None
) -> None:
    """Only with `log_content = true`, at debug level: the prompt and the answer's text."""
    if not log.isEnabledFor(logging.DEBUG):
        return
    body = None
    with contextlib.suppress(ValueError, web.HTTPException, ConnectionError):
        body = json.loads(await request.read())
    keys = body.keys() if isinstance(body, dict) else ()
    prompt = next((body[k] for k in ("messages", "prompt", "input") if k in keys), None)
    prompt_text = json.dumps(prompt)[:CONTENT_LOG_CHARS]
    answer = answer_text(response)
    answer = answer[:CONTENT_LOG_CHARS] if answer is not None else None
    content = {"request_id": record.id, "prompt": prompt_text, "answer": answer}
    message = "content %s prompt=%s answer=%s"
    log.debug(message, record.id, prompt_text, json.dumps(answer), extra={"fields": content})


# ==============================================================================================
# Metrics
# Owns: GET /metrics, the Prometheus text exposition (format 0.0.4) of Stats and the registry,
# rendered only when scraped.
# Must not: count anything itself (Stats does, once per request) or expose a key.
# ==============================================================================================

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: str) -> str:
    """A Prometheus label value, escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def labels(**values: Any) -> str:
    """A sample's labels, as they follow its name: {name="value",...}."""
    return "{" + ",".join(f'{k}="{escape_label(str(v))}"' for k, v in values.items()) + "}"


def histogram_samples(histogram: Histogram) -> list[tuple[str, Any]]:
    """A histogram's samples: its cumulative buckets, sum and count."""
    cumulative = list(itertools.accumulate(histogram.counts))
    bounds = (*LATENCY_BUCKETS, "+Inf")
    samples = [(f'_bucket{{le="{b}"}}', n) for b, n in zip(bounds, cumulative, strict=True)]
    return [*samples, ("_sum", histogram.sum), ("_count", cumulative[-1])]


# A metric's samples, read from the app when scraped: (what follows the name: a suffix and/or
# labels, value) pairs, or None to leave the family out.
MetricSamples = Callable[[web.Application], "Iterable[tuple[str, Any]] | None"]


def key_samples(value: Callable[[ApiKey], Any]) -> MetricSamples:
    """A per-key metric's samples by the key's name; None (the family left out) without keys."""
    return lambda app: [(labels(key=k.name), value(k)) for k in app[KEYS]] or None


# What /metrics shows, in this order: each family's name and type, its help and its samples.
METRICS: dict[tuple[str, str], tuple[str, MetricSamples]] = {
    ("nexus_requests_total", "counter"): (
        "Inference requests answered, by model asked for, backend that answered and HTTP status.",
        lambda app: [
            (labels(model=m, backend=b, status=s), n)
            for (m, b, s), n in sorted(app[STATS].by_outcome.items())
        ],
    ),
    ("nexus_errors_total", "counter"): (
        "Inference requests answered with an error, by kind (the error code).",
        lambda app: [(labels(type=k), n) for k, n in sorted(app[STATS].error_kinds.items())],
    ),
    ("nexus_fallbacks_total", "counter"): (
        "Requests served by a fallback model.",
        lambda app: [("", app[STATS].fallbacks)],
    ),
    ("nexus_request_duration_seconds", "histogram"): (
        "Time from receiving an inference request to its last byte.",
        lambda app: histogram_samples(app[STATS].duration),
    ),
    ("nexus_ttft_seconds", "histogram"): (
        "Time to the first streamed chunk of an answer.",
        lambda app: histogram_samples(app[STATS].ttft),
    ),
    ("nexus_tokens_total", "counter"): (
        "Tokens reported by backends, by type.",
        lambda app: [(labels(type=k), n) for k, n in app[STATS].tokens.items()],
    ),
    ("nexus_backends_total", "gauge"): (
        "Backends known.",
        lambda app: [("", len(app[REGISTRY].backends))],
    ),
    ("nexus_backends_healthy", "gauge"): (
        "Backends healthy now.",
        lambda app: [("", len(app[REGISTRY].healthy()))],
    ),
    ("nexus_models_available", "gauge"): (
        "Models (and aliases) a healthy backend serves now.",
        lambda app: [("", len(model_entries(app[REGISTRY], app[SETTINGS])))],
    ),
    ("nexus_queue_depth", "gauge"): (
        "Requests waiting in the queue for a backend slot.",
        lambda app: [("", len(app[QUEUE]))],
    ),
    ("nexus_sessions_tracked", "gauge"): (
        "Sessions whose last backend Nexus remembers, for session affinity.",
        lambda app: [("", app[SESSIONS].tracked(time.monotonic()))],
    ),
    ("nexus_session_affinity_total", "counter"): (
        "Requests served by the backend of their session's last turn (hit), by another (move),"
        " or with no session to follow (new).",
        lambda app: [
            (labels(outcome="hit"), app[SESSIONS].hits),
            (labels(outcome="move"), app[SESSIONS].moves),
            (labels(outcome="new"), app[SESSIONS].new),
        ],
    ),
    ("nexus_budget_spending_usd", "gauge"): (
        "Estimated spend on cloud backends this month, in USD.",
        lambda app: [("", app[BUDGET].spent_usd)],
    ),
    ("nexus_key_requests_total", "counter"): (
        "Inference requests made with each API key, by the key's name.",
        key_samples(operator.attrgetter("requests")),
    ),
    ("nexus_key_rate_limited_total", "counter"): (
        "Requests refused (429) by each API key's rpm or tpm limit, by the key's name.",
        key_samples(operator.attrgetter("rate_limited")),
    ),
    ("nexus_key_spending_usd", "gauge"): (
        "Estimated spend on cloud backends this month with each API key, in USD.",
        key_samples(key_spending),
    ),
}


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: the whole page, from Stats and the registry as they are now."""
    lines: list[str] = []
    for (name, kind), (text, read) in METRICS.items():
        if (samples := read(request.app)) is not None:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines.extend(f"{name}{labels} {value!r}" for labels, value in samples)
    body = ("\n".join(lines) + "\n").encode()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


# ==============================================================================================
# App assembly
# Owns: the aiohttp application, its typed state, the error middleware, and the background
# tasks (health, discovery) that live as long as the app.
# ==============================================================================================

# The doors other than OpenAI's, by path prefix: their errors take their API's shape.
FRONT_DOORS: tuple[tuple[str, type[OpenAIFormat]], ...] = (
    (MESSAGES_PATH, AnthropicFormat),
    (RESPONSES_PATH, ResponsesFormat),
    (OLLAMA_PREFIX.rstrip("/"), OllamaFormat),
)


def door_at(path: str) -> type[OpenAIFormat]:
    """The front door a path belongs to: its prefix's, else OpenAI's."""
    for prefix, door in FRONT_DOORS:
        if path == prefix or path.startswith(prefix + "/"):
            return door
    return OpenAIFormat


def error_response(error: NexusError, request: web.Request) -> web.Response:
    """The one place errors are rendered, in the shape of the API the path belongs to."""
    headers = {**error.headers, "X-Request-Id": request.get(REQUEST_ID, "")}
    budget = request.app[BUDGET]
    if budget.enabled:
        headers["X-Nexus-Budget-Status"] = budget.status
    document = door_at(request.path).error_document(error)
    return web.json_response(document, status=error.status, headers=headers)


HTTP_ERROR_TYPES = {
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
}


# The inference endpoints: each request to one is counted and logged once, even one refused
# before routing (a body that is not JSON, a missing field, a body over the size limit).
INFERENCE_PATHS = (
    {path: endpoint for endpoint, path in ENDPOINT_PATHS.items()}
    | {MESSAGES_PATH: "chat", RESPONSES_PATH: "chat"}
    | OLLAMA_INFERENCE_PATHS
)


@web.middleware
async def request_middleware(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """Give every request an id and every failure its error envelope; count inference requests."""
    started = time.perf_counter()
    request[REQUEST_ID] = new_request_id()
    status = 500
    code: str | None = None
    response: web.StreamResponse | None = None
    try:
        authenticate_request(request)
        response = await handler(request)
        status = response.status
        return response
    except NexusError as exc:
        status, code = exc.status, exc.code
        return error_response(exc, request)
    except web.HTTPException as exc:
        status = exc.status
        if status == 413:
            limit = request.app[SETTINGS].server.max_body_mb
            message = f"Request body too large: the limit is {limit:g} MB (server.max_body_mb)."
        elif status == 404:
            message = f"Unknown path {request.path}."
        else:
            message = exc.reason
        kind, code = HTTP_ERROR_TYPES.get(status, ("invalid_request_error", "http_error"))
        return error_response(NexusError(status, kind, code, message), request)
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    except Exception:
        log.exception("unexpected error serving %s %s", request.method, request.path)
        if (response := request.get(STREAMING)) is not None:
            return response  # its headers went out: never a second response
        error = NexusError(500, "server_error", "internal_error", "Nexus hit an internal error.")
        status, code = error.status, error.code
        return error_response(error, request)
    finally:
        record = request.get(RECORD)
        if record is None and request.method == "POST" and request.path in INFERENCE_PATHS:
            record = RequestRecord(request[REQUEST_ID], "", INFERENCE_PATHS[request.path], started)
        if record is not None:
            final = record.status or status
            seconds = time.perf_counter() - record.started
            settle_request(request, record, final)
            request.app[LEDGER].count(record)
            request.app[STATS].record(record, final, seconds, code if final == status else None)
            log_request(record, final, seconds)
            if request.app[SETTINGS].logging.log_content and status != 499:
                await log_content(request, record, response)


async def backend_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    """One pool of connections for all backend traffic, for the life of the app."""
    app[CLIENT] = BackendPool(app[SETTINGS].server.connect_timeout_seconds)
    yield
    app[CLIENT].close()


def start_keys(ledger: Ledger, keys: Iterable[ApiKey]) -> None:
    """Keys begin from their month's spend in the ledger (at start, or new in a reload)."""
    for key in keys:
        key.month, key.spent_usd = ledger.month, ledger.spent(key.name)


async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load the month's spend first (the budget and keys start from it); save it at shutdown."""
    await app[LEDGER].open()
    app[BUDGET].start_from(app[LEDGER].spent(TOTAL_ROW))
    start_keys(app[LEDGER], app[KEYS])
    yield
    await app[LEDGER].close()


def in_background(app: web.Application, job: Awaitable[None]) -> asyncio.Task:
    """A task that lives at most as long as the app (cancelled at its cleanup)."""
    tasks: set[asyncio.Task] = app[BACKGROUND].setdefault("background", set())
    task = asyncio.ensure_future(job)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


def start_health(app: web.Application, backends: Iterable[Backend]) -> None:
    """The health loop, or without health checks one first poll of each of `backends`."""
    if app[SETTINGS].health_check.enabled:
        app[BACKGROUND]["health_loop"] = in_background(app, health_loop(app))
    else:
        for backend in backends:
            in_background(app, first_poll(app, backend))


async def background_ctx(app: web.Application) -> AsyncIterator[None]:
    """Start keeping the world current; the server answers meanwhile, never waiting for it."""
    start_health(app, list(app[REGISTRY].backends.values()))
    discovery = Discovery(app) if app[SETTINGS].discovery.enabled else None
    if discovery is not None:
        discovery.start()
    yield
    await app[LIFECYCLE].stop()
    if discovery is not None:
        await discovery.stop()
    await cancel_all(app[BACKGROUND].pop("background", set()))


async def signal_stopping(app: web.Application) -> None:
    """Tell live feeds (the stats stream) that Nexus is shutting down."""
    app[STOPPING].set()


def create_app(settings: Settings) -> web.Application:
    """The aiohttp application for these settings: state, routes and background tasks."""
    max_body = int(settings.server.max_body_mb * 1024 * 1024)
    app = web.Application(client_max_size=max_body, middlewares=[request_middleware])
    app[SETTINGS] = settings
    app[REGISTRY] = Registry()
    app[STATS] = Stats()
    app[BACKGROUND] = {}
    app[BUDGET] = Budget(settings.routing.budget)
    app[KEYS] = api_keys(settings.auth)
    wanted = ledger_wanted(settings)
    app[LEDGER] = Ledger(
        data_directory(settings.server.data_dir, dict(os.environ)) / LEDGER_FILE if wanted else None
    )
    app[QUEUE] = WaitQueue()
    app[SESSIONS] = SessionTable()
    app[LIFECYCLE] = Lifecycle(app[REGISTRY])
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(signal_stopping)
    for backend_settings in settings.backends:
        app[REGISTRY].add(Backend.from_settings(backend_settings))
    # The ledger first in, last out: it outlives every request.
    app.cleanup_ctx.extend((ledger_ctx, backend_pool_ctx, background_ctx))
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post(MESSAGES_PATH, messages)
    app.router.add_post(MESSAGES_PATH + "/count_tokens", messages_count_tokens)
    app.router.add_post(RESPONSES_PATH, responses)
    add_ollama_routes(app)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/models/load", load_model)
    app.router.add_post("/v1/models/migrate", migrate_model)
    app.router.add_delete("/v1/models/{model_id:.+}", unload_model)
    app.router.add_get("/v1/operations/{operation_id}", get_operation)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/stats", get_stats)
    app.router.add_get("/v1/stats/stream", stream_stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/usage", usage)
    app.router.add_get("/v1/backends", list_backends)
    app.router.add_post("/v1/backends", add_backend)
    app.router.add_delete("/v1/backends/{name}", remove_backend)
    app.router.add_get("/", dashboard)
    return app


# ==============================================================================================
# Reload
# Owns: reading the configuration again on SIGHUP and when its file changes (polled, so it
# works where there are no signals), validating all of it, and swapping it in in one step.
# Must not: apply a file that is invalid or half-written, cut a request in flight, or forget
# what Nexus has learned of a backend that stays (health, load, latency).
# ==============================================================================================

CONFIG_POLL_SECONDS = 2.0
# A file is applied only once two reads this far apart agree: a file being saved does not.
CONFIG_SETTLE_SECONDS = 0.3
CONFIG_READ_TRIES = 10
# Requests (signals, file changes) this close together make one reload: a storm is one.
RELOAD_COALESCE_SECONDS = 0.2
# What a running process cannot change (the socket, the body limit aiohttp was built with,
# where the ledger lives, mDNS): a reload logs that it takes a restart.
RESTART_SETTINGS = {
    "server": ("host", "port", "max_body_mb", "data_dir"),
    "discovery": ("enabled",),
}
# An ApiKey's attributes that come from its settings (as BACKEND_SETTINGS for a Backend).
KEY_SETTINGS = tuple(
    f.name for f in fields(ApiKeySettings) if f.name in ApiKey.__slots__ and f.name != "name"
)


@dataclass(slots=True)
class ConfigSource:
    """How the running settings were made (the file found at start, the flags), for a reload."""

    file: Path | None = None
    overrides: dict[tuple[str, str], Any] = field(default_factory=dict)

    def path(self) -> Path | None:
        """The file found at start: gone, it is refused, never taken for "no file". Without
        one, a ./nexus.toml written since is read."""
        return self.file or config_file_path(None, {})


def read_settled(path: Path) -> str:
    """The file's text once two reads CONFIG_SETTLE_SECONDS apart agree (never a file half-saved).
    Blocking: a reload runs load_settings with it in a thread, which words what it raises."""
    previous = path.read_bytes()
    for _ in range(CONFIG_READ_TRIES):
        time.sleep(CONFIG_SETTLE_SECONDS)
        current = path.read_bytes()
        if current == previous:
            break
        previous = current
    else:
        raise ConfigError("config", f"{path} kept changing while it was read")
    text = current.decode("utf-8")
    if not text.strip():  # an editor's truncate-then-write, caught in between
        raise ConfigError("config", f"{path} is empty")
    return text


def file_fingerprint(path: Path | None) -> tuple[Any, ...] | None:
    """What the watch compares: modification time, size and a hash of the content (a
    coarse clock, like FAT's two seconds, misses an edit that the hash does not)."""
    if path is None:
        return None
    try:
        stat = path.stat()
        return (stat.st_mtime_ns, stat.st_size, hashlib.sha256(path.read_bytes()).digest())
    except OSError as exc:
        return ("unreadable", type(exc).__name__)


def swap_backends(
    app: web.Application, old: list[BackendSettings], new: list[BackendSettings]
) -> tuple[list[str], list[Backend]]:
    """Static backends as the new settings list them (discovered and admin-added ones stay);
    returns what changed and the backends to poll now. A removed one only leaves the registry:
    requests in flight hold it and finish."""
    registry = app[REGISTRY]
    before, after = {b.name: b for b in old}, {b.name: b for b in new}
    changes: list[str] = []
    fresh: list[Backend] = []
    for name in before.keys() - after.keys():
        current = registry.backends.get(name)
        if current is not None and current.source == "static":
            registry.backends.pop(name)
            changes.append(f"-{name}")
    for name, wanted in after.items():
        if before.get(name) == wanted:
            continue  # unchanged (or removed through the admin API: it stays removed)
        current = registry.backends.get(name)
        made = Backend.from_settings(wanted)
        changes.append(f"+{name}" if current is None else f"~{name}")
        if current is None or (current.url, current.type) != (made.url, made.type):
            duplicate = registry.find_url(made.url)  # static wins over a discovered duplicate
            if duplicate is not None and duplicate.source == "discovered":
                registry.backends.pop(duplicate.name)
            registry.backends[name] = made
        else:  # the same server: what Nexus has learned of it stays
            for attribute in BACKEND_SETTINGS:
                setattr(current, attribute, getattr(made, attribute))
            if name not in before or before[name].rpm != wanted.rpm:
                current.rpm_bucket = made.rpm_bucket
            current.source = "static"
            made = current
        fresh.append(made)
    registry.reindex()
    return changes, fresh


def swap_keys(current: list[ApiKey], auth: AuthSettings) -> list[ApiKey]:
    """The keys of the new settings. A key that stays (by name) keeps its ApiKey, so its usage
    and the requests in flight settle on it; its buckets only if its rpm or tpm did not change."""
    kept = {k.name: k for k in current}
    keys = []
    for key in api_keys(auth):
        prior = kept.get(key.name)
        if prior is not None:
            if prior.rpm != key.rpm:
                prior.requests_bucket = key.requests_bucket
            if prior.tpm != key.tpm:
                prior.tokens_bucket = key.tokens_bucket
            for attribute in KEY_SETTINGS:
                setattr(prior, attribute, getattr(key, attribute))
            key = prior
        keys.append(key)
    return keys


def swap_settings(app: web.Application, new: Settings) -> list[str]:
    """Put validated settings in place of the running ones; returns what changed. Nothing here
    awaits, so each request sees the old settings or the new, never half of each. The one
    Settings object stays (aiohttp freezes the app's state) and each of its sections is replaced,
    never changed in place, so a request holding one keeps a consistent view of it."""
    live = app[SETTINGS]
    for section, names in RESTART_SETTINGS.items():
        running, wanted = getattr(live, section), getattr(new, section)
        for name in names:
            was, now = getattr(running, name), getattr(wanted, name)
            if was != now:
                message = "%s.%s changed from %r to %r: that takes a restart; %r stays until then"
                log.warning(message, section, name, was, now, was)
                setattr(wanted, name, was)
    changes, fresh = swap_backends(app, live.backends, new.backends)
    changed = [f.name for f in fields(Settings) if getattr(live, f.name) != getattr(new, f.name)]
    changes += [name for name in changed if name != "backends"]
    known = {key.name for key in app[KEYS]}
    app[KEYS][:] = swap_keys(app[KEYS], new.auth)
    start_keys(app[LEDGER], [key for key in app[KEYS] if key.name not in known])
    app[BUDGET].configure(new.routing.budget)
    app[CLIENT].connect_timeout = new.server.connect_timeout_seconds
    for f in fields(Settings):
        setattr(live, f.name, getattr(new, f.name))
    if "health_check" in changed:  # a new loop: new interval, new timeout, or none at all
        polling = app[BACKGROUND].pop("health_loop", None)
        if polling is not None:
            polling.cancel()
        start_health(app, app[REGISTRY].backends.values())
        if not live.health_check.enabled:
            for backend in app[REGISTRY].backends.values():
                backend.status = "healthy"  # as at start: without checks, backends are trusted
    for backend in fresh:  # new or changed: known now, not at the next round
        in_background(app, first_poll(app, backend))
    return changes


class Reloader:
    """Reloads the configuration on SIGHUP and when its file changes, one reload at a time."""

    def __init__(self, app: web.Application, source: ConfigSource) -> None:
        self.app = app
        self.source = source
        self.wanted = asyncio.Event()
        self.triggers: set[str] = set()

    def request(self, trigger: str) -> None:
        """Ask for a reload (safe to call from a signal handler on the loop)."""
        self.triggers.add(trigger)
        self.wanted.set()

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        """For the app's cleanup_ctx: reload and watch for as long as the app runs."""
        tasks = [asyncio.create_task(self.run()), asyncio.create_task(self.watch())]
        for task in tasks:
            task.add_done_callback(log_task_failure)
        yield
        await cancel_all(tasks)

    async def run(self) -> None:
        """Take reload requests until the app stops, coalescing those close together."""
        while True:
            await self.wanted.wait()
            await asyncio.sleep(RELOAD_COALESCE_SECONDS)  # the rest of a storm joins this one
            self.wanted.clear()
            triggers, self.triggers = self.triggers, set()
            try:
                await self.reload(" and ".join(sorted(triggers)))
            except Exception:  # a bug here must not end reloading, or Nexus
                log.exception("config reload failed; the running configuration stays")

    async def reload(self, trigger: str) -> None:
        """Read, validate and apply the configuration; refused whole when anything is wrong."""
        env = dict(os.environ)
        load = (self.source.path(), env, self.source.overrides, read_settled)
        try:
            settings = await asyncio.to_thread(load_settings, *load)
        except ConfigError as exc:
            log.error("config not reloaded (%s): %s; the running configuration stays", trigger, exc)
            return
        changes = swap_settings(self.app, settings)
        log.info("config reloaded (%s): %s", trigger, " ".join(changes) or "no changes")
        # After that line (a new level may hide the next ones), and only where `nexus serve`
        # set logging up: a program embedding the app keeps its own.
        if any(isinstance(h, LogHandler) for h in logging.root.handlers):
            setup_logging(settings, env)

    async def watch(self) -> None:
        seen = await asyncio.to_thread(file_fingerprint, self.source.path())
        while True:
            await asyncio.sleep(CONFIG_POLL_SECONDS)
            if not self.app[SETTINGS].server.watch_config:
                continue
            now = await asyncio.to_thread(file_fingerprint, self.source.path())
            if now != seen:
                seen = now
                self.request("file changed")


# ==============================================================================================
# CLI and main()
# Owns: argument parsing, `nexus serve`, and the small HTTP client behind the other commands
# (they talk to a running Nexus).
# Must not: print a traceback for anything a user can cause.
# ==============================================================================================

DEFAULT_NEXUS_URL = "http://127.0.0.1:8000"
SHUTDOWN_GRACE_SECONDS = 10.0
# Young objects per cyclic collection (Python's default is 700). With dozens of requests in
# flight each young collection scans their coroutines, futures and buffers, most of them alive,
# and promotes them to be scanned again. Nexus makes few reference cycles: this costs little.
GC_YOUNG_THRESHOLD = 10_000
# `nexus serve`'s flags and the settings they set (a --no- flag is False when given).
SERVE_FLAGS = {
    "port": ("server", "port"),
    "host": ("server", "host"),
    "log_level": ("logging", "level"),
    "log_format": ("logging", "format"),
    "no_discovery": ("discovery", "enabled"),
    "no_health_check": ("health_check", "enabled"),
    "data_dir": ("server", "data_dir"),
}
# How often `nexus models load|unload|migrate` asks where its operation is, and for how long at
# most (a running Nexus ends every operation within its own lifecycle.timeout_seconds).
OPERATION_POLL_SECONDS = 0.5
OPERATION_WAIT_SECONDS = 3600.0


def build_commit() -> str:
    """The git commit Nexus was built from: recorded in the bundle, or asked of git."""
    info = asset_path("build_info.json")
    if info.is_file():
        with contextlib.suppress(OSError, ValueError):
            return str(json.loads(info.read_text()).get("commit", "unknown"))
    import subprocess

    command = ["git", "rev-parse", "--short", "HEAD"]
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(command, cwd=here, capture_output=True, text=True, timeout=2)
        if out.returncode == 0:
            return out.stdout.strip()
    return "unknown"


def tune_gc() -> None:
    """Once started: freeze what start-up built (it lives on) and make young collections rarer."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def run_server(settings: Settings, source: ConfigSource) -> int:
    """Serve until a signal stops Nexus; the exit code."""
    app = create_app(settings)
    reloader = Reloader(app, source)
    app.cleanup_ctx.append(reloader.ctx)
    loop = asyncio.get_running_loop()
    if hasattr(signal, "SIGHUP"):  # not on Windows, where the watch serves
        loop.add_signal_handler(signal.SIGHUP, reloader.request, "SIGHUP")
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_GRACE_SECONDS, access_log=None
    )
    await runner.setup()
    host, port = settings.server.host, settings.server.port
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        await runner.cleanup()
        return 1
    tune_gc()
    loop_kind = "uvloop" if uvloop is not None else "asyncio loop"
    detail = f"{len(settings.backends)} configured backends, {loop_kind}"
    log.info("Nexus %s listening on http://%s:%d (%s)", __version__, host, port, detail)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    await stop.wait()
    log.info("shutting down: finishing in-flight requests (up to %gs)", SHUTDOWN_GRACE_SECONDS)
    await runner.cleanup()
    log.info("stopped")
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """`nexus serve`: settings from file, environment and flags, then run_server."""
    env = dict(os.environ)
    flags = {key: getattr(args, flag) for flag, key in SERVE_FLAGS.items()}
    overrides = {key: value for key, value in flags.items() if value is not None}
    path = config_file_path(args.config, env)
    try:
        settings = load_settings(path, env, overrides)
    except ConfigError as exc:
        if (args.log_format or env.get("NEXUS_LOG_FORMAT", "")).lower() == "json":
            setup_logging(Settings(logging=LoggingSettings(format="json")), env)
            log.error("%s", exc)
        else:
            print(f"nexus: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings, env)
    # uvloop, where there is one, runs the same asyncio API for less CPU per proxied request.
    loop_factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(run_server(settings, ConfigSource(path, overrides)))


def call_nexus(args: argparse.Namespace, method: str, path: str, payload: Any = None) -> Any:
    """Ask a running Nexus; its OpenAI-format errors become one readable line."""
    url = (args.url or os.environ.get("NEXUS_URL") or DEFAULT_NEXUS_URL).rstrip("/")
    data = json.dumps(payload).encode() if payload is not None else None
    headers = dict(JSON_HEADERS)
    if os.environ.get("NEXUS_API_KEY"):  # a Nexus with [auth] keys wants one
        headers["Authorization"] = "Bearer " + os.environ["NEXUS_API_KEY"]
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {exc.code}"
        raise SystemExit(f"nexus: {message}") from None
    except OSError as exc:  # urllib.error.URLError among them
        reason = getattr(exc, "reason", exc)
        raise SystemExit(
            f"nexus: cannot reach Nexus at {url} ({reason}); "
            "is `nexus serve` running? (set --url or NEXUS_URL)"
        ) from None


def print_json(args: argparse.Namespace, data: Any) -> bool:
    """With --json, print what Nexus answered as JSON (and say so: the caller prints no table)."""
    if args.json:
        print(json.dumps(data, indent=2))
    return args.json


def print_table(rows: list[list[Any]]) -> None:
    """Print rows as aligned columns, the first row being the header."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def backends_command(args: argparse.Namespace) -> int:
    """`nexus backends list|add|remove`."""
    if args.action == "add":
        flags = {"name": args.name, "type": args.type, "priority": args.priority}
        payload = {"url": args.backend_url} | {k: v for k, v in flags.items() if v is not None}
        added = call_nexus(args, "POST", "/v1/backends", payload)
        models = len(added["models"])
        print(f"added {added['name']} ({added['type']}, {added['status']}, {models} models)")
    elif args.action == "remove":
        call_nexus(args, "DELETE", "/v1/backends/" + urllib.parse.quote(args.name, safe=""))
        print(f"removed {args.name}")
    else:
        data = call_nexus(args, "GET", "/v1/backends")
        if print_json(args, data):
            return 0
        rows = [["NAME", "TYPE", "STATUS", "ZONE", "URL", "MODELS"]]
        for b in data["data"]:
            rows.append([b["name"], b["type"], b["status"], b["zone"], b["url"], len(b["models"])])
        errors = ["LAST ERROR"] + [b.get("last_error") or "" for b in data["data"]]
        if any(errors[1:]):  # why each backend that is down is down
            rows = [[*row, error] for row, error in zip(rows, errors, strict=True)]
        print_table(rows)
    return 0


def lifecycle_command(args: argparse.Namespace) -> int:
    """Start a load, unload or migration on a running Nexus and wait for its end state."""
    if args.action == "load":
        payload = {"model_id": args.model, "backend_id": args.backend}
        if args.keep_alive is not None:  # seconds as a number, else a duration such as "30m"
            payload["keep_alive"] = args.keep_alive
            with contextlib.suppress(ValueError):
                payload["keep_alive"] = int(args.keep_alive)
        op = call_nexus(args, "POST", "/v1/models/load", payload)
        where = f"on {args.backend}"
    elif args.action == "unload":
        query = "?backend_id=" + urllib.parse.quote(args.backend, safe="")
        op = call_nexus(args, "DELETE", "/v1/models/" + urllib.parse.quote(args.model) + query)
        where = f"from {args.backend}"
    else:
        ends = {"source_backend_id": args.source, "target_backend_id": args.target}
        op = call_nexus(args, "POST", "/v1/models/migrate", {"model_id": args.model} | ends)
        where = f"from {args.source} to {args.target}"
    what = f"{args.action} of {args.model} {where}"
    print(f"{what}: {op['operation_id']} in progress", flush=True)
    deadline = time.monotonic() + OPERATION_WAIT_SECONDS
    path = "/v1/operations/" + urllib.parse.quote(op["operation_id"], safe="")
    while op["status"] == "in_progress" and time.monotonic() < deadline:
        time.sleep(OPERATION_POLL_SECONDS)
        op = call_nexus(args, "GET", path)
    if op["status"] == "completed":
        print(f"{what}: completed")
        return 0
    problem = op.get("error") or "still in progress"
    print(f"nexus: {what}: {op['status']}: {problem}", file=sys.stderr)
    return 1


def models_command(args: argparse.Namespace) -> int:
    """`nexus models` and its load, unload and migrate actions."""
    if args.action is not None:
        return lifecycle_command(args)
    data = call_nexus(args, "GET", "/v1/models")
    if print_json(args, data):
        return 0
    rows = [["MODEL", "CONTEXT", "CAPABILITIES", "BACKENDS", "LOADED ON"]]
    for m in data["data"]:
        caps = ",".join(name for name, on in m["capabilities"].items() if on)
        backends = ",".join(m["backends"])
        loaded = ",".join(m.get("loaded_on", ()))
        rows.append([m["id"], m["context_length"] or "-", caps or "-", backends, loaded or "-"])
    print_table(rows)
    return 0


def health_command(args: argparse.Namespace) -> int:
    """`nexus health`: exits 1 when no backend is healthy."""
    data = call_nexus(args, "GET", "/health")
    if not print_json(args, data):
        b = data["backends"]
        print(
            f"{data['status']}: {b['healthy']}/{b['total']} backends healthy, "
            f"{data['models']} models, up {data['uptime_seconds']:.0f}s (v{data['version']})"
        )
    return 0 if data["status"] != "unhealthy" else 1


def usage_command(args: argparse.Namespace) -> int:
    """`nexus usage`: the month's spend in total and per key."""
    query = "?month=" + urllib.parse.quote(args.month) if args.month else ""
    data = call_nexus(args, "GET", "/v1/usage" + query)
    if print_json(args, data):
        return 0
    rows = [["KEY", "SPENT USD", "REQUESTS", "TOKENS"]]
    for entry in [*data["keys"], dict(data["total"], name="(total)")]:
        limit = entry["monthly_limit_usd"]
        spent = f"{entry['spent_usd']:.4f}" + (f" of {limit:g}" if limit else "")
        rows.append([entry["name"], spent, entry["requests"], entry["tokens"]])
    print(f"usage in {data['month']} ({data['source']})")
    print_table(rows)
    return 0


def config_init_command(args: argparse.Namespace) -> int:
    """`nexus config init`: write the example configuration."""
    target = Path(args.output)
    if target.exists() and not args.force:
        print(f"nexus: {target} already exists; use --force to overwrite it", file=sys.stderr)
        return 1
    target.write_text(asset_path("nexus.example.toml").read_text(encoding="utf-8"))
    print(f"wrote {target}")
    return 0


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """A completion script for the commands and flags of this parser."""
    commands = {"serve", "backends", "models", "health", "usage", "config", "completions"}
    actions = {"list", "add", "remove", "init", "load", "unload", "migrate", "bash", "zsh", "fish"}
    words = sorted(commands | actions)
    flags = sorted({opt for a in parser._actions for opt in a.option_strings})
    if shell == "bash":
        return (
            "_nexus() {\n"
            f'  COMPREPLY=($(compgen -W "{" ".join(words + flags)}" '
            '-- "${COMP_WORDS[COMP_CWORD]}"))\n'
            "}\ncomplete -F _nexus nexus\n"
        )
    if shell == "zsh":
        return f"#compdef nexus\n_arguments '*: :({' '.join(words)})'\n"
    return "".join(f"complete -c nexus -f -a {w}\n" for w in words)


def client_flags(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    """--url, and --json unless told not to, for a command that talks to a running Nexus."""
    url_help = f"the running Nexus (default $NEXUS_URL or {DEFAULT_NEXUS_URL})"
    parser.add_argument("--url", help=url_help)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    """The command line: `nexus serve` and the commands that talk to a running Nexus."""
    parser = argparse.ArgumentParser(
        prog="nexus", description="One OpenAI-compatible endpoint in front of every LLM server."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "-c", "--config", help="TOML config file (default: $NEXUS_CONFIG, ./nexus.toml)"
    )
    serve.add_argument("-p", "--port", type=int, help="port to listen on (default 8000)")
    serve.add_argument("-H", "--host", help="address to listen on (default 0.0.0.0)")
    serve.add_argument("-l", "--log-level", help="debug, info, warning or error")
    serve.add_argument("--log-format", choices=["pretty", "json"])
    for name, what in (("discovery", "mDNS and port probes"), ("health-check", "health polling")):
        serve.add_argument(
            f"--no-{name}", action="store_const", const=False, help=f"turn off {what}"
        )
    serve.add_argument(
        "--data-dir", help="where nexus.db (the month's spend, only with monthly limits) lives"
    )

    backends = sub.add_parser("backends", help="list, add or remove backends of a running Nexus")
    actions = backends.add_subparsers(dest="action", required=True)
    client_flags(actions.add_parser("list", help="list backends"))
    add = actions.add_parser("add", help="add a backend (its type is detected unless given)")
    add.add_argument("backend_url", metavar="URL")
    add.add_argument("--name")
    add.add_argument("--type", choices=BACKEND_TYPES)
    add.add_argument("--priority", type=int)
    client_flags(add, json_flag=False)
    remove = actions.add_parser("remove", help="remove a backend")
    remove.add_argument("name", metavar="NAME")
    client_flags(remove, json_flag=False)

    models = sub.add_parser(
        "models", help="list the models of a running Nexus, or load, unload or migrate one"
    )
    client_flags(models)
    lifecycle = models.add_subparsers(dest="action")
    load = lifecycle.add_parser("load", help="load a model on a backend (Ollama, llama-server)")
    load.add_argument(
        "--keep-alive", help='how long it stays (e.g. "30m"; default: until unloaded)'
    )
    unload = lifecycle.add_parser("unload", help="unload a model from a backend")
    for action in (load, unload):
        action.add_argument("--backend", required=True, metavar="B", help="the backend's name")
    migrate = lifecycle.add_parser("migrate", help="move a model from one backend to another")
    migrate.add_argument("--from", dest="source", required=True, metavar="A")
    migrate.add_argument("--to", dest="target", required=True, metavar="B")
    for action in (load, unload, migrate):
        action.add_argument("model", metavar="MODEL")
        action.add_argument("--url", default=argparse.SUPPRESS, help="the running Nexus")
    client_flags(sub.add_parser("health", help="show a running Nexus's health"))
    usage_ = sub.add_parser("usage", help="a month's spend, requests and tokens per key")
    usage_.add_argument("--month", help="YYYY-MM (default: this month)")
    client_flags(usage_)

    config = sub.add_parser("config", help="configuration helpers")
    config_actions = config.add_subparsers(dest="action", required=True)
    init = config_actions.add_parser("init", help="write a commented config template")
    init.add_argument("-o", "--output", default="nexus.toml")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")

    completions_ = sub.add_parser("completions", help="print a shell completion script")
    completions_.add_argument("shell", choices=["bash", "zsh", "fish"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `nexus` command: parse the arguments and run the chosen command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {
        "serve": serve_command,
        "backends": backends_command,
        "models": models_command,
        "health": health_command,
        "usage": usage_command,
        "config": config_init_command,
    }
    if args.version:
        print(f"nexus {__version__} (commit {build_commit()})")
    elif args.command == "completions":
        print(completion_script(args.shell, parser), end="")
    elif args.command in commands:
        return commands[args.command](args)
    else:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
