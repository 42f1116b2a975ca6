"""DP-SGD (Abadi et al., "Deep learning with differential privacy", CCS 2016, Algorithm 1) for K
stacked models: the private gradient step the one training loop (:mod:`mlaudit.train.loop`) calls
when a recipe has ``dp``.

Per step t and per model (each with its own generators, so K models together equal K alone):

1. Poisson sampling: every training example of the model is in the batch L_t independently with
   probability q (the accountants assume exactly this). |L_t| ~ Binomial(n, q) varies, but vmap
   needs fixed shapes, so the batch is padded to ``B_max = ceil(qn + 6 sqrt(qn)) + 1`` slots with
   a 0/1 weight per slot; a draw larger than B_max (probability < 1e-9) is processed as several
   micro-batches of B_max whose clipped gradient sums are added -- nothing is dropped.
2. Per-example gradients g_i with torch.func: ``vmap(grad(loss of functional_call))`` over the
   examples (nested in a vmap over models for the ``vmap`` layout, a loop over models for ``loop``).
3. Clipping over all parameters jointly: g_i <- g_i * min(1, C / (||g_i||_2 + 1e-6)).
4. Noise and averaging: g~ = (sum_i w_i g_i + N(0, sigma^2 C^2 I)) / (q n) -- the *expected*
   batch size, the standard normalisation for Poisson DP-SGD (it keeps the update's sensitivity
   C / (qn) independent of the random batch size).
5. The recipe's optimizer (SGD/Adam with its weight decay and schedule) steps on g~ (post-processing).

Steps per epoch are ``ceil(n / batch_size)`` when q = batch_size / n (the default: the same
number of steps as the non-private loop, so the factory's grouping holds) or ``ceil(1/q)`` when
``dp.sample_rate`` is given. With ``dp.epsilon`` the noise multiplier is calibrated at the start
for (q, epochs * steps_per_epoch, delta); every model reports the accountant's epsilon for the
steps it took. DP steps run in float32 (bf16 autocast is not applied). Models with BatchNorm are
refused: BatchNorm mixes examples of a batch, so per-example gradients and clipping do not bound
one example's influence.

Threat model: the (epsilon, delta) guarantee covers the final weights (and every intermediate
iterate) against an adversary who knows everything but whether one training example was present;
it holds only if the sampling is really Poisson and the noise is really drawn as stated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..data.augment import AugmentParams, apply_augment, sample_augment_params
from ..data.augment import AugmentSpec as AugmentConfig
from ..errors import UnsupportedModelError
from ..models.registry import has_batchnorm
from ..train.recipe import DPConfig
from ..train.stacked import LoopStack, StackedModels, VmapStack, _set_mode
from .accountant import calibrate_noise, check_delta, epsilon

GatherFn = Callable[[Tensor], tuple[Tensor, Tensor]]
"""idx [K, B] (virtual indices) -> (x [K, B, *shape], y [K, B])."""


def max_batch(q: float, n: int) -> int:
    """Padded Poisson batch size: ceil(qn + 6 sqrt(qn)) + 1, at most n (P(|L| > B_max) < 1e-9)."""
    mu = q * n
    return int(min(n, math.ceil(mu + 6 * math.sqrt(mu)) + 1))


def poisson_batch(pool: Tensor, q: float, b_max: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One Poisson draw from ``pool`` (int64 [n]): every index kept with probability ``q``.

    Returns (idx [M, b_max], weight [M, b_max] float 0/1), M = max(1, ceil(|L| / b_max)); padding
    slots hold ``pool[0]`` with weight 0.
    """
    sel = pool[torch.rand(len(pool), generator=generator) < q]
    m = max(1, math.ceil(len(sel) / b_max))
    idx = torch.full((m * b_max,), int(pool[0]), dtype=torch.long)
    w = torch.zeros(m * b_max)
    idx[:len(sel)] = sel
    w[:len(sel)] = 1.0
    return idx.view(m, b_max), w.view(m, b_max)


