"""The CLI of SPEC §1, run as a user runs it: `nexus serve` as a process, and every other
command against it over HTTP. Also graceful shutdown, and plain `nexus serve` with no config."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import openai
import pytest
from conftest import ROOT, backends_toml, free_port

NEXUS = [sys.executable, str(ROOT / "nexus.py")]


async def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None):
    proc = await asyncio.create_subprocess_exec(
        *NEXUS,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def wait_until_serving(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("nexus did not start serving in time")


async def wait_until_listed(url: str, timeout: float = 15.0) -> None:
    """Until the first health poll has found the backend's models (it runs after start-up)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(url + "/v1/models") as resp:
                if resp.status == 200 and (await resp.json())["data"]:
                    return
            await asyncio.sleep(0.05)
    raise AssertionError("nexus listed no model in time")


@pytest.fixture
async def served(backend_factory, tmp_path):
    """`nexus serve` as a real process in front of one mock Ollama; yields (url, backend, proc)."""
    backend = await backend_factory("ollama", {"llama3:8b": {"context": 8192}}, name="gpu")
    config = tmp_path / "nexus.toml"
    config.write_text(backends_toml(backend))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *NEXUS,
        "serve",
        "-c",
        str(config),
        "-p",
        str(port),
        "-H",
        "127.0.0.1",
        "--no-discovery",
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    await wait_until_serving(url)
    await wait_until_listed(url)
    yield url, backend, proc
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_version():
    code, out, _ = await run_cli("--version")
    assert code == 0
    assert out.startswith("nexus 0.1.0 (commit ")


async def test_models_and_health_commands(served):
    url, _, _ = served
    code, out, _ = await run_cli("models", "--url", url)
    assert code == 0 and "llama3:8b" in out and "8192" in out
    code, out, _ = await run_cli("models", "--json", env={"NEXUS_URL": url})
    assert json.loads(out)["data"][0]["id"] == "llama3:8b"
    code, out, _ = await run_cli("health", "--url", url)
    assert code == 0 and out.startswith("healthy: 1/1 backends healthy")
    code, out, _ = await run_cli("health", "--json", "--url", url)
    assert json.loads(out)["backends"]["total"] == 1


async def test_backends_list_add_remove(served, backend_factory):
    url, _, _ = served
    code, out, _ = await run_cli("backends", "list", "--url", url)
    assert code == 0 and "gpu" in out and "ollama" in out and "healthy" in out
    extra = await backend_factory("llamacpp", {"smol": {"context": 2048}}, name="cpp")
    code, out, err = await run_cli("backends", "add", extra.url, "--name", "cpp", "--url", url)
    assert code == 0, err
    assert "added cpp (llamacpp" in out  # the type was detected from /props
    code, out, _ = await run_cli("backends", "list", "--json", "--url", url)
    listed = {b["name"]: b for b in json.loads(out)["data"]}
    assert listed["cpp"]["type"] == "llamacpp" and listed["cpp"]["models"] == ["smol"]
    assert set(listed["cpp"]) >= {"name", "url", "type", "status", "zone", "tier", "priority"}
    code, out, _ = await run_cli("backends", "remove", "cpp", "--url", url)
    assert code == 0 and "removed cpp" in out
    code, _, err = await run_cli("backends", "remove", "cpp", "--url", url)
    assert code != 0 and "No backend" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("kind", "models"),
    [("ollama", {"a": {}}), ("vllm", {"b": {}}), ("lmstudio", {"c": {}}), ("generic", {"d": {}})],
)
async def test_backends_add_detects_type(served, backend_factory, kind, models):
    url, _, _ = served
    extra = await backend_factory(kind, models, name=f"x-{kind}")
    code, out, err = await run_cli("backends", "add", extra.url, "--url", url)
    assert code == 0, err
    assert f"({kind}," in out


async def test_backends_add_nothing_there(served):
    url, _, _ = served
    code, _, err = await run_cli("backends", "add", f"http://127.0.0.1:{free_port()}", "--url", url)
    assert code != 0 and "No LLM server answered" in err


