"""Exception hierarchy.

Every error a user can cause derives from :class:`MlauditError`. The CLI maps
:class:`ConfigError` (and its subclasses) to exit code 2 ("invalid input") and every
other :class:`MlauditError` raised while a run is under way to exit code 1.
Messages say what was wrong, the value seen, and what is allowed.
"""

from __future__ import annotations


class MlauditError(Exception):
    """Base class of every error mlaudit raises on purpose."""


class ConfigError(MlauditError, ValueError):
    """Invalid user input: a config field, a CLI option, an unknown registry name."""


class DataError(MlauditError):
    """Missing, corrupt or inconsistent data (files, hashes, shapes)."""


class UnsupportedModelError(ConfigError):
    """A model cannot be used the way it was asked (e.g. BatchNorm under DP-SGD)."""


class BudgetError(MlauditError):
    """A resource budget (memory, privacy, time) cannot be met."""


class TrainingError(MlauditError):
    """Training diverged or failed (e.g. a NaN/inf loss); names the epoch and step.

    ``seed`` (of the model that failed), ``epoch`` and ``step`` (1-based) are kept as fields when
    known, so the run context can tell which trial failed without parsing the message."""

    def __init__(self, message: str, *, seed: int | None = None, epoch: int | None = None,
                 step: int | None = None) -> None:
        super().__init__(message)
        self.seed, self.epoch, self.step = seed, epoch, step


class TrialError(MlauditError):
    """A trial failed while a run was under way; carries the trial id."""

    def __init__(self, trial_id: str, cause: BaseException) -> None:
        super().__init__(f"trial {trial_id!r} failed: {type(cause).__name__}: {cause}")
        self.trial_id = trial_id
        self.cause = cause


def unknown_name(kind: str, name: object, valid: list[str] | tuple[str, ...]) -> ConfigError:
    """Build the standard error for an unknown registry name, listing the valid ones."""
    return ConfigError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")


def error_line(e: BaseException, limit: int = 200) -> str:
    """``"<type>: <first line of the message>"``, cut to ``limit`` characters: a failure named in one line of a
    warning or of results.json (a graph capture or a compiled probe that failed and fell back to the eager step)."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:limit]
