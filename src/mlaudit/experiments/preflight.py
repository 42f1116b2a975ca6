"""Checks before anything is written: the device exists, the dataset loads, the model builds and
runs on two inputs, the user's trainer imports with a usable signature (the first place user code
runs), and every DP recipe the kind will train with is usable (no BatchNorm, a finite and reachable
epsilon). The runner calls :func:`check_device` and :func:`preflight` before it creates the output
folder or a store row."""

from __future__ import annotations

import math
import re
import warnings

import torch

from ..data.base import DataBundle
from ..errors import ConfigError, UnsupportedModelError
from ..factory.spec import resolve_device
from ..models.registry import ModelSpec, build_model
from ..train.recipe import Recipe
from .base import ExperimentConfig

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(device: str) -> str:
    """Validate ``auto``/``cpu``/``cuda[:N]`` and resolve ``auto``; returns e.g. ``"cpu"``, ``"cuda"``."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    dev = str(resolve_device(device))
    if dev.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA device; "
                              "use --device cpu or --device auto")
        index = int(dev.split(":")[1]) if ":" in dev else 0
        if index >= n:
            raise ConfigError(f"device {device!r}: there are {n} CUDA devices (cuda:0 to cuda:{n - 1})")
    return dev


def preflight(cfg: ExperimentConfig, data: DataBundle | None = None) -> DataBundle:
    """Load the config's dataset (unless given), build its model (and a poisoning kind's victim model)
    once for that data and run it on two inputs, and import the user's trainer and check its signature, so that missing or corrupt files,
    import strings that do not resolve and model/data mismatches are reported before anything is
    written. This is the first place user code (import strings) is imported. Returns the data."""
    from ..data.registry import load_dataset
    from ..models.registry import check_output, check_sequence_output
    from ..train.trainer import UserTrainer

    data = load_dataset(cfg.dataset) if data is None else data
    # the poisoning kinds' victims may have their own architecture, init file (sha256) and frozen part
    for spec in dict.fromkeys([cfg.model, getattr(cfg, "victim_model", cfg.model)]):
        with torch.random.fork_rng(devices=[]):
            model = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)
            check = check_sequence_output if cfg.sequence_model else check_output
            check(model, input_shape=data.input_shape, num_classes=spec.num_classes or data.num_classes,
                  name=spec.name)
    if cfg.user_trainer is not None:
        UserTrainer(cfg.user_trainer)
    for where, spec, recipe in dp_trainings(cfg):
        check_dp_recipe(where, spec, recipe, data, extra=getattr(getattr(cfg, "attack", None), "eps_d", None))
    return data


def dp_trainings(cfg: ExperimentConfig) -> list[tuple[str, ModelSpec, Recipe]]:
    """(recipe field, architecture, recipe) of every model the kind trains with mlaudit's DP-SGD: the
    config's models, or for the poisoning kinds the victims and the factory-trained crafting models."""
    if cfg.trainer != "mlaudit":
        return []  # the user's trainer does its own training (dp-audit: recipe.dp states the claim)
    victim = getattr(cfg, "victim", None)
    if victim is None:
        found = [("recipe", cfg.model, cfg.recipe)]
    else:
        from ..attacks.poisoning.contract import Needs

        found = [("victim.recipe" if victim.recipe else "recipe", victim.model or cfg.model, victim.recipe or cfg.recipe)]
        crafting = cfg.crafting  # type: ignore[attr-defined]
        if Needs.CRAFTING_MODELS in cfg.attack.entry.needs and cfg.crafting_checkpoint is None:  # type: ignore[attr-defined]
            found += [("crafting.recipe" if crafting.recipe else "recipe", spec, crafting.recipe or cfg.recipe)
                      for spec in dict.fromkeys(crafting.specs(cfg.model))]
    return [f for f in found if f[2].dp is not None]


def check_dp_recipe(where: str, spec: ModelSpec, recipe: Recipe, data: DataBundle, *, extra: float | None = None) -> None:
    """Before anything is written: the architecture has no BatchNorm and a target ``dp.epsilon`` is
    finite and reachable (even sigma = MAX_NOISE_MULTIPLIER gives less) with q and steps for the largest
    training set the kind uses (N, or N (1 + ``extra``) with inserted poisons), so that a refusal here
    is one that training would make too (training checks each model's own set, and delta, again)."""
    from ..privacy.accountant import MAX_NOISE_MULTIPLIER, epsilon
    from ..privacy.dpsgd import check_dp_model
    from ..query import model_template

    dp = recipe.dp
    assert dp is not None
    try:
        check_dp_model([model_template(spec, data)])
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{where}.dp with model {spec.name!r} (norm {spec.norm!r}): {e}") from None
    n = len(data.train)
    if dp.epsilon is None:
        return
    if not math.isfinite(dp.epsilon):
        raise ConfigError(f"{where}.dp.epsilon = {dp.epsilon}: a target epsilon must be a finite number > 0 "
                          "(for training without privacy drop the dp block)")
    n_max = n + math.ceil(n * extra) if extra else n
    q = dp.sample_rate if dp.sample_rate is not None else min(1.0, recipe.batch_size / n_max)
    steps = recipe.epochs * (math.ceil(n_max / recipe.batch_size) if dp.sample_rate is None
                             else max(1, math.ceil(1.0 / dp.sample_rate - 1e-9)))
    with warnings.catch_warnings():  # at this sigma the accountant's best order is its largest: expected here
        warnings.simplefilter("ignore")
        floor = epsilon(noise_multiplier=MAX_NOISE_MULTIPLIER, sample_rate=q, steps=steps, delta=dp.delta,
                        accountant=dp.accountant)
    if dp.epsilon < floor:
        raise ConfigError(f"{where}.dp.epsilon = {dp.epsilon:g} cannot be reached: with q = {q:.4g}, {steps} steps "
                          f"({recipe.epochs} epoch{'s' * (recipe.epochs != 1)} on {n_max} examples), delta = {dp.delta:g} and the {dp.accountant!r} "
                          f"accountant even sigma = {MAX_NOISE_MULTIPLIER:g} gives epsilon {floor:.4g}; ask for "
                          f"epsilon >= {floor:.3g}, or a larger delta")
