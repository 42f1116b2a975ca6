"""Images in class folders, from a directory or a ``.zip`` file (read in place, never extracted).

Two layouts are recognised under ``spec.root``:

* split: ``train/<class>/<image>`` and ``test/<class>/<image>`` (both splits, same class folders);
* flat: ``<class>/<image>``, split into train and test per class by ``spec.test_fraction`` with a
  stratified split seeded by ``spec.seed``.

A single wrapping folder (``root/mydata/<class>/...``, common in zips) is looked through. Class
names are the sorted folder names; images may sit at any depth inside their class folder. Hidden
files and folders (leading ``.``, ``__MACOSX``) and files without an image extension
(:data:`IMAGE_EXTENSIONS`) are ignored. Zip members with absolute paths or ``..`` are refused, and so
are, before anything is decompressed, an image member that unpacks to more than
:data:`MAX_MEMBER_BYTES` or more than :data:`MAX_RATIO` times its compressed size (when over 1 MiB),
and images that unpack to more than :data:`MAX_TOTAL_BYTES` together (zip bombs).

Options: ``size`` -- resize every image to ``[H, W]`` (or ``S`` for ``S x S``, bilinear); without it
all images must have the same size. ``mode`` -- ``RGB`` (3 channels, default) or ``L`` (grey, 1).
Output: float32 [N, C, H, W] in [0, 1], int64 labels.

Errors (:class:`~mlaudit.errors.DataError`) name the offending file: no class folders, an empty
class folder, an unreadable image, a size mismatch (with the first image it differs from).
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, PositiveInt, field_validator

from ...errors import DataError
from ..base import DataBundle, TensorDataset
from ..registry import DatasetSpec, register_source
from ._util import parse_options, resolve_root, stratified_split, uint8_to_float

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_MEMBER_BYTES = 64 * 2**20  # one image file, unpacked
MAX_TOTAL_BYTES = 8 * 2**30  # all image files of a zip that are read, unpacked
MAX_RATIO = 100  # unpacked / compressed size of a zip member over 1 MiB
_MiB = 2**20
Parts = tuple[str, ...]


class ImageFolderOptions(BaseModel):
    """``size``: ``[H, W]`` or ``S`` to resize to (default: keep, all images must agree);
    ``mode``: ``RGB`` or ``L``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: tuple[PositiveInt, PositiveInt] | None = None
    mode: Literal["RGB", "L"] = "RGB"

    @field_validator("size", mode="before")
    @classmethod
    def _square(cls, v: object) -> object:
        return (v, v) if isinstance(v, int) and not isinstance(v, bool) else v


def _hidden(parts: Parts) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _is_image(parts: Parts) -> bool:
    return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


