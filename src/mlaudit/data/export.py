"""Export a :class:`~mlaudit.data.view.DataView` to a folder and import it back, hash-verified.

Layout of an exported folder (format ``mlaudit-view/1``)::

    DIGEST                 the content digest: a header line ``mlaudit-view-digest/1 <hex>``, then
                           ``<sha256>  <relative path>`` for every other file, sorted by path;
                           <hex> = sha256 of those listing lines (``tail -n +2 DIGEST | sha256sum``)
    manifest.json          format, base_id, base fingerprint, shape, eps, indices, relabel,
                           inserted, keep, meta, exact, and "files": {relative path: sha256}
    images/00000042.png    the perturbed image base.x[42] + delta, one per perturbed index
    inserted/00000000.png  one per inserted example (virtual index N + k)
    deltas.npy             exact float32 deltas [P, *shape]   (only with exact=True)
    inserted.npy           exact float32 inserted images [I, *shape] (only with exact=True)

Images with C=1 are stored as grayscale PNG, C=3 as RGB PNG; any other shape as a float32
``.npy`` per image. PNGs quantise to 1/255: ``png = round(255 * (x + delta))``. On import
:func:`import_view` prefers the exact ``.npy`` arrays; without them it reconstructs
``delta = png / 255 - base.x[i]``, re-checks ``|delta| <= eps + 0.5/255`` and projects the
quantisation error back into the eps ball, so the round trip is within 1/255 (exact with npy).

Threat model: an exported folder may come from elsewhere. The export is content-addressed: its
digest covers every file including ``manifest.json`` (relabels, keep, eps, meta, per-file hashes),
so any edit, added or removed file changes it. :func:`export_view` writes it to ``DIGEST`` and
:func:`view_digest` returns it for the caller to keep elsewhere (the experiments record it in
results.json as ``metrics.export_digests``). :func:`import_view` recomputes it over the files
present and refuses a folder that differs from its ``DIGEST`` (naming the files), and from
``expected_digest`` when given: the ``DIGEST`` file inside the folder can be rewritten by whoever
edited the folder, so only a digest kept outside it proves the export is the one written. Import
further verifies every listed file's sha256, refuses files the manifest does not list, checks that
each image file holds exactly ``base.x[i] + delta`` (quantised as export quantises) when exact
arrays are present, keeps names in the manifest to plain relative paths inside the folder, loads
arrays with ``allow_pickle=False``, and re-validates the view against the base dataset.
Export is atomic: files go to ``<folder>.tmp-<random>`` which is renamed at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from ..errors import ConfigError, DataError
from .base import TensorDataset
from .view import TOL, DataView

FORMAT = "mlaudit-view/1"
PNG_TOL = 0.5 / 255
"""Extra eps tolerance when deltas are rebuilt from 8-bit PNGs (half a quantisation step)."""
DIGEST_FILE = "DIGEST"
DIGEST_FORMAT = "mlaudit-view-digest/1"
_HEX = re.compile(r"[0-9a-f]{64}")


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str
    base_id: str
    base_fingerprint: str
    num_base: int
    shape: list[int]
    num_classes: int
    eps: float | None
    indices: list[int]
    images: list[str]
    relabel: list[tuple[int, int]]
    inserted: list[tuple[str, int]]
    keep: list[int] | None
    meta: dict[str, Any]
    exact: dict[str, str | None]
    files: dict[str, str]


def _is_png_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


def _quantise(img: Tensor) -> Tensor:
    """float [C, H, W] in [0, 1] -> uint8 [C, H, W], as PNGs store it: ``round(255 * x)`` clamped."""
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


def _encode_image(img: Tensor) -> tuple[str, bytes]:
    """One image [*shape] in [0, 1] -> (suffix, file bytes): 8-bit PNG for C in {1, 3}, else npy."""
    if not _is_png_shape(tuple(img.shape)):
        return ".npy", _npy_bytes(img.numpy())
    u8 = _quantise(img)
    arr = u8[0].numpy() if img.shape[0] == 1 else u8.permute(1, 2, 0).contiguous().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L" if img.shape[0] == 1 else "RGB").save(buf, format="PNG")
    return ".png", buf.getvalue()


def _write_file(root: Path, rel: str, data: bytes) -> str:
    """Write ``data`` to ``root / rel`` (creating folders) and return its sha256 hex digest."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _scan(folder: Path) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file under ``folder`` except ``DIGEST``.

    Refuses symbolic links, special files and names a listing line cannot carry (newline,
    backslash), so nothing in the folder escapes the digest.
    """
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise DataError(f"{rel!r} in {folder} is a link or special file; an export holds plain files only")
            if any(c in rel for c in "\n\r\\"):
                raise DataError(f"{rel!r} in {folder} has a name an export never writes (newline or backslash)")
            if stat.S_ISREG(mode) and rel != DIGEST_FILE:
                files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _listing(files: dict[str, str]) -> str:
    """The canonical listing the digest is taken over: ``<sha256>  <path>`` lines sorted by path."""
    return "".join(f"{files[rel]}  {rel}\n" for rel in sorted(files))


def _digest_of(files: dict[str, str]) -> str:
    return hashlib.sha256(_listing(files).encode("utf-8")).hexdigest()


def _write_digest(folder: Path) -> str:
    """Hash every file of ``folder`` and write ``DIGEST``; returns the digest."""
    files = _scan(folder)
    digest = _digest_of(files)
    (folder / DIGEST_FILE).write_bytes(f"{DIGEST_FORMAT} {digest}\n{_listing(files)}".encode())
    return digest


def _read_digest(folder: Path) -> tuple[str, dict[str, str]]:
    """(digest, {path: sha256}) as recorded in ``folder/DIGEST``; DataError if absent or malformed."""
    path = folder / DIGEST_FILE
    if not path.is_file() or path.is_symlink():
        raise DataError(f"no {DIGEST_FILE} file in {folder}: the export's content digest was removed, or the folder "
                        "was written before exports carried one; re-export the view with export_view")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        lines = []
    head = lines[0].split(" ") if lines else []
    if len(head) != 2 or head[0] != DIGEST_FORMAT or not _HEX.fullmatch(head[1]):
        raise DataError(f"{path} is malformed: expected a first line '{DIGEST_FORMAT} <64 hex digits>'")
    files: dict[str, str] = {}
    for line in lines[1:]:
        sha, sep, rel = line.partition("  ")
        if not sep or not _HEX.fullmatch(sha) or not rel or rel in files:
            raise DataError(f"{path} is malformed: bad listing line {line[:120]!r}")
        files[rel] = sha
    return head[1], files


def _normalise_digest(digest: str) -> str:
    d = digest.strip().lower().removeprefix("sha256:")
    if not _HEX.fullmatch(d):
        raise ConfigError(f"expected_digest must be 64 hex digits (optionally 'sha256:'-prefixed), got {digest!r}")
    return d


def _differences(recorded: dict[str, str], actual: dict[str, str]) -> list[str]:
    out = [f"{rel!r} is missing" for rel in sorted(set(recorded) - set(actual))]
    out += [f"{rel!r} was added" for rel in sorted(set(actual) - set(recorded))]
    out += [f"{rel!r} was modified (sha256 does not match)" for rel in sorted(set(recorded) & set(actual))
            if recorded[rel] != actual[rel]]
    return out


def view_digest(folder: str | Path) -> str:
    """The content digest of an exported folder, recomputed from the files present.

    Equal to the digest :func:`export_view` wrote to ``DIGEST`` as long as nothing was changed.
    Keep it outside the folder (results.json records it) and pass it to :func:`import_view` as
    ``expected_digest``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; export the view with mlaudit.data.export.export_view")
    return _digest_of(_scan(folder))


