"""MNIST (LeCun et al. 1998) and Fashion-MNIST (Xiao et al. 2017) from IDX files.

Reads the four standard files from ``spec.root`` (default ``~/.mlaudit/data/mnist``, or
``~/.mlaudit/data/fashion-mnist`` with ``options: {variant: fashion}``), gzipped or not -- for each
file both ``NAME`` and ``NAME.gz`` are looked for:

* ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (60,000 examples)
* ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (10,000 examples)

Output: float32 images [N, 1, 28, 28] in [0, 1], int64 labels; classes ``"0".."9"`` for MNIST and the
Fashion-MNIST names for ``fashion``. ``download: true`` fetches the gzipped MNIST files from
:data:`MNIST_URL` and checks their MD5 (:data:`MNIST_MD5`); there are no download URLs for
Fashion-MNIST, whose files must be placed in the root by hand.

IDX format: a 4-byte magic ``0x00 0x00 <type> <ndim>`` (type 0x08 = uint8; images are
``0x00000803``, labels ``0x00000801``), then ``ndim`` big-endian uint32 sizes, then the data in C
order. :func:`parse_idx` and :func:`write_idx` handle every IDX type.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from ...errors import DataError
from ..base import DataBundle, TensorDataset
from ..registry import DatasetSpec, register_source
from ._util import download_file, parse_options, resolve_root, uint8_to_float

log = logging.getLogger(__name__)

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_MD5 = MappingProxyType({
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
})
SPLIT_FILES = MappingProxyType({
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
})
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801

# IDX type code -> big-endian numpy dtype.
_IDX_TYPES = MappingProxyType({0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"})


class MnistOptions(BaseModel):
    """``variant``: ``mnist`` (handwritten digits) or ``fashion`` (Fashion-MNIST, same file names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["mnist", "fashion"] = "mnist"


def write_idx(array: np.ndarray) -> bytes:
    """Serialise ``array`` (1 to 255 dims, a dtype IDX supports) as IDX bytes."""
    arr = np.asarray(array)
    code = next((c for c, dt in _IDX_TYPES.items() if np.dtype(dt).newbyteorder("=") == arr.dtype.newbyteorder("=")),
                None)
    if code is None or not 1 <= arr.ndim <= 255:
        raise ValueError(f"IDX cannot hold a {arr.ndim}-d {arr.dtype} array")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=_IDX_TYPES[code]).tobytes()


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes -> array in native byte order; ``source`` names the file in errors.

    Raises:
        DataError: bad magic (first two bytes not zero or unknown type code), truncated header or
            data, or trailing bytes.
    """
    if len(data) < 4:
        raise DataError(f"{source}: truncated IDX file ({len(data)} bytes, no header)")
    zero, code, ndim = data[:2], data[2], data[3]
    if zero != b"\0\0" or code not in _IDX_TYPES or ndim == 0:
        raise DataError(f"{source}: bad IDX magic number 0x{data[:4].hex()} (expected 0x000008NN for uint8 data, "
                        f"e.g. 0x{IMAGES_MAGIC:08x} for images, 0x{LABELS_MAGIC:08x} for labels)")
    start = 4 + 4 * ndim
    if len(data) < start:
        raise DataError(f"{source}: truncated IDX header ({len(data)} bytes, needs {start})")
    shape = struct.unpack(f">{ndim}I", data[4:start])
    dtype = np.dtype(_IDX_TYPES[code])
    need = start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != need:
        what = "truncated" if len(data) < need else "has trailing bytes"
        raise DataError(f"{source}: IDX file {what}: header says shape {list(shape)} ({need} bytes), file has {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))


def _find(root: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def read_idx_file(path: Path, *, magic: int) -> np.ndarray:
    """Read a (possibly gzipped) IDX file and require the given magic number."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip file ({exc})") from exc
    if raw[:4] != magic.to_bytes(4, "big") and len(raw) >= 4:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()}, expected 0x{magic:08x}")
    return parse_idx(raw, source=str(path))


def download_mnist(root: Path, *, url: str | None = None) -> None:
    """Download the four gzipped MNIST files into ``root`` (skipping those present), checking MD5s.

    ``url`` defaults to :data:`MNIST_URL` (looked up at call time); file names are appended to it.
    """
    base = url or MNIST_URL
    for name, md5 in MNIST_MD5.items():
        if _find(root, name.removesuffix(".gz")) is None:
            log.info("downloading %s%s into %s", base, name, root)
            download_file(base + name, root / name, md5=md5)


def _missing_message(root: Path, missing: list[str], variant: str) -> str:
    paths = ", ".join(str(root / m) for m in missing)
    how = (
        "There are no download URLs for Fashion-MNIST: get the four IDX files (e.g. from the "
        "zalandoresearch/fashion-mnist project) and place them there."
        if variant == "fashion"
        else f"Set `download: true` in the dataset spec (fetches them from {MNIST_URL}), or download them "
        "yourself and place them there."
    )
    label = "Fashion-MNIST" if variant == "fashion" else "MNIST"
    return f"{label} files are missing: {paths} (each may also be gzipped, with a .gz suffix). {how}"


def _read_split(img_path: Path, lab_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx_file(img_path, magic=IMAGES_MAGIC)
    labels = read_idx_file(lab_path, magic=LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{img_path} holds {images.shape[0]} images but {lab_path} holds {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{lab_path}: labels must lie in 0..9, got a maximum of {labels.max()}")
    return images[:, None], labels.astype(np.int64)


@register_source("mnist")
def load(spec: DatasetSpec) -> DataBundle:
    """Load MNIST or Fashion-MNIST from ``spec.root``; see the module docstring."""
    opts = parse_options(MnistOptions, spec.options, source="mnist")
    root = resolve_root(spec.root, "mnist" if opts.variant == "mnist" else "fashion-mnist")
    names = [n for pair in SPLIT_FILES.values() for n in pair]
    found = {n: _find(root, n) for n in names}
    if None in found.values() and spec.download and opts.variant == "mnist":
        download_mnist(root)
        found = {n: _find(root, n) for n in names}
    paths = {n: p for n, p in found.items() if p is not None}
    if len(paths) < len(names):
        raise DataError(_missing_message(root, [n for n in names if n not in paths], opts.variant))
    classes = FASHION_CLASSES if opts.variant == "fashion" else tuple(str(i) for i in range(10))
    splits = {}
    for split, (img_name, lab_name) in SPLIT_FILES.items():
        x, y = _read_split(paths[img_name], paths[lab_name])
        splits[split] = TensorDataset(uint8_to_float(x), torch.from_numpy(y), classes)
    files = [paths[n].name for n in names]
    return DataBundle("mnist", splits["train"], splits["test"],
                      {"root": str(root), "format": "idx", "variant": opts.variant, "files": files})
