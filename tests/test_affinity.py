"""Session affinity (SPEC §3.7): a conversation's turns stay on the backend that holds its prompt
cache while that backend is a candidate; otherwise the session moves, and stays where it went.
Over HTTP with two mock backends of equal priority where round-robin would alternate, and as
properties of the pure routing functions."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import tracemalloc

import aiohttp
import anthropic
import openai
import pytest
from conftest import backends_toml
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from multidict import CIMultiDict

import nexus

ROUND_ROBIN = '[routing]\nstrategy = "round_robin"\n'
SYSTEM = "You are a careful coding assistant. Answer briefly."


async def pair(backend_factory, nexus_factory, routing: str = "", toml: str = "", **options):
    """Two generic mocks serving model m; Nexus in front with round-robin (they alternate)."""
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    nx = await nexus_factory(ROUND_ROBIN + routing + toml + backends_toml(a, b, **options))
    return nx, {"a": a, "b": b}


async def turn(nx, messages, headers=None, **extra) -> tuple[str, str, str]:
    """One chat request: the backend that served it, the route reason, the answer's text."""
    body = {"model": "m", "messages": messages, **extra}
    async with (
        aiohttp.ClientSession() as session,
        session.post(nx.url + "/v1/chat/completions", json=body, headers=headers or {}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        answer = (await resp.json())["choices"][0]["message"]["content"]
        return resp.headers["X-Nexus-Backend"], resp.headers["X-Nexus-Route-Reason"], answer


class Conversation:
    """An agent conversation: each turn resends everything so far plus a new user message."""

    def __init__(self, opening: str, headers: dict | None = None) -> None:
        self.messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": opening},
        ]
        self.headers = headers
        self.served: list[str] = []
        self.reasons: list[str] = []

    async def next(self, nx) -> str:
        backend, reason, answer = await turn(nx, self.messages, self.headers)
        self.served.append(backend)
        self.reasons.append(reason)
        self.messages = [
            *self.messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"and step {len(self.served)}?"},
        ]
        return backend


