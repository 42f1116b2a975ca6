"""DP-auditing canaries: what D' = D + {canary} adds, for the distinguishing game of
:mod:`mlaudit.audit.game`, scored by :mod:`mlaudit.audit.scores`.

Canaries are registered in :data:`CANARIES` as ``make(train, *, seed, model_fn=None, device="cpu")
-> Canary`` (``model_fn`` builds a freshly initialised model of the audited architecture; only the
white-box canary needs it):

``mislabeled``  a natural training example inserted once more with a wrong label (black box).
``crafted``     an input-space canary in the spirit of ClipBKD (Jagielski, Ullman & Oprea, "Auditing
                differentially private machine learning: how private is private SGD?", NeurIPS
                2020): an input in a direction of low variance of the training data, so that the
                other examples' gradients barely move the model along it and its own (clipped)
                gradient is not drowned out. ClipBKD takes the right singular vector of the data with
                the smallest singular value; that vector is not an image (it has negative entries),
                so mlaudit solves the box-constrained version with the crafting engine
                (:func:`mlaudit.craft.craft`, :class:`~mlaudit.craft.constraints.Box`) from seeded
                uniform random images (2 restarts; not from a natural image, where the pixels the data
                leaves at 0 are saddle points at 0): minimise J(x) = R(x) / R_bar - beta ||x||^2 / d over x in [0, 1]^d,
                with R(x) = mean_i <x_i, x>^2 / ||x||^2 the Rayleigh quotient of the data's
                second-moment matrix, R_bar its mean over training images and beta = 0.1 a small
                reward for a large input (among directions the data leaves empty, the brightest),
                then scale x so that its brightest pixel is 1. The label is a seeded class.
``blank``       the all-zero input (Annamalai & De Cristofaro, "Nearly Tight Black-Box Auditing of
                Differentially Private Machine Learning", NeurIPS 2024, their ``blank`` target): far from
                every natural image, so the other examples do not pull the model's output on it in
                any one direction. Its label is the class the audited model's initialisation (the
                worst-case initialisation under ``worst_case_init``, else a model built under the
                seed) gives the lowest logit, as their ``choose_worstcase_label``: the largest loss and
                so the largest (clipped) gradient; without a model (a user's trainer) the last class.
``gradient``    the white-box Dirac canary of Nasr et al., "Tight auditing of differentially private
                machine learning" (USENIX Security 2023): no input at all, but a gradient C * e_j
                added to the clipped-gradient sum in every step in which the canary is Poisson-sampled
                (:class:`mlaudit.train.hooks.GradientCanary`). j is the parameter coordinate with
                the least gradient energy sum_i g_ij^2 over (up to) 2048 seeded training examples at
                a seeded initialisation (ties broken with the seed), so that the data hardly moves it.

Many canaries for one training run (the one-run audit, :mod:`mlaudit.audit.one_run`) are registered in
:data:`CANARY_SETS` as ``make(train, *, m, seed) -> CanarySet``:

``mislabeled``  m distinct training examples (a seeded choice), each inserted once more with its own
                seeded wrong label: the ``mislabeled`` canary m times.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..craft import craft
from ..craft.constraints import Box
from ..data.base import TensorDataset
from ..errors import ConfigError
from ..privacy.dpsgd import per_example_grads
from ..registry import Registry
from ..train.hooks import GradientCanary
from ..train.stacked import StackedModels

TRAINER_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

ModelFn = Callable[[], nn.Module]


@dataclass(frozen=True)
class Canary:
    """What D' = D + {canary} adds: ``x`` float32 [1, *shape] with label ``y`` (for the gradient
    canary a placeholder that is never used as an input), where it came from (``source_index`` into
    the training split and its true label ``source_label``; -1 when it is not a training example),
    ``gradient`` (the Dirac canary, else None) and ``details`` (how it was made, for the report)."""

    x: Tensor
    y: int
    source_index: int
    source_label: int
    gradient: GradientCanary | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def has_input(self) -> bool:
        """False for the gradient canary: it has no input a black-box score could query."""
        return self.gradient is None


CANARIES: Registry[Callable[..., Canary]] = Registry("canary")


def _white_box_model(canary: str, model_fn: ModelFn | None, seed: int, alternatives: str) -> nn.Module:
    """The model a white-box canary is placed in, built under ``seed`` without touching the global RNG."""
    if model_fn is None:
        raise ConfigError(f"canary {canary} is a white-box canary injected into mlaudit's DP-SGD step; it needs "
                          f"trainer: mlaudit (a user trainer can be audited with canary {alternatives})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_fn()


def _parameter_coordinate(model: nn.Module, energy: list[Tensor], pick: int) -> tuple[str, int]:
    """(parameter name, flat coordinate in it) of index ``pick`` into the concatenation of ``energy`` (one
    tensor per parameter of ``model``, in ``named_parameters()`` order)."""
    ends = np.cumsum([e.numel() for e in energy])
    pos = int(np.searchsorted(ends, pick, side="right"))
    return [n for n, _ in model.named_parameters()][pos], pick - int(ends[pos - 1] if pos else 0)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 0x43414E]))


@CANARIES.register("mislabeled")
def mislabeled_canary(train: TensorDataset, *, seed: int, model_fn: ModelFn | None = None,
                      device: str | torch.device = "cpu") -> Canary:
    """A training example chosen with ``seed``, relabelled to a different class chosen with ``seed``."""
    c = len(train.classes)
    if c < 2:
        raise ConfigError(f"canary mislabeled needs >= 2 classes, the dataset has {c}")
    rng = _rng(seed)
    i = int(rng.integers(len(train)))
    y = int(train.y[i])
    wrong = (y + 1 + int(rng.integers(c - 1))) % c
    return Canary(train.x[i : i + 1].clone(), wrong, i, y, details={"type": "mislabeled"})


@CANARIES.register("blank")
def blank_canary(train: TensorDataset, *, seed: int, model_fn: ModelFn | None = None,
                 device: str | torch.device = "cpu") -> Canary:
    """The all-zero input x [1, *shape] labelled with the class of lowest logit of the model ``model_fn``
    builds under ``seed`` (its ``model.init`` weights when set, e.g. the worst-case initialisation), or the
    last class without ``model_fn`` (see the module docstring)."""
    c = len(train.classes)
    if c < 2:
        raise ConfigError(f"canary blank needs >= 2 classes, the dataset has {c}")
    x = torch.zeros(1, *train.shape)
    if model_fn is None:
        return Canary(x, c - 1, -1, -1, details={"type": "blank", "label_rule": "last class (no model to ask)"})
    model = _white_box_model("blank", model_fn, seed, "").eval()
    with torch.no_grad():
        logits = model.to(device)(x.to(device)).float()[0].cpu()
    label = int(logits.argmin())
    return Canary(x, label, -1, -1, details={"type": "blank", "label_rule": "lowest logit of the initial model",
                                             "initial_logit": float(logits[label]),
                                             "initial_loss": float(torch.nn.functional.cross_entropy(
                                                 logits[None], torch.tensor([label])))})


@dataclass(frozen=True)
class CanarySet:
    """m canaries of a one-run audit: inputs ``x`` float32 [m, *shape] with labels ``y`` int64 [m], where
    each came from (``source_index`` / ``source_label`` int64 [m] into the training split, -1 when not a
    training example) and ``details`` for the report."""

    x: Tensor
    y: Tensor
    source_index: np.ndarray
    source_label: np.ndarray
    details: dict[str, Any] = field(default_factory=dict)
    gradients: tuple[GradientCanary, ...] = ()
    """Dirac canaries (``dirac``): canary k's gradient is C e_j on its own (parameter, coordinate); the
    ``index`` fields are placeholders (k), set to the inserted rows' virtual indices at training time."""

    def __len__(self) -> int:
        return int(self.y.numel())


