"""Noise, denoise, train, classify (NDTCLASSIFY; seed 004, Hong, "Provable guarantee against data
poisoning"): randomized smoothing (Cohen et al. 2019) lifted from the test input to the training data.

Each of M base models is trained on its own copy of the training set D to which fresh Gaussian noise
N(0, sigma^2 I) was added and then removed by a denoiser (the seed's pseudocode "Noise, denoise, train,
and classify", lines 1-8):

    for i in 1..n:  D_hat <- NOISEANDDENOISE(D, sigma);  f_i <- TRAIN(D_hat, f);  counts[f_i(x)] += 1

The ensemble's vote counts replace Cohen's noise samples in CERTIFY (the seed's pseudocode "Predict and
certify", lines 8-14): m0 models pick cA (lines 9-10), m further models count it (line 11),
pA_lower = LOWERCFBOUND(counts[cA], m, 1 - alpha) (line 12, the one-sided Clopper-Pearson bound of
:func:`mlaudit.stats.clopper_pearson`), and cA is certified with radius

    R = sigma * Phi^-1(pA_lower)        if pA_lower > 1/2, else ABSTAIN         (line 13)

The classifier x -> argmax_c P(TRAIN(denoise(D + eps))(x) = c), eps ~ N(0, sigma^2 I) over the whole
training set (flattened to one vector), is a smoothed function of D, so by Cohen et al.'s Theorem 1 its
prediction at x is unchanged for every poisoned training set D' with ||D' - D||_2 < R (the l2 norm of the
perturbation of *all* training inputs together, labels unchanged, no rows inserted or removed: a
clean-label perturbation budget). The denoiser and the [0, 1] clip below act after the noise, so they
are post-processing and do not affect the argument; the certificate holds with probability >= 1 - alpha
over the training randomness (as Cohen's CERTIFY over the noise). With the DDPM path the seed scales by
sqrt(alpha_t*) before denoising (GETTIMESTEP, lines 10-12); :class:`mlaudit.certify.DiffusionDenoiser`
does that scaling itself from sigma.

* :func:`ndt_inputs` — NOISEANDDENOISE of one model: x + N(0, sigma^2 I) from the model's own seed,
  denoised (``denoiser=None``: noise only, the seed's "Gaussian noising" baseline), clipped to [0, 1].
* :func:`ndt_view` / :func:`ndt_views` — that training set as a :class:`~mlaudit.data.view.DataView` of
  the clean split or of a poisoned view (its relabels, insertions and ``keep`` preserved; every row,
  inserted rows included, noised and denoised).
* :func:`ndt_trials` / :func:`train_ndt` — the M trials of one factory job (``<prefix>-m<i>`` on view
  ``<prefix>-m<i>``), trained by :func:`mlaudit.factory.train_many` (no other training loop).
* :func:`ndt_certify` (vote matrix) / :func:`certify_ensemble` (models) — PREDICT and CERTIFY over the
  ensemble via :func:`.smoothing.certify_from_counts` and :func:`.smoothing.predict_from_counts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..data.base import DataBundle, TensorDataset
from ..data.view import DataView
from ..errors import ConfigError
from ..factory import FactoryJob, TrainedModel, TrialSpec, train_many
from ..models.registry import ModelSpec, build_model
from ..query import forward_batched
from .partition import vote_counts
from .smoothing import Certificate, _check_alpha, _positive, certify_from_counts, predict_from_counts

if TYPE_CHECKING:
    from ..train import Recipe

__all__ = ["NDTResult", "certify_ensemble", "ensemble_votes", "ndt_certify", "ndt_inputs", "ndt_trials", "ndt_view",
           "ndt_views", "load_models", "train_ndt"]


@torch.no_grad()
def ndt_inputs(x: Tensor, *, sigma: float, seed: int, denoiser: nn.Module | None = None,
               batch_size: int = 512, clip: bool = True) -> Tensor:
    """NOISEANDDENOISE (seed 004, "Noise, denoise, train, and classify", line 5) of one model's training
    inputs ``x`` [N, *shape]: x + sigma * eps, eps ~ N(0, I) drawn on the CPU from a generator seeded
    with ``seed`` (one draw [N, *shape], so the noise of row j does not depend on the device or the batch
    size), passed through ``denoiser`` (eval mode, no gradient, in chunks of ``batch_size``; None = noise
    only) and clipped to [0, 1] (``clip``; post-processing). Returns float32 [N, *shape] on x's device."""
    _positive("sigma", sigma)
    _positive("batch_size", batch_size, integer=True)
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(x.shape, generator=gen, dtype=torch.float32)
    out = x.detach().float().cpu() + sigma * noise
    if denoiser is not None:
        out = forward_batched(denoiser, out, batch_size=batch_size, device=_device(denoiser, x)).float().cpu()
        if out.shape != x.shape:
            raise ConfigError(f"the denoiser maps inputs of shape {list(x.shape[1:])} to {list(out.shape[1:])}; it "
                              "must return inputs of the same shape")
    if clip:
        out = out.clamp_(0.0, 1.0)
    return out.to(x.device)


