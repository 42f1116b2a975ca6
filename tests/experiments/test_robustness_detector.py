"""The ``detector:`` block of the ``robustness`` kind (issue 16): a feature-space detector evaluated by
:func:`mlaudit.attacks.evasion.detector.evaluate_detector` inside ``mlaudit run``, non-adaptive PGD and
the detector-aware attack side by side in results.json and the report; bad input names the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from torch import Tensor, nn
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.errors import ConfigError
from mlaudit.experiments import parse_config, run_experiment

BASE: dict[str, Any] = {"kind": "robustness", "name": "rob-det", "dataset": "digits", "model": "mlp",
                        "recipe": {"name": "fast", "epochs": 4}, "attacks": ["pgd"],
                        "attack_options": {"pgd": {"steps": 10}}, "threat": {"norm": "linf", "eps": [0.2]},
                        "examples": 60, "grid": 0, "sanity": False, "seed": 0,
                        "detector": {"method": "mahalanobis", "fpr": 0.05, "steps": 50, "fit": 800, "calibrate": 400}}


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_detector_block_reports_non_adaptive_and_adaptive_side_by_side(tmp_path: Path, method: str) -> None:
    cfg = copy.deepcopy(BASE)
    cfg["detector"].update(method=method, k=5)
    out = tmp_path / "run"
    m = run_experiment(cfg, out=out, device="cpu", store=tmp_path / "runs.db", quiet=True).results["metrics"]
    d = m["detector"]
    assert d["method"] == method and d["fpr"] == 0.05 and d["steps"] == 50 and len(d["thresholds"]) == 1
    at = d["by_eps"]["0.2"]
    assert set(at) == {"clean_accuracy", "clean_flagged", "pgd", "feature-collision", "detector-aware"}
    for v in (at["clean_accuracy"], at["clean_flagged"], d["clean_flagged"]):
        assert 0.0 <= v <= 1.0
    for name in ("pgd", "feature-collision", "detector-aware"):
        r = at[name]
        assert all(0.0 <= r[f] <= 1.0 for f in ("misclassified", "flagged", "undetected_success"))
        assert r["undetected_success"] <= r["misclassified"]
    assert d["undetected_non_adaptive_at_max_eps"] == at["pgd"]["undetected_success"]
    assert d["undetected_adaptive_at_max_eps"] == at["detector-aware"]["undetected_success"]
    assert d["undetected_adaptive_at_max_eps"] >= d["undetected_non_adaptive_at_max_eps"]
    assert d["adaptive_gain_at_max_eps"] == pytest.approx(at["detector-aware"]["undetected_success"]
                                                          - at["pgd"]["undetected_success"])
    html = (out / "report.html").read_text()
    assert "Detector: non-adaptive vs detector-aware attack" in html and "undetected and fooled" in html


@pytest.mark.parametrize(("change", "words"), [
    ({"method": "lof"}, ["detector.method", "'mahalanobis' or 'knn'"]),
    ({"fpr": 1.0}, ["detector.fpr", "less than 1"]),
    ({"fpr": 0}, ["detector.fpr", "greater than 0"]),
    ({"steps": 0}, ["detector.steps", "greater than or equal to 1"]),
    ({"k": 900}, ["detector.k = 900", "k <= detector.fit = 800"]),
    ({"eps": 1.5}, ["detector.eps = 1.5", "above the pixel range", "eps <= 1"]),
    ({"fit": 1200, "calibrate": 400}, ["detector.fit + detector.calibrate = 1200 + 400", "train split"]),
    ({"weight": 2}, ["detector.weight", "Extra inputs"]),
])
def test_bad_detector_block_exits_2_naming_the_field(tmp_path: Path, change: dict[str, Any], words: list[str]) -> None:
    cfg = copy.deepcopy(BASE)
    cfg["detector"].update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), "--device", "cpu", "--store",
                                   str(tmp_path / "runs.db")])
    assert res.exit_code == 2, res.output
    for w in words:
        assert w in res.stderr, res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs.db").exists()
    with pytest.raises(ConfigError):
        run_experiment(cfg, out=tmp_path / "out2", device="cpu", store=tmp_path / "r2.db", quiet=True)
    assert not (tmp_path / "out2").exists()


def test_detector_block_is_optional_and_defaults() -> None:
    assert parse_config({k: v for k, v in BASE.items() if k != "detector"}).detector is None
    d = parse_config({**BASE, "detector": {}}).detector
    assert (d.method, d.k, d.fpr, d.steps, d.eps, d.fit, d.calibrate) == ("mahalanobis", 10, 0.05, 50, None, 1000, 400)


class _NoLinear(nn.Module):
    """A classifier of 8x8 digits without an nn.Linear head (a 1x1 conv): no penultimate features."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv1d(64, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.flatten(1)[:, :, None])[:, :, 0]


def test_detector_needs_a_linear_head(tmp_path: Path) -> None:
    cfg = {**BASE, "model": f"{__name__}:_NoLinear"}
    with pytest.raises(ConfigError, match="detector: _NoLinear has no nn.Linear layer"):
        run_experiment(cfg, out=tmp_path / "out", device="cpu", store=tmp_path / "r.db", quiet=True)
    assert not (tmp_path / "out").exists()