async def wait_for(condition, timeout: float = 5.0) -> None:
    """Poll `condition` until it holds, failing the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- sticking and spreading --------------------------------------------------------------------


async def test_turns_of_an_unkeyed_conversation_stick(backend_factory, nexus_factory):
    nx, _ = await pair(backend_factory, nexus_factory)
    talk = Conversation("Refactor the parser in parse.py")
    for _ in range(4):
        await talk.next(nx)
    assert len(set(talk.served)) == 1
    assert talk.reasons[1:] == ["session-affinity"] * 3
    assert talk.reasons[0] != "session-affinity"


async def test_session_affinity_false_restores_spreading(backend_factory, nexus_factory):
    nx, _ = await pair(backend_factory, nexus_factory, "session_affinity = false\n")
    talk = Conversation("Refactor the parser in parse.py", {"X-Nexus-Session": "s-1"})
    for _ in range(4):
        await talk.next(nx)
    assert talk.served[0] != talk.served[1]  # round-robin alternates, turn after turn
    assert talk.served[0::2] == [talk.served[0]] * 2 and talk.served[1::2] == [talk.served[1]] * 2
    assert "session-affinity" not in talk.reasons
    assert nx.app[nexus.SESSIONS].tracked(time.monotonic()) == 0


async def test_different_sessions_spread_and_each_keeps_its_backend(backend_factory, nexus_factory):
    nx, _ = await pair(backend_factory, nexus_factory)
    talks = [Conversation(f"Task {i}: fix the failing test in module_{i}.py") for i in range(4)]
    for _ in range(3):  # interleaved, as four agents working at once would be
        for talk in talks:
            await talk.next(nx)
    firsts = [talk.served[0] for talk in talks]
    assert sorted(firsts) == ["a", "a", "b", "b"]  # new sessions spread as before
    for talk in talks:
        assert talk.served == [talk.served[0]] * 3


async def test_identical_one_shot_requests_still_spread(backend_factory, nexus_factory):
    """Without a key, a conversation is recognised from its second turn on: the same one-turn
    prompt sent by many clients is not piled onto one backend."""
    nx, _ = await pair(backend_factory, nexus_factory)
    served = [(await turn(nx, [{"role": "user", "content": "ping"}]))[0] for _ in range(4)]
    assert sorted(served) == ["a", "a", "b", "b"]


# --- where the key comes from ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "extra"),
    [
        ({}, {"prompt_cache_key": "cache-7"}),
        ({"X-Nexus-Session": "s-7"}, {}),
        ({"session-id": "s-7"}, {}),
        ({"session_id": "s-7"}, {}),  # as Codex spells it
        ({"X-Claude-Code-Session-Id": "0f0e2a5c-7d31-4c5e-9b1a-2f6a1d9c8e77"}, {}),
    ],
    ids=["prompt_cache_key", "x-nexus-session", "session-id", "session_id", "claude-code"],
)
async def test_each_key_source_keeps_a_session_together(
    backend_factory, nexus_factory, headers, extra
):
    """Four requests whose openings all differ (no conversation to recognise): only the key
    holds them together."""
    nx, _ = await pair(backend_factory, nexus_factory)
    served, reasons = [], []
    for i in range(4):
        backend, reason, _ = await turn(
            nx, [{"role": "user", "content": f"unrelated question {i}"}], headers, **extra
        )
        served.append(backend)
        reasons.append(reason)
    assert served == [served[0]] * 4
    assert reasons[1:] == ["session-affinity"] * 3


async def test_prompt_cache_key_through_the_openai_client(backend_factory, nexus_factory):
    nx, _ = await pair(backend_factory, nexus_factory)
    client = openai.AsyncOpenAI(base_url=nx.url + "/v1", api_key="unused", max_retries=0)
    try:
        served = []
        for key in ("k1", "k2", "k1", "k2", "k1", "k2"):
            raw = await client.chat.completions.with_raw_response.create(
                model="m",
                messages=[{"role": "user", "content": f"question {len(served)}"}],
                prompt_cache_key=key,
            )
            served.append(raw.headers["X-Nexus-Backend"])
    finally:
        await client.close()
    assert served[0] != served[1]  # two sessions, spread
    assert served[0::2] == [served[0]] * 3 and served[1::2] == [served[1]] * 3


@pytest.mark.parametrize(
    "user_id",
    [
        json.dumps(
            {
                "device_id": "d" * 64,
                "account_uuid": "",
                "session_id": "5b1c0d2e-8f3a-4e6b-9c7d-1a2b3c4d5e6f",
            }
        ),
        "user_" + "d" * 64 + "_account__session_5b1c0d2e-8f3a-4e6b-9c7d-1a2b3c4d5e6f",
    ],
    ids=["json", "legacy"],
)
async def test_claude_code_metadata_user_id_keys_a_messages_session(
    backend_factory, nexus_factory, user_id
):
    nx, _ = await pair(backend_factory, nexus_factory)
    client = anthropic.AsyncAnthropic(base_url=nx.url, api_key="unused", max_retries=0)
    try:
        served, reasons = [], []
        for i in range(4):
            raw = await client.messages.with_raw_response.create(
                model="m",
                max_tokens=64,
                messages=[{"role": "user", "content": f"unrelated question {i}"}],
                metadata={"user_id": user_id},
            )
            served.append(raw.headers["X-Nexus-Backend"])
            reasons.append(raw.headers["X-Nexus-Route-Reason"])
    finally:
        await client.close()
    assert served == [served[0]] * 4
    assert reasons[1:] == ["session-affinity"] * 3


async def test_an_unkeyed_messages_conversation_sticks(backend_factory, nexus_factory):
    nx, _ = await pair(backend_factory, nexus_factory)
    client = anthropic.AsyncAnthropic(base_url=nx.url, api_key="unused", max_retries=0)
    messages: list[dict] = [{"role": "user", "content": "Explain the build"}]
    served = []
    try:
        for i in range(3):
            raw = await client.messages.with_raw_response.create(
                model="m", max_tokens=64, system=SYSTEM, messages=messages
            )
            served.append(raw.headers["X-Nexus-Backend"])
            answer = (await raw.parse()).content[0].text
            messages = [
                *messages,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": f"and step {i}?"},
            ]
    finally:
        await client.close()
    assert served == [served[0]] * 3


async def test_prompt_cache_key_keys_a_responses_session(backend_factory, nexus_factory):
    """Codex sends prompt_cache_key with each /v1/responses turn: its turns stay together."""
    nx, _ = await pair(backend_factory, nexus_factory)
    client = openai.AsyncOpenAI(base_url=nx.url + "/v1", api_key="unused", max_retries=0)
    try:
        served, reasons = [], []
        for key in ("codex-1", "codex-2", "codex-1", "codex-2", "codex-1", "codex-2"):
            raw = await client.responses.with_raw_response.create(
                model="m", input=f"question {len(served)}", prompt_cache_key=key
            )
            served.append(raw.headers["X-Nexus-Backend"])
            reasons.append(raw.headers["X-Nexus-Route-Reason"])
    finally:
        await client.close()
    assert served[0] != served[1]
    assert served[0::2] == [served[0]] * 3 and served[1::2] == [served[1]] * 3
    assert reasons[2:] == ["session-affinity"] * 4


async def test_an_unkeyed_ollama_conversation_sticks(backend_factory, nexus_factory):
    """An app speaking Ollama's API sends no key: the conversation's opening names it."""
    import ollama

    nx, _ = await pair(backend_factory, nexus_factory)
    client = ollama.AsyncClient(host=nx.url)
    messages: list[dict] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Explain the build"},
    ]
    served = []
    for i in range(3):
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "messages": messages, "stream": False}
            async with session.post(nx.url + "/api/chat", json=body) as resp:
                assert resp.status == 200
                served.append(resp.headers["X-Nexus-Backend"])
                answer = (await resp.json())["message"]["content"]
        messages = [
            *messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"and step {i}?"},
        ]
    assert served == [served[0]] * 3
    reply = await client.chat(model="m", messages=messages)  # the official client, same session
    assert reply.message.content == f"Hello from {served[0]}"


def headers_of(**values: str) -> CIMultiDict:
    """Request headers as aiohttp has them (case-insensitive); `_` in a name becomes `-`."""
    return CIMultiDict({k.replace("_", "-"): v for k, v in values.items()})


def chat(opening: str = "hello", *later: str, **extra) -> dict:
    """A chat body: the system prompt, the opening user turn, then a turn pair per `later`."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opening}]
    for text in later:
        messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": text}]
    return {"model": "m", "messages": messages, **extra}


