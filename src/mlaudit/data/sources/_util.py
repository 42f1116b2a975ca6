"""Helpers shared by the file-based data sources.

* :func:`default_root` -- where a source keeps its files: ``$MLAUDIT_DATA/<name>`` when the
  ``MLAUDIT_DATA`` environment variable is set, else ``~/.mlaudit/data/<name>``.
* :func:`parse_options` -- validate ``DatasetSpec.options`` against a source's frozen pydantic model,
  turning validation failures into a :class:`~mlaudit.errors.ConfigError` that names the field.
* :func:`file_digest`, :func:`download_file`, :func:`safe_extract_tar` -- hashed downloads and
  archive extraction that refuses absolute paths, ``..`` components and links.
* :func:`stratified_split` -- a seeded, per-class train/test split.
* :func:`uint8_to_float` -- uint8 images to float32 in [0, 1].
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from torch import Tensor

from ...errors import ConfigError, DataError
from ..manifest import check_url

M = TypeVar("M", bound=BaseModel)

DATA_ENV_VAR = "MLAUDIT_DATA"
_CHUNK = 1 << 20


def default_root(name: str) -> Path:
    """Default folder of source ``name``: ``$MLAUDIT_DATA/<name>`` or ``~/.mlaudit/data/<name>``."""
    base = os.environ.get(DATA_ENV_VAR)
    return (Path(base).expanduser() if base else Path.home() / ".mlaudit" / "data") / name


def resolve_root(root: str | None, name: str) -> Path:
    """``root`` (with ``~`` expanded) when given, else :func:`default_root` of ``name``."""
    return Path(root).expanduser() if root else default_root(name)


def parse_options(model: type[M], options: dict[str, object], *, source: str) -> M:
    """Validate ``options`` with ``model``; a failure raises :class:`ConfigError` naming each bad field.

    The message lists every offending option with pydantic's explanation (which names the allowed
    values for ``Literal`` fields) and, for unknown options, the options the source accepts.
    """
    try:
        return model(**options)
    except ValidationError as exc:
        allowed = ", ".join(model.model_fields) or "(none)"
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "options"
            problems.append(f"options.{field} = {err.get('input')!r}: {err['msg']}")
        raise ConfigError(
            f"dataset {source!r}: invalid option(s): " + "; ".join(problems) + f". Allowed options: {allowed}"
        ) from None


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest (``sha256`` or ``md5``) of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, dest: Path, *, md5: str | None = None, sha256: str | None = None, timeout: float = 60.0,
                  unchecked: bool = False) -> Path:
    """Download ``url`` to ``dest`` and check its digest; returns ``dest``.

    ``md5`` (the whole hex digest) or ``sha256``: the whole hex digest, or a prefix of at least 8 hex digits (the
    convention of torchvision's weight file names, e.g. ``alexnet-owt-7be5be79.pth``). ``unchecked=True`` with
    neither: no digest is known (the caller checks the content and reports the file's sha256). The data is
    streamed to ``dest`` + ``.part`` and renamed only after the digest matched, so an interrupted or corrupt
    download never leaves a file that looks complete. ``http(s)://`` and ``file://`` URLs are accepted (the
    latter for tests and local mirrors).

    Raises:
        ConfigError: no digest and not ``unchecked``, or a sha256 prefix shorter than 8 hex digits.
        DataError: the URL cannot be fetched, or the digest differs.
    """
    if md5 is None and sha256 is None and not unchecked:
        raise ConfigError(f"download of {url}: give md5 or sha256 (or unchecked=True where no digest is known)")
    if sha256 is not None and not (len(sha256) >= 8 and all(c in "0123456789abcdefABCDEF" for c in sha256)):
        raise ConfigError(f"sha256 = {sha256!r}: allowed a hex digest or a prefix of at least 8 hex digits")
    check_url(url, where="download")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.new("md5" if md5 is not None else "sha256", usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:  # noqa: S310
            for chunk in iter(lambda: resp.read(_CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise DataError(
            f"could not download {url} to {dest}: {exc}. Download it by hand and place it at {dest}"
        ) from exc
    got = h.hexdigest()
    want, name = (md5.lower(), "MD5") if md5 is not None else ((sha256 or "").lower(), "SHA-256")
    if (md5 is not None and got != want) or (md5 is None and not got.startswith(want)):
        part.unlink(missing_ok=True)
        raise DataError(
            f"{name} mismatch for {url}: expected {want}{'...' if md5 is None and len(want) < 64 else ''}, got {got}; "
            f"the download is corrupt or the file changed upstream (nothing was kept at {dest})"
        )
    os.replace(part, dest)
    return dest


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or ":" in (p.parts[0] if p.parts else ""):
        raise DataError(f"archive {archive} holds an unsafe member path {name!r} (absolute or with '..'); refusing")
    return p


def safe_extract_tar(archive: Path, dest: Path) -> list[Path]:
    """Extract the regular files and folders of the tar ``archive`` under ``dest``.

    Members with absolute paths or ``..`` components raise :class:`DataError` before anything is
    written; links, devices and FIFOs raise too. Returns the extracted file paths.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                _check_member_name(m.name, archive)
                if not (m.isfile() or m.isdir()):
                    raise DataError(f"archive {archive} member {m.name!r} is a link or special file; refusing")
            written = []
            for m in members:
                target = dest / _check_member_name(m.name, archive)
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                if src is None:  # pragma: no cover - isfile() members always have data
                    raise DataError(f"archive {archive} member {m.name!r} has no data")
                with src, open(target, "wb") as out:
                    for chunk in iter(lambda: src.read(_CHUNK), b""):  # noqa: B023
                        out.write(chunk)
                written.append(target)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"archive {archive} is corrupt or unreadable: {exc}") from exc
    return written


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split of the labels ``y`` (int [N]); returns sorted (train_idx, test_idx).

    Each class of n members sends ``round(n * test_fraction)`` to test, clipped so that a class
    with at least two members keeps at least one in each split (a singleton stays in train).
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n = len(idx)
        k = 0 if n < 2 else min(max(int(round(n * test_fraction)), 1), n - 1)
        test.append(idx[:k])
        train.append(idx[k:])
    empty = np.zeros(0, dtype=np.int64)
    return (np.sort(np.concatenate(train or [empty])).astype(np.int64),
            np.sort(np.concatenate(test or [empty])).astype(np.int64))


def uint8_to_float(images: np.ndarray) -> Tensor:
    """uint8 array [N, ...] -> float32 tensor in [0, 1] (same shape)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
