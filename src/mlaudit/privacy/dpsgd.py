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
   With ``dp.clipping`` ``auto``/``fast`` and the ``loop`` layout, steps 2-3 are
   instead book-keeping clipping (:mod:`mlaudit.privacy.fastclip`: one forward and one backward of
   the batch, ghost norms; the same clipped sum to float rounding), checked once against autograd on
   the first step.
3. Clipping over all parameters jointly: g_i <- g_i * min(1, C / (||g_i||_2 + 1e-6)).
4. Noise and averaging: g~ = (sum_i w_i g_i + N(0, sigma^2 C^2 I)) / (q n) -- the *expected*
   batch size, the standard normalisation for Poisson DP-SGD (it keeps the update's sensitivity
   C / (qn) independent of the random batch size).
5. The recipe's optimizer (SGD/Adam with its weight decay and schedule) steps on g~ (post-processing).

Steps per epoch are ``ceil(n / batch_size)`` when q = batch_size / n (the default: the same
number of steps as the non-private loop, so the factory's grouping holds) or ``ceil(1/q)`` when
``dp.sample_rate`` is given. With ``dp.epsilon`` the noise multiplier is calibrated at the start
for (q, epochs * steps_per_epoch, delta); every model reports the accountant's epsilon for the
steps it took. DP steps run in float32 unless the recipe says ``precision: bf16`` (``auto`` keeps
float32): then book-keeping steps run their forward under bf16 autocast; the per-example path stays
float32 (bf16 autocast around the vmapped per-example gradients was measured 1.5x *slower* for
ResNet-18/GroupNorm on an H100, 171 against 115 ms per step at batch 256, 2026-11-23;
benchmarks/results/dp_throughput.md). Each step computes per-example gradients only for the slots it needs: the widest sampled
batch of the chunk rounded up to a multiple of :data:`SLOT_MULTIPLE` (32; :data:`FAST_SLOT_MULTIPLE`
= 8 for book-keeping steps, which have no vmap to feed), not the worst-case padded ``b_max``, about
1.4x the expected batch at q * n = 256. Models with BatchNorm are
refused: BatchNorm mixes examples of a batch, so per-example gradients and clipping do not bound
one example's influence.

CUDA graphs (``recipe.cuda_graph``, :mod:`mlaudit.train.graphed`): a small model's book-keeping step is
bound by kernel launches (the fast CNN's clipped sum runs ~220 operations), so on CUDA the step's device
part can be replayed as a graph. A step is split into :meth:`DPTraining.draw` (host side, always eager: the
Poisson batch, whose size is a host number, the canaries' slots, the gathers, the augmentation from the CPU
generators, and the Gaussian noise, one ``randn`` per model from its own generator into a [K, P] buffer)
and :meth:`DPTraining.update` (clipped sums, noise added, average; then the optimizer): the graph captures
``update`` and the update, the same code the eager step runs, and reads the draws from static buffers. So:

* fixed shapes: the widest draw is rounded up to a bucket of :data:`GRAPH_SLOT_MULTIPLE` slots (at most
  b_max), one graph per bucket in one memory pool; padded slots have weight 0, and every clipped gradient,
  ghost norm's clip factor and loss is multiplied by its weight, so they contribute exactly nothing;
* noise: drawn eagerly by the same call as the eager step's, so the graphed step's noise equals the eager
  step's for the same generator state (tests compare the two paths' trained weights);
* eager steps: the first (book-keeping verified against autograd, :func:`verify_fast_clip`), each bucket's
  warm-ups, a draw beyond b_max (micro-batches), the per-example path, the vmap layout, Adam (host state),
  and every step with audit hooks (a Dirac canary's slots and coordinates are host choices per step; the
  broken fixtures are audit references and stay on the reference path); ``watch`` changes no step.

``recipe.compile: true`` (CUDA, loop layout): book-keeping steps run their norms, clip factors and clipped sums as
one ``torch.compile``d graph (:func:`~mlaudit.privacy.fastclip.clipped_grad_sum` ``compiled``), eager or inside
the step's CUDA graph; the forward and backward stay eager. A second slot count compiles a graph with a symbolic
batch size, unless a layer's transients exceed one chunk (then each count compiles), so these steps draw the
graphed step's bucketed widths (:data:`GRAPH_SLOT_MULTIPLE`) even when not graphed. ``compile: auto``: the
factory's timed probe decides, as for non-private jobs (on an H100, 2026-12-08, compiling paid only inside CUDA
graphs: ResNet-18-GN's graphed step 27.9 -> 23.4 ms, the eager one 29.7 -> 31.3 ms).

Threat model: the (epsilon, delta) guarantee covers the final weights (and every intermediate
iterate) against an adversary who knows everything but whether one training example was present;
it holds only if the sampling is really Poisson and the noise is really drawn as stated.

Audit hooks (used by the ``dp-audit`` kind only; see docs/dp_audit.md): the training loop's
``hooks`` argument (one :class:`~mlaudit.train.hooks.DPStepHooks` or None per model) changes the step
of those models:

* ``gradient_canary`` (:class:`GradientCanary`): the Dirac canary of Nasr et al., "Tight auditing
  of differentially private machine learning" (USENIX Security 2023; gradient canaries also appear
  in Nasr et al. 2021, "Adversary instantiation"). The model's view holds one inserted placeholder example
  at virtual index ``index``; it is Poisson-sampled like every other example (rate q), but
  whenever it is in the batch its per-example gradient is replaced by
  C * e_j, all of the clip norm on one coordinate j of one parameter, so the noisy sum becomes
  sum_i w_i clip(g_i) + C e_j + N(0, sigma^2 C^2 I). This is the worst case the clipping allows,
  so it is still a valid input to the (epsilon, delta) guarantee.