def _device(module: nn.Module, x: Tensor) -> torch.device:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else x.device


def ndt_view(source: DataView | TensorDataset, *, sigma: float, seed: int, denoiser: nn.Module | None = None,
             batch_size: int = 512) -> DataView:
    """One model's noised-then-denoised training set as a view of the clean split: every row of ``source``
    (the clean split, or a poisoned view of it: its perturbed and inserted rows as the attacker left them)
    replaced by :func:`ndt_inputs`; labels, insertions and ``keep`` as in ``source``."""
    view = source if isinstance(source, DataView) else DataView.identity(source)
    n = view.num_base
    x, y = view.gather(torch.arange(view.num_total, device=view.device), validate=False)
    xn = ndt_inputs(x, sigma=sigma, seed=seed, denoiser=denoiser, batch_size=batch_size)
    base = view.base
    out = DataView.identity(base).with_delta(torch.arange(n), xn[:n] - base.x, eps=None)
    out = out.with_labels(torch.arange(n), y[:n])
    if view.num_inserted:
        out = out.with_inserted(xn[n:], y[n:])
    if view.keep is not None:
        out = out.with_keep(view.keep)
    return out.with_meta(ndt={"sigma": float(sigma), "seed": int(seed), "denoised": denoiser is not None})


def ndt_views(source: DataView | TensorDataset, *, sigma: float, seeds: Sequence[int],
              denoiser: nn.Module | None = None, prefix: str = "ndt", batch_size: int = 512) -> dict[str, DataView]:
    """The M = len(seeds) training sets of NDTCLASSIFY, ``{"<prefix>-m<i>": view}``, model i's noise drawn
    from ``seeds[i]``. Raises :class:`ConfigError` on repeated seeds (two models with the same noise are
    not independent samples)."""
    if len(seeds) < 1:
        raise ConfigError("ndt_views needs at least one seed (M >= 1)")
    if len(set(int(s) for s in seeds)) != len(seeds):
        raise ConfigError("ndt_views needs distinct seeds: each model's noise must be drawn afresh")
    return {f"{prefix}-m{i:04d}": ndt_view(source, sigma=sigma, seed=int(s), denoiser=denoiser,
                                           batch_size=batch_size) for i, s in enumerate(seeds)}


def ndt_trials(views: dict[str, DataView], *, seeds: Sequence[int], tags: dict | None = None) -> list[TrialSpec]:
    """One trial per view (named as it), trained with ``seeds[i]`` (the same seed also drew its noise)."""
    if len(seeds) != len(views):
        raise ConfigError(f"ndt_trials needs one seed per view, got {len(seeds)} for {len(views)} views")
    return [TrialSpec(name, seed=int(s), view=name, tags={**dict(tags or {}), "model": i})
            for i, (name, s) in enumerate(zip(views, seeds))]


def train_ndt(model: ModelSpec | str, recipe: Recipe, data: DataBundle, *, sigma: float, seeds: Sequence[int],
              denoiser: nn.Module | None = None, source: DataView | None = None, device: str = "cpu",
              prefix: str = "ndt", executor: str = "local") -> list[TrainedModel]:
    """NDTCLASSIFY's training (seed 004, lines 3-6): M = len(seeds) models, model i trained through the
    factory on :func:`ndt_view` of ``source`` (default: the clean training split of ``data``) with noise
    seed and training seed ``seeds[i]``. Returns the factory's models in order."""
    views = ndt_views(source if source is not None else data.train, sigma=sigma, seeds=seeds, denoiser=denoiser,
                      prefix=prefix)
    spec = model if isinstance(model, ModelSpec) else ModelSpec(name=model)
    job = FactoryJob(model=spec, recipe=recipe, data=data, trials=tuple(ndt_trials(views, seeds=seeds)),
                     views=views, device=device)
    return train_many(job, executor=executor)


