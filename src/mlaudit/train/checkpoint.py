"""Checkpoints are plain ``state_dict`` files; loading never unpickles arbitrary objects."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import atomic_path
from ..errors import DataError


def save_checkpoint(state_dict: dict[str, Tensor], path: str | Path) -> str:
    """Write ``state_dict`` atomically (tmp file + rename); returns the file's sha256."""
    try:
        with atomic_path(path) as tmp:
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError("... file write failed")
        raise _write_error(Path(path), e) from e
    return sha256_file(path)


def _write_error(path: Path, e: BaseException) -> BaseException:
    """A :class:`DataError` for a full disk or failed write of ``path``; other errors unchanged."""
    text = str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in text:
        return DataError(f"the disk holding {path.parent} is full (writing {path.name}); free space there and "
                         "continue with --resume: finished trials are kept")
    if "write failed" in text:
        return DataError(f"writing the checkpoint {path} failed ({text.splitlines()[0][:200]}); is the disk full or "
                         "read-only? Fix it and continue with --resume: finished trials are kept")
    return e


def load_checkpoint(path: str | Path, *, sha256: str | None = None) -> dict[str, Tensor]:
    """Load a state_dict with ``weights_only=True``; verify ``sha256`` when given.

    Raises :class:`DataError` for a missing, corrupt or non-state_dict file, or a hash mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {str(path)!r} does not exist")
    if sha256 is not None and sha256_file(path) != sha256:
        raise DataError(f"checkpoint {str(path)!r} does not match its recorded sha256 (modified or corrupt)")
    obj = load_weights_only(path, what="checkpoint", expect="a weights-only state_dict")
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise DataError(f"checkpoint {str(path)!r} is not a state_dict (a mapping of names to tensors)")
    return obj


def load_weights_only(path: str | Path, *, what: str = "file", expect: str = "weights-only tensors") -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` (tensors, and dicts / lists of them;
    never arbitrary objects): the one place mlaudit reads a torch file. A :class:`DataError` naming
    ``what`` and the path for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or hostile files
        raise DataError(f"{what} {str(path)!r} could not be loaded as {expect}: {e}") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
