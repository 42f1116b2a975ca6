"""``model.init``: every model built from the spec starts from a saved state_dict (fine-tuning, crafted
initial weights of a last-iterate DP audit), checked before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from mlaudit.errors import ConfigError, DataError
from mlaudit.experiments import run_experiment
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.train.checkpoint import sha256_file


def saved(tmp_path: Path, **spec: object) -> Path:
    torch.manual_seed(3)
    m = build_model({"name": "mlp", "width": 16, **spec}, input_shape=(1, 8, 8), num_classes=10)
    path = tmp_path / "init.pt"
    torch.save(m.state_dict(), path)
    return path


def test_every_build_starts_from_the_saved_weights(tmp_path: Path) -> None:
    path = saved(tmp_path)
    want = torch.load(path, weights_only=True)
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = build_model({"name": "mlp", "width": 16, "init": str(path), "init_sha256": sha256_file(path)},
                        input_shape=(1, 8, 8), num_classes=10)
        for k, v in m.state_dict().items():
            assert torch.equal(v, want[k]), k


def test_a_wrong_file_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path)
    with pytest.raises(ConfigError, match="does not fit model 'mlp'"):
        build_model({"name": "mlp", "width": 32, "init": str(path)}, input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(DataError, match="sha256"):
        build_model({"name": "mlp", "width": 16, "init": str(path), "init_sha256": "0" * 64}, input_shape=(1, 8, 8),
                    num_classes=10)
    with pytest.raises(ValidationError, match="is not a file"):
        ModelSpec(name="mlp", init=str(tmp_path / "missing.pt"))
    with pytest.raises(ValidationError, match="without model.init"):
        ModelSpec(name="mlp", init_sha256="0" * 64)


def test_a_kind_trains_from_the_init(tmp_path: Path) -> None:
    """The factory builds its models through the spec: with an init and no training (lr tiny), the trained
    models stay at the saved weights whatever their seeds."""
    path = saved(tmp_path, norm="none")
    cfg = {"kind": "train", "dataset": "digits", "model": {"name": "mlp", "width": 16, "norm": "none", "init": str(path)},
           "recipe": {"name": "fast", "epochs": 1, "lr": 1e-12, "weight_decay": 0.0}, "trials": 2, "seed": 0}
    res = run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "r.db", quiet=True).results
    accs = [t["test_accuracy"] for t in res["trials"]]
    assert accs[0] == accs[1]  # both start from (and stay at) the same weights
    with pytest.raises(ConfigError, match="is not a file"):
        run_experiment({**cfg, "model": {"name": "mlp", "init": str(tmp_path / "nope.pt")}}, out=tmp_path / "p",
                       device="cpu", store=tmp_path / "r.db", quiet=True)
