"""The ledger (SPEC §1): with a monthly limit the month's spend, requests and tokens survive a
restart in nexus.db (SQLite) in the data directory; without one nothing is written. Faults
(the file deleted, read-only, overwritten, held by a second Nexus, the process killed) never
stop Nexus serving. Also `GET /v1/usage` and `nexus usage`.

Nexus runs as a real `nexus serve` process; the cloud backend it pays for is a mock OpenAI
server on 127.0.0.1 that reports 10 prompt and 3 completion tokens per answer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import ROOT, backends_toml, cloud_env, free_port

import nexus

NEXUS = [sys.executable, str(ROOT / "nexus.py")]
COST = nexus.cost_usd(nexus.load_price_table()["gpt-4o"], nexus.TokenUsage(10, 3))
TOKENS = 13  # per answer: the mock's usage
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "the secret plan"}]}
ADMIN, ALICE = "sk-ledger-admin-0f1e2d", "sk-ledger-alice-9a8b7c"
KEY_ENV = {"NEXUS_LEDGER_ADMIN": ADMIN, "NEXUS_LEDGER_ALICE": ALICE}


def auth_toml(alice_limit: float = 1.0) -> str:
    return (
        "[auth]\napi_keys = [\n"
        '  { name = "ops", key_env = "NEXUS_LEDGER_ADMIN", admin = true },\n'
        '  { name = "alice", key_env = "NEXUS_LEDGER_ALICE", '
        f"monthly_limit_usd = {alice_limit} }},\n"
        "]\n"
    )


BUDGET_TOML = "[routing.budget]\nmonthly_limit_usd = 50.0\n"


class Served:
    """`nexus serve` as a process of its own, its log in a file (read while it runs)."""

    def __init__(self, tmp_path: Path, toml: str, env: dict[str, str], *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp_path / f"nexus-{self.port}.toml"
        config.write_text("[health_check]\ninterval_seconds = 0.5\n" + toml)
        self.log_path = tmp_path / f"nexus-{self.port}.log"
        self.log_file = self.log_path.open("wb")
        command = [*NEXUS, "serve", "-c", str(config), "-p", str(self.port), "-H", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [*command, "--no-discovery", *args],
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    async def wait_serving(self, timeout: float = 20.0) -> None:
        """Until it answers and its cloud backend's model is routable."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.url + "/health") as resp:
                        if resp.status == 200 and (await resp.json())["models"]:
                            return
                await asyncio.sleep(0.05)
        raise AssertionError("nexus did not start serving in time:\n" + self.log)

    async def chat(self, key: str | None = ADMIN) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url + "/v1/chat/completions", json=CHAT, headers=headers) as resp,
        ):
            return resp.status, await resp.json()

    async def get(self, path: str, key: str | None = ADMIN) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + path, headers=headers) as resp,
        ):
            return resp.status, await resp.json()

    async def stop(self) -> int:
        """SIGTERM, as a service manager stops it; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self.proc.wait, 20)
        self.log_file.close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.log_file.close()


@pytest.fixture
async def cloud(backend_factory):
    return await backend_factory("openai", {"gpt-4o": {}}, name="oai")


@pytest.fixture
async def start(cloud, tmp_path):
    """Start `nexus serve` in front of the cloud mock: start(toml, *args) -> Served."""
    running: list[Served] = []

    async def make(toml: str, *args: str, wait: bool = True) -> Served:
        env = {**KEY_ENV, **cloud_env(cloud)}
        served = Served(tmp_path, backends_toml(cloud) + toml, env, *args)
        running.append(served)
        if wait:
            await served.wait_serving()
        return served

    yield make
    for served in running:
        if served.proc.poll() is None:
            served.kill()


def ledger_rows(path: Path) -> dict[tuple[str, str], tuple[float, int, int]]:
    """What nexus.db holds (read once Nexus has stopped), after an integrity check."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT month, key, spent_usd, requests, tokens FROM usage").fetchall()
    return {(m, k): (usd, requests, tokens) for m, k, usd, requests, tokens in rows}


def this_month() -> str:
    return nexus.month_of(nexus.dt.datetime.now(nexus.dt.UTC))


# --- survives a restart -------------------------------------------------------------------


