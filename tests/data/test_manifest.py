"""URL-indexed manifests with integrity hashes (mlaudit.data.manifest) and `mlaudit data verify`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mlaudit.attacks.web import ContentServer
from mlaudit.cli import app
from mlaudit.data.manifest import (
    ManifestEntry,
    fetch_all,
    fetch_bytes,
    index_urls,
    load_manifest,
    save_manifest,
    verify_local,
)
from mlaudit.errors import ConfigError, DataError

H = hashlib.sha256(b"x").hexdigest()


def test_round_trip(tmp_path: Path) -> None:
    entries = [ManifestEntry("https://example.org/a.png", H, label=3),
               ManifestEntry("file:///tmp/b.png", H, caption="a photo of a dog", path="b.png")]
    p = save_manifest(entries, tmp_path / "m.jsonl")
    assert load_manifest(p) == entries


@pytest.mark.parametrize("line, field", [
    ({"url": "ftp://example.org/a", "sha256": H}, "scheme"),
    ({"url": "http:///a.png", "sha256": H}, "no host"),
    ({"url": "https://example.org/a b.png", "sha256": H}, "whitespace"),
    ({"url": "https://example.org/a.png", "sha256": "abc"}, "64 hexadecimal"),
    ({"url": "https://example.org/a.png", "sha256": H, "path": "../x"}, "relative path"),
    ({"url": "https://example.org/a.png", "sha256": H, "label": 1.5}, "label"),
    ({"url": "https://example.org/a.png", "sha256": H, "extra": 1}, "unknown field"),
    ([1, 2], "JSON object"),
])
def test_malformed_lines_name_the_line_and_field(tmp_path: Path, line: object, field: str) -> None:
    p = tmp_path / "m.jsonl"
    good = json.dumps({"url": "https://example.org/ok.png", "sha256": H})
    p.write_text(good + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ConfigError, match=field) as e:
        load_manifest(p)
    assert "line 2" in str(e.value)


def test_not_json_and_empty(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text("{not json\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_manifest(p)
    p.write_text("\n\n")
    with pytest.raises(ConfigError, match="no entries"):
        load_manifest(p)


def test_fetch_refuses_other_schemes_and_oversized_items() -> None:
    with pytest.raises(ConfigError, match="scheme"):
        fetch_bytes("gopher://example.org/x")
    with ContentServer() as srv:
        url = srv.put("big.bin", b"a" * 100)
        with pytest.raises(DataError, match="more than 10 bytes"):
            fetch_bytes(url, max_bytes=10)
        assert fetch_bytes(url) == b"a" * 100


def test_server_binds_to_loopback() -> None:
    with ContentServer() as srv:
        assert srv.host == "127.0.0.1" and srv.port > 0
        assert srv.url("a b/c.png").startswith(f"http://127.0.0.1:{srv.port}/a%20b/c.png")
        assert fetch_bytes(srv.put("a b/c.png", b"q")) == b"q"


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from(["intact", "tampered", "gone"]), min_size=1, max_size=12))
def test_verified_download_rejects_every_tampered_item_and_accepts_every_intact_one(fates: list[str]) -> None:
    with ContentServer() as srv:
        urls = [srv.put(f"i{i}", f"content {i}".encode()) for i in range(len(fates))]
        manifest = index_urls(urls)
        for i, fate in enumerate(fates):
            if fate == "tampered":
                srv.put(f"i{i}", f"poison {i}".encode())
            elif fate == "gone":
                srv.remove(f"i{i}")
        verified = fetch_all(manifest)
        unverified = fetch_all(manifest, verify=False)
    want = {"intact": "accepted", "tampered": "rejected", "gone": "unavailable"}
    assert verified.status == [want[f] for f in fates]
    assert [c is not None for c in verified.content] == [f == "intact" for f in fates]
    # without the check the client takes the poison
    assert unverified.status == ["unavailable" if f == "gone" else "accepted" for f in fates]
    for i, f in enumerate(fates):
        if f == "tampered":
            assert unverified.content[i] == f"poison {i}".encode()


def test_verify_local(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"A")
    (tmp_path / "data" / "b.png").write_bytes(b"B-changed")
    entries = [ManifestEntry("https://example.org/x/a.png", hashlib.sha256(b"A").hexdigest()),
               ManifestEntry("https://example.org/x/b.png", hashlib.sha256(b"B").hexdigest()),
               ManifestEntry("https://example.org/c.png", H, path="sub/c.png")]
    r = verify_local(entries, tmp_path / "data")
    assert r.status == ["accepted", "rejected", "unavailable"]


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    with ContentServer() as srv:
        urls = [srv.put(f"i{i}", bytes([i])) for i in range(4)]
        m = save_manifest(index_urls(urls), tmp_path / "m.jsonl")
        ok = runner.invoke(app, ["data", "verify", str(m)])
        assert ok.exit_code == 0, ok.output
        srv.put("i2", b"poison")
        bad = runner.invoke(app, ["data", "verify", str(m)])
        assert bad.exit_code == 1
        assert "rejected" in bad.output and "i2" in bad.output
    (tmp_path / "bad.jsonl").write_text(json.dumps({"url": "notaurl", "sha256": H}) + "\n")
    malformed = runner.invoke(app, ["data", "verify", str(tmp_path / "bad.jsonl")])
    assert malformed.exit_code == 2
    assert "url" in malformed.output
