"""What a run folder holds and whether a config may continue it: the output-folder checks, growing a
study in place, which finished trials are still usable, the clean-up of a killed run's temp files and
the lock a run holds on its folder. Nothing here writes, except :func:`remove_stale_tmp`, which deletes
only mlaudit's own temp files, and :func:`lock_out_dir`, which creates and removes ``.mlaudit.lock``."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ..atomic import is_atomic_temp
from ..config import MAX_CONFIG_BYTES, YamlBoundsError, bounded_safe_load
from ..errors import ConfigError, MlauditError
from ..jsonutil import config_hash
from .base import config_to_dict, parse_config

log = logging.getLogger(__name__)
LOCK_NAME = ".mlaudit.lock"


def check_out_dir(out_dir: Path, resolved: dict[str, Any], *, resume: bool,
                  growable: tuple[str, ...] | None = None) -> dict[str, tuple[int, int]]:
    """Refuse an output folder that is a file, holds something other than an mlaudit run, holds a
    different run, or holds this run while ``resume`` is False. Writes nothing.

    With ``growable`` (a grow: see :func:`run_experiment`), a run whose config differs only by larger
    counts in those fields is accepted; returns ``{field: (old, new)}`` for them (empty otherwise)."""
    if not out_dir.exists():
        return {}
    if not out_dir.is_dir():
        raise ConfigError(f"output path {str(out_dir)!r} exists and is not a folder; choose another --out")
    if all(p.name == LOCK_NAME for p in out_dir.iterdir()):
        return {}
    cfg_file = out_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError(f"output folder {str(out_dir)!r} is not empty and holds no mlaudit run (no config.yaml); "
                          "choose another --out or empty it")
    raw = _read_config(cfg_file)
    if not _same_config(raw, resolved):
        old = _resolved(raw)
        if growable is not None and old is not None:
            return config_growth(old, resolved, growable)  # raises for anything but a grow
        hint = (" (--set changes the config of the run being resumed; drop it, or add --grow to raise a count "
                "such as scenarios or victims)" if resume else "")
        raise ConfigError(f"output folder {str(out_dir)!r} already holds a different run (its config.yaml differs)"
                          f"{hint}; choose another --out")
    if not resume:
        state = "finished " if (out_dir / "results.json").is_file() else ""
        raise ConfigError(f"output folder {str(out_dir)!r} already holds this {state}run; pass --resume "
                          f"{str(out_dir)!r} to continue it (finished trials are skipped) or choose another --out")
    return {}


def config_growth(old: dict[str, Any], new: dict[str, Any], growable: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """``{field: (old, new)}`` for a config ``new`` that grows ``old`` (resolved configs): only fields in
    ``growable`` may differ, and only as integer counts that do not shrink. ConfigError otherwise."""
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    fixed = [k for k in diff if k not in growable]
    if fixed:
        allowed = ", ".join(growable) if growable else "none for this kind"
        raise ConfigError(f"cannot grow the run: {', '.join(fixed)} differ from the run being resumed "
                          f"(was {', '.join(repr(old.get(k)) for k in fixed)}, now "
                          f"{', '.join(repr(new.get(k)) for k in fixed)}); a grow may only raise these counts: {allowed}")
    out: dict[str, tuple[int, int]] = {}
    for k in diff:
        a, b = old.get(k), new.get(k)
        if not (isinstance(a, int) and isinstance(b, int)) or isinstance(a, bool) or isinstance(b, bool):
            raise ConfigError(f"cannot grow the run: {k} must be a count in both configs to grow, got {a!r} -> {b!r}")
        if b < a:
            raise ConfigError(f"cannot grow the run: {k} can only grow, got {a} -> {b} (a smaller study is a new run; "
                              "choose another --out)")
        out[k] = (a, b)
    return out


def _read_config(cfg_file: Path) -> dict[str, Any] | None:
    """The raw config mapping in ``cfg_file`` (None when it cannot be read or is not a mapping)."""
    try:
        with cfg_file.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            return None
        old = bounded_safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, YamlBoundsError, ValueError, RecursionError, OSError):  # UnicodeDecodeError is a ValueError
        return None
    return old if isinstance(old, dict) else None


def _resolved(old: dict[str, Any] | None) -> dict[str, Any] | None:
    """The resolved form of a raw config read by :func:`_read_config` (None when it does not parse)."""
    if old is None:
        return None
    try:
        return config_to_dict(parse_config(old))
    except MlauditError:
        return None


def _same_config(old: dict[str, Any] | None, resolved: dict[str, Any]) -> bool:
    """Whether the raw config ``old`` is the run ``resolved`` (as written, or once resolved)."""
    if old is None:
        return False
    want = config_hash(resolved)
    try:
        if config_hash(old) == want:
            return True
    except MlauditError:  # not JSON-serialisable as written: not a config mlaudit wrote
        return False
    again = _resolved(old)
    return again is not None and config_hash(again) == want


def usable(finished: dict[str, dict[str, Any]], out_dir: Path) -> dict[str, dict[str, Any]]:
    """Finished trials whose checkpoint (if they saved one) is still on disk; others train again."""
    keep = {t: rec for t, rec in finished.items() if not rec.get("checkpoint") or (out_dir / rec["checkpoint"]).is_file()}
    if len(keep) < len(finished):
        log.warning("%d finished trials lost their checkpoints under %s; training them again",
                    len(finished) - len(keep), out_dir)
    return keep


def remove_stale_tmp(out_dir: Path) -> None:
    """Delete temp files left by a killed run (atomic writes that never got renamed): only the names
    :func:`mlaudit.atomic.atomic_path` makes, only regular files, never through a symlinked folder."""
    for folder in (out_dir, out_dir / "artifacts", out_dir / "artifacts" / "models", out_dir / "artifacts" / "cache"):
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.glob(".*.tmp"):
                if is_atomic_temp(p):
                    p.unlink(missing_ok=True)




@contextmanager
def lock_out_dir(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``fcntl.flock`` on ``out_dir/.mlaudit.lock`` (which records the
    holder's pid) for the ``with`` block; ConfigError naming the pid when another process (or another
    run in this one) holds it. The file is removed while still locked on exit; a run that locked the
    file just as its holder removed it sees a different file at the path and locks again."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    path = out_dir / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot create the lock file {str(path)!r} of the run: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"the run in {str(out_dir)!r} is in use by another process (pid {pid}); wait for it "
                              "to end or choose another --out") from None
        try:
            here = os.stat(path, follow_symlinks=False)
            mine = os.fstat(fd)
            if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file we locked was removed by the run that held it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


LEDGER = "artifacts/cost_ledger.json"
"""Per-invocation cost of a run folder (one entry per ``mlaudit run`` / ``--resume`` that got to train)."""


def record_invocation(out_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append ``entry`` (wall_s, train_wall_s, models_trained, gpu_seconds, status) to the folder's cost
    ledger (atomically) and return the sums over every invocation so far: ``{"invocations": n,
    "wall_s", "train_wall_s", "models_trained", "gpu_seconds"}`` (a resumed run reports the whole cost
    of its result, not only its own). A missing or unreadable ledger starts a new one."""
    import json

    from ..atomic import write_text

    path = out_dir / LEDGER
    try:
        entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else []
        entries = entries if isinstance(entries, list) else []
    except (OSError, ValueError):
        entries = []
    entries.append(entry)
    write_text(path, json.dumps(entries, indent=1))
    total: dict[str, Any] = {"invocations": len(entries)}
    for k in ("wall_s", "train_wall_s", "models_trained", "gpu_seconds"):
        vals = [e.get(k) for e in entries if isinstance(e, dict) and isinstance(e.get(k), (int, float))]
        total[k] = round(sum(vals), 3) if vals else None
    return total


RUN_ID = "artifacts/run_id"
"""The run-store id of the run in a folder, so a moved folder still finds its run."""


def find_run(rs: Any, out_dir: Path) -> Any:
    """The store row of the run in ``out_dir``: by the folder's path, else (a moved folder) by the id
    the folder records in ``artifacts/run_id``; None when neither is known to the store."""
    from ..errors import ConfigError as _ConfigError

    existing = rs.find_by_out_dir(out_dir)
    if existing is not None:
        return existing
    path = out_dir / RUN_ID
    if not path.is_file() or path.is_symlink():
        return None
    run_id = path.read_text(encoding="utf-8").strip()[:64]
    try:
        return rs.get_experiment(run_id) if run_id else None
    except _ConfigError:
        return None


def record_run_id(out_dir: Path, run_id: str) -> None:
    """Write ``artifacts/run_id`` (atomically) unless it already holds ``run_id``."""
    from ..atomic import write_text

    path = out_dir / RUN_ID
    if not (path.is_file() and path.read_text(encoding="utf-8").strip() == run_id):
        write_text(path, run_id + "\n")