* ``broken`` (:data:`BROKEN`): a deliberately wrong DP-SGD, as a fixture for testing audits. It is
  never used unless an audit config asks for it. The accountant still reports the epsilon of the
  correct mechanism, which is the claim the audit must refute.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data.augment import AugmentParams, apply_augment, sample_augment_params
from ..data.augment import AugmentSpec as AugmentConfig
from ..errors import ConfigError, UnsupportedModelError
from ..models.registry import has_batchnorm
from ..train.hooks import DPStepHooks
from ..train.recipe import DPConfig
from ..train.stacked import LoopStack, StackedModels, VmapStack, _set_mode
from .accountant import Releases, calibrate_noise, check_delta, epsilon
from .fastclip import check_fast_clip, clipped_grad_sum, fast_clip_supported, native_rnn, verify_fast_clip
from .mechanism import (  # noqa: F401  (re-exported: the mechanism's names are imported from here too)
    SLOT_MULTIPLE,
    clip_factors,
    clip_per_example,
    clipped_sum,
    gaussian_flat,
    gaussian_noise,
    max_batch,
    noisy_average,
    poisson_batch,
    unflatten,
)
from .normstats import norm_noise, norm_releases

GatherFn = Callable[[Tensor], tuple[Tensor, Tensor]]
"""idx [K, B] (virtual indices) -> (x [K, B, *shape], y [K, B])."""

Canaries = list[list[tuple[int, int, tuple[int, ...]]]]
"""Per model, its Dirac gradient canaries: (virtual index, parameter position, unravelled coordinate)."""


