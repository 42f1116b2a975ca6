"""What the public entry points share (:mod:`mlaudit.membership`, :mod:`mlaudit.poison`,
:func:`mlaudit.privacy.audit`, :func:`train_models`): turn the user's Python objects into a validated
experiment config and run it through the one runner, so a library call and ``mlaudit run`` give
the same run folder, run store rows, resume and ``report.html``.

Objects map to config fields like this:

* ``model``: a zoo name or mapping, an import string, or a class/function defined at the top level
  of a module (it becomes the import string ``module:Name``, which travels to process/Ray workers);
* ``data``: a registry name or mapping, an import string, a top-level function (called with no
  arguments, or ``data_options``), or the data itself: ``(train, test)`` splits of ``(x, y)``
  tensors or map-style ``torch.utils.data.Dataset``, one such split, or a ``DataBundle``
  (:mod:`mlaudit.data.user`). Data given as objects is converted once and fingerprinted: its config
  names it ``memory:<fingerprint>`` and the tensors travel with the jobs;
* ``trainer``: ``None``/``"mlaudit"`` for the factory, an import string, or a top-level function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .data.base import DataBundle
from .errors import ConfigError
from .imports import import_string_of

ModelLike = str | dict[str, Any] | type[nn.Module] | Callable[..., nn.Module]
DataLike = Any
TrainerLike = str | Callable[..., Any] | None


@dataclass
class AuditResult:
    """A finished run: ``metrics`` (headline numbers with uncertainties), ``trials`` (one record per
    model or target), ``out_dir`` with ``report.html`` and ``results.json``, and its run-store id."""

    kind: str
    metrics: dict[str, Any]
    trials: list[dict[str, Any]]
    out_dir: Path
    experiment_id: str
    results: dict[str, Any]

    @property
    def report(self) -> Path:
        """The HTML report of the run."""
        return self.out_dir / "report.html"


def model_field(model: ModelLike) -> Any:
    """The config form of ``model`` (see the module docstring)."""
    if isinstance(model, (str, dict)):
        return model
    if isinstance(model, nn.Module):
        raise ConfigError("model: pass the architecture (a class or a function returning a new nn.Module), not "
                          "a module instance; mlaudit builds many fresh models from it (give a trained instance "
                          "as target=)")
    return import_string_of(model, what="model")


def trainer_field(trainer: TrainerLike) -> str:
    if trainer is None:
        return "mlaudit"
    if isinstance(trainer, str):
        return trainer
    return import_string_of(trainer, what="trainer")


def data_field(data: DataLike, *, options: dict[str, Any] | None = None) -> tuple[Any, DataBundle | None]:
    """``(config form, bundle or None)``: the bundle when ``data`` was given as objects."""
    if isinstance(data, dict) or (isinstance(data, str) and not data.startswith("memory:")):
        return data, None
    if callable(data) and not hasattr(data, "__getitem__") and not isinstance(data, DataBundle):
        spec: dict[str, Any] = {"name": import_string_of(data, what="data")}
        if options:
            spec["options"] = dict(options)
        return spec, None
    from .data.user import as_bundle

    bundle = as_bundle(data, name="memory")
    name = f"memory:{bundle.train.fingerprint()}{bundle.test.fingerprint()}"
    return {"name": name}, DataBundle(name, bundle.train, bundle.test, {**bundle.meta, "format": "memory"})


def run_kind(kind: str, *, model: ModelLike, data: DataLike, trainer: TrainerLike, recipe: Any, out: str | Path,
             device: str, seed: int, executor: str, store: str | Path | None, resume: bool, quiet: bool,
             data_options: dict[str, Any] | None = None, **fields: Any) -> AuditResult:
    """Build the ``kind`` config from objects and fields, run it into ``out`` and return its result."""
    from .experiments.runner import run_experiment

    dataset, bundle = data_field(data, options=data_options)
    raw = {"kind": kind, "dataset": dataset, "model": model_field(model), "recipe": recipe,
           "trainer": trainer_field(trainer), "seed": seed, **{k: v for k, v in fields.items() if v is not None}}
    res = run_experiment(raw, out=out, device=device, executor=executor, store=store, resume=resume, quiet=quiet,
                         data=bundle)
    return AuditResult(kind, res.results["metrics"], res.results["trials"], res.out_dir, res.experiment_id,
                       res.results)


def train_models(*, model: ModelLike, data: DataLike, trainer: TrainerLike = None, recipe: Any = "fast",
                 trials: int = 4, out: str | Path, device: str = "auto", seed: int = 0, executor: str = "local",
                 store: str | Path | None = None, resume: bool = False, quiet: bool = True) -> AuditResult:
    """Train ``trials`` models (the ``train`` kind): test accuracy mean +- SE, checkpoints, report."""
    return run_kind("train", model=model, data=data, trainer=trainer, recipe=recipe, out=out, device=device,
                    seed=seed, executor=executor, store=store, resume=resume, quiet=quiet, trials=trials)

