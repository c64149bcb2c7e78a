"""The built one-file executable: what it carries, that it serves, and that it cleans up.

Runs after `make dist`; skipped when dist/nexus has not been built.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import offline_smoke
import pytest
from conftest import ROOT, free_port

BINARY = ROOT / "dist" / ("nexus.exe" if sys.platform == "win32" else "nexus")
MAX_SIZE_MB = 20

pytestmark = [
    pytest.mark.binary,
    pytest.mark.skipif(not BINARY.exists(), reason="dist/nexus not built (make dist)"),
]


def bundled_files() -> dict[str, bytes]:
    """{name: content} of the data files packed into the executable."""
    from PyInstaller.archive.readers import CArchiveReader

    archive = CArchiveReader(str(BINARY))
    return {name: archive.extract(name) for name in archive.toc if name.startswith("assets/")}


def test_size_within_budget() -> None:
    assert BINARY.stat().st_size <= MAX_SIZE_MB * 2**20


def test_every_asset_is_inside_unchanged() -> None:
    inside = bundled_files()
    for path in (ROOT / "assets").iterdir():
        if path.is_file() and path.name != "build_info.json":
            name = f"assets/{path.name}"
            assert name in inside, f"{name} missing from the executable"
            assert inside[name] == path.read_bytes(), f"{name} differs from the source tree"
    commit = json.loads(inside["assets/build_info.json"])["commit"]
    assert re.fullmatch(r"[0-9a-f]{7,40}|unknown", commit)


def test_the_fast_paths_are_compiled_in() -> None:
    """aiohttp's HTTP parser and writer, multidict, yarl and the event loop as C extensions:
    without them the binary still runs, on pure-Python fallbacks several times slower."""
    from PyInstaller.archive.readers import CArchiveReader

    names = list(CArchiveReader(str(BINARY)).toc)
    wanted = ["aiohttp/_http_parser.", "aiohttp/_http_writer.", "multidict/_multidict.", "yarl/"]
    if sys.platform != "win32":
        wanted.append("uvloop/loop.")
    for prefix in wanted:
        assert any(n.startswith(prefix) and n.endswith((".so", ".pyd")) for n in names), prefix


def test_certifis_certificates_are_inside() -> None:
    """What https backends are verified against where the system's certificates are not found
    (tls_context): certifi's bundle, collected with the package."""
    from PyInstaller.archive.readers import CArchiveReader

    assert "certifi/cacert.pem" in CArchiveReader(str(BINARY)).toc


def test_version_names_the_build_commit() -> None:
    result = subprocess.run(
        [str(BINARY), "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    commit = json.loads(bundled_files()["assets/build_info.json"])["commit"]
    assert result.stdout.startswith("nexus ")
    assert commit in result.stdout


def wait_healthy(port: int, process: subprocess.Popen, seconds: float = 30) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the executable exited during start-up"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                return json.loads(answer.read())
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"no answer on /health within {seconds} s")


def unpacked_dirs(tmp: Path) -> list[str]:
    return [entry.name for entry in tmp.iterdir() if entry.name.startswith("_MEI")]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_then_stops_cleanly_and_removes_its_unpacked_files(
    sig: signal.Signals, tmp_path: Path
) -> None:
    port = free_port()
    process = subprocess.Popen(
        [str(BINARY), "serve", "--no-discovery", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        health = wait_healthy(port, process)
        assert health["backends"]["total"] == 0
        assert len(unpacked_dirs(tmp_path)) == 1
        process.send_signal(sig)  # to the bootloader, which passes it on to the program
        assert process.wait(timeout=20) == 0
        log = process.stderr.read()
        assert "listening on" in log
        if sys.platform != "win32":  # uvloop is bundled wherever it is built
            assert "uvloop)" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert unpacked_dirs(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_offline_smoke_in_isolated_network(tmp_path: Path) -> None:
    """With no network at all (a namespace with only loopback): models listed, chats answered
    stream and not through the openai SDK, a cloud model's tokens counted exactly offline (its
    backend reports no usage), SIGTERM exits 0 and the unpacked files are gone."""
    smoke = [sys.executable, str(ROOT / "tests" / "offline_smoke.py"), str(BINARY), str(tmp_path)]
    result = subprocess.run(
        ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *smoke],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["models"] == ["gpt-4o", "m"]
    assert report["chat"] == report["stream"] == "Hello from the mock"
    assert report["cloud_chat"] == "Hello from the mock"
    sys.path.insert(0, str(ROOT))
    import nexus

    body = {"messages": [{"role": "user", "content": offline_smoke.PROMPT}]}
    texts, framing = nexus.payload_texts("chat", body)
    expected_prompt = nexus.count_texts(texts, "o200k_base") + framing
    expected_answer = nexus.count_texts(["Hello from the mock"], "o200k_base")
    assert report["cloud_tokens"] == {"prompt": expected_prompt, "completion": expected_answer}
    assert float(report["cloud_cost"]) > 0
    assert report["unpacked_while_running"] == 1
    assert report["exit"] == 0
    assert report["unpacked_after_exit"] == 0
    assert not report["traceback"] and not report["key_in_logs"]
