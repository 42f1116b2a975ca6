"""URL-indexed dataset manifests with integrity hashes: the defence against split-view poisoning.

Web-scale datasets (LAION, COYO, CC3M, ...) are distributed as an index of URLs with labels or
captions; every client downloads the content itself, long after the maintainer looked at it. Carlini
et al. (2023, "Poisoning Web-Scale Training Datasets is Practical", seed 001) show that the content
behind a URL can change in between (split-view poisoning: an attacker buys the expired domains of
some URLs) and that a cryptographic hash of each item taken at indexing time, checked by every
client, rejects every changed item. This module is that defence, for users' own datasets:

* :class:`ManifestEntry` / :func:`load_manifest` / :func:`save_manifest`: a JSON Lines file, one
  object per item: ``url`` (http, https or file), ``sha256`` (64 hex digits of the content seen at
  indexing time), optional ``label``, ``caption`` and ``path`` (where a local copy lives, relative to
  a root). Malformed lines are refused with the line number, field, value and what is allowed.
* :func:`index_urls`: build a manifest by fetching each URL once and hashing what it served.
* :func:`fetch_all`: download every item, checking (``verify=True``) or not checking its hash;
  :class:`FetchReport` says which items were accepted, rejected (hash mismatch), or unavailable.
* :func:`verify_local`: check local copies under a root against the manifest (``mlaudit data verify``).

Downloads are bounded (``max_bytes`` per item) and only http, https and file URLs are followed.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlparse

from ..errors import ConfigError, DataError

SCHEMES = ("http", "https", "file")
MAX_ITEM_BYTES = 64 * 2**20
"""Default cap on one downloaded item (64 MiB): a larger response is an error, not read to the end."""
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
Status = Literal["accepted", "rejected", "unavailable"]


@dataclass(frozen=True)
class ManifestEntry:
    """One item of a URL-indexed dataset: where it is, the sha256 of its content at indexing time,
    and its label or caption."""

    url: str
    sha256: str
    label: int | str | None = None
    caption: str | None = None
    path: str | None = None

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in (("url", self.url), ("sha256", self.sha256), ("label", self.label),
                                  ("caption", self.caption), ("path", self.path)) if v is not None}


def check_url(url: object, *, where: str) -> str:
    """``url`` if it is a string URL with an allowed scheme (and a host for http/https), else ConfigError."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"{where}: url = {url!r}; allowed: a non-empty http(s):// or file:// URL")
    parsed = urlparse(url)
    if parsed.scheme.lower() not in SCHEMES:
        raise ConfigError(f"{where}: url = {url!r} has scheme {parsed.scheme!r}; allowed: {', '.join(SCHEMES)}")
    if parsed.scheme.lower() in ("http", "https") and not parsed.hostname:
        raise ConfigError(f"{where}: url = {url!r} has no host; allowed: http(s)://host/...")
    if any(c.isspace() for c in url):
        raise ConfigError(f"{where}: url = {url!r} contains whitespace; allowed: a percent-encoded URL")
    return url


def check_sha256(value: object, *, where: str) -> str:
    """Lower-case ``value`` if it is 64 hexadecimal digits, else ConfigError."""
    if not isinstance(value, str) or not _HEX64.match(value.lower()):
        raise ConfigError(f"{where}: sha256 = {value!r}; allowed: 64 hexadecimal digits (the sha256 of the "
                          "item's content)")
    return value.lower()


def _check_path(value: object, *, where: str) -> str | None:
    if value is None:
        return None
    p = PurePosixPath(str(value))
    if not isinstance(value, str) or not value or p.is_absolute() or ".." in p.parts:
        raise ConfigError(f"{where}: path = {value!r}; allowed: a relative path without '..'")
    return value


def parse_entry(obj: object, *, where: str) -> ManifestEntry:
    """A :class:`ManifestEntry` from a decoded JSON object, every field checked."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object with url and sha256, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"url", "sha256", "label", "caption", "path"})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: url, sha256, label, caption, path")
    label = obj.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
        raise ConfigError(f"{where}: label = {label!r}; allowed: an integer class or a string")
    caption = obj.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise ConfigError(f"{where}: caption = {caption!r}; allowed: a string")
    return ManifestEntry(check_url(obj.get("url"), where=where), check_sha256(obj.get("sha256"), where=where),
                         label, caption, _check_path(obj.get("path"), where=where))


def load_manifest(path: str | Path, *, max_entries: int = 10_000_000) -> list[ManifestEntry]:
    """Entries of the JSON Lines manifest at ``path`` (blank lines skipped); ConfigError on any bad line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"manifest {str(p)!r} is not a file")
    entries: list[ManifestEntry] = []
    with open(p, "rb") as f:
        for no, raw in enumerate(f, start=1):
            where = f"{p.name}, line {no}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ConfigError(f"{where}: not UTF-8; allowed: UTF-8 JSON Lines") from None
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: not a JSON object ({e.msg}); allowed: one JSON object per line") from None
            entries.append(parse_entry(obj, where=where))
            if len(entries) > max_entries:
                raise ConfigError(f"manifest {p.name} has more than {max_entries} entries; allowed <= {max_entries}")
    if not entries:
        raise ConfigError(f"manifest {str(p)!r} has no entries; allowed: one JSON object per line")
    return entries