def verify_digest(folder: str | Path, expected_digest: str | None = None) -> str:
    """Check ``folder`` against its ``DIGEST`` (and ``expected_digest`` if given); return the digest.

    Raises :class:`DataError` naming every file that is missing, added or modified relative to the
    ``DIGEST`` listing, when ``DIGEST`` is inconsistent with itself, or when the digest differs from
    ``expected_digest``. ``DIGEST`` lives in the folder, so whoever can edit the folder can also
    rewrite it: only an ``expected_digest`` kept elsewhere detects such an edit.
    """
    return _verify(Path(folder), expected_digest)[0]


def _verify(folder: Path, expected_digest: str | None) -> tuple[str, dict[str, str]]:
    """:func:`verify_digest`, also returning the verified {path: sha256} of the folder's files."""
    expected = None if expected_digest is None else _normalise_digest(expected_digest)
    recorded_digest, recorded = _read_digest(folder)
    actual = _scan(folder)
    diff = _differences(recorded, actual)
    if diff:
        raise DataError(f"export {folder} differs from its {DIGEST_FILE}: " + "; ".join(diff)
                        + ". The folder was edited after export; re-export it or restore the original files")
    if _digest_of(recorded) != recorded_digest:
        raise DataError(f"{folder / DIGEST_FILE} is inconsistent: its header digest is not the sha256 of its listing")
    if expected is not None and recorded_digest != expected:
        raise DataError(f"export {folder} has content digest {recorded_digest} but {expected} was expected: this is "
                        f"not the export whose digest you kept (its {DIGEST_FILE} file may have been rewritten)")
    return recorded_digest, actual