class _Store:
    """Files (as path parts) and folders of a directory or zip, and a way to read one file."""

    def __init__(self, root: Path, zf: zipfile.ZipFile | None) -> None:
        self.root, self.zf = root, zf
        self.files: list[Parts] = []
        self._members: dict[Parts, zipfile.ZipInfo] = {}  # zip: parts -> member as stored
        dirs: set[Parts] = set()
        if zf is None:
            for dirpath, dirnames, filenames in os.walk(root):
                rel = Path(dirpath).relative_to(root).parts
                dirnames[:] = sorted(d for d in dirnames if not _hidden((d,)))
                dirs.update((*rel, d) for d in dirnames)
                self.files.extend((*rel, f) for f in sorted(filenames) if not _hidden((f,)))
        else:
            for info in zf.infolist():
                name = info.filename.replace("\\", "/")
                p = PurePosixPath(name)
                if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
                    raise DataError(f"zip {root} holds an unsafe member path {info.filename!r}; refusing to read it")
                if not p.parts or _hidden(p.parts):
                    continue
                if info.is_dir():
                    dirs.add(p.parts)
                else:
                    self.files.append(p.parts)
                    self._members[p.parts] = info
            self.files.sort()
        for f in self.files:
            dirs.update(f[:i] for i in range(1, len(f)))
        self.dirs = dirs

    def name(self, parts: Parts) -> str:
        return f"{self.root}:{'/'.join(parts)}" if self.zf else str(self.root.joinpath(*parts))

    def check_sizes(self, files: list[Parts]) -> None:
        """Refuse, before decompressing anything, zip members that unpack to too much (see the module
        docstring): each one's size and compression ratio, then their total. Folders: each file's size."""
        total = 0
        for f in files:
            info = self._members.get(f) if self.zf is not None else None
            size = info.file_size if info is not None else self._disk_size(f)
            if size > MAX_MEMBER_BYTES:
                what = "unpacks to" if info is not None else "is"
                raise DataError(f"image {self.name(f)} {what} {size:,} bytes ({size / _MiB:,.1f} MiB); an image file may "
                                f"be at most {MAX_MEMBER_BYTES // _MiB} MiB")
            if info is not None and size > _MiB and size > MAX_RATIO * max(info.compress_size, 1):
                raise DataError(f"zip member {self.name(f)} unpacks to {size:,} bytes from {info.compress_size:,} "
                                f"(ratio {size / max(info.compress_size, 1):,.0f}); at most {MAX_RATIO}x is allowed for "
                                "a member over 1 MiB (a zip bomb?)")
            total += size
        if self.zf is not None and total > MAX_TOTAL_BYTES:
            raise DataError(f"the {len(files):,} images in zip {self.root} unpack to {total:,} bytes "
                            f"({total / 2**30:,.1f} GiB); at most {MAX_TOTAL_BYTES:,} bytes ({MAX_TOTAL_BYTES / 2**30:g} GiB) "
                            "are read from a zip")

    def _disk_size(self, parts: Parts) -> int:
        try:
            return self.root.joinpath(*parts).stat().st_size
        except OSError as exc:
            raise DataError(f"cannot read {self.name(parts)}: {exc}") from exc

    def read(self, parts: Parts) -> bytes:
        try:
            if self.zf is not None:
                self.check_sizes([parts])
                return self.zf.read(self._members[parts])
            return self.root.joinpath(*parts).read_bytes()
        except (OSError, zipfile.BadZipFile, KeyError, EOFError) as exc:
            raise DataError(f"cannot read {self.name(parts)}: {exc}") from exc

    def subdirs(self, prefix: Parts) -> list[str]:
        return sorted({d[len(prefix)] for d in self.dirs if len(d) > len(prefix) and d[:len(prefix)] == prefix})

    def images(self, prefix: Parts) -> list[Parts]:
        return [f for f in self.files if f[:len(prefix)] == prefix and len(f) > len(prefix) and _is_image(f)]


@contextmanager
def _open_store(root: Path) -> Iterator[_Store]:
    if root.is_dir():
        yield _Store(root, None)
    elif root.is_file() and root.suffix.lower() == ".zip":
        try:
            zf = zipfile.ZipFile(root)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{root} is not a readable zip file: {exc}") from exc
        with zf:
            yield _Store(root, zf)
    else:
        raise DataError(f"image-folder root {root} must be an existing folder or .zip file "
                        "(layout: <root>/<class>/<image> or <root>/{train,test}/<class>/<image>)")


def _prefix(store: _Store) -> Parts:
    """Look through single wrapping folders that contain only folders (not train/test)."""
    prefix: Parts = ()
    while True:
        subs = store.subdirs(prefix)
        loose = [f for f in store.images(prefix) if len(f) == len(prefix) + 1]
        if len(subs) != 1 or loose or subs[0] in ("train", "test"):
            return prefix
        inner = (*prefix, subs[0])
        if any(len(f) == len(inner) + 1 for f in store.images(inner)) or not store.subdirs(inner):
            return prefix
        prefix = inner


def _collect(store: _Store, prefix: Parts) -> dict[str, list[Parts]]:
    """Class name -> image files under ``prefix``, checking every class folder holds images."""
    loose = [f for f in store.images(prefix) if len(f) == len(prefix) + 1]
    if loose:
        raise DataError(f"image {store.name(loose[0])} is not inside a class folder; "
                        f"expected {store.name(prefix) if prefix else store.root}/<class>/<image>")
    classes = store.subdirs(prefix)
    if not classes:
        raise DataError(f"no class folders in {store.name(prefix) if prefix else store.root}; expected "
                        "<root>/<class>/<image> or <root>/train/<class>/<image> + <root>/test/<class>/<image>")
    out = {}
    for c in classes:
        files = store.images((*prefix, c))
        if not files:
            raise DataError(f"class folder {store.name((*prefix, c))} holds no images "
                            f"(supported extensions: {', '.join(IMAGE_EXTENSIONS)})")
        out[c] = files
    return out