def save_manifest(entries: Iterable[ManifestEntry], path: str | Path) -> Path:
    """Write ``entries`` as JSON Lines (sorted keys, one object per line)."""
    p = Path(path)
    p.write_text("".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in entries), encoding="utf-8")
    return p


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_bytes(url: str, *, timeout: float = 10.0, max_bytes: int = MAX_ITEM_BYTES) -> bytes:
    """The content behind ``url`` (http, https or file), at most ``max_bytes``; DataError when it cannot
    be fetched or is larger."""
    check_url(url, where="fetch")
    host = (urlparse(url).hostname or "").lower()
    # loopback never goes through an environment proxy (a local mirror or the simulations' server)
    opener = (urllib.request.build_opener(urllib.request.ProxyHandler({}))
              if host in ("127.0.0.1", "localhost", "::1") else urllib.request.build_opener())
    try:
        with opener.open(url, timeout=timeout) as resp:  # noqa: S310 (schemes checked above)
            data = resp.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"could not fetch {url}: {e}") from e
    if len(data) > max_bytes:
        raise DataError(f"{url} served more than {max_bytes} bytes; refusing (raise max_bytes if this is expected)")
    return data


def index_urls(urls: Sequence[str], *, labels: Sequence[int | str | None] | None = None,
               captions: Sequence[str | None] | None = None, fetch: Callable[[str], bytes] = fetch_bytes
               ) -> list[ManifestEntry]:
    """The maintainer's step: fetch every URL once and record the sha256 of what it served."""
    if labels is not None and len(labels) != len(urls):
        raise ConfigError(f"index_urls: {len(labels)} labels for {len(urls)} urls; give one per url")
    if captions is not None and len(captions) != len(urls):
        raise ConfigError(f"index_urls: {len(captions)} captions for {len(urls)} urls; give one per url")
    return [ManifestEntry(check_url(u, where=f"urls[{i}]"), sha256_bytes(fetch(u)),
                          None if labels is None else labels[i], None if captions is None else captions[i])
            for i, u in enumerate(urls)]


@dataclass
class FetchReport:
    """What a client got for each manifest item: ``status`` [N] (accepted / rejected / unavailable),
    ``content`` [N] (bytes of accepted items, else None) and ``served_sha256`` [N] (None if unavailable)."""

    status: list[Status]
    content: list[bytes | None]
    served_sha256: list[str | None]
    errors: dict[int, str] = field(default_factory=dict)

    def count(self, status: Status) -> int:
        return sum(s == status for s in self.status)

    def fraction(self, status: Status) -> float:
        return self.count(status) / max(len(self.status), 1)

    def summary(self) -> dict[str, float | int]:
        return {"items": len(self.status), **{s: self.count(s) for s in ("accepted", "rejected", "unavailable")},
                "rejected_fraction": self.fraction("rejected")}


def fetch_all(entries: Sequence[ManifestEntry], *, verify: bool = True,
              fetch: Callable[[str], bytes] = fetch_bytes) -> FetchReport:
    """The client's step: download every item; with ``verify`` keep only content whose sha256 equals
    the manifest's (a changed item is ``rejected``), without it keep whatever was served."""
    return _collect(entries, lambda e: fetch(e.url), verify=verify)


def verify_local(entries: Sequence[ManifestEntry], root: str | Path) -> FetchReport:
    """Check local copies: item i is ``root / path`` (or the URL's file name when the entry has no
    path); missing files are ``unavailable``, changed ones ``rejected``."""
    base = Path(root)
    if not base.is_dir():
        raise ConfigError(f"--root {str(base)!r} is not a folder")

    def local(entry: ManifestEntry) -> bytes:
        rel = entry.path or PurePosixPath(urlparse(entry.url).path).name
        f = base / rel
        if not rel or not f.is_file():
            raise DataError(f"no local copy of {entry.url} at {f}")
        if f.stat().st_size > MAX_ITEM_BYTES:
            raise DataError(f"{f} is larger than {MAX_ITEM_BYTES} bytes")
        return f.read_bytes()

    return _collect(entries, local, verify=True)


def _collect(entries: Sequence[ManifestEntry], get: Callable[[ManifestEntry], bytes], *, verify: bool) -> FetchReport:
    report = FetchReport([], [], [])
    for i, e in enumerate(entries):
        try:
            data = get(e)
        except DataError as err:
            report.status.append("unavailable")
            report.content.append(None)
            report.served_sha256.append(None)
            report.errors[i] = str(err)
            continue
        digest = sha256_bytes(data)
        ok = digest == e.sha256 or not verify
        report.status.append("accepted" if ok else "rejected")
        report.content.append(data if ok else None)
        report.served_sha256.append(digest)
    return report