def test_the_first_key_found_wins():
    key = nexus.session_key
    by_body = key(CIMultiDict(), chat(prompt_cache_key="p"))
    assert key(headers_of(X_Nexus_Session="h"), chat(prompt_cache_key="p")) == by_body
    by_header = key(headers_of(X_Nexus_Session="h"), chat())
    assert by_header != by_body
    assert key(headers_of(X_Nexus_Session="h", session_id="s"), chat()) == by_header
    assert key(headers_of(session_id="s"), chat()) != by_header
    claude = json.dumps({"session_id": "c"})
    assert key(headers_of(X_Claude_Code_Session_Id="x"), chat(user=claude)) != key(
        CIMultiDict(), chat(user=claude)
    )
    # A key applies from the first turn; an opening only once the conversation goes on.
    assert by_body[1] and by_header[1]
    assert key(CIMultiDict(), chat())[1] is False
    assert key(CIMultiDict(), chat("hello", "more"))[1] is True


def test_the_opening_is_the_system_prompt_and_the_first_user_turn():
    key = nexus.session_key
    none = CIMultiDict()
    assert key(none, chat("hello", "more"))[0] == key(none, chat("hello", "other", "more"))[0]
    assert key(none, chat("hello"))[0] == key(none, chat("hello", "more"))[0]
    assert key(none, chat("hello"))[0] != key(none, chat("hullo"))[0]
    other_system = chat("hello")
    other_system["messages"][0]["content"] = "You are terse."
    assert key(none, other_system)[0] != key(none, chat("hello"))[0]
    parts = chat("hello")
    parts["messages"][1]["content"] = [{"type": "text", "text": "hello"}]
    assert key(none, parts)[0] == key(none, parts)[0]
    # The same session asking another model is another prompt cache, another entry.
    assert key(none, dict(chat("hello"), model="n"))[0] != key(none, chat("hello"))[0]
    assert (
        key(headers_of(X_Nexus_Session="s"), dict(chat(), model="n"))[0]
        != key(headers_of(X_Nexus_Session="s"), chat())[0]
    )


