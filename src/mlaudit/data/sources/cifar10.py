"""CIFAR-10 (Krizhevsky 2009): 50,000 train / 10,000 test RGB images of 32x32, 10 classes.

Two on-disk formats are read, both giving float32 images [N, 3, 32, 32] in [0, 1] and int64 labels:

* ``pickle`` -- the official ``cifar-10-batches-py`` layout (``data_batch_1..5``, ``test_batch``,
  ``batches.meta``; python pickles holding ``b"data"`` uint8 [N, 3072] and ``b"labels"``).
  ``spec.root`` may name the folder holding ``cifar-10-batches-py`` or that folder itself
  (default ``~/.mlaudit/data/cifar10``). With ``download: true`` missing files are fetched from
  :data:`CIFAR10_URL`, checked against :data:`CIFAR10_MD5` and extracted.
* ``jpeg-npz`` -- a pack of JPEG-compressed images (``{train,test}_jpeg`` uint8 concatenated JPEG
  files, ``{train,test}_offsets`` int64 [n+1], ``{train,test}_labels`` uint8, ``classes``). Chosen by
  ``options: {format: jpeg-npz, path: ...}`` or when ``spec.root`` is a ``.npz`` file. Decoding
  (Pillow, about 15 s for 60k images) is cached under the default root as
  ``jpeg-decoded-<key>.npz``, keyed by the pack's size and the sha256 of its first and last MiB.
  JPEG compression changes the pixels: report numbers from it as "CIFAR-10 (JPEG)".

Security: the batch files are pickles, so they are read with :class:`RestrictedUnpickler`, which
resolves only the globals needed for plain containers and numpy arrays and refuses everything
else; a file asking for any other global raises :class:`~mlaudit.errors.DataError`.
"""

from __future__ import annotations

import builtins
import codecs
import hashlib
import importlib
import io
import logging
import os
import pickle
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from ...errors import ConfigError, DataError
from ..base import DataBundle, TensorDataset
from ..registry import DatasetSpec, register_source
from ._util import default_root, download_file, parse_options, resolve_root, safe_extract_tar, uint8_to_float

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
NPZ_KEYS = ("train_jpeg", "train_offsets", "train_labels", "test_jpeg", "test_offsets", "test_labels", "classes")


class Cifar10Options(BaseModel):
    """``format``: ``auto`` (a ``.npz`` root means ``jpeg-npz``, else ``pickle``), ``pickle`` or
    ``jpeg-npz``; ``path``: the ``.npz`` pack (``jpeg-npz`` only; defaults to ``spec.root``);
    ``cache``: keep decoded JPEG packs under the default root."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["auto", "pickle", "jpeg-npz"] = "auto"
    path: str | None = None
    cache: bool = True


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    allowed: dict[tuple[str, str], Any] = {}
    for n in ("dict", "list", "tuple", "bytes", "bytearray", "str", "int", "float", "bool"):
        allowed[("builtins", n)] = getattr(builtins, n)
        allowed[("__builtin__", n)] = getattr(builtins, n)  # python 2 pickles
    allowed[("_codecs", "encode")] = codecs.encode  # bytes pickled by python 3 at protocol <= 2
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = numeric._frombuffer  # numpy arrays pickled at protocol 5
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only builtin containers/scalars and numpy array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise DataError(
                f"pickle asks for global {module}.{name}, which is not allowed (only plain containers and numpy "
                "arrays are); refusing to load it"
            )
        return obj


def safe_unpickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``encoding="bytes"`` for python 2 files)."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure while parsing untrusted bytes means a corrupt file
        raise DataError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); delete it and download or convert again"
        ) from exc


def _field(d: Any, key: str, path: Path) -> Any:
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DataError(f"{path}: the pickled dict has no {key!r} entry (keys: {sorted(map(str, d))})")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file -> (uint8 images [N, 3, 32, 32], int64 labels [N]); checks shapes and labels."""
    d = safe_unpickle(path)
    data, labels = _field(d, "data", path), np.asarray(_field(d, "labels", path))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be uint8 [N, 3072], got {desc}")
    if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: 'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_meta(path: Path) -> tuple[str, ...]:
    """Class names from ``batches.meta`` (``label_names``)."""
    names = _field(safe_unpickle(path), "label_names", path)
    if not isinstance(names, list) or len(names) != 10:
        raise DataError(f"{path}: 'label_names' must be a list of 10 names, got {names!r:.200}")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def batches_folder(root: Path) -> Path:
    """The ``cifar-10-batches-py`` folder for ``root`` (which may be that folder or its parent)."""
    if root.name == FOLDER or (root / META_FILE).is_file():
        return root
    return root / FOLDER