def clip_factors(per_example: Sequence[Tensor], clip: float) -> Tensor:
    """min(1, C / (||g_i|| + 1e-6)) per example, the norm over all parameters: list of [G, B, *s] -> [G, B]."""
    sq = sum(g.flatten(2).float().pow(2).sum(-1) for g in per_example)
    return (clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # type: ignore[union-attr]


def clip_per_example(per_example: Sequence[Tensor], clip: float) -> list[Tensor]:
    """Each example's gradient (all parameters jointly) scaled to norm <= ``clip``: [G, B, *s] each."""
    f = clip_factors(per_example, clip)
    return [g * f.view(*f.shape, *([1] * (g.dim() - 2))) for g in per_example]


def clipped_sum(per_example: Sequence[Tensor], weights: Tensor, clip: float) -> list[Tensor]:
    """sum_i w_i clip(g_i): per-example grads [G, B, *s] and weights [G, B] -> [G, *s] each."""
    f = clip_factors(per_example, clip) * weights
    return [torch.einsum("gb,gb...->g...", f.to(g.dtype), g) for g in per_example]


def gaussian_noise(shapes: Sequence[torch.Size], generators: Sequence[torch.Generator],
                   device: torch.device) -> list[Tensor]:
    """Standard normal noise [G, *s] for each shape, row g drawn from ``generators[g]`` alone."""
    total = sum(math.prod(s) for s in shapes)
    rows = [torch.randn(total, generator=g, device=device).split([math.prod(s) for s in shapes])
            for g in generators]
    return [torch.stack([r[j].view(s) for r in rows]) for j, s in enumerate(shapes)]


def noisy_average(sums: Sequence[Tensor], noise: Sequence[Tensor], sigma_c: Tensor, denom: Tensor) -> list[Tensor]:
    """(sum + sigma C z) / (q n) per model g: sums and noise [G, *s], sigma_c and denom [G]."""
    out = []
    for s, z in zip(sums, noise):
        shape = (-1, *([1] * (s.dim() - 1)))
        out.append((s + sigma_c.view(shape) * z) / denom.view(shape))
    return out


def _loss_fn(module: nn.Module, label_smoothing: float) -> Callable[..., tuple[Tensor, Tensor]]:
    def loss(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(module, (p, b), (xi.unsqueeze(0),))
        v = F.cross_entropy(out.float(), yi.unsqueeze(0), label_smoothing=label_smoothing)
        return v, v.detach()
    return loss


def per_example_grads(stack: StackedModels, x: Tensor, y: Tensor, *, label_smoothing: float = 0.0
                      ) -> list[tuple[list[Tensor], Tensor]]:
    """Per-example gradients of the cross-entropy, in groups of models.

    x [K, B, *shape], y [K, B] -> list of (grads, losses): for the ``vmap`` layout one group of all
    K models (grads [K, B, *s] in ``stack.trainable()`` order, losses [K, B]); for ``loop`` one group
    per model (grads [1, B, *s], losses [1, B]). Concatenating the groups' grads gives the order of
    ``stack.trainable()``.
    """
    if isinstance(stack, VmapStack):
        _set_mode(stack.template, True)
        g = grad(_loss_fn(stack.template, label_smoothing), has_aux=True)
        f = vmap(vmap(g, in_dims=(None, None, 0, 0), randomness="different"), randomness="different")
        gr, losses = f({n: p.detach() for n, p in stack.params.items()}, stack.buffers, x, y)
        return [([gr[n] for n in stack.params], losses)]
    if isinstance(stack, LoopStack):
        out = []
        for m, xk, yk in zip(stack.modules, x, y):
            _set_mode(m, True)
            params = {n: p.detach() for n, p in m.named_parameters()}
            g = grad(_loss_fn(m, label_smoothing), has_aux=True)
            gr, losses = vmap(g, in_dims=(None, None, 0, 0), randomness="different")(
                params, dict(m.named_buffers()), xk, yk)
            out.append(([gr[n].unsqueeze(0) for n in params], losses.unsqueeze(0)))
        return out
    raise UnsupportedModelError(f"DP-SGD needs a vmap or loop stack, got {type(stack).__name__}")


def check_dp_model(models: Sequence[nn.Module]) -> None:
    """Raise :class:`UnsupportedModelError` if a model has BatchNorm (it mixes examples of a batch)."""
    if any(has_batchnorm(m) for m in models):
        raise UnsupportedModelError(
            "DP-SGD cannot train a model with BatchNorm (it mixes the examples of a batch, so per-example "
            "clipping does not bound one example's influence); use GroupNorm or no normalisation: "
            "`model: {name: ..., norm: group}` or `norm: none`")


@dataclass
class DPTraining:
    """The state of one DP-SGD run of K models (generators, q, sigma); build with :meth:`start`."""

    cfg: DPConfig
    pools: list[Tensor]  # per model, CPU int64 virtual indices it trains on
    sample_rates: list[float]
    noise_multipliers: list[float]
    steps_per_epoch: int
    total_steps: int
    b_max: int
    sample_gens: list[torch.Generator]  # CPU: Poisson draws and augmentation
    noise_gens: list[torch.Generator]  # on the training device
    sigma_c: Tensor  # [K] sigma * C
    denom: Tensor  # [K] q * n
    augment: AugmentConfig | None = None

    @classmethod
    def start(cls, cfg: DPConfig, models: Sequence[nn.Module], pools: Sequence[Tensor], *, seeds: Sequence[int],
              batch_size: int, epochs: int, default_spe: int, device: torch.device,
              augment: AugmentConfig | None = None) -> DPTraining:
        """Check the model and delta, pick q and steps, calibrate sigma when ``cfg.epsilon`` is set."""
        check_dp_model(models)
        ns = [len(p) for p in pools]
        for n in ns:
            check_delta(cfg.delta, n, force=cfg.allow_large_delta)
        qs = [cfg.sample_rate if cfg.sample_rate is not None else min(1.0, batch_size / n) for n in ns]
        spe = default_spe if cfg.sample_rate is None else max(1, math.ceil(1.0 / cfg.sample_rate - 1e-9))
        total = epochs * spe
        sig: dict[float, float] = {}
        for q in qs:
            if q not in sig:
                sig[q] = float(cfg.noise_multiplier) if cfg.noise_multiplier is not None else calibrate_noise(
                    target_epsilon=float(cfg.epsilon), sample_rate=q, steps=total, delta=cfg.delta,  # type: ignore[arg-type]
                    accountant=cfg.accountant)
        sigmas = [sig[q] for q in qs]
        noise_gens = [(torch.Generator(device=device) if device.type == "cuda" else torch.Generator())
                      .manual_seed(int(s) + 0x4015E) for s in seeds]
        return cls(cfg, [p.cpu() for p in pools], qs, sigmas, spe, total,
                   max(max_batch(q, n) for q, n in zip(qs, ns)),
                   [torch.Generator().manual_seed(int(s) + 0xD95D) for s in seeds], noise_gens,
                   torch.tensor([s * cfg.clip for s in sigmas], device=device),
                   torch.tensor([q * n for q, n in zip(qs, ns)], device=device), augment)

    def sample(self) -> tuple[Tensor, Tensor]:
        """This step's Poisson batches of all models: (idx [M, K, B_max], weight [M, K, B_max]), CPU."""
        draws = [poisson_batch(p, q, self.b_max, g) for p, q, g in zip(self.pools, self.sample_rates, self.sample_gens)]
        m = max(d[0].shape[0] for d in draws)
        idx = torch.stack([torch.cat([i, i[:1].expand(m - len(i), -1)]) for i, _ in draws], 1)
        w = torch.stack([torch.cat([v, torch.zeros(m - len(v), self.b_max)]) for _, v in draws], 1)
        return idx, w

    def step(self, stack: StackedModels, gather: GatherFn, *, label_smoothing: float = 0.0
             ) -> tuple[Tensor, list[Tensor]]:
        """One DP-SGD step: (mean loss of each model's sampled batch [K], private grads in
        ``stack.trainable()`` order, ready for the optimizer)."""
        idx, w = self.sample()
        device = self.sigma_c.device
        k = len(self.pools)
        rows = [torch.arange(k)] if isinstance(stack, VmapStack) else [torch.tensor([i]) for i in range(k)]
        sums: list[list[Tensor]] = []
        loss_sum = torch.zeros(k, device=device)
        for mi in range(idx.shape[0]):  # one micro-batch unless the Poisson draw exceeded B_max
            xb, yb = gather(idx[mi].to(device))
            wb = w[mi].to(device)
            groups = per_example_grads(stack, self._augment(xb), yb, label_smoothing=label_smoothing)
            part = [clipped_sum(g, wb[r], self.cfg.clip) for (g, _), r in zip(groups, rows)]
            loss_sum += torch.cat([(lo.detach() * wb[r]).sum(1) for (_, lo), r in zip(groups, rows)])
            sums = part if not sums else [[a + b for a, b in zip(s, p)] for s, p in zip(sums, part)]
        grads: list[Tensor] = []
        for s, r in zip(sums, rows):
            z = gaussian_noise([t.shape[1:] for t in s], [self.noise_gens[i] for i in r.tolist()], device)
            grads += noisy_average(s, z, self.sigma_c[r], self.denom[r])
        count = w.sum((0, 2)).to(device).clamp(min=1.0)
        return loss_sum / count, _to_trainable(stack, grads)

    def _augment(self, xb: Tensor) -> Tensor:
        a = self.augment
        if a is None or xb.dim() != 5 or (a.crop_pad == 0 and not a.flip):
            return xb
        ps = [sample_augment_params(xb.shape[1], pad=a.crop_pad, flip=a.flip, generator=g, device="cpu")
              for g in self.sample_gens]
        p = AugmentParams(shift=torch.cat([q.shift for q in ps]).to(xb.device),
                          flip=torch.cat([q.flip for q in ps]).to(xb.device))
        return apply_augment(xb.flatten(0, 1), p).view_as(xb)

    def report(self, i: int, steps: int) -> dict[str, float]:
        """Model i's privacy: the accountant's epsilon for the ``steps`` taken, sigma, q, steps, delta."""
        sigma, q = self.noise_multipliers[i], self.sample_rates[i]
        eps = math.inf if sigma <= 0 or steps < 1 else epsilon(
            noise_multiplier=sigma, sample_rate=q, steps=steps, delta=self.cfg.delta, accountant=self.cfg.accountant)
        return {"dp_epsilon": eps, "dp_noise_multiplier": sigma, "dp_sample_rate": q, "dp_steps": float(steps),
                "dp_delta": self.cfg.delta, "dp_clip": self.cfg.clip}


def _to_trainable(stack: StackedModels, grads: list[Tensor]) -> list[Tensor]:
    """Private grads (each [G, *s]) in the layout of ``stack.trainable()``: [K, *s] for vmap, [*s] for loop."""
    return grads if isinstance(stack, VmapStack) else [g.squeeze(0) for g in grads]