@pytest.mark.parametrize(
    "user_id",
    [
        "alice",  # a plain user id names a person, not a session
        "{not json",
        json.dumps({"session_id": 7}),
        json.dumps(["session_id"]),
        "user_abc_account__session_",
    ],
)
def test_a_user_id_without_a_session_falls_back_to_the_opening(user_id):
    none = CIMultiDict()
    assert nexus.session_key(none, chat(user=user_id)) == nexus.session_key(none, chat())


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": "not a list"},
        {"model": "m", "messages": [1, "x", None]},
        {"model": "m", "messages": [{"role": "user", "content": 5}]},
        {"model": "m", "messages": [{"role": "assistant", "content": "only me"}]},
        {"model": "m", "prompt": "a completion"},
        {"model": "m", "messages": [], "prompt_cache_key": 5, "user": ["x"]},
    ],
)
def test_odd_bodies_give_no_key_or_a_harmless_one(body):
    found = nexus.session_key(CIMultiDict(), body)
    assert found is None or isinstance(found[0], int)


# --- when the sticky backend is no longer a candidate --------------------------------------------


async def test_a_backend_that_goes_down_loses_its_sessions_to_the_next(
    backend_factory, nexus_factory
):
    nx, mocks = await pair(backend_factory, nexus_factory)
    talk = Conversation("Port the CLI to click")
    first = await talk.next(nx)
    other = "b" if first == "a" else "a"
    port = mocks[first].server.port
    await mocks[first].stop()  # refused from now on
    assert await talk.next(nx) == other
    assert talk.reasons[-1] == "failover"
    await mocks[first].start(port=port)  # back: the session stays where its cache now is
    for _ in range(3):
        assert await talk.next(nx) == other
    assert talk.reasons[-3:] == ["session-affinity"] * 3
    sessions = nx.app[nexus.SESSIONS]
    assert (sessions.new, sessions.hits, sessions.moves) == (1, 3, 1)


async def test_an_unhealthy_backend_is_no_longer_sticky(backend_factory, nexus_factory):
    health = (
        "[health_check]\ninterval_seconds = 0.1\nfailure_threshold = 1\nrecovery_threshold = 1\n"
    )
    nx, mocks = await pair(backend_factory, nexus_factory, toml=health)
    talk = Conversation("Write the migration")
    first = await talk.next(nx)
    other = "b" if first == "a" else "a"
    mocks[first].healthy = False
    await wait_for(lambda: nx.backend(first).status == "unhealthy")
    assert await talk.next(nx) == other
    assert len(mocks[first].received) == 1  # it was not even tried
    mocks[first].healthy = True
    await wait_for(lambda: nx.backend(first).status == "healthy")
    assert await talk.next(nx) == other
    assert await talk.next(nx) == other


async def test_a_full_backend_loses_the_turn_and_the_next_keeps_the_session(
    backend_factory, nexus_factory
):
    a = await backend_factory("generic", {"m": {}}, name="a")
    b = await backend_factory("generic", {"m": {}}, name="b")
    nx = await nexus_factory(
        '[routing]\nstrategy = "priority_only"\n'
        + backends_toml(a, b, a={"priority": 10, "max_concurrent": 1}, b={"priority": 20})
    )
    talk = Conversation("Profile the importer")
    assert await talk.next(nx) == "a"  # a is preferred
    release = asyncio.Event()

    async def held(request, body):
        await release.wait()
        return await a.chat_answer(request, body)

    a.behaviours = [held]
    busy = asyncio.create_task(turn(nx, [{"role": "user", "content": "another task"}]))
    await wait_for(lambda: a.in_flight == 1)
    assert await talk.next(nx) == "b"  # a is at max_concurrent: the session moves
    release.set()
    assert (await busy)[0] == "a"
    for _ in range(2):  # a is free and preferred again, but b now holds the session's cache
        assert await talk.next(nx) == "b"
    assert talk.reasons[-2:] == ["session-affinity"] * 2