def download_cifar10(root: Path, *, url: str | None = None, md5: str | None = None) -> Path:
    """Fetch and extract the official archive into ``root``; returns ``root / "cifar-10-batches-py"``.

    ``url``/``md5`` default to :data:`CIFAR10_URL`/:data:`CIFAR10_MD5` (looked up at call time).
    The archive is removed after a successful extraction.
    """
    url, md5 = url or CIFAR10_URL, md5 or CIFAR10_MD5
    archive = download_file(url, root / "cifar-10-python.tar.gz", md5=md5)
    safe_extract_tar(archive, root)
    archive.unlink()
    return root / FOLDER


def _missing_message(folder: Path, missing: list[Path]) -> str:
    parent = folder.parent
    return (
        "CIFAR-10 files are missing: " + ", ".join(str(p) for p in missing) + ". "
        f"Expected the official python layout in {folder}/ ({', '.join(TRAIN_FILES)}, {TEST_FILE}, {META_FILE}). "
        f"Fix: set `download: true` in the dataset spec (fetches {CIFAR10_URL}, MD5 {CIFAR10_MD5}, into {parent}); "
        f"or download that archive yourself and extract it into {parent}; or convert a JPEG pack with "
        f"`python shared/data/make_cifar10.py {parent}`; or read the pack directly with "
        "`options: {format: jpeg-npz, path: /path/to/cifar10-jpeg.npz}`."
    )


