"""The membership kind with RMIA and label-only attacks (issue 19): bad population and reference
settings refused before training, and a tiny end-to-end run (synthetic vectors, 8 MLPs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_membership import tiny  # same folder (rootdir-relative import)

from mlaudit.errors import ConfigError
from mlaudit.experiments import run_experiment


@pytest.mark.parametrize("change,pattern", [
    ({"pool": {"models": 8, "keep": 0.5, "size": 100}, "population": {"data": "train", "indices": [0, 1, 2, 3]}},
     r"population.indices overlaps the pool \(the target examples\) in \d+ rows"),
    ({"population": {"data": "train"}}, r"population.data: train needs training rows outside the pool"),
    ({"attack_options": {"rmia-offline": {"references": 6}}},
     r"attack rmia-offline needs >= 0 IN and >= 6 OUT shadow models .* set pool.models >= 13 or lower attack_options.rmia-offline.references"),
])
def test_bad_rmia_settings_are_refused_before_training(tmp_path: Path, change: dict[str, Any], pattern: str) -> None:
    cfg = tiny(**{"attacks": ["rmia-offline"], **change})
    with pytest.raises(ConfigError, match=pattern):
        run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True)
    assert not (tmp_path / "o").exists()


def test_rmia_and_label_boundary_end_to_end(tmp_path: Path) -> None:
    cfg = tiny(attacks=["loss", "rmia-online", "rmia-offline", "label-boundary"], n_boot=20,
               attack_options={"label-boundary": {"draws": 1, "steps": 4}, "rmia-offline": {"references": 2}})
    res = run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "s.db", quiet=True)
    m = res.results["metrics"]
    for name in ("rmia-online", "rmia-offline", "label-boundary"):
        assert set(m[name]["tpr_at_fpr"]) == {"0", "1e-05", "0.0001", "0.001", "0.01"}
        assert 0.3 < m[name]["auc"]["value"] <= 1.0
    assert m["pool"]["attack_options"]["rmia-offline"]["references"] == 2
