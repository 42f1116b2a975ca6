"""Export a :class:`~mlaudit.data.view.DataView` to a folder and import it back, hash-verified.

Layout of an exported folder (format ``mlaudit-view/1``)::

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

Threat model: an exported folder may come from elsewhere. Every listed file's sha256 is
verified, names in the manifest must be plain relative paths inside the folder, arrays are
loaded with ``allow_pickle=False``, and the view is re-validated against the base dataset.
Export is atomic: files go to ``<folder>.tmp-<random>`` which is renamed at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import shutil
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


def _encode_image(img: Tensor) -> tuple[str, bytes]:
    """One image [*shape] in [0, 1] -> (suffix, file bytes): 8-bit PNG for C in {1, 3}, else npy."""
    if not _is_png_shape(tuple(img.shape)):
        return ".npy", _npy_bytes(img.numpy())
    u8 = (img * 255).round().clamp(0, 255).to(torch.uint8)
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
    nothing is left at ``folder`` (an existing one is untouched).
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


def _load_image(path: Path, shape: tuple[int, ...], rel: str) -> Tensor:
    """An image file -> float32 [*shape] in [0, 1] (PNG / 255, or an exact npy)."""
    if rel.endswith(".npy"):
        return _load_array(path, shape, rel)
    if not rel.endswith(".png") or not _is_png_shape(shape):
        raise DataError(f"{rel}: expected a .npy file for example shape {shape} (.png only for C in 1, 3)")
    mode = "L" if shape[0] == 1 else "RGB"
    with Image.open(path) as im:
        if im.format != "PNG" or im.mode != mode or im.size != (shape[2], shape[1]):
            raise DataError(f"{rel} is a {im.format} {im.mode} {im.size} image; expected PNG {mode} {shape[2]}x{shape[1]}")
        arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).to(torch.float32) / 255
    return t.unsqueeze(0) if shape[0] == 1 else t.permute(2, 0, 1).contiguous()


def import_view(folder: str | Path, base: TensorDataset, *, base_id: str) -> DataView:
    """Read a folder written by :func:`export_view` and rebuild the view over ``base``.

    Verifies the format, that ``base_id`` and the base's shape, size, classes and fingerprint
    match the manifest, that every listed file exists with the recorded sha256, and that every
    path is a plain relative path inside ``folder``. Raises :class:`DataError` naming the
    offending field or file. Tensors are placed on ``base.device``.
    """
    folder = Path(folder)
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
    empty = torch.zeros((0, *shape), dtype=torch.float32)
    p, ni = len(m.indices), len(m.inserted)
    idx = torch.tensor(m.indices, dtype=torch.int64).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(base)):
        raise DataError(f"manifest indices must lie in [0, {len(base) - 1}]")
    if m.exact.get("deltas"):
        delta, tol = _load_array(folder / m.exact["deltas"], (p, *shape), m.exact["deltas"]), TOL
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