def _load_pickles(root: Path, download: bool) -> DataBundle:
    folder = batches_folder(root)
    names = (*TRAIN_FILES, TEST_FILE, META_FILE)
    missing = [folder / n for n in names if not (folder / n).is_file()]
    if missing and download:
        log.info("downloading CIFAR-10 into %s", folder.parent)
        download_cifar10(folder.parent)
        missing = [folder / n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(_missing_message(folder, missing))
    classes = read_meta(folder / META_FILE)
    parts = [read_batch(folder / n) for n in TRAIN_FILES]
    x_train, y_train = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x_test, y_test = read_batch(folder / TEST_FILE)
    train = TensorDataset(uint8_to_float(x_train), torch.from_numpy(y_train), classes)
    test = TensorDataset(uint8_to_float(x_test), torch.from_numpy(y_test), classes)
    return DataBundle("cifar10", train, test, {"root": str(folder), "format": "pickle", "files": list(names)})


def pack_key(path: Path) -> str:
    """Cache key of a pack: sha256 over its size and first and last MiB (hex, 16 chars)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, *, source: Path, split: str) -> np.ndarray:
    """Decode concatenated JPEG files -> uint8 [n, 3, 32, 32]; image i is ``jpeg[offsets[i]:offsets[i+1]]``."""
    n = len(offsets) - 1
    if n < 0 or offsets[0] != 0 or offsets[-1] != len(jpeg) or np.any(np.diff(offsets) <= 0):
        raise DataError(f"{source}: {split}_offsets must rise strictly from 0 to {len(jpeg)} (the jpeg byte count)")
    out = np.empty((n, 3, 32, 32), dtype=np.uint8)
    for i in range(n):
        try:
            with Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())) as img:
                rgb = img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"{source}: {split} image {i} cannot be decoded ({exc})") from exc
        if rgb.size != (32, 32):
            raise DataError(f"{source}: {split} image {i} is {rgb.size[0]}x{rgb.size[1]}, expected 32x32")
        out[i] = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    return out


def _cached_decode(pack: Any, path: Path, counts: dict[str, int], use_cache: bool) -> dict[str, np.ndarray]:
    cache = default_root("cifar10") / f"jpeg-decoded-{pack_key(path)}.npz"
    if use_cache and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as c:
                got = {s: c[s] for s in counts}
            if all(got[s].shape == (counts[s], 3, 32, 32) and got[s].dtype == np.uint8 for s in counts):
                return got
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            log.info("ignoring unreadable cache %s: %s", cache, exc)
        warnings.warn(f"decoded-image cache {cache} does not match {path}; decoding again", stacklevel=3)
    decoded = {s: decode_jpegs(pack[f"{s}_jpeg"], pack[f"{s}_offsets"], source=path, split=s) for s in counts}
    if use_cache:
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp.npz")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, **decoded)
            os.replace(tmp, cache)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"could not write the decoded-image cache {cache}: {exc}", stacklevel=3)
    return decoded


def load_jpeg_npz(path: Path, *, cache: bool = True) -> DataBundle:
    """Load a CIFAR-10 JPEG pack (see the module docstring) as float32 [N, 3, 32, 32] in [0, 1]."""
    if not path.is_file():
        raise DataError(f"CIFAR-10 JPEG pack {path} does not exist; pass its location as options.path or spec.root")
    try:
        with np.load(path, allow_pickle=False) as z:
            absent = [k for k in NPZ_KEYS if k not in z.files]
            if absent:
                raise DataError(f"{path}: not a CIFAR-10 JPEG pack, missing arrays {absent} (needs {list(NPZ_KEYS)})")
            pack = {k: z[k] for k in NPZ_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc})") from exc
    classes = tuple(str(c) for c in pack["classes"])
    counts = {}
    for s in ("train", "test"):
        labels, offsets = pack[f"{s}_labels"], pack[f"{s}_offsets"]
        if labels.ndim != 1 or len(offsets) != len(labels) + 1:
            raise DataError(f"{path}: {s}_offsets must have len({s}_labels) + 1 = {len(labels) + 1} entries")
        if len(labels) and int(labels.max()) >= len(classes):
            raise DataError(f"{path}: {s}_labels reach {int(labels.max())} but there are {len(classes)} classes")
        counts[s] = len(labels)
    images = _cached_decode(pack, path, counts, cache)
    splits = [TensorDataset(uint8_to_float(images[s]), torch.from_numpy(pack[f"{s}_labels"].astype(np.int64)), classes)
              for s in ("train", "test")]
    return DataBundle("cifar10", splits[0], splits[1],
                      {"root": str(path), "format": "jpeg-npz", "files": [path.name], "pack_key": pack_key(path)})


@register_source("cifar10")
def load(spec: DatasetSpec) -> DataBundle:
    """Load CIFAR-10 from ``spec.root`` (pickle layout or JPEG pack); see the module docstring."""
    opts = parse_options(Cifar10Options, spec.options, source="cifar10")
    fmt = opts.format
    if fmt == "auto":
        fmt = "jpeg-npz" if opts.path or (spec.root or "").lower().endswith(".npz") else "pickle"
    if fmt == "pickle" and opts.path is not None:
        raise ConfigError("dataset 'cifar10': options.path is only used with format jpeg-npz; for the pickle "
                          "layout set spec.root to the folder holding cifar-10-batches-py")
    if fmt == "jpeg-npz":
        target = opts.path or spec.root
        if target is None:
            raise DataError("format jpeg-npz needs the pack's location: set options.path or spec.root to the .npz file")
        return load_jpeg_npz(Path(target).expanduser(), cache=opts.cache)
    return _load_pickles(resolve_root(spec.root, "cifar10"), spec.download)