# --- never across a rule ----------------------------------------------------------------------

POLICY_MODELS = ("internal-a", "internal-b", "public")

world_backend = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["ollama", "vllm", "openai", "anthropic"]),
        "zone": st.sampled_from(["restricted", "open", ""]),
        "tier": st.integers(0, 5),
        "status": st.sampled_from(["healthy", "healthy", "unhealthy"]),
        "priority": st.sampled_from([10, 10, 20, 50]),
        "in_flight": st.integers(0, 2),
        "max_concurrent": st.integers(0, 2),
        "models": st.lists(st.sampled_from(POLICY_MODELS), min_size=1, max_size=3, unique=True),
    }
)


def policy_world(specs: list[dict]) -> nexus.Registry:
    """A registry of local and cloud backends in both zones, from hypothesis specs."""
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
    return registry


def route_from(needs, registry, s, sticky):
    """route() with the round-robin counter at the same place, so two calls are comparable."""
    saved = nexus.ROUND_ROBIN
    nexus.ROUND_ROBIN = itertools.count()
    try:
        needs.last_backend = sticky
        return nexus.route(needs, registry, s)
    except nexus.NexusError as exc:
        return exc.status
    finally:
        nexus.ROUND_ROBIN = saved


@hypothesis_settings(max_examples=400, deadline=None)
@given(
    specs=st.lists(world_backend, min_size=1, max_size=7),
    model=st.sampled_from(POLICY_MODELS),
    min_tier=st.integers(0, 5),
    flexible=st.booleans(),
    overflow=st.sampled_from(["block", "scrub"]),
    budget_status=st.sampled_from(["normal", "soft_limit", "hard_limit"]),
    action=st.sampled_from(nexus.BUDGET_ACTIONS),
    strategy=st.sampled_from(nexus.STRATEGIES),
    sticky=st.integers(0, 7),
)
def test_affinity_only_reorders_what_policy_allows(
    specs, model, min_tier, flexible, overflow, budget_status, action, strategy, sticky
):
    registry = policy_world(specs)
    s = nexus.Settings()
    s.routing.strategy = "priority_only" if strategy == "random" else strategy
    s.routing.max_retries = 10  # every candidate is an attempt: nothing is cut
    s.routing.fallbacks = {"internal-a": ["internal-b", "public"]}
    s.routing.policies = [
        nexus.PolicySettings(model_pattern="internal-*", privacy="restricted", min_tier=min_tier),
        nexus.PolicySettings(model_pattern="*", overflow=overflow),
    ]
    s.routing.budget = nexus.BudgetSettings(monthly_limit_usd=1.0, hard_limit_action=action)
    name = f"b{sticky}"
    needs = nexus.RequestNeeds(model=model, flexible=flexible, budget_status=budget_status)
    plain = route_from(needs, registry, s, None)
    kept = route_from(needs, registry, s, name)
    if isinstance(plain, int):
        assert kept == plain  # the same refusal: affinity admits nothing
        return
    assert not isinstance(kept, int)
    before = [(a.model, a.backend.name) for a in plain.attempts]
    after = [(a.model, a.backend.name) for a in kept.attempts]
    assert sorted(before) == sorted(after)  # the same attempts, the same models
    assert [x for x in after if x[1] != name] == [x for x in before if x[1] != name]
    lowered = model.startswith("internal-") and any(
        a.backend.tier < min_tier for a in plain.attempts
    )
    for i, attempt in enumerate(kept.attempts):
        if attempt.backend.name != name:
            continue
        j = before.index((attempt.model, name))
        assert i <= j  # it can only move up, and only past attempts of the same standing
        for passed in plain.attempts[i:j]:
            assert passed.model == attempt.model
            assert passed.backend.at_capacity() == attempt.backend.at_capacity()
            assert passed.scrub == attempt.scrub  # never an open backend before a local one
            if budget_status == "soft_limit":
                assert passed.backend.is_cloud == attempt.backend.is_cloud
            if lowered:
                assert passed.backend.tier == attempt.backend.tier
    first = kept.attempts[0]
    if kept.reason == "session-affinity":
        assert first.backend.name == name and not first.backend.at_capacity()


