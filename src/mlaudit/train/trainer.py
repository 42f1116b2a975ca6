"""The trainer seam: every experiment kind trains its models through the factory (``trainer:
mlaudit``, the default) or through the user's own training function (``trainer:
"package.module:train"``), as LeakPro's input handler makes the user's training the seam of every
attack.

A user trainer has one of two signatures (checked before any work starts):

* **trains the model it is given** (preferred)::

      def train(model: nn.Module, train_set: torch.utils.data.TensorDataset, *, seed: int,
                device: torch.device, recipe: Recipe, classes: tuple[str, ...]) -> nn.Module | None

  ``model`` is a fresh instance of the config's ``model`` (its initial weights drawn with ``seed``,
  on ``device``). ``train_set`` is a plain ``torch.utils.data.TensorDataset(x, y)`` on the CPU: x
  float32 [N, *shape], y int64 [N] — the trial's own training set (poisoned, with a canary, or a
  random half: mlaudit applies the view and the subset). The keyword arguments are optional:
  mlaudit passes only those the function declares. Return the trained model (or None when trained
  in place).
* **builds its own model** (``train(dataset, seed) -> nn.Module``): the returned module's weights
  must fit the config's ``model``.

For convenience the dataset also carries ``.x``, ``.y`` (its two tensors) and ``.classes``.

mlaudit seeds torch's CPU and CUDA generators with ``seed`` around the call (restoring them after),
then checks the result: an ``nn.Module`` whose weights fit the config's model, are finite, and
changed from the initial ones (an untrained model is refused), and whose outputs are logits
[N, num_classes]. A failed check is a :class:`~mlaudit.errors.TrainingError` for that trial.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, TrainingError
from ..imports import accepted_kwargs, is_import_string, resolve_import

OPTIONAL_ARGS = ("seed", "device", "recipe", "classes")
"""Keyword arguments a model-training user trainer may declare."""


class UserTrainer:
    """A user's training function, imported and its signature checked (``ConfigError`` otherwise)."""

    def __init__(self, spec: str) -> None:
        if not is_import_string(spec):
            raise ConfigError(f"trainer = {spec!r} is neither 'mlaudit' nor an import string "
                              "'package.module:function' (see docs/bring_your_own.md)")
        self.spec = spec
        self.fn: Callable[..., Any] = resolve_import(spec, what="trainer")
        if isinstance(self.fn, type) or not callable(self.fn):
            raise ConfigError(f"trainer {spec!r} is a {type(self.fn).__name__}, not a function; it must be "
                              "train(model, train_set, *, seed, device) -> nn.Module")
        self.builds_model = _builds_model(self.fn, spec)

    def __call__(self, model: nn.Module, train_set: torch.utils.data.TensorDataset, *, seed: int,
                 device: torch.device, recipe: Any, classes: tuple[str, ...]) -> nn.Module:
        if self.builds_model:
            out = self.fn(train_set, seed)
        else:
            extra = accepted_kwargs(self.fn, {"seed": seed, "device": device, "recipe": recipe, "classes": classes})
            out = self.fn(model, train_set, **extra)
            out = model if out is None else out
        if not isinstance(out, nn.Module):
            raise TrainingError(f"trainer {self.spec!r} returned {type(out).__name__}, not a torch.nn.Module "
                                f"(seed {seed})", seed=seed)
        return out


def _builds_model(fn: Callable[..., Any], spec: str) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        raise ConfigError(f"trainer {spec!r}: its signature cannot be read; wrap it in a Python function") from None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional and positional[0].name == "model" and len(positional) >= 2:
        required = [p.name for p in params[2:] if p.default is p.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in OPTIONAL_ARGS]
        if required:
            raise ConfigError(f"trainer {spec!r} requires {', '.join(required)}, which mlaudit does not pass; it "
                              f"may declare only {', '.join(OPTIONAL_ARGS)} after (model, train_set)")
        return False
    if len(positional) == 2 and positional[1].name == "seed":
        return True
    got = f"({', '.join(p.name for p in params)})"
    raise ConfigError(f"trainer {spec!r} has the signature {got}; it must be train(model, train_set, *, seed, "
                      "device) -> nn.Module (or train(dataset, seed) -> nn.Module when it builds the model)")


def train_set_for(x: Tensor, y: Tensor, classes: tuple[str, ...]) -> torch.utils.data.TensorDataset:
    """A plain torch TensorDataset(x, y) on the CPU, with ``.x``, ``.y`` and ``.classes`` as well."""
    ds = torch.utils.data.TensorDataset(x.detach().cpu(), y.detach().cpu())
    ds.x, ds.y, ds.classes = ds.tensors[0], ds.tensors[1], tuple(classes)  # type: ignore[attr-defined]
    return ds


def run_user_trainer(trainer: UserTrainer, model_fn: Callable[[], nn.Module], x: Tensor, y: Tensor, *,
                     classes: tuple[str, ...], seed: int, device: torch.device, recipe: Any
                     ) -> tuple[nn.Module, float]:
    """Train one model with the user's function and check the result; returns (the trained model as a
    fresh instance of the config's architecture holding the returned weights, on the CPU, and the
    wall seconds of the call).

    ``model_fn`` builds the config's model; it is called under ``torch.manual_seed(seed)`` for the
    model handed to the trainer and again for the reference the result is checked against (the one
    fit check, :func:`mlaudit.query.fit_weights`). Raises :class:`TrainingError` (carrying ``seed``)
    for every failed check.
    """
    from .loop import init_models  # the factory's seeded construction

    model, reference = init_models(model_fn, [seed, seed])
    initial = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    model = model.to(device)
    devices = [device] if device.type == "cuda" else []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            out = trainer(model, train_set_for(x, y, classes), seed=seed, device=device, recipe=recipe,
                          classes=classes)
        except (TrainingError, ConfigError):
            raise
        except Exception as e:  # noqa: BLE001 - the user's training code
            raise TrainingError(f"trainer {trainer.spec!r} raised {type(e).__name__}: {e} (seed {seed})",
                                seed=seed) from e
    wall = time.perf_counter() - t0
    state = {k: v.detach().cpu() for k, v in out.state_dict().items()}
    _check_trained(trainer.spec, reference, state, initial, seed)
    return reference, wall


def _check_trained(spec: str, reference: nn.Module, state: dict[str, Tensor], initial: dict[str, Tensor],
                   seed: int) -> None:
    """Load ``state`` into ``reference`` through the one fit check; refuse NaN/inf or unchanged weights."""
    from ..query.load import fit_weights

    try:
        fit_weights(reference, state, source=f"the model trainer {spec!r} returned (seed {seed})",
                    what="the config's model", hint="set model: to the architecture your trainer trains")
    except ConfigError as e:
        raise TrainingError(str(e), seed=seed) from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(f"trainer {spec!r} returned non-finite (NaN/inf) weights in {bad[:5]} (seed {seed}); "
                            "lower the learning rate or check the data", seed=seed)
    if all(torch.equal(state[k], initial[k]) for k in initial):
        raise TrainingError(f"trainer {spec!r} returned the model with its initial weights unchanged (seed {seed}); "
                            "did it train? (train the model it is given, or return the trained one)", seed=seed)