def _audit_hooks(hooks: Sequence[DPStepHooks | None] | None, k: int, names: list[str], shapes: list[torch.Size]
                 ) -> tuple[Canaries, str | None]:
    """Per model: its Dirac canaries (possibly none); the broken variant (one for all models, else a
    ConfigError)."""
    specs = [h or DPStepHooks() for h in (hooks or [None] * k)]
    broken = {s.broken for s in specs}
    if len(broken) > 1:
        raise ConfigError(f"models trained together must share one DP-SGD variant, got {sorted(map(str, broken))}")
    canaries: Canaries = []
    for s in specs:
        mine: list[tuple[int, int, tuple[int, ...]]] = []
        for c in s.all_canaries:
            if c.parameter not in names:
                raise ConfigError(f"gradient canary parameter {c.parameter!r} is not a parameter of the model; "
                                  f"valid: {', '.join(names)}")
            pos = names.index(c.parameter)
            numel = math.prod(shapes[pos])
            if not 0 <= c.coordinate < numel:
                raise ConfigError(f"gradient canary coordinate {c.coordinate} is outside parameter "
                                  f"{c.parameter!r} ({numel} entries)")
            coord = tuple(int(t) for t in torch.unravel_index(torch.tensor(c.coordinate), shapes[pos]))
            mine.append((int(c.index), pos, coord))
        if len({c[0] for c in mine}) != len(mine):
            raise ConfigError("a model's gradient canaries must each have their own placeholder index")
        canaries.append(mine)
    return canaries, broken.pop()


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

    Kept apart from :mod:`mlaudit.query.grads` (the gradients of one model's loss) on purpose: this is
    the DP-SGD step's hot path, per-example and batched over all K models of a stack in one double
    ``vmap`` in train mode; routing it through the one-model query would loop over models and change
    both speed and the kernels' summation order.
    """
    # attention through scaled_dot_product_attention: its fused CPU / CUDA kernels have no vmap batching rule (vmap
    # then loops over the examples, with a warning); the math kernel's operations do
    if isinstance(stack, VmapStack):
        _set_mode(stack.template, True)
        g = grad(_loss_fn(stack.template, label_smoothing), has_aux=True)
        f = vmap(vmap(g, in_dims=(None, None, 0, 0), randomness="different"), randomness="different")
        with sdpa_kernel([SDPBackend.MATH]), native_rnn(stack.template, x.device):
            gr, losses = f({n: p.detach() for n, p in stack.params.items()}, stack.buffers, x, y)
        return [([gr[n] for n in stack.params], losses)]
    if isinstance(stack, LoopStack):
        out = []
        for m, xk, yk in zip(stack.modules, x, y):
            _set_mode(m, True)
            params = {n: p.detach() for n, p in m.named_parameters()}
            g = grad(_loss_fn(m, label_smoothing), has_aux=True)
            with sdpa_kernel([SDPBackend.MATH]), native_rnn(m, xk.device):
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
    frozen = [n for n, p in models[0].named_parameters() if not p.requires_grad] if models else []
    if frozen:
        raise UnsupportedModelError(
            f"DP-SGD here clips and noises the gradient of every parameter, but the model freezes {frozen[:4]}"
            f"{' ...' if len(frozen) > 4 else ''} (requires_grad=False); unfreeze them, or train without recipe.dp")


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
    sigma_c: Tensor  # [K] noise std on the clipped sum: sigma * C (divided by q * n for noise-over-batch)
    denom: Tensor  # [K] q * n
    augment: AugmentConfig | None = None
    canaries: Canaries | None = None  # per model: its Dirac canaries (index, param pos, coord)
    canary_counts: list[int] | None = None  # per model: its canaries' samplings (all of them, summed)
    broken: str | None = None  # an audit fixture (BROKEN); None = correct DP-SGD
    fast_clip: bool = False  # book-keeping clipping (fastclip) for loop stacks
    fast_checked: bool = False  # verify_fast_clip ran (on the first fast step)
    releases: Releases = ()  # Gaussian releases before training (private normalisation statistics)
    numel: int = 0  # parameters of one model (all are clipped and noised): the noise drawn per model and step

    @classmethod
    def start(cls, cfg: DPConfig, models: Sequence[nn.Module], pools: Sequence[Tensor], *, seeds: Sequence[int],
              batch_size: int, epochs: int, default_spe: int, device: torch.device,
              augment: AugmentConfig | None = None, hooks: Sequence[DPStepHooks | None] | None = None) -> DPTraining:
        """Check the model and delta, pick q and steps, calibrate sigma when ``cfg.epsilon`` is set;
        apply the audit ``hooks`` (one per model or None; :mod:`mlaudit.train.hooks`)."""
        check_dp_model(models)
        if cfg.clipping == "fast":
            check_fast_clip(models[0])
        fast = cfg.clipping == "fast" or (cfg.clipping == "auto" and fast_clip_supported(models[0]))
        named = list(models[0].named_parameters())
        canaries, broken = _audit_hooks(hooks, len(models), [n for n, _ in named], [p.shape for _, p in named])
        ns = [len(p) for p in pools]
        for n in ns:
            check_delta(cfg.delta, n, force=cfg.allow_large_delta)
        qs = [cfg.sample_rate if cfg.sample_rate is not None else min(1.0, batch_size / n) for n in ns]
        spe = default_spe if cfg.sample_rate is None else max(1, math.ceil(1.0 / cfg.sample_rate - 1e-9))
        total = epochs * spe
        releases = norm_releases(cfg)  # composed with the steps: sigma is calibrated for the whole budget
        sig: dict[float, float] = {}
        for q in qs:
            if q not in sig:
                sig[q] = float(cfg.noise_multiplier) if cfg.noise_multiplier is not None else calibrate_noise(
                    target_epsilon=float(cfg.epsilon), sample_rate=q, steps=total, delta=cfg.delta,  # type: ignore[arg-type]
                    accountant=cfg.accountant, releases=releases)
        sigmas = [sig[q] for q in qs]
        noise_gens = [(torch.Generator(device=device) if device.type == "cuda" else torch.Generator())
                      .manual_seed(int(s) + 0x4015E) for s in seeds]
        noise_std = [s * cfg.clip / (q * n if broken == "noise-over-batch" else 1.0) for s, q, n in zip(sigmas, qs, ns)]
        has_canary = any(canaries)
        return cls(cfg, [p.cpu() for p in pools], qs, sigmas, spe, total,
                   max(max_batch(q, n) for q, n in zip(qs, ns)),
                   [torch.Generator().manual_seed(int(s) + 0xD95D) for s in seeds], noise_gens,
                   torch.tensor(noise_std, device=device),
                   torch.tensor([q * n for q, n in zip(qs, ns)], device=device), augment,
                   canaries if has_canary else None, [0] * len(models) if has_canary else None, broken,
                   fast_clip=fast, releases=releases, numel=sum(p.numel() for _, p in named))

    @property
    def clip(self) -> float:
        """The clip norm applied to per-example gradients (inf for the ``no-clip`` fixture)."""
        return math.inf if self.broken == "no-clip" else self.cfg.clip

    def sample(self, multiple: int = SLOT_MULTIPLE) -> tuple[Tensor, Tensor]:
        """This step's Poisson batches of all models: (idx [M, K, B], weight [M, K, B]), CPU; B = b_max, or
        fewer slots (a multiple of ``multiple``) when one micro-batch holds every model's draw."""
        draws = [poisson_batch(p, q, self.b_max, g) for p, q, g in zip(self.pools, self.sample_rates, self.sample_gens)]
        m = max(d[0].shape[0] for d in draws)
        idx = torch.stack([torch.cat([i, i[:1].expand(m - len(i), -1)]) for i, _ in draws], 1)
        w = torch.stack([torch.cat([v, torch.zeros(m - len(v), self.b_max)]) for _, v in draws], 1)
        if m == 1:  # drop padding slots no model uses (sampled examples come first in each row)
            used = int(w[0].sum(1).max())
            width = min(self.b_max, max(multiple, -(-used // multiple) * multiple))
            idx, w = idx[:, :, :width], w[:, :, :width]
        return idx, w

    def step(self, stack: StackedModels, gather: GatherFn, *, label_smoothing: float = 0.0, bf16: bool = False
             ) -> tuple[Tensor, list[Tensor]]:
        """One DP-SGD step: (mean loss of each model's sampled batch [K], private grads in
        ``stack.trainable()`` order, ready for the optimizer). ``bf16``: book-keeping steps run their
        forward under bf16 autocast (the recipe's ``precision: bf16``; the per-example path stays float32).
        The host draws (:meth:`draw`), then the device work (:meth:`update`)."""
        b = self.draw(stack, gather)
        return self.update(stack, b.x, b.y, b.w, b.z, hits=b.hits, label_smoothing=label_smoothing, bf16=bf16)

    def draw(self, stack: StackedModels, gather: GatherFn, *, bucket: int | None = None) -> DPBatch:
        """This step's inputs, everything a CUDA graph cannot hold: the Poisson batch (its size is a host
        number), the canaries' slots, the gathers, the augmentation (CPU generators) and the noise.

        ``bucket`` (the graphed step, :data:`GRAPH_SLOT_MULTIPLE`): a one-micro-batch draw is widened to the
        next multiple of ``bucket`` slots (at most b_max) by padding slots of weight 0, so a graph meets a few
        fixed shapes. Its augmentation is still drawn for the slots the eager step would have (the padding
        gets none), so the CPU generators advance exactly as on the eager path and both paths train on the
        same batches."""
        # the fast path has no vmap to feed: finer slot widths waste less work on padding (more shapes)
        idx, w = self.sample(FAST_SLOT_MULTIPLE if self.fast_clip and isinstance(stack, LoopStack) else SLOT_MULTIPLE)
        drawn = idx.shape[2]
        if bucket is not None and idx.shape[0] == 1:
            idx, w = _widen(idx, w, min(self.b_max, -(-drawn // bucket) * bucket))
        hits = self._take_canaries(idx, w)  # per micro-batch and model: canaries sampled (their slots get weight 0)
        device = self.sigma_c.device
        xs, ys = [], []
        for mi in range(idx.shape[0]):  # one micro-batch unless the Poisson draw exceeded B_max
            xb, yb = gather(_upload(idx[mi], device))
            xs.append(self._augment(xb, drawn))
            ys.append(yb)
        x, y = (xs[0].unsqueeze(0), ys[0].unsqueeze(0)) if len(xs) == 1 else (torch.stack(xs), torch.stack(ys))
        return DPBatch(x, y, _upload(w, device), gaussian_flat(self.numel, self.noise_gens, device), hits)

    def update(self, stack: StackedModels, x: Tensor, y: Tensor, w: Tensor, z: Tensor, *,
               hits: list[list[list[int]]] | None = None, label_smoothing: float = 0.0, bf16: bool = False
               ) -> tuple[Tensor, list[Tensor]]:
        """The private gradient from one step's inputs on the device (:class:`DPBatch`: x [M, K, B, *shape], y
        and w [M, K, B], noise z [K, P]): (mean loss of each model's sampled examples [K], private grads in
        ``stack.trainable()`` order). Clipped sums (book-keeping or per-example), the Dirac canaries ``hits``,
        then ``(sum + sigma C z) / (q n)`` (Abadi et al. 2016, Algorithm 1). Once the fast path is verified
        (the first step) it reads no host value: this is the body a graphed step captures
        (:mod:`mlaudit.train.graphed`), the same code as the eager step."""
        k = len(self.pools)
        rows = [torch.arange(k)] if isinstance(stack, VmapStack) else [torch.tensor([i]) for i in range(k)]
        # the same groups as slices for indexing device tensors: a CPU index tensor is copied to the GPU from
        # pageable memory, and such a copy waits for the whole stream (three queue drains per step)
        spans = [slice(0, k)] if isinstance(stack, VmapStack) else [slice(i, i + 1) for i in range(k)]
        sums: list[list[Tensor]] = []
        loss_sum = torch.zeros(k, device=x.device)
        for mi in range(x.shape[0]):  # one micro-batch unless the Poisson draw exceeded B_max
            xb, yb, wb = x[mi], y[mi], w[mi]
            if self._use_fast(stack, xb, yb, label_smoothing):
                groups = self._fast_groups(stack, xb, yb, wb, label_smoothing, bf16)  # type: ignore[arg-type]
                part = [g for g, _ in groups]
            else:
                groups = per_example_grads(stack, xb, yb, label_smoothing=label_smoothing)
                part = [clipped_sum(g, wb[r], self.clip) for (g, _), r in zip(groups, spans)]
            if hits is not None:
                self._add_diracs(part, rows, hits[mi])
            loss_sum += torch.cat([(lo.detach() * wb[r]).sum(1) for (_, lo), r in zip(groups, spans)])
            sums = part if not sums else [[a + b for a, b in zip(s, p)] for s, p in zip(sums, part)]
        grads: list[Tensor] = []
        for s, sp in zip(sums, spans):
            grads += noisy_average(s, unflatten(z[sp], [t.shape[1:] for t in s]), self.sigma_c[sp], self.denom[sp])
        return loss_sum / w.sum((0, 2)).clamp(min=1.0), _to_trainable(stack, grads)

    @property
    def has_hooks(self) -> bool:
        """Whether an audit hook changes the step (a Dirac canary, a broken fixture): such steps run eagerly."""
        return self.canaries is not None or self.broken is not None

    def graph_unsupported(self, stack: StackedModels) -> str | None:
        """Why this run's step cannot be a CUDA graph (what ``recipe.cuda_graph: true`` would need), or None.
        Only the book-keeping path is graphed: the per-example path's vmapped gradients are compute-bound, not
        launch-bound, and were never checked under capture."""
        if self.fast_clip and isinstance(stack, LoopStack):
            return None
        layout = "loop" if isinstance(stack, LoopStack) else "vmap"
        return ("a DP-SGD step with book-keeping clipping in the loop layout (dp.clipping: fast, or auto on a model "
                "the fast-clipping rules cover; strategy: loop); this run clips per example (dp.clipping: "
                f"{self.cfg.clipping!r}, {layout} layout)")

    def graphable(self, stack: StackedModels, batch: DPBatch) -> bool:
        """Whether this step may replay a graph: the fast path, verified against autograd on an earlier (eager)
        step, one micro-batch (a draw beyond b_max runs eagerly), no canary."""
        return (self.fast_checked and self.fast_clip and isinstance(stack, LoopStack) and batch.x.shape[0] == 1
                and batch.hits is None)

    def _use_fast(self, stack: StackedModels, x: Tensor, y: Tensor, label_smoothing: float) -> bool:
        """Book-keeping clipping for this step? Only for a loop stack; on the first such step
        :func:`verify_fast_clip` checks model 0 (a failure raises for ``clipping: fast`` and falls back to
        the per-example path for ``auto``). The audit hooks act outside the clipped sum (a gradient
        canary's slot has weight 0 and C e_j is added to the sum; the broken fixtures change the clip
        norm or the noise), so they hold on either path."""
        if not (self.fast_clip and isinstance(stack, LoopStack)):
            return False
        if not self.fast_checked:
            self.fast_checked = True
            _set_mode(stack.modules[0], True)
            try:
                verify_fast_clip(stack.modules[0], _loop_layout(stack, x[0]), y[0], label_smoothing=label_smoothing)
            except UnsupportedModelError as e:
                if self.cfg.clipping == "fast":
                    raise
                warnings.warn(f"dp.clipping auto: using per-example clipping ({e})", UserWarning, stacklevel=3)
                self.fast_clip = False
        return self.fast_clip

    def _fast_groups(self, stack: LoopStack, x: Tensor, y: Tensor, w: Tensor, label_smoothing: float,
                     bf16: bool = False) -> list[tuple[list[Tensor], Tensor]]:
        """Per model: (clipped sums [1, *s] each, losses [1, B]) by book-keeping, from x [K, B, *shape],
        y and w [K, B]."""
        out = []
        for m, xk, yk, wk in zip(stack.modules, x, y, w):
            _set_mode(m, True)
            sums, losses = clipped_grad_sum(m, _loop_layout(stack, xk), yk, wk, clip=self.clip,
                                            label_smoothing=label_smoothing, bf16=bf16, compiled=stack.compiled)
            out.append(([s.unsqueeze(0) for s in sums], losses.unsqueeze(0)))
        return out

    def _take_canaries(self, idx: Tensor, w: Tensor) -> list[list[list[int]]] | None:
        """Find each model's sampled Dirac canaries in idx/w [M, K, B] (CPU), zero their weights in ``w``
        (their natural gradients are not used) and return, per micro-batch and model, the positions (in
        the model's canary list) sampled; None without canaries."""
        if self.canaries is None or self.canary_counts is None:
            return None
        hits: list[list[list[int]]] = [[[] for _ in self.canaries] for _ in range(idx.shape[0])]
        for i, mine in enumerate(self.canaries):
            if not mine:
                continue
            target = torch.tensor([c[0] for c in mine])
            slot = (idx[:, i, :, None] == target) & (w[:, i, :, None] > 0)  # [M, B, n]
            w[:, i].masked_fill_(slot.any(-1), 0.0)
            for mi, js in enumerate(slot.any(1).tolist()):
                hits[mi][i] = [j for j, h in enumerate(js) if h]
            self.canary_counts[i] += int(slot.any(1).sum())
        return hits

    def _add_diracs(self, part: list[list[Tensor]], rows: list[Tensor], hit: list[list[int]]) -> None:
        """Add C * e_j to the clipped sums ``part`` (groups of [G, *s]) for every canary sampled in this
        micro-batch (``hit``: per model, positions in its canary list)."""
        assert self.canaries is not None
        for sums, r in zip(part, rows):
            for local, i in enumerate(r.tolist()):
                for j in hit[i]:
                    _, pos, coord = self.canaries[i][j]
                    sums[pos][(local, *coord)] += self.cfg.clip

    def _augment(self, xb: Tensor, drawn: int) -> Tensor:
        """xb [K, B, *shape] augmented with each model's ``drawn`` draws from its CPU generator; slots beyond
        ``drawn`` (a graph bucket's weight-0 padding) are left as they are."""
        a = self.augment
        if a is None or xb.dim() != 5 or (a.crop_pad == 0 and not a.flip):
            return xb
        ps = [sample_augment_params(drawn, pad=a.crop_pad, flip=a.flip, generator=g, device="cpu")
              for g in self.sample_gens]
        pad = xb.shape[1] - drawn
        shift = torch.cat([torch.cat([q.shift, torch.zeros(pad, 2, dtype=q.shift.dtype)]) for q in ps])
        flip = torch.cat([torch.cat([q.flip, torch.zeros(pad, dtype=torch.bool)]) for q in ps])
        p = AugmentParams(shift=_upload(shift, xb.device), flip=_upload(flip, xb.device))
        return apply_augment(xb.flatten(0, 1), p).view_as(xb)

    def report(self, i: int, steps: int) -> dict[str, float]:
        """Model i's privacy: the accountant's epsilon for the ``steps`` taken (composed with the private
        normalisation statistics' releases, whose sigma is then ``dp_norm_noise_multiplier``), sigma, q,
        steps, delta."""
        sigma, q = self.noise_multipliers[i], self.sample_rates[i]
        sigma_norm = norm_noise(self.cfg)
        eps = math.inf if sigma <= 0 or steps < 1 or sigma_norm == 0 else epsilon(
            noise_multiplier=sigma, sample_rate=q, steps=steps, delta=self.cfg.delta, accountant=self.cfg.accountant,
            releases=self.releases)
        out = {"dp_epsilon": eps, "dp_noise_multiplier": sigma, "dp_sample_rate": q, "dp_steps": float(steps),
               "dp_delta": self.cfg.delta, "dp_clip": self.cfg.clip}
        if sigma_norm is not None:
            out["dp_norm_noise_multiplier"] = sigma_norm
        if self.canaries is not None and self.canary_counts is not None and self.canaries[i]:
            out["dp_canary_sampled"] = float(self.canary_counts[i])
        return out


def _upload(t: Tensor, device: torch.device) -> Tensor:
    """A step's CPU draws (indices, weights, augmentation) on ``device``. To CUDA through pinned memory
    without blocking: a copy from pageable memory first waits for the whole stream, which would drain
    the GPU's queue up to four times per DP step and expose the Python time of the next launches.
    PyTorch's caching host allocator keeps the pinned block until the copy has finished."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


FAST_SLOT_MULTIPLE = 8
"""Slots per book-keeping step are rounded up to this multiple (on average 4 padding slots, not 16)."""

GRAPH_SLOT_MULTIPLE = 32
"""Slots per graphed book-keeping step are rounded up to this multiple (at most b_max): a graph has fixed
shapes, so each width is one captured graph. At an expected batch of 256 the widest draw (sd 16) lands in
about five buckets (224 to 352), each warmed up and captured once; padding costs 16 slots on average (6%)."""


@dataclass
class DPBatch:
    """One DP-SGD step's inputs on the training device (:meth:`DPTraining.draw`): the Poisson batch as M
    micro-batches of B slots (M = 1 unless the draw exceeded b_max)."""

    x: Tensor  # [M, K, B, *shape], gathered and augmented
    y: Tensor  # [M, K, B]
    w: Tensor  # [M, K, B] 0/1 slot weights (0: padding, or a sampled Dirac canary's slot)
    z: Tensor  # [K, P] standard normal noise, row k from model k's generator (P parameters per model)
    hits: list[list[list[int]]] | None = None  # per micro-batch and model: the Dirac canaries sampled


def _widen(idx: Tensor, w: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """idx and w [M, K, B] padded to ``width`` slots: indices repeat each row's first, weights are 0, so
    the padding contributes nothing (every clipped gradient and loss is multiplied by its weight)."""
    pad = width - idx.shape[2]
    if pad <= 0:
        return idx, w
    return (torch.cat([idx, idx[:, :, :1].expand(-1, -1, pad)], 2),
            torch.cat([w, torch.zeros(*w.shape[:2], pad, dtype=w.dtype)], 2))


def _loop_layout(stack: LoopStack, x: Tensor) -> Tensor:
    """One model's images in the stack's memory format (channels_last on CUDA, as its forward)."""
    return x.contiguous(memory_format=torch.channels_last) if stack.channels_last and x.dim() == 4 else x


def _to_trainable(stack: StackedModels, grads: list[Tensor]) -> list[Tensor]:
    """Private grads (each [G, *s]) in the layout of ``stack.trainable()``: [K, *s] for vmap, [*s] for loop."""
    return grads if isinstance(stack, VmapStack) else [g.squeeze(0) for g in grads]