def test_a_restricted_request_never_follows_its_session_to_an_open_backend():
    local = nexus.Backend(
        name="local", url="http://127.0.0.1:1", type="vllm", zone="restricted", priority=90
    )
    cloud = nexus.Backend(name="cloud", url="http://127.0.0.1:2", type="openai", zone="open")
    for backend in (local, cloud):
        backend.status = "healthy"
        backend.models = {"internal-x": nexus.Model(id="internal-x")}
    registry = nexus.Registry()
    registry.backends = {"local": local, "cloud": cloud}
    registry.reindex()
    s = nexus.Settings()
    s.routing.policies = [nexus.PolicySettings(model_pattern="internal-*", privacy="restricted")]
    needs = nexus.RequestNeeds(model="internal-x", last_backend="cloud")
    decision = nexus.route(needs, registry, s)
    assert [a.backend.name for a in decision.attempts] == ["local"]
    assert decision.reason == "privacy-requirement"


# --- the table ---------------------------------------------------------------------------------


def test_the_table_stays_bounded_under_100k_sessions():
    table = nexus.SessionTable()
    none = CIMultiDict()
    names = ("gpu-box", "nas")
    now = time.monotonic()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            key, _ = nexus.session_key(none, chat(f"session {i}: what does main() do?"))
            table.note(key, names[i % 2], None, now)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert table.tracked(now) == nexus.SESSIONS_MAX
    assert table.new == 100_000
    per_session = used / nexus.SESSIONS_MAX
    assert per_session < 300, f"{per_session:.0f} bytes per tracked session"
    assert used < 3_000_000
    # The oldest went first; the newest are all there.
    newest, _ = nexus.session_key(none, chat("session 99999: what does main() do?"))
    oldest, _ = nexus.session_key(none, chat("session 0: what does main() do?"))
    assert table.backend_of(newest, now) == names[99_999 % 2]
    assert table.backend_of(oldest, now) is None


def test_idle_sessions_expire_after_an_hour():
    table = nexus.SessionTable()
    table.note(1, "a", None, 1000.0)
    table.note(2, "b", None, 2000.0)
    assert table.backend_of(1, 1000.0 + nexus.SESSION_IDLE_SECONDS - 1) == "a"
    assert table.backend_of(1, 1000.0 + nexus.SESSION_IDLE_SECONDS + 1) is None
    assert table.tracked(1000.0 + nexus.SESSION_IDLE_SECONDS + 1) == 1
    table.note(2, "b", "b", 2000.0 + nexus.SESSION_IDLE_SECONDS - 1)  # served again: kept
    assert table.backend_of(2, 2000.0 + nexus.SESSION_IDLE_SECONDS + 10) == "b"
    assert (table.new, table.hits, table.moves) == (2, 1, 0)


# --- what the operator sees ---------------------------------------------------------------------


async def test_stats_and_metrics_show_sessions(backend_factory, nexus_factory):
    nx, mocks = await pair(backend_factory, nexus_factory)
    talk = Conversation("Add a --verbose flag")
    first = await talk.next(nx)
    await talk.next(nx)
    port = mocks[first].server.port
    await mocks[first].stop()
    await talk.next(nx)  # moves
    await mocks[first].start(port=port)
    await Conversation("Another task").next(nx)
    async with aiohttp.ClientSession() as session:
        async with session.get(nx.url + "/v1/stats") as resp:
            stats = await resp.json()
        async with session.get(nx.url + "/metrics") as resp:
            metrics = await resp.text()
    assert stats["sessions"] == {"tracked": 2, "hits": 1, "moves": 1, "new": 2}
    assert "nexus_sessions_tracked 2" in metrics
    assert 'nexus_session_affinity_total{outcome="hit"} 1' in metrics
    assert 'nexus_session_affinity_total{outcome="move"} 1' in metrics
    assert 'nexus_session_affinity_total{outcome="new"} 2' in metrics
    assert "Add a --verbose flag" not in json.dumps(stats) + metrics