async def test_spend_and_key_budgets_survive_a_restart(start, tmp_path):
    data = tmp_path / "data"
    toml = BUDGET_TOML + auth_toml(alice_limit=COST * 2.5)  # alice: two and a half answers
    first = await start(toml, "--data-dir", str(data))
    for key in (ALICE, ALICE, ADMIN):
        status, _ = await first.chat(key)
        assert status == 200
    status, document = await first.chat(ALICE)  # over her limit: only cloud serves gpt-4o
    assert status == 200  # the third is still let through: the limit is checked before
    status, document = await first.chat(ALICE)
    assert status == 429 and document["error"]["code"] == "key_budget_exceeded"
    assert await first.stop() == 0
    assert (data / "nexus.db").is_file()
    rows = ledger_rows(data / "nexus.db")
    month = this_month()
    assert rows[month, ""] == (pytest.approx(4 * COST), 5, 4 * TOKENS)
    assert rows[month, "alice"] == (pytest.approx(3 * COST), 4, 3 * TOKENS)
    assert rows[month, "ops"] == (pytest.approx(COST), 1, TOKENS)
    everything = (data / "nexus.db").read_bytes()
    for secret in (ADMIN, ALICE, "the secret plan", "Hello from oai"):
        assert secret.encode() not in everything  # names and numbers only

    second = await start(toml, "--data-dir", str(data))
    assert "ledger" in second.log and str(data / "nexus.db") in second.log
    # The restart did not hand alice her month again, and the budget goes on from 4 answers.
    status, document = await second.chat(ALICE)
    assert status == 429 and document["error"]["code"] == "key_budget_exceeded"
    status, stats = await second.get("/v1/stats")
    assert stats["budget"]["spent_usd"] == pytest.approx(4 * COST, abs=1e-6)
    alice = next(k for k in stats["keys"] if k["name"] == "alice")
    assert alice["spent_usd"] == pytest.approx(3 * COST, abs=1e-6)
    status, _ = await second.chat(ADMIN)
    assert status == 200
    status, usage = await second.get("/v1/usage")
    assert status == 200
    assert usage["month"] == month and usage["source"] == "ledger"
    assert usage["total"] == {
        "spent_usd": pytest.approx(5 * COST, abs=1e-6),
        "requests": 7,
        "tokens": 5 * TOKENS,
        "monthly_limit_usd": 50.0,
    }
    keys = {k["name"]: k for k in usage["keys"]}
    assert keys["alice"]["requests"] == 5 and keys["alice"]["tokens"] == 3 * TOKENS
    assert keys["alice"]["monthly_limit_usd"] == pytest.approx(COST * 2.5)
    assert keys["ops"]["spent_usd"] == pytest.approx(2 * COST, abs=1e-6)
    assert keys["ops"]["requests"] == 2 and keys["ops"]["monthly_limit_usd"] is None

    # `nexus usage` prints the same, for this month or another.
    env = {**os.environ, "NEXUS_API_KEY": ADMIN}
    printed = await asyncio.to_thread(
        subprocess.run,
        [*NEXUS, "usage", "--json", "--url", second.url],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout) == json.loads(json.dumps(usage))
    table = await asyncio.to_thread(
        subprocess.run,
        [*NEXUS, "usage", "--url", second.url],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    lines = table.stdout.splitlines()
    assert lines[0] == f"usage in {month} (ledger)"
    assert lines[1].split() == ["KEY", "SPENT", "USD", "REQUESTS", "TOKENS"]
    alice_line = next(line for line in lines if line.startswith("alice"))
    assert alice_line.split()[-2:] == ["5", str(3 * TOKENS)]
    assert lines[-1].split()[0] == "(total)" and lines[-1].split()[-2:] == ["7", str(5 * TOKENS)]
    other = await asyncio.to_thread(
        subprocess.run,
        [*NEXUS, "usage", "--json", "--month", "2001-01", "--url", second.url],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    past = json.loads(other.stdout)
    assert past["month"] == "2001-01" and past["total"]["requests"] == 0
    assert await second.stop() == 0
    assert "Traceback" not in first.log + second.log


async def test_usage_needs_a_month_it_understands(start, tmp_path):
    served = await start(BUDGET_TOML, "--data-dir", str(tmp_path / "data"))
    for month in ("2026-13", "26-01", "2026-1", "x", "2026-01-01"):
        status, document = await served.get(f"/v1/usage?month={month}", key=None)
        assert status == 400, month
        assert document["error"]["param"] == "month"
    status, document = await served.get("/v1/usage?month=2026-01", key=None)
    assert status == 200 and document["keys"] == [] and document["total"]["requests"] == 0
    assert await served.stop() == 0


# --- nothing written without a monthly limit ----------------------------------------------


async def test_no_file_is_written_without_a_monthly_limit(start, tmp_path, own_data_home):
    data = tmp_path / "data"
    toml = '[routing.budget]\nhard_limit_action = "warn"\n' + auth_toml(alice_limit=0)
    served = await start(toml, "--data-dir", str(data))
    for key in (ALICE, ADMIN, ALICE):
        status, _ = await served.chat(key)
        assert status == 200
    status, usage = await served.get("/v1/usage")
    assert usage["source"] == "memory"  # what this process counted
    assert usage["total"]["requests"] == 3
    assert usage["total"]["spent_usd"] == pytest.approx(3 * COST, abs=1e-6)
    assert {k["name"]: k["requests"] for k in usage["keys"]} == {"alice": 2, "ops": 1}
    assert await served.stop() == 0
    assert not data.exists()
    assert list(own_data_home.iterdir()) == []  # nor in the platform's data directory


async def test_data_directory_from_flag_variable_file_or_platform(tmp_path):
    config = tmp_path / "nexus.toml"
    config.write_text('[server]\ndata_dir = "/from/file"\n')
    env = {"NEXUS_DATA_DIR": "/from/env"}
    flag = {("server", "data_dir"): "/from/flag"}
    assert nexus.load_settings(config, env, flag).server.data_dir == "/from/flag"
    assert nexus.load_settings(config, env, {}).server.data_dir == "/from/env"
    assert nexus.load_settings(config, {}, {}).server.data_dir == "/from/file"
    home = {"HOME": "/home/u"}
    where = nexus.data_directory
    assert where("/srv/nexus", home, "linux") == Path("/srv/nexus")
    assert where("", home, "linux") == Path("/home/u/.local/share/nexus")
    assert where("", {**home, "XDG_DATA_HOME": "/xdg"}, "linux") == Path("/xdg/nexus")
    assert where("", home, "darwin") == Path("/home/u/Library/Application Support/nexus")
    assert where("", {**home, "LOCALAPPDATA": "C:/Users/u/AppData/Local"}, "win32") == Path(
        "C:/Users/u/AppData/Local/nexus"
    )


async def test_without_a_data_dir_the_ledger_is_in_the_platform_directory(start, own_data_home):
    served = await start(BUDGET_TOML)
    status, _ = await served.chat(None)
    assert status == 200
    assert await served.stop() == 0
    rows = ledger_rows(own_data_home / "nexus" / "nexus.db")
    assert rows[this_month(), ""][1] == 1


# --- faults ---------------------------------------------------------------------------------

LOAD_WORKERS = 8
LOAD_SECONDS = 3.0
MAX_LOSS_SECONDS = 1.0  # SPEC §1: a crash loses at most the last second
SCHEDULING_SLACK_SECONDS = 0.3  # the writer thread's own time on a busy machine


async def test_kill_9_under_load_keeps_all_but_the_last_second(start, tmp_path):
    data = tmp_path / "data"
    served = await start(BUDGET_TOML, "--data-dir", str(data))
    answered: list[float] = []  # when each paid answer was complete, as the client saw it
    sent = 0
    stop_at = time.monotonic() + LOAD_SECONDS

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while time.monotonic() < stop_at + 5:  # until the kill cuts it off
            sent += 1
            try:
                async with session.post(served.url + "/v1/chat/completions", json=CHAT) as resp:
                    await resp.read()
                    if resp.status == 200:
                        answered.append(time.monotonic())
            except aiohttp.ClientError:
                return

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(LOAD_WORKERS)]
        await asyncio.sleep(LOAD_SECONDS)
        killed_at = time.monotonic()
        os.kill(served.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*workers), 15)
    served.proc.wait(10)
    old = [t for t in answered if t < killed_at - MAX_LOSS_SECONDS - SCHEDULING_SLACK_SECONDS]
    assert len(old) > 20, "too little load to judge"

    again = await start(BUDGET_TOML, "--data-dir", str(data))
    status, usage = await again.get("/v1/usage", key=None)
    assert status == 200
    kept = usage["total"]["requests"]
    assert len(old) <= kept <= sent
    assert usage["total"]["spent_usd"] == pytest.approx(kept * COST, rel=1e-6)
    assert usage["total"]["tokens"] == kept * TOKENS
    assert await again.stop() == 0
    assert ledger_rows(data / "nexus.db")[this_month(), ""][1] == kept


