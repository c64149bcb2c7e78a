"""The tokenizer files shipped in assets/ are exactly the ones tiktoken publishes."""

import hashlib
from pathlib import Path

import pytest
import tiktoken_ext.openai_public as openai_public

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_ENCODINGS = ("o200k_base", "cl100k_base")


def published_definition(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """(file name, expected SHA-256) that tiktoken's own constructor asks its loader for.

    The loader is replaced so that nothing is read or downloaded: only its arguments are kept.
    """
    requested: list[tuple[str, str]] = []

    def record(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        assert expected_hash, f"tiktoken publishes no hash for {url}"
        requested.append((url.rsplit("/", 1)[-1], expected_hash))
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", record)
    openai_public.ENCODING_CONSTRUCTORS[name]()
    assert len(requested) == 1
    return requested[0]


@pytest.mark.parametrize("name", SHIPPED_ENCODINGS)
def test_shipped_file_matches_tiktoken_published_hash(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_name, expected = published_definition(name, monkeypatch)
    assert file_name == f"{name}.tiktoken"
    data = (ASSETS / file_name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == expected


def test_every_tokenizer_file_in_assets_is_checked() -> None:
    shipped = sorted(p.name for p in ASSETS.glob("*.tiktoken"))
    assert shipped == sorted(f"{name}.tiktoken" for name in SHIPPED_ENCODINGS)
