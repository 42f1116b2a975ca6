"""RMIA, the Robust Membership Inference Attack of Zarifzadeh, Liu, Kim & Shokri 2024, "Low-Cost
High-Power Membership Inference Attacks" (ICML), online and offline.

Threat model: black-box access to the target's probabilities on chosen inputs, reference models
trained by the attacker with the same recipe (here the other models of the pool, leave-one-out),
and population data from the same distribution known not to be in the target's training set.

For target model theta, example x and population example z (the paper's Sec. 3):

    LR(x, z) = [Pr(x | theta) / Pr(x)] / [Pr(z | theta) / Pr(z)]                 (pairwise likelihood ratio)
    score(x) = Pr_z[ LR(x, z) >= gamma ]  = (1 / |Z|) sum_z 1[LR(x, z) >= gamma]    (the test's statistic)

with Pr(x | theta) the model's softmax probability of x's true label (the mean over the A augmented
queries of ``obs``) and Pr(x) its average over reference models:

* ``rmia-online``: Pr(x) = mean of Pr(x | theta') over the reference models (IN and OUT for x);
* ``rmia-offline``: only OUT reference models; their mean p_OUT under-estimates Pr(x) and the paper
  corrects it linearly, Pr(x) = ((1 + a) p_OUT + (1 - a)) / 2 (Pr_IN taken as a p_OUT + 1 - a, then
  averaged with p_OUT; a = 1: no correction). Note the sign: ``+ (1 - a)``, so Pr(x) stays in [p_OUT, 1].

Pr(z) is computed the same way from z's reference models (offline: z's OUT models with the same
correction). These formulas are as we read the paper (Sec. 3 and its offline paragraph / appendix);
the equation numbers could not be checked against the PDF in this workspace, so the docs cite the
sections, not numbers.

The population Z (option ``population``): ``external`` uses ``obs.population_logits`` (examples no
model trained on, e.g. the test split; the paper's setting), ``pool-out`` the pool examples that are
OUT for the target (the attacker is granted knowledge of which pool examples the target did not
train on, i.e. it reads ``keep[target]`` for those, as the paper's population is known to be
disjoint from the target's data; an example in Z is also compared with itself, LR = 1, which counts
only when gamma <= 1), ``auto`` the first when present, else the second. ``z_samples`` caps |Z| (a
seeded sample). ``references`` caps the reference models (:mod:`.references`).

Default gamma = 1: on the digits CPU pool (benchmarks/results/membership_rmia_digits_cpu.md) gamma = 2
cut RMIA's AUC from about 63% to 53% (well-trained models give Pr(x | theta) / Pr(x) near 1 for
most x and z, so LR >= 2 holds for few pairs); a = 0.3 is not tuned here (the paper picks a by a
simulated attack on reference models, one as the target). Statistics in float64. Cost per target O((N + Z) log Z + M (N + Z)).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError
from .base import Observations, register_attack
from .references import reference_requirements, reference_weights
from .signals import cross_entropy, warn_clipped

Population = Literal["auto", "external", "pool-out"]
TINY = torch.finfo(torch.float64).tiny


def true_class_prob(logits: Tensor, labels: Tensor, *, attack: str) -> Tensor:
    """Pr(x | theta): softmax probability of the true label, mean over queries -> float64 [M, N]."""
    loss, clipped = cross_entropy(logits, labels)
    warn_clipped(clipped, loss.numel(), attack=attack)
    return torch.exp(-loss).mean(-1)


def marginal(p: Tensor, w_in: Tensor, w_out: Tensor, *, online: bool, a: float) -> Tensor:
    """Pr(x) [N] from reference probabilities p [R, N] and the chosen IN/OUT references."""
    if online:
        w = (w_in | w_out).to(p.dtype)
        return (p * w).sum(0) / w.sum(0).clamp_min(1)
    w = w_out.to(p.dtype)
    p_out = (p * w).sum(0) / w.sum(0).clamp_min(1)
    return 0.5 * ((1 + a) * p_out + (1 - a))


def pairwise_score(ratio_x: Tensor, ratio_z: Tensor, gamma: float) -> Tensor:
    """Fraction of z with ratio_x / ratio_z >= gamma, for each x: float64 [N] (sorted counting)."""
    rz = ratio_z.sort().values
    count = torch.searchsorted(rz, ratio_x / gamma, right=True)  # z with ratio_z <= ratio_x / gamma
    return count.to(torch.float64) / max(rz.numel(), 1)


def _check(obs: Observations, *, gamma: float, a: float, population: str, z_samples: int | None, online: bool) -> str:
    if not gamma > 0 or gamma == float("inf"):
        raise ConfigError(f"rmia option gamma must be a positive finite number, got {gamma!r}")
    if not 0.0 <= a <= 1.0:
        raise ConfigError(f"rmia-offline option a must lie in [0, 1] (a = 1: no correction), got {a!r}")
    if population not in ("auto", "external", "pool-out"):
        raise ConfigError(f"rmia option population={population!r} is not allowed; use auto, external or pool-out")
    if z_samples is not None and (int(z_samples) != z_samples or z_samples < 1):
        raise ConfigError(f"rmia option z_samples must be a positive integer or None (all), got {z_samples!r}")
    if obs.num_models < 2:
        raise ConfigError("rmia needs at least 1 reference model: the pool has only the target (M = 1)")
    if population == "auto":
        population = "external" if obs.population_logits is not None else "pool-out"
    if population == "external" and obs.population_logits is None:
        raise ConfigError("rmia option population='external' needs population logits (Observations.population_logits; "
                          "the membership kind's population block); use population='pool-out' or give them")
    return population


def _z_sample(z: int, z_samples: int | None, seed: int, target: int) -> Tensor:
    """Indices of the population used: all, or a seeded sample of ``z_samples`` (sorted)."""
    if z_samples is None or z_samples >= z:
        return torch.arange(z)
    return torch.from_numpy(np.sort(np.random.default_rng([seed, target, 0x5A]).choice(z, z_samples, replace=False)))


def _rmia_target(obs: Observations, target: int, p_x: Tensor, p_pop: Tensor | None, *, online: bool, gamma: float,
                 a: float, population: str, references: int | None, z_samples: int | None, seed: int) -> Tensor:
    name = "rmia-online" if online else "rmia-offline"
    keep = obs.keep.bool().to(p_x.device)
    refs, w_in, w_out = reference_weights(keep, target, references=references, online=online, seed=seed, attack=name)
    refs = refs.to(p_x.device)
    if not online and bool((w_out.sum(0) < 1).any()):
        raise ConfigError(f"{name} needs >= 1 OUT reference model (a model other than target {target} not trained on "
                          f"the example) for every example; {int((w_out.sum(0) < 1).sum())} examples have none: train "
                          "more models (pool.models)")
    ratio_x = p_x[target] / marginal(p_x[refs], w_in, w_out, online=online, a=a).clamp_min(TINY)
    if population == "external":
        assert p_pop is not None
        zi = _z_sample(p_pop.shape[1], z_samples, seed, target).to(p_pop.device)
        p_z = p_pop[:, zi]
        refs_z, wz_in, wz_out = reference_weights(torch.zeros(p_z.shape, dtype=torch.bool, device=p_z.device), target,
                                                  references=references, online=False, seed=seed, attack=name)
        ratio_z = p_z[target] / marginal(p_z[refs_z.to(p_z.device)], wz_in, wz_out, online=online, a=a).clamp_min(TINY)
    else:  # pool examples: the same reference choice as for x, so ratio_z is ratio_x at the attacker's known OUT
        out_idx = torch.nonzero(~keep[target]).flatten()
        if out_idx.numel() == 0:
            raise ConfigError(f"{name} with population='pool-out': target {target} holds every pool example, so there "
                              "is no population; give a population (external) or a pool with keep < 1")
        ratio_z = ratio_x[out_idx[_z_sample(out_idx.numel(), z_samples, seed, target).to(out_idx.device)]]
    return pairwise_score(ratio_x, ratio_z, gamma)


def _rmia(obs: Observations, targets: list[int], *, online: bool, gamma: float, a: float, population: str,
          references: int | None, z_samples: int | None, seed: int) -> Tensor:
    name = "rmia-online" if online else "rmia-offline"
    population = _check(obs, gamma=gamma, a=a, population=population, z_samples=z_samples, online=online)
    # everything stays where the logits are: on the GPU the per-target [R, N] reductions over 255 reference
    # models of a 256 x 50,000 pool are milliseconds; on the CPU they took ~43 s per variant (H200 host, 2026-12-03)
    p_x = true_class_prob(obs.logits, obs.labels, attack=name)
    p_pop = None
    if population == "external":
        assert obs.population_logits is not None and obs.population_labels is not None
        p_pop = true_class_prob(obs.population_logits, obs.population_labels.to(obs.population_logits.device),
                                attack=name)
    return torch.stack([_rmia_target(obs, t, p_x, p_pop, online=online, gamma=gamma, a=a, population=population,
                                     references=references, z_samples=z_samples, seed=seed) for t in targets])


def rmia_all_targets(obs: Observations, *, online: bool, gamma: float = 1.0, a: float = 0.3,
                     population: Population = "auto", references: int | None = None, z_samples: int | None = None,
                     seed: int = 0) -> Tensor:
    """Scores float64 [M, N] of every model as the target (row m equals the single-target call)."""
    return _rmia(obs, list(range(obs.num_models)), online=online, gamma=gamma, a=a, population=population,
                 references=references, z_samples=z_samples, seed=seed)


@register_attack("rmia-online", all_targets=partial(rmia_all_targets, online=True),
                 requirements=partial(reference_requirements, online=True))
def rmia_online(obs: Observations, target: int, *, gamma: float = 1.0, population: Population = "auto",
                references: int | None = None, z_samples: int | None = None, seed: int = 0) -> Tensor:
    """Online RMIA: fraction of population z with LR(x, z) >= gamma, Pr(x) from IN and OUT references
    -> scores float64 [N] in [0, 1] (higher = member)."""
    return _rmia(obs, [target], online=True, gamma=gamma, a=1.0, population=population, references=references,
                 z_samples=z_samples, seed=seed)[0]


@register_attack("rmia-offline", all_targets=partial(rmia_all_targets, online=False),
                 requirements=partial(reference_requirements, online=False))
def rmia_offline(obs: Observations, target: int, *, gamma: float = 1.0, a: float = 0.3,
                 population: Population = "auto", references: int | None = None, z_samples: int | None = None,
                 seed: int = 0) -> Tensor:
    """Offline RMIA: as online with Pr(x) = ((1 + a) p_OUT + (1 - a)) / 2 from OUT references only
    -> scores float64 [N] in [0, 1] (higher = member)."""
    return _rmia(obs, [target], online=False, gamma=gamma, a=a, population=population, references=references,
                 z_samples=z_samples, seed=seed)[0]
