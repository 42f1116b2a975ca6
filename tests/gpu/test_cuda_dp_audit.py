"""GPU checks of the DP audit (``pytest -m gpu`` on a CUDA machine; skipped elsewhere): a fast-CNN audit on
CUDA takes the loop layout without a probe, and the white-box scores its training reports (``hooks.watch``)
equal the ones computed from the saved weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlaudit.audit.scores import update_scores
from mlaudit.data import DatasetSpec, load_dataset
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.experiments.dp_audit import _model_fn
from mlaudit.train.checkpoint import load_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
SYN = {"name": "synthetic", "options": {"n_train": 512, "n_test": 64, "shape": [3, 16, 16], "num_classes": 4}}


def test_fast_cnn_audit_on_cuda_takes_the_loop_and_reports_its_scores(tmp_path: Path) -> None:
    cfg = {"kind": "dp-audit", "dataset": SYN, "model": {"name": "fastcnn", "norm": "group", "width": 8},
           "recipe": {"name": "fast", "epochs": 2, "batch_size": 64, "dp": {"epsilon": 4.0, "delta": 1e-5, "clip": 1.0}},
           "canary": "gradient", "models_per_side": 12, "save_models": True, "seed": 0}
    r = run_experiment(cfg, out=tmp_path / "o", device="cuda", store=tmp_path / "s.db", quiet=True).results
    rows = r["trials"]
    assert {t["stack_layout"] for t in rows} == {"loop"}
    data = load_dataset(DatasetSpec(**SYN))
    canary = type("C", (), {"gradient": type("G", (), {"parameter": r["metrics"]["canary"]["parameter"],
                                                        "coordinate": r["metrics"]["canary"]["coordinate"]})()})()
    paths = [tmp_path / "o" / t["checkpoint"] for t in rows]
    want = update_scores(_model_fn(parse_config(r["config"]), data), [t["seed"] for t in rows],
                         lambda i: load_checkpoint(paths[i]), canary, device="cuda")  # type: ignore[arg-type]
    np.testing.assert_allclose([t["canary_score"] for t in rows], want, rtol=0, atol=1e-12)
