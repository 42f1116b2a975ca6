"""``mlaudit demo``: a short tour on scikit-learn's bundled digits, on CPU in a few minutes.

1. loads the embedded ``digits`` data (no download);
2. trains four target MLPs with the ``fast`` recipe through the experiment runner and the
   factory (batched), committing each to the run store and writing a report;
3. shows the library API on the same data: a 10% label-flip view of the training set and a victim
   retrained on it, to show how every attack is expressed as a view over clean data;
4. membership inference: a pool of 8 MLPs, each on a random half of the digits training split,
   attacked by LOSS and LiRA (online and offline), every model a target once (experiment kind
   ``membership-inference``; AUC and TPR at 1% FPR printed).
Later capabilities (poisoning, DP auditing) add their steps here.

Output: ``OUT/train/`` and ``OUT/membership/`` (config.yaml, results.json, report.html, artifacts/) and ``OUT/demo.json``
(the summary returned by :func:`run_demo`). Running the demo again into the same folder resumes
(finished models are not retrained).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from .data import load_dataset
from .data.view import DataView
from .errors import ConfigError
from .experiments import run_experiment
from .experiments.runner import write_atomic
from .models import build_model
from .store import RunStore
from .train import evaluate, train
from .train.loop import StackedModels

DEMO_CONFIG: dict[str, Any] = {"kind": "train", "name": "demo-digits-mlp", "dataset": "digits", "model": "mlp",
                               "recipe": "fast", "trials": 4, "seed": 0}
MEMBERSHIP_CONFIG: dict[str, Any] = {"kind": "membership-inference", "name": "demo-digits-membership",
                                     "dataset": "digits", "model": "mlp", "recipe": "fast",
                                     "pool": {"models": 8, "keep": 0.5},
                                     "attacks": ["loss", "lira-online", "lira-offline"], "n_boot": 100, "seed": 0}
_DEMO_PARTS = ("train", "membership", "demo.json")


def demo_config(*, epochs: int | None = None, kind: str = "train") -> dict[str, Any]:
    """The demo's experiment config of ``kind`` (``train`` or ``membership-inference``); ``epochs``
    overrides the recipe's (for quick smoke runs)."""
    cfg = dict(MEMBERSHIP_CONFIG if kind == "membership-inference" else DEMO_CONFIG)
    if epochs is not None:
        cfg["recipe"] = {"name": "fast", "epochs": epochs}
    return cfg


def run_demo(*, out: str | Path, store: RunStore | str | Path | None = None, quiet: bool = False,
             epochs: int | None = None) -> dict[str, Any]:
    """Run the tour into folder ``out``; returns a summary dict (also printed unless quiet).

    ``epochs`` shortens training (default: the ``fast`` recipe's 12 epochs). Raises
    :class:`ConfigError` when ``out`` holds something other than an earlier demo.
    """
    console = Console(quiet=quiet, highlight=False)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(p.name not in _DEMO_PARTS for p in out.iterdir())):
        raise ConfigError(f"demo output folder {str(out)!r} holds other files; choose another --out or empty it")
    cfg = demo_config(epochs=epochs)
    console.rule("mlaudit demo")
    console.print("Step 1/3: train 4 target models (digits, mlp, recipe 'fast') through the factory")
    res = run_experiment(cfg, out=out / "train", device="cpu", store=store, quiet=quiet,
                         resume=(out / "train" / "config.yaml").is_file())
    acc = res.results["metrics"]["test_accuracy"]
    console.print(Text(f"  test accuracy {acc['mean']:.4f} ± {acc['se']:.4f} over {acc['n']} models; "
                       f"report: {res.out_dir / 'report.html'}"))

    console.print("Step 2/3: the same data seen through a view: flip 10% of the training labels")
    data = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    n = len(data.train)
    idx = torch.randperm(n, generator=g)[: n // 10]
    new = (data.train.y[idx] + torch.randint(1, data.num_classes, (len(idx),), generator=g)) % data.num_classes
    view = DataView.identity(data.train).with_labels(idx, new)
    recipe = cfg["recipe"]
    flips: dict[str, float] = {}
    for label, v in (("clean", None), ("10% labels flipped", view)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            model = build_model("mlp", input_shape=data.input_shape, num_classes=data.num_classes)
        train(model, data, recipe, seed=1, view=v)
        acc_v = float(evaluate(StackedModels.from_modules([model], torch.device("cpu")), data.test)["accuracy"][0])
        flips[label] = acc_v
        console.print(f"  {label:>20}: test accuracy {acc_v:.4f}")
    membership = _membership_step(out, store=store, quiet=quiet, epochs=epochs, console=console)
    console.rule("done")
    summary = {"train": res.results["metrics"], "label_flip": flips, "membership": membership, "out": str(out),
               "experiment_id": res.experiment_id}
    write_atomic(out / "demo.json", json.dumps(summary, indent=2))
    return summary


def _membership_step(out: Path, *, store: RunStore | str | Path | None, quiet: bool, epochs: int | None,
                     console: Console) -> dict[str, Any]:
    """Step 3: the membership-inference pool; returns AUC and TPR at 1% FPR per attack."""
    cfg = demo_config(epochs=epochs, kind="membership-inference")
    console.print("Step 3/3: membership inference: 8 models, each on a random half of the training split; "
                  "every model is attacked with the other 7 as shadows")
    res = run_experiment(cfg, out=out / "membership", device="cpu", store=store, quiet=quiet,
                         resume=(out / "membership" / "config.yaml").is_file())
    summary: dict[str, Any] = {"experiment_id": res.experiment_id}
    for name in cfg["attacks"]:
        m = res.results["metrics"][name]
        summary[name] = {"auc": m["auc"]["value"], "tpr_at_1pct_fpr": m["tpr_at_fpr"]["0.01"]["value"]}
        console.print(f"  {name:>13}: AUC {summary[name]['auc']:.3f}, TPR at 1% FPR "
                      f"{100 * summary[name]['tpr_at_1pct_fpr']:.2f}%")
    console.print(Text(f"  report (ROC curves, log-log): {res.out_dir / 'report.html'}"))
    return summary