def _decode(store: _Store, files: list[Parts], opts: ImageFolderOptions) -> np.ndarray:
    """Decode ``files`` -> uint8 [N, C, H, W]."""
    arrays, first = [], None
    for f in files:
        try:
            with Image.open(io.BytesIO(store.read(f))) as img:
                img = img.convert(opts.mode)
                if opts.size is not None:
                    img = img.resize((opts.size[1], opts.size[0]), Image.BILINEAR)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot decode image {store.name(f)}: {exc}") from exc
        if first is None:
            first = (f, img.size)
        elif img.size != first[1]:
            raise DataError(
                f"image {store.name(f)} is {img.size[0]}x{img.size[1]} (WxH) but {store.name(first[0])} is "
                f"{first[1][0]}x{first[1][1]}; set options.size: [H, W] to resize all images")
        a = np.asarray(img, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(arrays)


def _datasets(store: _Store, splits: list[list[tuple[Parts, int]]], classes: tuple[str, ...],
              opts: ImageFolderOptions) -> tuple[TensorDataset, TensorDataset]:
    """Decode both splits together (so sizes are checked across them) -> (train, test)."""
    items = splits[0] + splits[1]
    store.check_sizes([f for f, _ in items])
    x = uint8_to_float(_decode(store, [f for f, _ in items], opts))
    y = torch.tensor([c for _, c in items], dtype=torch.int64)
    n = len(splits[0])
    return TensorDataset(x[:n], y[:n], classes), TensorDataset(x[n:], y[n:], classes)


@register_source("image-folder")
def load(spec: DatasetSpec) -> DataBundle:
    """Load class-folder images from a directory or zip; see the module docstring."""
    opts = parse_options(ImageFolderOptions, spec.options, source="image-folder")
    root = resolve_root(spec.root, "image-folder")
    with _open_store(root) as store:
        prefix = _prefix(store)
        top = store.subdirs(prefix)
        if "train" in top or "test" in top:
            if not ("train" in top and "test" in top):
                have, lack = ("train", "test") if "train" in top else ("test", "train")
                raise DataError(f"found {store.name((*prefix, have))} but no {store.name((*prefix, lack))}; "
                                "the split layout needs both (or use one flat <class>/<image> folder)")
            tr, te = _collect(store, (*prefix, "train")), _collect(store, (*prefix, "test"))
            if set(tr) != set(te):
                raise DataError(f"train and test class folders differ in {store.name(prefix) or root}: only in "
                                f"train {sorted(set(tr) - set(te))}, only in test {sorted(set(te) - set(tr))}")
            classes = tuple(sorted(tr))
            splits = [[(f, i) for i, c in enumerate(classes) for f in d[c]] for d in (tr, te)]
            layout = "train-test"
        else:
            per_class = _collect(store, prefix)
            classes = tuple(sorted(per_class))
            items = [(f, i) for i, c in enumerate(classes) for f in per_class[c]]
            train_idx, test_idx = stratified_split(np.array([c for _, c in items]), spec.test_fraction, spec.seed)
            if len(test_idx) == 0:
                raise DataError(f"{root}: too few images to split off a test set (every class has one image); "
                                "add images or use the train/ + test/ layout")
            splits = [[items[i] for i in train_idx], [items[i] for i in test_idx]]
            layout = "flat"
        train, test = _datasets(store, splits, classes, opts)
    meta: dict[str, object] = {"root": str(root), "format": "zip" if root.suffix.lower() == ".zip" else "folder",
                               "layout": layout, "mode": opts.mode, "files": len(train) + len(test)}
    if opts.size is not None:
        meta["size"] = list(opts.size)
    if layout == "flat":
        meta.update(test_fraction=spec.test_fraction, seed=spec.seed)
    return DataBundle("image-folder", train, test, meta)
