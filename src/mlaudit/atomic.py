"""The one atomic file write: a temp file in the target's folder, then ``os.replace``, so a reader
(or a resumed run after a kill) never sees a half-written file. Temp names start with ``.`` and end
in ``.tmp``; the runner removes stale ones on resume."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def is_atomic_temp(path: Path) -> bool:
    """Whether ``path`` is a regular file named as :func:`atomic_path` names its temp files."""
    return bool(_TEMP.match(path.name)) and path.is_file() and not path.is_symlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``path``; write to it inside the block. On normal exit it is renamed
    to ``path`` (mode 0644); on an exception it is deleted and ``path`` is untouched."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)
