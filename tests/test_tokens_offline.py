"""Exact token counts from the embedded encodings, with no network at all."""

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken_ext.openai_public as openai_public

import nexus
from nexus import count_tokens, encoding_for_model, load_encoding, read_bpe_ranks

REPO = Path(__file__).resolve().parent.parent

# Counts and ids produced by tiktoken's own get_encoding(); the same strings give the same
# numbers in an independent pure-Python implementation of these encodings.
KNOWN_COUNTS: list[tuple[str, int, int]] = [  # text, o200k_base (gpt-4o), cl100k_base (gpt-4)
    ("Hello, world!", 4, 4),
    ("The quick brown fox jumps over the lazy dog.", 10, 10),
    (
        "def fibonacci(n: int) -> int:\n"
        "    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
        31,
        31,
    ),
    ("Grüße aus Zürich! 東京タワーは333メートルです。 Привет, мир!", 22, 29),
    ("1234567890 3.14159 -42 1e10", 15, 15),
    ("   leading spaces and\ttabs\n\n\nnewlines   ", 10, 10),
    ("emoji 🎉🚀👩‍💻 and symbols ∑∫√ ≠ ≤", 20, 24),
    ("<|endoftext|> is a special token", 11, 11),
    ("", 0, 0),
]
KNOWN_IDS = {"o200k_base": [13225, 11, 2375, 0], "cl100k_base": [9906, 11, 1917, 0]}


@pytest.fixture(scope="module")
def no_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Any attempt to resolve or connect fails the test; tiktoken's cache is empty.

    Encodings are loaded afresh under this guard, once for the whole module.
    """

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network use while tokenizing: {args!r}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", refuse)
        patch.setattr(socket.socket, "connect", refuse)
        patch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("empty-cache")))
        patch.setattr(nexus, "_loaded_encodings", {})
        yield


def tiktoken_definition(name: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    """tiktoken's own definition of an encoding, without loading or downloading its ranks."""
    with monkeypatch.context() as patch:
        patch.setattr(openai_public, "load_tiktoken_bpe", lambda url, expected_hash=None: {})
        return openai_public.ENCODING_CONSTRUCTORS[name]()


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_definition_is_tiktoken_s(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    published = tiktoken_definition(name, monkeypatch)
    ours = nexus.ENCODINGS[name]
    assert ours.pattern == published["pat_str"]
    assert ours.special_tokens == published["special_tokens"]


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize(("text", "o200k", "cl100k"), KNOWN_COUNTS)
def test_exact_counts_offline(text: str, o200k: int, cl100k: int) -> None:
    assert count_tokens(text, "gpt-4o") == (o200k, True)
    assert count_tokens(text, "gpt-4") == (cl100k, True)


@pytest.mark.usefixtures("no_network")
def test_known_token_ids() -> None:
    for name, ids in KNOWN_IDS.items():
        encoding = load_encoding(name)
        assert encoding.encode_ordinary("Hello, world!") == ids
        assert encoding.decode(ids) == "Hello, world!"


@pytest.mark.usefixtures("no_network")
def test_encoding_is_loaded_once() -> None:
    assert load_encoding("o200k_base") is load_encoding("o200k_base")
    assert load_encoding("o200k_base").n_vocab == 200019
    assert load_encoding("cl100k_base").n_vocab == 100277


def test_unknown_encoding_is_refused() -> None:
    with pytest.raises(KeyError, match="r50k_base"):
        load_encoding("r50k_base")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o", ("o200k_base", True)),
        ("gpt-4o-mini-2024-07-18", ("o200k_base", True)),
        ("gpt-4.1", ("o200k_base", True)),
        ("o3-mini", ("o200k_base", True)),
        ("gpt-5", ("o200k_base", True)),
        ("openai/gpt-4o", ("o200k_base", True)),
        ("gpt-4", ("cl100k_base", True)),
        ("gpt-4-turbo", ("cl100k_base", True)),
        ("gpt-3.5-turbo", ("cl100k_base", True)),
        ("llama3.1:8b", ("cl100k_base", False)),
        ("text-davinci-003", ("cl100k_base", False)),
    ],
)
def test_encoding_for_model(model: str, expected: tuple[str, bool]) -> None:
    assert encoding_for_model(model) == expected


def test_damaged_file_is_refused(tmp_path: Path) -> None:
    original = REPO / "assets" / "cl100k_base.tiktoken"
    damaged = tmp_path / "cl100k_base.tiktoken"
    damaged.write_bytes(original.read_bytes().replace(b" 100\n", b" 101\n", 1))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        read_bpe_ranks(damaged, nexus.ENCODINGS["cl100k_base"].sha256)


def test_assets_found_inside_a_one_file_bundle(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    assert nexus.asset_path("o200k_base.tiktoken") == tmp_path / "assets" / "o200k_base.tiktoken"


COUNT_IN_CHILD = """
import json, sys
from nexus import count_tokens
texts = json.load(sys.stdin)
print(json.dumps([[count_tokens(t, "gpt-4o")[0], count_tokens(t, "gpt-4")[0]] for t in texts]))
"""


@pytest.mark.netns
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare to make a network namespace",
)
def test_exact_counts_in_a_namespace_without_network(tmp_path: Path) -> None:
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", COUNT_IN_CHILD],
        input=json.dumps([text for text, _, _ in KNOWN_COUNTS]),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=True,
    )
    assert json.loads(result.stdout) == [[o200k, cl100k] for _, o200k, cl100k in KNOWN_COUNTS]
    assert not (tmp_path / "empty-cache").exists()
