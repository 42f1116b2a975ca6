"""The federated kind's ``lpips`` block: LPIPS of matched reconstructions from local weight files."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mlaudit.attacks.federated.lpips import ALEX_CHANNELS, alexnet_trunk
from mlaudit.errors import ConfigError
from mlaudit.experiments import run_experiment


def weight_files(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    convs = [m for stage in alexnet_trunk() for m in stage if isinstance(m, nn.Conv2d)]
    state = {}
    for i, conv in zip((0, 3, 6, 8, 10), convs, strict=True):
        state[f"features.{i}.weight"], state[f"features.{i}.bias"] = conv.weight.detach(), conv.bias.detach()
    torch.save(state, tmp_path / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(ALEX_CHANNELS)},
               tmp_path / "alex.pth")
    return tmp_path / "alexnet.pth", tmp_path / "alex.pth"


def config(tmp_path: Path, **lpips: Any) -> dict[str, Any]:
    a, b = weight_files(tmp_path)
    return {"kind": "federated", "dataset": {"name": "synthetic", "options": {"shape": [3, 32, 32], "n_train": 64, "n_test": 64}},
            "model": {"name": "mlp", "width": 16}, "recipe": "fast", "attack": "imprint", "users": 2, "batch": 4,
            "imprint": {"bins": 16}, "grid": 0, "seed": 0,
            "lpips": {"backbone": str(a), "lin": str(b), **lpips}}


def test_lpips_is_reported_and_exact_recoveries_are_perceptually_identical(tmp_path: Path) -> None:
    cfg = config(tmp_path, threshold=0.05)
    cfg["lpips"]["backbone_sha256"] = hashlib.sha256(Path(cfg["lpips"]["backbone"]).read_bytes()).hexdigest()
    out = tmp_path / "run"
    res = run_experiment(cfg, out=out, device="cpu", store=tmp_path / "runs.db", quiet=True).results
    m = res["metrics"]
    assert m["lpips"]["threshold"] == 0.05 and m["lpips"]["n"] == 8
    assert m["exact"]["k"] >= 1  # some inputs alone in their bin come back verbatim ...
    assert m["lpips"]["recovered"]["k"] >= m["exact"]["k"]  # ... and those are perceptually identical
    assert m["lpips"]["recovered"]["k"] <= m["lpips"]["matched"]
    assert math.isfinite(m["lpips"]["median"]) and m["lpips"]["q1"] >= 0
    assert "perceptually recovered (LPIPS &lt;= 0.05)" in (out / "report.html").read_text()


def test_lpips_refuses_small_images_and_a_wrong_hash_before_anything_is_written(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg["dataset"] = "digits"
    with pytest.raises(ConfigError, match="at least 31 pixels"):
        run_experiment(cfg, out=tmp_path / "a", device="cpu", store=tmp_path / "runs.db", quiet=True)
    cfg = config(tmp_path, lin_sha256="0" * 64)
    with pytest.raises(ConfigError, match="lpips: .*sha256"):
        run_experiment(cfg, out=tmp_path / "b", device="cpu", store=tmp_path / "runs.db", quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