async def test_a_second_nexus_on_the_same_data_dir_counts_in_memory(start, tmp_path):
    data = tmp_path / "data"
    first = await start(BUDGET_TOML, "--data-dir", str(data))
    second = await start(BUDGET_TOML, "--data-dir", str(data))
    path = str(data / "nexus.db")
    assert f"ledger {path} cannot be used (database is locked: another Nexus" in second.log
    assert "counted in memory" in second.log
    for served, times in ((first, 2), (second, 3)):
        for _ in range(times):
            status, _ = await served.chat(None)
            assert status == 200
    _, usage = await first.get("/v1/usage", key=None)
    assert usage["source"] == "ledger" and usage["total"]["requests"] == 2
    _, usage = await second.get("/v1/usage", key=None)
    assert usage["source"] == "memory" and usage["total"]["requests"] == 3
    assert await second.stop() == 0
    assert await first.stop() == 0
    assert ledger_rows(data / "nexus.db")[this_month(), ""][1] == 2  # whole, never mixed
    third = await start(BUDGET_TOML, "--data-dir", str(data))
    _, usage = await third.get("/v1/usage", key=None)
    assert usage["source"] == "ledger" and usage["total"]["requests"] == 2
    assert await third.stop() == 0


async def wait_for_log(served: Served, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in served.log:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{served.log}"
        await asyncio.sleep(0.1)


async def spent_and_serving(served: Served, answers: int) -> None:
    """Nexus still answers, and its budget has counted every answer (in memory at least)."""
    status, _ = await served.chat(None)
    assert status == 200
    _, stats = await served.get("/v1/stats", key=None)
    assert stats["budget"]["spent_usd"] == pytest.approx(answers * COST, abs=1e-6)


async def test_ledger_deleted_while_running_is_written_anew(start, tmp_path):
    data = tmp_path / "data"
    served = await start(BUDGET_TOML, "--data-dir", str(data))
    await spent_and_serving(served, 1)
    await asyncio.sleep(1.5)  # written
    for name in ("nexus.db", "nexus.db-wal"):
        (data / name).unlink(missing_ok=True)
    await spent_and_serving(served, 2)
    await wait_for_log(served, "deleted or replaced: written anew")
    assert str(data / "nexus.db") in served.log
    await spent_and_serving(served, 3)
    assert await served.stop() == 0
    assert ledger_rows(data / "nexus.db")[this_month(), ""][:2] == (pytest.approx(3 * COST), 3)


async def test_ledger_made_read_only_while_running_keeps_counting(start, tmp_path):
    data = tmp_path / "data"
    served = await start(BUDGET_TOML, "--data-dir", str(data))
    await spent_and_serving(served, 1)
    await asyncio.sleep(1.5)
    # Root ignores permission bits; the immutable attribute stops even root from writing.
    files = [str(p) for p in (data, *data.iterdir())]
    chattr = subprocess.run(["chattr", "+i", *files], capture_output=True, text=True)
    if chattr.returncode != 0:
        pytest.skip(f"this filesystem has no immutable attribute: {chattr.stderr.strip()}")
    try:
        await spent_and_serving(served, 2)
        await wait_for_log(served, "cannot be written")
        assert f"ledger {data / 'nexus.db'} cannot be written" in served.log
        await spent_and_serving(served, 3)
        _, usage = await served.get("/v1/usage", key=None)
        assert usage["total"]["requests"] == 3  # counted in memory meanwhile
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)
    await wait_for_log(served, "is written again")
    assert await served.stop() == 0
    assert ledger_rows(data / "nexus.db")[this_month(), ""][:2] == (pytest.approx(3 * COST), 3)
    assert "Traceback" not in served.log