CANARY_SETS: Registry[Callable[..., CanarySet]] = Registry("one-run canary")


@CANARY_SETS.register("mislabeled")
def mislabeled_canaries(train: TensorDataset, *, m: int, seed: int) -> CanarySet:
    """``m`` distinct training examples chosen with ``seed``, each relabelled to its own wrong class
    chosen with ``seed`` (the originals stay in the data: inserting a canary adds the relabelled copy)."""
    c, n = len(train.classes), len(train)
    if c < 2:
        raise ConfigError(f"canary mislabeled needs >= 2 classes, the dataset has {c}")
    if not 1 <= m <= n:
        raise ConfigError(f"canaries = {m} mislabeled canaries need as many distinct training examples, and the "
                          f"training split has {n}; allowed 1 <= canaries <= {n}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x43414E, 0x4D414E59]))
    idx = np.sort(rng.choice(n, size=m, replace=False))
    true = train.y[torch.as_tensor(idx, device=train.y.device)].cpu().numpy().astype(np.int64)
    wrong = (true + 1 + rng.integers(c - 1, size=m)) % c
    x = train.x[torch.as_tensor(idx, device=train.x.device)].cpu().clone()
    return CanarySet(x, torch.as_tensor(wrong, dtype=torch.int64), idx.astype(np.int64), true,
                     details={"type": "mislabeled"})


@CANARY_SETS.register("dirac")
def dirac_canaries(train: TensorDataset, *, m: int, seed: int, model_fn: ModelFn | None = None,
                   device: str | torch.device = "cpu", examples: int = 2048) -> CanarySet:
    """``m`` Dirac gradient canaries for a one-run white-box audit (Steinke, Nasr & Jagielski 2023, sec. 6;
    the canary of Nasr et al. 2023): placeholder examples (zero inputs) whose gradient, when sampled, is
    C e_j on m distinct coordinates j of the model ``model_fn`` builds, the m of least gradient energy
    over (up to ``examples`` seeded) training examples at the seeded initialisation (ties broken by a
    seeded shuffle), so the data add as little as possible to the canaries' coordinates."""
    model = _white_box_model("dirac", model_fn, seed, "mislabeled")
    rng = _rng(seed)
    named = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    total = sum(k for _, k in named)
    if not 1 <= m <= total:
        raise ConfigError(f"canaries = {m} Dirac canaries need as many distinct parameter coordinates, and the model "
                          f"has {total}; allowed 1 <= canaries <= {total}")
    energy = coordinate_energy(model, train, rng.permutation(len(train))[:examples], device=device)
    flat = torch.cat([e.flatten() for e in energy]).double()
    order = np.lexsort((rng.permutation(len(flat)), flat.numpy()))[:m]  # least energy, seeded tie-break
    grads = [GradientCanary(k, *_parameter_coordinate(model, energy, pick)) for k, pick in enumerate(order.tolist())]
    return CanarySet(torch.zeros(m, *train.shape), torch.zeros(m, dtype=torch.int64), np.full(m, -1, dtype=np.int64),
                     np.full(m, -1, dtype=np.int64), details={"type": "dirac", "max_gradient_energy": float(flat[order].max()),
                                                           "mean_gradient_energy": float(flat.mean())},
                     gradients=tuple(grads))


def second_moment_quotient(x: Tensor, data: Tensor) -> Tensor:
    """R(x) = mean_i <x_i, x>^2 / ||x||^2 per row: x [B, *shape], data [n, *shape] -> [B]."""
    v = x.flatten(1)
    return (v @ data.flatten(1).T).pow(2).mean(1) / v.pow(2).sum(1).clamp_min(1e-12)


@CANARIES.register("crafted")
def crafted_canary(train: TensorDataset, *, seed: int, model_fn: ModelFn | None = None,
                   device: str | torch.device = "cpu", steps: int = 200, max_examples: int = 4096,
                   beta: float = 0.1) -> Canary:
    """ClipBKD-style input canary (see the module docstring): a [0, 1] input minimising the second-moment
    Rayleigh quotient of (up to ``max_examples`` seeded) training inputs minus ``beta`` ||x||^2 / d,
    found with :func:`craft` (signed Adam, ``steps`` steps, cosine schedule, 2 seeded uniform random
    starts), scaled to a brightest pixel of 1; label a seeded class."""
    c = len(train.classes)
    if c < 2:
        raise ConfigError(f"canary crafted needs >= 2 classes, the dataset has {c}")
    rng = _rng(seed)
    label = int(rng.integers(c))
    sub = torch.as_tensor(rng.permutation(len(train))[:max_examples], device=train.device)
    data = train.x[sub].to(device).float()
    r_bar = float(second_moment_quotient(data[:256], data).mean())
    d = data[0].numel()

    def objective(xa: Tensor, _idx: Tensor) -> Tensor:
        return second_moment_quotient(xa, data) / r_bar - beta * xa.flatten(1).pow(2).sum(1) / d

    x0 = data.mean(0, keepdim=True)  # any point: the restarts start from uniform random images
    res = craft(objective, x0, constraint=Box(), steps=steps, optimizer="signed-adam", lr=0.05, schedule="cosine",
                init="random", restarts=2, generator=torch.Generator(device=torch.device(device)).manual_seed(seed))
    x = (x0 + res.delta).clamp(0, 1)
    top = float(x.max())
    if top <= 0:  # R is undefined at 0, so the optimiser does not end there; never divide by it anyway
        raise ConfigError("canary crafted: the optimised input is all zeros; use canary mislabeled")
    x = (x / top).clamp(0, 1)
    return Canary(x.cpu(), label, -1, -1, details={
        "type": "crafted", "quotient": float(second_moment_quotient(x, data)), "quotient_mean_example": r_bar,
        "norm": float(x.norm()), "pixels_on": int((x > 0.5).sum())})


@CANARIES.register("gradient")
def gradient_canary(train: TensorDataset, *, seed: int, model_fn: ModelFn | None = None,
                    device: str | torch.device = "cpu", examples: int = 2048) -> Canary:
    """The Dirac gradient canary (white box, see the module docstring) for the model ``model_fn``
    builds; its placeholder example is the first inserted one (virtual index len(train))."""
    model = _white_box_model("gradient", model_fn, seed, "mislabeled, crafted or blank")
    rng = _rng(seed)
    energy = coordinate_energy(model, train, rng.permutation(len(train))[:examples], device=device)
    flat = torch.cat([e.flatten() for e in energy])
    lo = float(flat.min())
    ties = (flat <= lo + 1e-12 * max(float(flat.max()), 1.0)).nonzero().flatten()
    pick = int(ties[int(rng.integers(len(ties)))])
    name, coord = _parameter_coordinate(model, energy, pick)
    g = GradientCanary(index=len(train), parameter=name, coordinate=coord)
    x = torch.zeros(1, *train.shape)
    return Canary(x, 0, -1, -1, gradient=g, details={
        "type": "gradient", "parameter": g.parameter, "coordinate": coord, "gradient_energy": lo,
        "tied_coordinates": len(ties), "mean_gradient_energy": float(flat.mean())})


def coordinate_energy(model: nn.Module, train: TensorDataset, rows: Sequence[int], *,
                      device: str | torch.device = "cpu") -> list[Tensor]:
    """sum_i g_i^2 per parameter coordinate over the training examples ``rows`` (per-example
    cross-entropy gradients at the model's weights): one CPU tensor per parameter, its shape."""
    idx = torch.as_tensor(np.asarray(rows), dtype=torch.long).to(train.device)
    total: list[Tensor] | None = None
    for grads in per_example_grad_chunks(model, train.x[idx], train.y[idx], device=device):
        sq = [g.float().pow(2).sum(0) for g in grads]
        total = sq if total is None else [a + b for a, b in zip(total, sq)]
    assert total is not None
    return [t.cpu() for t in total]


def per_example_grad_chunks(model: nn.Module, x: Tensor, y: Tensor, *, device: str | torch.device = "cpu"
                            ) -> Iterator[list[Tensor]]:
    """Per-example cross-entropy gradients of ``model`` at its weights on x [n, *shape], y [n], a chunk of
    examples at a time (<= ~200 MB of gradients): per chunk, one tensor [b, *shape] per parameter
    (``named_parameters()`` order), on ``device``."""
    dev = torch.device(device)
    stack = StackedModels.from_modules([model], dev, strategy="vmap")
    nparams = sum(p.numel() for p in model.parameters())
    chunk = max(1, min(64, int(5e7 // max(nparams, 1))))
    for s in range(0, len(y), chunk):
        (grads, _), = per_example_grads(stack, x[s : s + chunk].to(dev)[None], y[s : s + chunk].to(dev)[None])
        yield [g[0] for g in grads]


def with_canary(train: TensorDataset, canary: Canary) -> TensorDataset:
    """D' = ``train`` with ``canary`` appended (N + 1 examples); input canaries only."""
    if not canary.has_input:
        raise ConfigError("the gradient canary has no input to append to a dataset; it needs trainer: mlaudit")
    y = torch.tensor([canary.y], dtype=torch.int64, device=train.y.device)
    return TensorDataset(torch.cat([train.x, canary.x.to(train.x.device)]), torch.cat([train.y, y]), train.classes)


def load_trainer(spec: str) -> Callable[[TensorDataset, int], nn.Module]:
    """Import the user's ``"package.module:function"``; a ConfigError naming what failed otherwise."""
    if not TRAINER_PATTERN.match(spec):
        raise ConfigError(f"trainer = {spec!r} is neither 'mlaudit' nor 'package.module:function' (a function "
                          "train(dataset: mlaudit.data.base.TensorDataset, seed: int) -> torch.nn.Module)")
    mod_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise ConfigError(f"trainer {spec!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e}); "
                          "make it importable (install it, or put its folder on PYTHONPATH)") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"trainer {spec!r}: module {mod_name!r} has no function {fn_name!r}; it must define "
                          "train(dataset, seed) -> torch.nn.Module")
    return fn
