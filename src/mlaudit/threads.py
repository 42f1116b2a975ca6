"""How many CPU threads torch uses for a run (the CLI's ``--threads``).

PyTorch defaults to one intra-op thread per core. For the small models mlaudit trains by the hundred
that is the wrong default on small or shared machines: on this project's 2-core CI box the digits
tour ran 10-30x slower with 2 torch threads than with 1, because the other core was busy and the
threads spin waiting for each other on tiny kernels. The rule here: an explicit ``--threads N`` (or
``MLAUDIT_THREADS``) wins; otherwise 1 thread on machines with at most 2 cores and half the cores
(at most 8) on larger ones. GPU runs are unaffected except for their CPU-side work.
"""

from __future__ import annotations

import os

import torch

from .errors import ConfigError

ENV = "MLAUDIT_THREADS"
MAX_DEFAULT = 8


def default_threads(cores: int | None = None) -> int:
    """The automatic choice for a machine with ``cores`` logical CPUs (default: this one's)."""
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return 1 if cores <= 2 else min(cores // 2, MAX_DEFAULT)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads``, ``$MLAUDIT_THREADS`` or :func:`default_threads`
    (in that order) and return the number set. Raises :class:`ConfigError` for a value below 1 or an
    ``MLAUDIT_THREADS`` that is not an integer."""
    if threads is None and os.environ.get(ENV):
        raw = os.environ[ENV]
        try:
            threads = int(raw)
        except ValueError:
            raise ConfigError(f"{ENV}={raw!r} must be a whole number of threads (>= 1)") from None
    n = default_threads() if threads is None else threads
    if n < 1:
        raise ConfigError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    return n