async def test_ledger_filled_with_junk_while_running_is_left_alone(start, tmp_path):
    data = tmp_path / "data"
    served = await start(BUDGET_TOML, "--data-dir", str(data))
    await spent_and_serving(served, 1)
    await asyncio.sleep(1.5)
    junk = os.urandom(64 * 1024)
    with (data / "nexus.db").open("r+b") as file:  # the same file, overwritten in place
        file.write(junk)
    await spent_and_serving(served, 2)
    await wait_for_log(served, "no longer a SQLite database")
    assert f"ledger {data / 'nexus.db'} cannot be written" in served.log
    for answers in range(3, 6):
        await spent_and_serving(served, answers)
    _, usage = await served.get("/v1/usage", key=None)
    assert usage["source"] == "memory" and usage["total"]["requests"] == 5
    assert await served.stop() == 0
    assert "Traceback" not in served.log


@pytest.mark.parametrize("fault", ["directory is a file", "file is junk", "under /proc"])
async def test_an_unusable_ledger_at_start_warns_and_counts_in_memory(start, tmp_path, fault):
    data = tmp_path / "data"
    if fault == "directory is a file":
        data.write_text("not a directory")
    elif fault == "file is junk":
        data.mkdir()
        (data / "nexus.db").write_bytes(b"this is no database\n" * 1000)
    else:
        data = Path("/proc/self/nexus-data")
    served = await start(BUDGET_TOML, "--data-dir", str(data))
    assert f"ledger {data / 'nexus.db'} cannot be used" in served.log
    if fault == "directory is a file":
        assert f"({data} is not a directory)" in served.log
    for answers in (1, 2):
        await spent_and_serving(served, answers)
    _, usage = await served.get("/v1/usage", key=None)
    assert usage["source"] == "memory" and usage["total"]["requests"] == 2
    assert await served.stop() == 0
    if fault == "file is junk":
        assert (data / "nexus.db").read_bytes() == b"this is no database\n" * 1000


