"""Progress bars (rich) that a ``--quiet`` run turns off; one object passed down, no globals."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Rich progress bars on stderr (done/total, elapsed time and an ETA), one task per long loop;
    every method is a no-op when ``quiet``.

    Use as a context manager: ``with Progress(quiet=q) as p: t = p.task("models", total=8); p.advance(t)``.
    """

    quiet: bool = False
    console: Console = field(default_factory=lambda: Console(stderr=True))
    _bar: RichProgress | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> Progress:
        if not self.quiet:
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def task(self, description: str, *, total: int, completed: int = 0) -> TaskID | None:
        """Add a bar of ``total`` steps (``completed`` already done); None when quiet. The start is also
        logged (INFO), so a quiet run's log still shows where it is."""
        log.info("%s: %d of %d to do", description.strip(), total - completed, total)
        if self._bar is None:
            return None
        return self._bar.add_task(description, total=total, completed=completed)

    def advance(self, task: TaskID | None, n: int = 1) -> None:
        if self._bar is not None and task is not None:
            self._bar.advance(task, n)

    def set(self, task: TaskID | None, *, completed: int, description: str | None = None) -> None:
        if self._bar is not None and task is not None:
            self._bar.update(task, completed=completed, description=description)

    def done(self, task: TaskID | None) -> None:
        if self._bar is not None and task is not None:
            self._bar.stop_task(task)

    def log(self, message: str) -> None:
        """Print a line above the bars (plain text: brackets in it are not read as markup)."""
        if not self.quiet:
            self.console.print(message, markup=False, highlight=False)


@contextlib.contextmanager
def run_log(out_dir: Path, *, level: int = logging.INFO) -> Iterator[Path]:
    """Append everything mlaudit logs at ``level`` and above during the block to
    ``out_dir/artifacts/run.log`` (timestamped; every invocation of the folder appends), then detach."""
    path = out_dir / "artifacts" / "run.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    logger = logging.getLogger("mlaudit")
    old = logger.level
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
        handler.close()