@torch.no_grad()
def ensemble_votes(models: Sequence[nn.Module], x: Tensor, *, batch_size: int = 1000) -> Tensor:
    """int64 [M, B]: each model's class for each input (eval mode, no gradient)."""
    if not models:
        raise ConfigError("the ensemble is empty")
    preds = []
    for m in models:
        preds.append(forward_batched(m, x, batch_size=batch_size, device=_device(m, x)).argmax(-1).cpu())
    return torch.stack(preds).long()


@dataclass(frozen=True, eq=False)
class NDTResult:
    """PREDICT and CERTIFY of the NDT ensemble for B inputs: ``certificate`` (CERTIFY: prediction int64
    [B], -1 = abstain, radius float64 [B] in the training data's l2 units, pa_lower, counts of the m
    estimation models, selection_counts of the m0 selection models); ``prediction`` int64 [B] of PREDICT
    over all M models (-1 where the binomial test does not reject at alpha) and ``votes`` int64 [M, B]."""

    certificate: Certificate
    prediction: Tensor
    votes: Tensor

    @property
    def abstained(self) -> Tensor:
        """bool [B]: where CERTIFY abstained."""
        return self.certificate.abstained

    @property
    def radius(self) -> Tensor:
        return self.certificate.radius


def ndt_certify(votes: Tensor, num_classes: int, *, sigma: float, alpha: float, n0: int = 1) -> NDTResult:
    """PREDICT and CERTIFY of seed 004 ("Predict and certify", lines 1-14) from the ensemble's votes int
    [M, B]: the first ``n0`` models are the selection samples (m0, lines 9-10: cA = their top class), the
    other m = M - n0 the estimation samples (lines 11-13); PREDICT (lines 1-6) uses all M votes."""
    _check_alpha(alpha)
    _positive("sigma", sigma)
    if votes.dim() != 2:
        raise ConfigError(f"votes must be [M, B] class indices, got shape {list(votes.shape)}")
    if isinstance(n0, bool) or not isinstance(n0, int) or not 1 <= n0 < votes.shape[0]:
        raise ConfigError(f"n0 (selection models) must be an integer in [1, M - 1] = [1, {votes.shape[0] - 1}], "
                          f"got {n0!r}")
    sel = vote_counts(votes[:n0], num_classes)
    est = vote_counts(votes[n0:], num_classes)
    cert = certify_from_counts(sel.argmax(1), est, sigma=sigma, alpha=alpha, selection_counts=sel)
    pred, _ = predict_from_counts(vote_counts(votes, num_classes), alpha=alpha)
    return NDTResult(cert, pred, votes.cpu().long())


def certify_ensemble(models: Sequence[nn.Module], x: Tensor, *, sigma: float, alpha: float, n0: int = 1,
                     num_classes: int | None = None, batch_size: int = 1000) -> NDTResult:
    """CERTIFY over the NDT ensemble ``models`` (trained by :func:`train_ndt` at this ``sigma``) for the
    inputs x [B, *shape]: :func:`ensemble_votes` then :func:`ndt_certify`."""
    votes = ensemble_votes(models, x, batch_size=batch_size)
    if num_classes is None:
        first = models[0]
        with torch.no_grad():
            num_classes = int(forward_batched(first, x[:1], batch_size=1, device=_device(first, x)).shape[-1])
    return ndt_certify(votes, num_classes, sigma=sigma, alpha=alpha, n0=n0)


def load_models(trained: Sequence[TrainedModel], model: ModelSpec | str, data: DataBundle) -> list[nn.Module]:
    """The factory's trained models as modules (eval mode, CPU)."""
    out = []
    for t in trained:
        m = build_model(model, input_shape=tuple(data.train.x.shape[1:]), num_classes=data.num_classes)
        m.load_state_dict(t.state_dict)
        out.append(m.eval())
    return out