async def test_backends_list_says_why_a_backend_is_down(served):
    url, _, _ = served
    dead = f"http://127.0.0.1:{free_port()}"
    code, out, err = await run_cli(
        "backends", "add", dead, "--name", "dead", "--type", "generic", "--url", url
    )
    assert code == 0 and "unhealthy" in out, err
    code, out, _ = await run_cli("backends", "list", "--url", url)
    header, *rows = out.splitlines()
    assert header.split()[-2:] == ["LAST", "ERROR"]
    row = next(r for r in rows if r.startswith("dead "))
    assert "unhealthy" in row and row.endswith("could not connect: connection refused")
    assert next(r for r in rows if r.startswith("gpu ")).endswith("1")  # healthy: no reason
    code, out, _ = await run_cli("backends", "list", "--json", "--url", url)
    listed = {b["name"]: b["last_error"] for b in json.loads(out)["data"]}
    assert listed == {"gpu": None, "dead": "could not connect: connection refused"}


async def test_cli_without_a_running_nexus():
    code, _, err = await run_cli("models", "--url", f"http://127.0.0.1:{free_port()}")
    assert code != 0
    assert "cannot reach Nexus" in err and "Traceback" not in err


async def test_config_init_writes_template_and_refuses_overwrite(tmp_path):
    code, _out, _ = await run_cli("config", "init", cwd=tmp_path)
    assert code == 0
    written = (tmp_path / "nexus.toml").read_text()
    assert "[server]" in written and "[[backends]]" in written
    code, _, err = await run_cli("config", "init", cwd=tmp_path)
    assert code != 0 and "--force" in err
    code, _, _ = await run_cli("config", "init", "-o", "nexus.toml", "--force", cwd=tmp_path)
    assert code == 0
    # The template is a valid config that starts Nexus with every default.
    code, _, err = await run_cli("serve", "-c", "nexus.toml", "-p", "99999", cwd=tmp_path)
    assert code == 2 and "server.port" in err


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
async def test_completions(shell):
    code, out, _ = await run_cli("completions", shell)
    assert code == 0 and "nexus" in out and "serve" in out
    if shell == "bash" and shutil.which("bash"):
        check = subprocess.run(["bash", "-n"], input=out, text=True, capture_output=True)
        assert check.returncode == 0, check.stderr


async def test_sigterm_finishes_in_flight_stream_then_exits_0(served):
    url, backend, proc = served
    backend.reply = "a b c d e f"
    backend.chunk_delay = 0.2
    sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    stream = await sdk.chat.completions.create(
        model="llama3:8b", messages=[{"role": "user", "content": "x"}], stream=True
    )
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and proc.returncode is None:
            if not text:
                proc.send_signal(signal.SIGTERM)
            text += chunk.choices[0].delta.content
    assert text == "a b c d e f"  # the in-flight answer completed
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as session, session.get(url + "/health"):
            pass


async def test_sigint_exits_0(served):
    _, _, proc = served
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    stderr = (await proc.stderr.read()).decode()
    assert "Traceback" not in stderr


NO_CONFIG_CHECK = textwrap.dedent(
    """
    import json, subprocess, sys, time, urllib.request, urllib.error
    proc = subprocess.Popen([sys.executable, sys.argv[1], "serve"])
    def get(path):
        with urllib.request.urlopen("http://127.0.0.1:8000" + path, timeout=5) as r:
            return json.loads(r.read())
    for _ in range(150):
        try:
            health = get("/health")
            break
        except OSError:
            time.sleep(0.1)
    models = get("/v1/models")
    body = json.dumps({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]})
    req = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions", body.encode(),
                                 {"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=5)
        status, error = 200, None
    except urllib.error.HTTPError as exc:
        status, error = exc.code, json.loads(exc.read())
    proc.terminate()
    print(json.dumps({"health": health, "models": models, "status": status, "error": error,
                      "exit": proc.wait(timeout=15)}))
    """
)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_plain_serve_with_no_config_in_isolated_network(tmp_path):
    """`nexus serve` with no arguments and no file, discovery on, inside a namespace with only
    loopback: it serves, lists no models, and answers completions with an actionable error."""
    script = tmp_path / "check.py"
    script.write_text(NO_CONFIG_CHECK)
    result = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            f'ip link set lo up && "{sys.executable}" "$@"',
            "sh",
            str(script),
            str(ROOT / "nexus.py"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["health"]["status"] in ("healthy", "degraded", "unhealthy")
    assert report["models"] == {"object": "list", "data": []}
    assert report["status"] in (404, 503)
    assert report["error"]["error"]["message"]
    assert report["exit"] == 0