# --- other months ---------------------------------------------------------------------------


async def test_usage_of_another_month_is_read_from_the_ledger(
    backend_factory, nexus_factory, own_data_home
):
    path = own_data_home / "nexus" / "nexus.db"
    path.parent.mkdir()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(nexus.LEDGER_SCHEMA)
        db.executemany(
            nexus.LEDGER_UPSERT,
            [("2001-01", "", 1.5, 30, 3000), ("2001-01", "gone", 1.25, 20, 2000)],
        )
        db.commit()
    local = await backend_factory("ollama", {"llama3:8b": {}}, name="gpu")
    nx = await nexus_factory(BUDGET_TOML + backends_toml(local))
    async with aiohttp.ClientSession() as session:
        body = {"model": "llama3:8b", "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(nx.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
        async with session.get(nx.url + "/v1/usage?month=2001-01") as resp:
            past = await resp.json()
        async with session.get(nx.url + "/v1/usage") as resp:
            now = await resp.json()
    assert past["source"] == "ledger"
    assert past["total"]["spent_usd"] == 1.5 and past["total"]["requests"] == 30
    # A key no longer configured keeps its row: the ledger knows names, not configurations.
    assert past["keys"] == [
        {
            "name": "gone",
            "spent_usd": 1.25,
            "requests": 20,
            "tokens": 2000,
            "monthly_limit_usd": None,
        }
    ]
    assert now["month"] == this_month() and now["total"]["requests"] == 1
    assert now["total"]["spent_usd"] == 0  # a local answer costs nothing


def test_counts_move_to_the_new_month_when_it_begins(monkeypatch):
    last_second = nexus.dt.datetime(2026, 1, 31, 23, 59, 59, tzinfo=nexus.dt.UTC).timestamp()
    monkeypatch.setattr(nexus.time, "time", lambda: last_second)
    ledger = nexus.Ledger(None)
    ledger.add(nexus.TOTAL_ROW, 1.0, 1, 10)
    ledger.add("alice", 1.0, 1, 10)
    monkeypatch.setattr(nexus.time, "time", lambda: last_second + 2)
    ledger.add(nexus.TOTAL_ROW, 2.0, 1, 20)
    assert ledger.rows == {
        "2026-01": {"": [1.0, 1, 10], "alice": [1.0, 1, 10]},
        "2026-02": {"": [2.0, 1, 20]},
    }
    assert ledger.month == "2026-02" and ledger.spent("alice") == 0