def _install(tmp: Path, folder: Path) -> None:
    """Move the finished ``tmp`` folder to ``folder``, replacing an existing one last."""
    if not folder.exists():
        tmp.rename(folder)
        return
    old = folder.with_name(f"{folder.name}.old-{secrets.token_hex(6)}")
    folder.rename(old)
    try:
        tmp.rename(folder)
    except BaseException:
        old.rename(folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_view(view: DataView, folder: str | Path, *, base_id: str, overwrite: bool = False,
                exact: bool = True) -> Path:
    """Write ``view`` to ``folder`` (layout in the module docstring) and return the folder.

    ``base_id`` names the clean split the view refers to (e.g. ``DataBundle.id``); import checks
    it. ``exact`` also writes float32 ``deltas.npy`` / ``inserted.npy`` so import is lossless.
    Refuses a non-empty existing ``folder`` unless ``overwrite=True``. Atomic: on any failure
    nothing is left at ``folder`` (an existing one is untouched). Writes the content digest to
    ``folder/DIGEST``; :func:`view_digest` returns it, to be kept outside the folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"export folder {folder} exists and is a file; choose a folder path")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise ConfigError(f"export folder {folder} is not empty; pass overwrite=True or choose another folder")
    try:
        meta = json.loads(json.dumps(view.meta))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"view.meta must be JSON-serialisable to export it: {exc}") from None
    view = view.to("cpu")
    base, shape = view.base, view.shape
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{secrets.token_hex(6)}")
    tmp.mkdir()
    try:
        files: dict[str, str] = {}
        perturbed = base.x[view.indices] + view.delta
        images: list[str] = []
        for k, i in enumerate(view.indices.tolist()):
            suffix, data = _encode_image(perturbed[k])
            images.append(f"images/{i:08d}{suffix}")
            files[images[-1]] = _write_file(tmp, images[-1], data)
        inserted: list[list[Any]] = []
        for k, y in enumerate(view.inserted_y.tolist()):
            suffix, data = _encode_image(view.inserted_x[k])
            rel = f"inserted/{k:08d}{suffix}"
            files[rel] = _write_file(tmp, rel, data)
            inserted.append([rel, y])
        exact_files: dict[str, str | None] = {"deltas": None, "inserted": None}
        if exact:
            for key, arr in (("deltas", view.delta), ("inserted", view.inserted_x)):
                exact_files[key] = f"{key}.npy"
                files[f"{key}.npy"] = _write_file(tmp, f"{key}.npy", _npy_bytes(arr.numpy()))
        manifest = {
            "format": FORMAT, "base_id": base_id, "base_fingerprint": base.fingerprint(),
            "num_base": len(base), "shape": list(shape), "num_classes": len(base.classes), "eps": view.eps,
            "indices": view.indices.tolist(), "images": images,
            "relabel": torch.stack([view.relabel_indices, view.relabel_to], 1).tolist(),
            "inserted": inserted, "keep": None if view.keep is None else view.kept_indices().tolist(),
            "meta": meta, "exact": exact_files, "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _write_digest(tmp)
        _install(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _safe_path(folder: Path, rel: str) -> Path:
    """``folder / rel`` for a plain relative POSIX path that stays inside ``folder``."""
    p = PurePosixPath(rel)
    bad = (not rel or "\\" in rel or p.is_absolute() or PureWindowsPath(rel).drive
           or any(part in ("..", ".", "") for part in rel.split("/")))
    if bad or not (folder / p).resolve().is_relative_to(folder.resolve()):
        raise DataError(f"manifest names the unsafe path {rel!r}; only plain relative paths inside the folder are allowed")
    return folder / p


def _load_manifest(folder: Path) -> _Manifest:
    path = folder / "manifest.json"
    if not path.is_file():
        raise DataError(f"no manifest.json in {folder}; export the view with mlaudit.data.export.export_view")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"{path} has format {got!r}; expected {FORMAT!r}")
    try:
        return _Manifest.model_validate(raw)
    except ValidationError as exc:
        raise DataError(f"{path} is malformed: {exc}") from None


def _load_array(path: Path, shape: tuple[int, ...], rel: str) -> Tensor:
    arr = np.load(path, allow_pickle=False)
    if arr.dtype != np.float32 or tuple(arr.shape) != shape:
        raise DataError(f"{rel} holds {arr.dtype} {tuple(arr.shape)}; expected float32 {shape}")
    return torch.from_numpy(arr.copy())


def _load_raw(path: Path, shape: tuple[int, ...], rel: str) -> Tensor:
    """An image file as stored: uint8 [C, H, W] for a PNG, float32 [*shape] for an npy."""
    if rel.endswith(".npy"):
        return _load_array(path, shape, rel)
    if not rel.endswith(".png") or not _is_png_shape(shape):
        raise DataError(f"{rel}: expected a .npy file for example shape {shape} (.png only for C in 1, 3)")
    mode = "L" if shape[0] == 1 else "RGB"
    with Image.open(path) as im:
        if im.format != "PNG" or im.mode != mode or im.size != (shape[2], shape[1]):
            raise DataError(f"{rel} is a {im.format} {im.mode} {im.size} image; expected PNG {mode} {shape[2]}x{shape[1]}")
        arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if shape[0] == 1 else t.permute(2, 0, 1).contiguous()


def _load_image(path: Path, shape: tuple[int, ...], rel: str) -> Tensor:
    """An image file -> float32 [*shape] in [0, 1] (PNG / 255, or an exact npy)."""
    raw = _load_raw(path, shape, rel)
    return raw.to(torch.float32) / 255 if raw.dtype == torch.uint8 else raw


def _check_images(folder: Path, rels: list[str], expected: Tensor, shape: tuple[int, ...], what: str) -> None:
    """Each image file must hold exactly ``expected[k]`` as export encodes it (PNG: quantised)."""
    for k, rel in enumerate(rels):
        raw = _load_raw(folder / rel, shape, rel)
        want = _quantise(expected[k]) if raw.dtype == torch.uint8 else expected[k]
        if not torch.equal(raw, want):
            raise DataError(f"{rel} does not hold the image implied by {what}: the file was replaced or the "
                            "exact arrays were edited; re-export the view")


def import_view(folder: str | Path, base: TensorDataset, *, base_id: str,
                expected_digest: str | None = None) -> DataView:
    """Read a folder written by :func:`export_view` and rebuild the view over ``base``.

    Verifies the content digest (every file, ``manifest.json`` included, against ``DIGEST``; any
    change, added or removed file is named), the format, that ``base_id`` and the base's shape,
    size, classes and fingerprint match the manifest, that every listed file exists with the
    recorded sha256 and no other file is present, that every path is a plain relative path inside
    ``folder``, and, with exact arrays, that every image file decodes to exactly
    ``base.x[i] + delta`` (or the inserted image) quantised as export quantises. Raises
    :class:`DataError` naming the offending field or file. Tensors are placed on ``base.device``.

    ``expected_digest``: the digest kept when the view was exported (:func:`view_digest`, or
    ``metrics.export_digests`` in results.json). Pass it: ``DIGEST`` sits inside the folder, so
    whoever edits the folder can rewrite it too, and only a digest kept elsewhere catches that.
    """
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        raise DataError(f"no manifest.json in {folder}; export the view with mlaudit.data.export.export_view")
    _, present = _verify(folder, expected_digest)
    m = _load_manifest(folder)
    if m.base_id != base_id:
        raise DataError(
            f"view in {folder} was exported for base {m.base_id!r} but base_id {base_id!r} was given; "
            "load the dataset the view was made from (same name, split and limits) or re-export the view"
        )
    shape = tuple(base.shape)
    if (tuple(m.shape), m.num_base, m.num_classes) != (shape, len(base), len(base.classes)):
        raise DataError(
            f"view expects {m.num_base} examples of shape {tuple(m.shape)} with {m.num_classes} classes; the base "
            f"has {len(base)} of shape {shape} with {len(base.classes)} classes"
        )
    if m.base_fingerprint != base.fingerprint():
        raise DataError(f"base data fingerprint {base.fingerprint()} differs from the exported {m.base_fingerprint}")
    for rel, digest in m.files.items():
        path = _safe_path(folder, rel)
        if not path.is_file():
            raise DataError(f"file {rel!r} listed in the manifest is missing from {folder}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise DataError(f"sha256 of {rel!r} does not match the manifest: the file was modified or corrupted")
    referenced = [*m.images, *(f for f, _ in m.inserted), *(f for f in m.exact.values() if f)]
    unlisted = sorted(set(referenced) - set(m.files))
    if unlisted or len(m.images) != len(m.indices):
        raise DataError(f"manifest is inconsistent: unhashed files {unlisted} or images/indices length mismatch")
    extra = sorted(set(present) - set(m.files) - {"manifest.json"})
    if extra:
        raise DataError(f"{folder} holds files the manifest does not list: {extra}")
    empty = torch.zeros((0, *shape), dtype=torch.float32)
    p, ni = len(m.indices), len(m.inserted)
    idx = torch.tensor(m.indices, dtype=torch.int64).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(base)):
        raise DataError(f"manifest indices must lie in [0, {len(base) - 1}]")
    if m.exact.get("deltas"):
        delta, tol = _load_array(folder / m.exact["deltas"], (p, *shape), m.exact["deltas"]), TOL
        clean = base.x[idx.to(base.device)].detach().cpu().float()
        _check_images(folder, m.images, clean + delta, shape, f"base + {m.exact['deltas']}")
    else:
        imgs = [_load_image(folder / rel, shape, rel) for rel in m.images]
        delta = (torch.stack(imgs) if imgs else empty) - base.x[idx.to(base.device)].detach().cpu().float()
        tol = PNG_TOL + TOL if _is_png_shape(shape) else TOL
    if m.eps is not None and delta.numel():
        worst = float(delta.abs().max())
        if worst > m.eps + tol:
            raise DataError(f"imported delta reaches {worst:.6g}, beyond eps {m.eps:.6g} + tolerance {tol:.3g}")
        delta = delta.clamp(-m.eps, m.eps)  # remove PNG quantisation overshoot; stays in the [0, 1] box
    if m.exact.get("inserted"):
        ins_x = _load_array(folder / m.exact["inserted"], (ni, *shape), m.exact["inserted"])
        _check_images(folder, [rel for rel, _ in m.inserted], ins_x, shape, m.exact["inserted"])
    else:
        ins = [_load_image(folder / rel, shape, rel) for rel, _ in m.inserted]
        ins_x = torch.stack(ins) if ins else empty
    keep = None
    if m.keep is not None:
        kept = torch.tensor(m.keep, dtype=torch.int64).reshape(-1)
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= len(base) + ni):
            raise DataError(f"manifest keep indices must lie in [0, {len(base) + ni - 1}]")
        keep = torch.zeros(len(base) + ni, dtype=torch.bool)
        keep[kept] = True
    dev = base.device
    rel = torch.tensor(m.relabel, dtype=torch.int64).reshape(-1, 2)
    return DataView(
        base, idx.to(dev), delta.to(dev, base.x.dtype), rel[:, 0].to(dev), rel[:, 1].to(dev),
        ins_x.to(dev, base.x.dtype),
        torch.tensor([y for _, y in m.inserted], dtype=torch.int64).reshape(-1).to(dev),
        None if keep is None else keep.to(dev), m.eps, dict(m.meta),
    )
