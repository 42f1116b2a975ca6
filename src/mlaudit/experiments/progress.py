"""Progress bars (rich) that a ``--quiet`` run turns off; one object passed down, no globals."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


@dataclass
class Progress:
    quiet: bool = False
    console: Console = field(default_factory=lambda: Console(stderr=True))
    _bar: RichProgress | None = None

    def __enter__(self) -> Progress:
        if not self.quiet:
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console, transient=False)
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def task(self, description: str, *, total: int, completed: int = 0) -> TaskID | None:
        if self._bar is None:
            return None
        return self._bar.add_task(description, total=total, completed=completed)

    def advance(self, task: TaskID | None, n: int = 1) -> None:
        if self._bar is not None and task is not None:
            self._bar.advance(task, n)

    def done(self, task: TaskID | None) -> None:
        if self._bar is not None and task is not None:
            self._bar.stop_task(task)

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)
