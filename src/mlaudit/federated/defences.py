"""Client-side defences against gradient inversion: each user transforms the update it shares before
the server (the attacker) sees it.

    d = defend_updates(updates, method="prune", prune=0.9)                  # {name: [U, *shape]}
    d = defend_updates(updates, method="clip-noise", clip=1.0, sigma=0.5, generator=g)
    distortion(updates, d)                                                  # [U]: ||g' - g|| / ||g||

Methods (every one acts on each user's update alone, the user axis first):

- ``noise``: g + N(0, sigma^2 I), Gaussian noise of std ``sigma`` on every entry (Zhu et al., NeurIPS
  2019, "Deep Leakage from Gradients", section 5 "Defense Strategies": noisy gradients).
- ``clip-noise``: g * min(1, C / ||g||) + N(0, (sigma C)^2 I), the update clipped to l2 norm ``clip`` = C
  over all parameters jointly, then noise of std sigma * C. This is the Gaussian mechanism on the
  *per-client update* (user-level, in the style of McMahan et al., ICLR 2018, "Learning Differentially
  Private Recurrent Language Models"), not per-example DP-SGD (Abadi et al. 2016): the examples of a
  user's batch are not clipped separately, and no privacy accounting is done here.
- ``prune``: per tensor, the fraction ``prune`` = p of entries of smallest magnitude set to zero: exactly
  ``k = floor(p * n)`` of the n entries (ties broken arbitrarily), the top n - k kept (Zhu et al.
  2019, section 5: gradient compression / pruning; Lin et al., ICLR 2018, "Deep Gradient Compression").
- ``quantise``: per tensor, symmetric uniform quantisation to ``bits`` bits: step = max|g| / (2^(bits-1) - 1),
  g' = step * round(g / step) (Zhu et al. 2019, section 5: low-precision gradients; with bits 2 the
  levels are {-max|g|, 0, max|g|}, close to signSGD, Bernstein et al., ICML 2018).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import ConfigError
from ..query import ParamVector

METHODS = ("none", "noise", "clip-noise", "prune", "quantise")


def client_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a user's defence noise, from the user's seed: each user draws its own noise, as a Flower
    client does (:class:`mlaudit.federated.flower.TorchClient`), so the simulated rounds of the ``federated``
    kind and a Flower run with the same seeds add the same noise."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + 17)


def defend_each(updates: Mapping[str, Tensor], generators: list[torch.Generator], **options: object) -> ParamVector:
    """:func:`defend_updates` on each user's update {name: [U, *shape]} alone, user u's noise from
    ``generators[u]`` (prune, quantise and clipping act per user anyway; only the noise draws differ from one
    shared generator)."""
    users = next(iter(updates.values())).shape[0]
    if len(generators) != users:
        raise ConfigError(f"defend_each needs one generator per user: {users} users, {len(generators)} generators")
    parts = [defend_updates({n: t[u:u + 1] for n, t in updates.items()}, generator=generators[u], **options)  # type: ignore[arg-type]
             for u in range(users)]
    return ParamVector({n: torch.cat([p[n] for p in parts]) for n in updates})


def defend_updates(updates: Mapping[str, Tensor], *, method: str, sigma: float = 0.0, clip: float | None = None,
                   prune: float = 0.0, bits: int = 8, generator: torch.Generator | None = None) -> ParamVector:
    """Each user's update of ``updates`` {name: [U, *shape]} after the defence ``method`` (module docstring).
    Noise is drawn from ``generator`` (on the updates' device), parameters in order; the input is not changed."""
    if method not in METHODS:
        raise ConfigError(f"defence method = {method!r}; allowed: {', '.join(METHODS)}")
    out = ParamVector({n: t.detach().clone() for n, t in updates.items()})
    if method == "none":
        return out
    if method in ("noise", "clip-noise"):
        if not sigma >= 0 or generator is None:
            raise ConfigError(f"defence sigma = {sigma}; allowed sigma >= 0, with a generator for the noise")
        std = sigma
        if method == "clip-noise":
            if clip is None or not clip > 0:
                raise ConfigError(f"defence clip = {clip}; allowed clip > 0 with method clip-noise")
            out = clip_updates(out, clip)
            std = sigma * clip
        if std > 0:
            for n, t in out.items():
                out[n] = t + std * torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
        return out
    if method == "prune":
        if not 0.0 <= prune < 1.0:
            raise ConfigError(f"defence prune = {prune}; allowed 0 <= prune < 1 (the fraction zeroed per tensor)")
        return ParamVector({n: prune_smallest(t, prune) for n, t in out.items()})
    if not 2 <= bits <= 32:
        raise ConfigError(f"defence bits = {bits}; allowed 2 <= bits <= 32")
    return ParamVector({n: quantise(t, bits) for n, t in out.items()})


def clip_updates(updates: Mapping[str, Tensor], clip: float) -> ParamVector:
    """Each user's update {name: [U, *shape]} scaled by min(1, clip / ||g_u||), the l2 norm over all parameters."""
    norm = update_norms(updates)
    scale = (clip / norm.clamp(min=1e-30)).clamp(max=1.0)
    return ParamVector({n: t * scale.view(-1, *([1] * (t.dim() - 1))).to(t.dtype) for n, t in updates.items()})


def update_norms(updates: Mapping[str, Tensor]) -> Tensor:
    """[U]: each user's l2 norm over all parameters of {name: [U, *shape]}."""
    return torch.sqrt(sum(t.flatten(1).double().pow(2).sum(1) for t in updates.values()))  # type: ignore[arg-type]


def prune_smallest(t: Tensor, fraction: float) -> Tensor:
    """Per user (row of ``t`` [U, *shape]): the floor(fraction * n) entries of smallest magnitude zeroed,
    the other n - floor(fraction * n) kept unchanged."""
    flat = t.flatten(1)
    k = math.floor(fraction * flat.shape[1])
    if k == 0:
        return t.clone()
    drop = flat.abs().topk(k, dim=1, largest=False).indices
    return flat.scatter(1, drop, 0.0).view_as(t)


def quantise(t: Tensor, bits: int) -> Tensor:
    """Per user (row of ``t`` [U, *shape]): symmetric uniform quantisation to ``bits`` bits, levels
    step * {-(2^(bits-1) - 1), ..., 2^(bits-1) - 1}, step = max|g| / (2^(bits-1) - 1)."""
    flat = t.flatten(1)
    top = 2 ** (bits - 1) - 1
    step = (flat.abs().amax(1, keepdim=True) / top).clamp(min=1e-30)
    return (torch.round(flat / step).clamp(-top, top) * step).view_as(t)


def distortion(updates: Mapping[str, Tensor], defended: Mapping[str, Tensor]) -> Tensor:
    """[U]: each user's relative distortion ||g' - g|| / ||g|| (nan where ||g|| = 0)."""
    diff = update_norms({n: defended[n] - t for n, t in updates.items()})
    return diff / update_norms(updates)
