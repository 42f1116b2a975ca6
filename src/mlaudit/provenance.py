"""Where a result came from: versions of mlaudit, Python, torch, numpy and CUDA, the platform, the
git revision and a readable device name, written into every results.json."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__


def device_name(dev: str) -> str:
    """Human-readable device: the GPU's name, or ``cpu (<arch>, <N> threads)``."""
    if dev.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(dev))
    arch = platform.processor() or platform.machine() or "unknown"
    return f"cpu ({arch}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, Any]:
    """Versions of mlaudit, Python, torch, numpy, CUDA, the platform and the git revision."""
    return {
        "mlaudit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "git_rev": git_revision(),
    }


def git_revision() -> str | None:
    """HEAD of the git checkout this package is imported from, or None (not a checkout, no git)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None
