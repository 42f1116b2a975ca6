"""The one training loop: K models of one architecture trained together (K = 1 is sequential).

Every model in mlaudit is trained here, whether one user model or 64 shadow models at once.
The K models live in a :class:`~mlaudit.train.stacked.StackedModels` (stacked tensors under
torch.func ``vmap``, or K plain channels_last modules for conv nets on CUDA; BatchNorm statistics
are per model in both). The loop is flat and reads top to bottom:

    for epoch:  draw each model's data order and augmentation from its own CPU generator
        for step:  gather [K, B] examples (views applied) -> augment -> forward -> per-model CE loss
                   -> grads of the summed loss (models are independent) -> stacked optimizer step

On CUDA the part after "augment" (``step_body``) is replayed as one CUDA graph (``recipe.cuda_graph``,
:mod:`mlaudit.train.graphed`): the same function, captured once and launched with one call per step. A
DP-SGD step draws on the host first (:meth:`~mlaudit.privacy.dpsgd.DPTraining.draw`), then runs ``dp_body``
(private gradient and update), replayed as a graph per slot bucket where the book-keeping path applies.

Reproducibility: a model's initial weights come from ``torch.manual_seed(seed)`` on the CPU and its
data order and augmentation from a CPU ``torch.Generator`` seeded from ``seed``, so the same trial
trains on the same batches whatever K, the executor or the device. On CPU a repeat with the same
chunk is bitwise reproducible, and a model trained in a chunk of K agrees with the same trial
trained alone to float32 rounding (vmap batches the kernels, which changes the summation order:
max |diff| ~ 5e-7 after 8 steps of small CNNs, see tests/factory/test_batched.py); on CUDA, cuDNN convolution algorithms and bf16 autocast make runs agree only up to
floating-point tolerance (set ``torch.use_deterministic_algorithms(True)`` for bitwise repeats at a
speed cost).

Epochs: model k with n_k training examples takes S = ceil(n_k / B) full batches per epoch; its
last batch is topped up with the first examples of the same epoch's permutation, so every step
uses exactly B examples (vmap needs equal batch sizes). Models trained together must have equal S;
the factory groups trials accordingly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.augment import AugmentParams, apply_augment, sample_augment_params
from ..data.base import TensorDataset
from ..data.view import DataView
from ..errors import ConfigError, TrainingError
from ..models.registry import PRETRAINED_FLAG
from .adversarial import adversarial_batch, trades_loss
from .graphed import GraphedStep, model_streams
from .hooks import DPStepHooks
from .optim import Rate, StackedOptimizer, apply_rates, graph_safe, make_optimizer, slot_active, slot_rates
from .recipe import AugmentConfig, Recipe
from .stacked import LoopStack, StackedModels, choose_strategy  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from ..privacy.dpsgd import DPTraining

# Dataset sources whose images must not be flipped or shifted by default (digits, handwriting).
NO_AUGMENT_BY_DEFAULT = frozenset({"digits", "mnist", "synthetic"})


@dataclass
class TrainOutput:
    """What training one model produced (weights on CPU, last-epoch mean loss, steps taken; with DP-SGD
    ``privacy`` holds dp_epsilon, dp_noise_multiplier, dp_sample_rate, dp_steps, dp_delta, dp_clip)."""

    seed: int
    state_dict: dict[str, Tensor]
    train_loss: float
    steps: int
    privacy: dict[str, float] = field(default_factory=dict)
    step_path: str = "eager"
    """How the steps ran: ``eager``, ``cuda-graph`` or ``eager (capture failed: ...)`` (recipe.cuda_graph); with
    ``(... captures paused)`` where steps ran eagerly while another thread was on the GPU
    (:func:`mlaudit.train.graphed.pause_captures`)."""


def init_models(model_fn: Callable[[], nn.Module], seeds: Sequence[int]) -> list[nn.Module]:
    """Build one model per seed with the CPU RNG seeded, so init is the same on every device."""
    out = []
    for s in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            out.append(model_fn())
    return out


def resolve_augment(recipe: Recipe, dataset_name: str, example_shape: tuple[int, ...]) -> AugmentConfig | None:
    """The augmentation actually used: none for vector data; ``auto`` -> crop 4 + flip for natural
    images of side >= 16 and none for digit-like sources (flipping a 2 makes no sense)."""
    if len(example_shape) != 3 or recipe.augment == "none":
        return None
    if isinstance(recipe.augment, AugmentConfig):
        return recipe.augment
    if dataset_name in NO_AUGMENT_BY_DEFAULT or min(example_shape[1:]) < 16:
        return None
    return AugmentConfig(crop_pad=4, flip=True)


def use_bf16(recipe: Recipe, device: torch.device) -> bool:
    return device.type == "cuda" and recipe.precision in ("auto", "bf16")


def train_stack(
    models: Sequence[nn.Module],
    data: TensorDataset,
    recipe: Recipe,
    *,
    seeds: Sequence[int],
    lr: float,
    device: torch.device,
    views: Sequence[DataView | None] | None = None,
    hooks: Sequence[DPStepHooks | None] | None = None,
    masks: Tensor | None = None,
    augment: AugmentConfig | None = None,
    on_epoch: Callable[[int, Tensor], None] | None = None,
    strategy: str = "auto",
    on_epoch_models: Callable[[int, StackedModels], None] | None = None,
) -> list[TrainOutput]:
    """Train ``len(models)`` models together, each on its own data order, view and subset.

    Args:
        models: K freshly initialised modules of one architecture (see :func:`init_models`).
        data: the clean training split (x [N, *shape], y [N]); moved to ``device`` once.
        recipe: optimizer, schedule, epochs, batch size, precision.
        seeds: K ints; seed the data order and augmentation of each model.
        lr: base learning rate (``recipe.resolved_lr`` for the architecture).
        views: K optional :class:`DataView` over ``data`` (poisons, relabels, inserts); models that
            share one view object share its gathers.
        hooks: K optional :class:`~mlaudit.train.hooks.DPStepHooks` (audit hooks of the DP-SGD step:
            a gradient canary, a broken-DP-SGD fixture); needs ``recipe.dp``.
        masks: optional bool [K, N_total] subset of (virtual) indices each model may train on.
        augment: augmentation config (None = no augmentation).
        on_epoch: called with (epoch, mean loss per model [K]) after each epoch.
        on_epoch_models: called with (epoch, the stack) after each epoch, for diagnostics that need
            the weights mid-training (e.g. gradient alignment, seed 002 Fig. 1.3b); must not modify them.
        strategy: stack layout, ``auto``/``vmap``/``loop`` (see :mod:`mlaudit.train.stacked`).

    With ``recipe.dp`` each step is a DP-SGD step (Poisson batches, per-example clipping, noise;
    :mod:`mlaudit.privacy.dpsgd`) and the data order below is not used. With ``recipe.adversarial``
    each batch (after augmentation) is replaced by PGD examples against each model's current weights
    (:mod:`mlaudit.train.adversarial`); with its ``method: trades`` (Zhang et al. 2019, eq. 5) the
    step instead runs one forward of [clean; adversarial] (KL-maximising examples), [K, 2B, *shape],
    and each model's loss is CE(clean) + beta * KL(clean || adversarial)
    (:func:`~mlaudit.train.adversarial.trades_loss`; BatchNorm in train mode thus normalises the clean
    and adversarial halves together). With ``recipe.noise_sigma`` > 0 each batch (after augmentation)
    gets Gaussian noise N(0, noise_sigma^2 I) (Cohen et al. 2019, randomized smoothing), model k's
    drawn on ``device`` from its own generator seeded from its seed (independent of K; CPU and CUDA
    draw different noise).

    Returns: K :class:`TrainOutput`, in input order.

    Raises: :class:`TrainingError` naming model, epoch and step when a loss is NaN or inf;
    :class:`~mlaudit.errors.UnsupportedModelError` for BatchNorm under DP.
    """
    k = len(models)
    data, groups, pools, spe = _prepare(data, views, masks, k, len(seeds), recipe.batch_size, device)
    bsz = recipe.batch_size
    gens = [torch.Generator().manual_seed(int(s) + 0x5EED) for s in seeds]
    watched = _watched_start(models, hooks)  # theta_0[j] of each watched coordinate, before any data init
    _data_init(models, data, groups, pools, seeds)
    _fit_dp_stats(models, data, groups, pools, seeds, recipe)
    stack = StackedModels.from_modules(models, device, strategy=strategy, channels_last=recipe.channels_last,
                                       compile=recipe.compile is True)  # "auto" is the factory's to resolve
    compiled = isinstance(stack, LoopStack) and stack.compiled
    plist = stack.trainable()
    opt = make_optimizer(recipe, plist, names=stack.trainable_names(), leading_k=stack.leading_k, base_lr=lr)
    flip_base = _alternating_flips(augment, pools, gens, device)
    bf16 = use_bf16(recipe, device)
    dp = None
    if hooks is not None and any(h is not None for h in hooks) and recipe.dp is None:
        raise ConfigError("training hooks act on the DP-SGD step, but the recipe has no dp; add recipe.dp")
    if recipe.dp is not None:
        from ..privacy.dpsgd import GRAPH_SLOT_MULTIPLE, DPTraining  # lazy: privacy imports train

        dp = DPTraining.start(recipe.dp, models, pools, seeds=seeds, batch_size=bsz, epochs=recipe.epochs,
                              default_spe=spe, device=device, augment=augment, hooks=hooks)
        spe = dp.steps_per_epoch
    graph_step = use_cuda_graph(recipe, device, opt, dp=dp, stack=stack)
    # a captured step must not reuse autocast's cast-weight cache across replays (PyTorch's graph notes); a compiled
    # forward casts inside its graph, and dynamo guards on the flag: compiled steps, graphed or not, keep it off, so
    # a graph compiled without capture (the factory's background compile) serves the captured step as it is
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not (graph_step or compiled)) if bf16
                else contextlib.nullcontext())
    check_every_step = device.type == "cpu"
    adv_gens = [torch.Generator().manual_seed(int(sd) + 0xAD7) for sd in seeds]  # adversarial training's starts
    adv = recipe.adversarial
    trades_beta = adv.beta if adv is not None and adv.method == "trades" else None  # None: not TRADES
    noise_gens = ([torch.Generator(device=device).manual_seed(int(sd) + NOISE_SEED) for sd in seeds]
                  if recipe.noise_sigma > 0 else [])

    def step_body(xb: Tensor, yb: Tensor, rates: Sequence[Rate], active: tuple[bool, ...]) -> Tensor:
        """The step (eager, or captured by :class:`GraphedStep`): forward, per-model loss [K], update."""
        with autocast:
            logits = stack.forward(xb, train=True)
        if trades_beta is not None:  # CE(clean) + beta KL(clean || adv) per model [K]
            loss_k = trades_loss(logits, yb, beta=trades_beta, label_smoothing=recipe.label_smoothing)
        else:
            loss_k = F.cross_entropy(
                logits.float().flatten(0, 1), yb.flatten(), label_smoothing=recipe.label_smoothing,
                reduction="none").view(k, yb.shape[1]).mean(1)
        grads = torch.autograd.grad(loss_k.sum() * (bsz if recipe.loss_reduction == "sum" else 1), plist)
        apply_rates(opt, list(grads), rates, active)
        return loss_k.detach()

    dp_bf16 = device.type == "cuda" and recipe.precision == "bf16"  # DP: bf16 only when asked (see dpsgd)

    def dp_body(xb: Tensor, yb: Tensor, rates: Sequence[Rate], active: tuple[bool, ...], wb: Tensor, z: Tensor,
                hits: list[list[list[int]]] | None = None) -> Tensor:
        """The DP-SGD step after its host draws (eager, or captured by :class:`GraphedStep`): the private
        gradient from the batch xb, yb [M, K, B], slot weights wb and noise z (:meth:`DPTraining.update`),
        then the update."""
        assert dp is not None
        loss_k, grads = dp.update(stack, xb, yb, wb, z, hits=hits, label_smoothing=recipe.label_smoothing,
                                  bf16=dp_bf16)
        apply_rates(opt, grads, rates, active)
        return loss_k.detach()

    graphed = None
    if graph_step:
        # DP-SGD: one graph per slot bucket (dpsgd.GRAPH_SLOT_MULTIPLE), so any number of input shapes
        graphed = GraphedStep(step_body if dp is None else dp_body, slots=len(slot_rates(opt, recipe, lr, 0.0)),
                              device=device, shapes=1 if dp is None else None)
        if dp is None and isinstance(stack, LoopStack) and k > 1:  # K independent branches, run concurrently
            stack.streams = model_streams(device, k)
    first_bad = torch.full((k,), -1, dtype=torch.long, device=device)
    step = 0
    last_loss = torch.zeros(k, device=device)
    for epoch in range(recipe.epochs):
        if dp is None:
            # drawn on the CPU (the same batches on every device), sent as int32: fewer host-to-device bytes
            order = torch.stack([_epoch_order(p, spe * bsz, g) for p, g in zip(pools, gens)]).int().to(device).long()
            aug = _draw_augment(augment, spe * bsz, gens, device)
        epoch_loss = torch.zeros(k, device=device)
        for s in range(spe):
            rates = slot_rates(opt, recipe, lr, epoch + s / spe)
            active = slot_active(opt, rates)
            if dp is not None:
                # host draws first (Poisson batch, canaries, gathers, augmentation, noise); the device part is
                # replayed when the graph applies: the fast path after its first (verified) step, one micro-batch.
                # Compiled clipping also draws bucketed widths: a chunked layer makes inductor compile each width
                b = dp.draw(stack, lambda i: _gather(data, groups, i),
                            bucket=GRAPH_SLOT_MULTIPLE if graphed is not None or compiled else None)
                if graphed is not None and dp.graphable(stack, b):
                    loss_k = graphed(b.x, b.y, rates, active, b.w, b.z)
                else:
                    loss_k = dp_body(b.x, b.y, rates, active, b.w, b.z, b.hits)
            else:
                idx = order[:, s * bsz:(s + 1) * bsz]  # [K, B] virtual indices
                xb, yb = _gather(data, groups, idx)
                if aug is not None:  # aug = (shift [K, S*B, 2], flip [K, S*B]); this step's slice, flattened
                    sl = slice(s * bsz, (s + 1) * bsz)
                    flips = aug[1][:, sl] if flip_base is None else flip_base.gather(1, idx) ^ bool(epoch % 2)
                    p = AugmentParams(shift=aug[0][:, sl].flatten(0, 1), flip=flips.flatten(0, 1))
                    xb = apply_augment(xb.flatten(0, 1), p, pad_mode=augment.pad_mode).view_as(xb)
                if noise_gens:  # Gaussian noise training (randomized smoothing): x + N(0, sigma^2 I)
                    xb = add_noise(xb, recipe.noise_sigma, noise_gens)
                if adv is not None:  # PGD-AT: train on the PGD examples; TRADES: on [clean; adv], [K, 2B, ...]
                    x_adv = adversarial_batch(stack, xb, yb, adv, generators=adv_gens)
                    xb = x_adv if trades_beta is None else torch.cat([xb, x_adv], 1)
                loss_k = step_body(xb, yb, rates, active) if graphed is None else graphed(xb, yb, rates, active)
            loss_d = loss_k.detach()
            epoch_loss += loss_d
            bad = ~torch.isfinite(loss_d)
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
            if check_every_step and bool(bad.any()):
                _raise_nonfinite(first_bad, seeds, spe, compiled=compiled)
            step += 1
        if bool((first_bad >= 0).any()):
            _raise_nonfinite(first_bad, seeds, spe, compiled=compiled)
        last_loss = epoch_loss / spe
        if on_epoch is not None:
            on_epoch(epoch, last_loss.detach().cpu())
        if on_epoch_models is not None:
            on_epoch_models(epoch, stack)
    if isinstance(stack, LoopStack):
        stack.streams = None  # evaluation after training runs on the current stream
    losses = last_loss.cpu().tolist()
    path = "eager" if graphed is None else graphed.path
    outs = [TrainOutput(int(seeds[i]), stack.state_dict(i), float(losses[i]), step,
                        dp.report(i, step) if dp is not None else {}, path) for i in range(k)]
    for i, (name, j, theta0) in watched.items():
        outs[i].privacy["dp_watch_update"] = float(outs[i].state_dict[name].flatten()[j].double() - theta0)
    return outs


def _watched_start(models: Sequence[nn.Module], hooks: Sequence[DPStepHooks | None] | None
                   ) -> dict[int, tuple[str, int, float]]:
    """Model index -> (parameter, coordinate, theta_0 value in float64) of each ``hooks[i].watch``."""
    out: dict[int, tuple[str, int, float]] = {}
    for i, h in enumerate(hooks or ()):
        if h is not None and h.watch is not None:
            name, j = h.watch
            params = dict(models[i].named_parameters())
            if name not in params or not 0 <= j < params[name].numel():
                raise ConfigError(f"hooks.watch {h.watch!r}: the model has no parameter {name!r} with a flat coordinate "
                                  f"{j}; its parameters: {', '.join(params)}")
            out[i] = (name, j, float(params[name].detach().flatten()[j].double()))
    return out


def use_cuda_graph(recipe: Recipe, device: torch.device, opt: StackedOptimizer, *, dp: DPTraining | None = None,
                   stack: StackedModels | None = None) -> bool:
    """Whether the step runs as a CUDA graph (:mod:`mlaudit.train.graphed`): ``recipe.cuda_graph`` (true or auto)
    on a CUDA device. With ``recipe.compile`` the compiled forward (and its compiled backward) is what the graph
    captures: the compile happens in the eager warm-up steps, the graph then replays inductor's fused kernels. An
    optimizer with host state (Adam), and a DP-SGD step that clips per example (``dp``:
    :meth:`~mlaudit.privacy.dpsgd.DPTraining.graph_unsupported`; the book-keeping path in the loop ``stack`` is
    graphed), run eagerly under ``auto`` and are refused under ``true``. A DP-SGD step with
    audit hooks (Dirac canaries, broken fixtures: host-side choices per step) always runs eagerly."""
    if recipe.cuda_graph is False or device.type != "cuda":
        return False
    if recipe.dp is not None and (dp is None or stack is None):
        raise TypeError("use_cuda_graph: a DP recipe needs its DPTraining and stack (dp=, stack=)")
    if dp is not None and dp.has_hooks:
        return False
    why = None
    if not graph_safe(opt):
        why = (f"an optimizer without host-side state (sgd or muon); {recipe.optimizer!r} keeps its bias-correction "
               "step count on the host")
    elif dp is not None and stack is not None:
        why = dp.graph_unsupported(stack)
    if why is None:
        return True
    if recipe.cuda_graph == "auto":
        return False
    raise ConfigError(f"recipe.cuda_graph: true needs {why}; set cuda_graph: auto (eager where no graph applies) "
                      "or false")


NOISE_SEED = 0x501CE
"""Offset of the seed of each model's noise generator (``recipe.noise_sigma``), separate from its
data-order and augmentation generator so turning the noise on leaves its batches unchanged."""


def add_noise(xb: Tensor, sigma: float, generators: Sequence[torch.Generator]) -> Tensor:
    """xb [K, B, *shape] plus N(0, sigma^2) noise, model k's [B, *shape] drawn from ``generators[k]``
    (on the generator's device, which must be xb's)."""
    noise = torch.stack([torch.randn(xb.shape[1:], generator=g, device=xb.device, dtype=xb.dtype)
                         for g in generators])
    return xb + sigma * noise


def _prepare(data: TensorDataset, views: Sequence[DataView | None] | None, masks: Tensor | None, k: int,
             n_seeds: int, bsz: int, device: torch.device
             ) -> tuple[TensorDataset, list[tuple[DataView | None, list[int]]], list[Tensor], int]:
    """Check the inputs, move data and each distinct view to ``device`` once, and return (data,
    [(view, its models)] so a shared view is gathered once per step, per-model pools, steps per epoch)."""
    if k == 0 or n_seeds != k or (views is not None and len(views) != k) or (masks is not None and len(masks) != k):
        raise ConfigError(f"train_stack needs one seed (and view/mask row, if given) per model; got {k} models, "
                          f"{n_seeds} seeds, {None if views is None else len(views)} views, "
                          f"{None if masks is None else len(masks)} mask rows")
    data = data if on_device(data.device, device) else data.to(device)
    moved: dict[int, DataView] = {}
    vs = [None if v is None else moved.setdefault(id(v), v if on_device(v.device, device) else v.to(device))
          for v in (views if views is not None else [None] * k)]
    pools = training_pools(data, vs, masks)
    groups: dict[int, tuple[DataView | None, list[int]]] = {}
    for i, v in enumerate(vs):
        groups.setdefault(id(v), (v, []))[1].append(i)
    sizes = [len(p) for p in pools]
    spe = {math.ceil(n / bsz) for n in sizes}
    if len(spe) != 1:
        raise ConfigError(f"models trained together need equal steps per epoch (batch {bsz}), got training-set "
                          f"sizes {sizes}; train them in separate calls (the factory groups them)")
    return data, list(groups.values()), pools, spe.pop()


def on_device(have: torch.device, want: torch.device) -> bool:
    """Whether a tensor on ``have`` already is on ``want`` (``cuda`` means the current GPU)."""
    return have.type == want.type and (want.index is None or have.index == want.index)


def training_pools(data: TensorDataset, views: list[DataView | None], masks: Tensor | None) -> list[Tensor]:
    """Per model, the CPU int64 tensor of virtual indices it trains on (view's kept set & mask).

    ``masks`` is bool [K, M] with M >= every model's number of virtual indices (rows padded with
    False beyond a model's own N_total are allowed); a shorter or non-bool mask is a ConfigError.
    """
    if masks is not None and (masks.dtype != torch.bool or masks.dim() != 2):
        raise ConfigError(f"masks must be bool [K, N_total], got {masks.dtype} {list(masks.shape)}")
    pools = []
    for i, v in enumerate(views):
        if v is not None and v.num_base != len(data):
            raise ConfigError(f"view {i} is over a base of {v.num_base} examples but the training split has "
                              f"{len(data)}; build views over the split being trained on")
        total = v.num_total if v is not None else len(data)
        pool = v.kept_indices().cpu() if v is not None else torch.arange(total)
        if masks is not None:
            m = masks[i].cpu()
            if m.numel() < total:
                raise ConfigError(f"subset mask of model {i} has {m.numel()} entries but its data has {total} "
                                  "(virtual) indices; give one bool per index of the base split plus inserted ones")
            pool = pool[m[pool]]
        if len(pool) == 0:
            raise ConfigError(f"model {i} has no training examples after its view and subset mask")
        pools.append(pool)
    return pools


DATA_INIT_SEED = 0xDA7A
"""Offset of the seed of the generator that picks the images a model's ``data_init`` sees (separate
from the data-order generator, so adding ``data_init`` to a model leaves its batches unchanged)."""
DATA_INIT_MAX = 5000


def _data_init(models: Sequence[nn.Module], data: TensorDataset, groups: list[tuple[DataView | None, list[int]]],
               pools: list[Tensor], seeds: Sequence[int]) -> None:
    """Give every model that defines ``data_init(x [n, *shape])`` (e.g. the whitening stem of
    ``airbench``) up to 5000 images drawn, seeded, from its own training pool (through its view)."""
    if not hasattr(models[0], "data_init") or getattr(models[0], PRETRAINED_FLAG, False):
        return  # a model loaded from model.init keeps its pretrained weights
    view_of = {i: v for v, members in groups for i in members}
    for i, (m, pool) in enumerate(zip(models, pools)):
        g = torch.Generator().manual_seed(int(seeds[i]) + DATA_INIT_SEED)
        pick = pool[torch.randperm(len(pool), generator=g)[:DATA_INIT_MAX]].to(data.x.device)
        v = view_of.get(i)
        x = data.x[pick] if v is None else v.gather(pick)[0]
        m.data_init(x)


DP_STATS_SEED = 0xD57A7
"""Offset of the seed of the generator of each model's private normalisation statistics' noise."""


def _fit_dp_stats(models: Sequence[nn.Module], data: TensorDataset, groups: list[tuple[DataView | None, list[int]]],
                  pools: list[Tensor], seeds: Sequence[int], recipe: Recipe) -> None:
    """Fix the DP normalisation statistics of every model built with ``norm: dp-stats`` from its own training
    pool (through its view), before training (:func:`mlaudit.privacy.normstats.fit_dp_stats`); refuse a
    ``dp.normalisation`` for models without such a layer, and such a layer without it."""
    from ..privacy.normstats import FEATURE_BATCH, dp_stats_norms, fit_dp_stats  # lazy: privacy imports train

    wanted = recipe.dp is not None and recipe.dp.normalisation is not None
    has = bool(dp_stats_norms(models[0]))
    if wanted != has:
        raise ConfigError("recipe.dp.normalisation (privately estimated statistics) needs a model built with "
                          "norm: dp-stats (scatter-linear, scatter-cnn)" if wanted else
                          "a model built with norm: dp-stats needs recipe.dp with dp.normalisation "
                          "(e.g. {share: 0.1, clip_mean: 1.0, clip_second: 1.0}); or use norm: group")
    if not has:
        return
    assert recipe.dp is not None
    view_of = {i: v for v, members in groups for i in members}
    for i, (m, pool) in enumerate(zip(models, pools)):
        v = view_of.get(i)
        dev_pool = pool.to(data.x.device)
        batches = ((data.x[b] if v is None else v.gather(b)[0]) for b in dev_pool.split(FEATURE_BATCH))
        home = dp_stats_norms(m)[0].mean.device  # features on the data's device; the model goes back after
        fit_dp_stats(m.to(data.x.device), batches, len(pool), recipe.dp,
                     torch.Generator().manual_seed(int(seeds[i]) + DP_STATS_SEED))
        m.to(home)


def _alternating_flips(augment: AugmentConfig | None, pools: list[Tensor], gens: list[torch.Generator],
                       device: torch.device) -> Tensor | None:
    """For ``flip: alternating``: per model a random flip bit for each of its (virtual) indices, bool
    [K, N_total]; epoch e flips index i iff ``bit[i] xor (e odd)`` (Jordan 2024, section 3.6)."""
    if augment is None or augment.flip != "alternating":
        return None
    n_total = max(int(p.max()) + 1 for p in pools)
    return torch.stack([torch.rand(n_total, generator=g) < 0.5 for g in gens]).to(device)


def _epoch_order(pool: Tensor, total: int, g: torch.Generator) -> Tensor:
    perm = pool[torch.randperm(len(pool), generator=g)]
    if total > len(perm):  # top up the last batch from the start of this epoch's order
        reps = math.ceil(total / len(perm))
        perm = perm.repeat(reps)
    return perm[:total]


def _draw_augment(augment: AugmentConfig | None, n: int, gens: list[torch.Generator],
                  device: torch.device) -> tuple[Tensor, Tensor] | None:
    """One epoch of augmentation per model from its own generator: (shift [K, n, 2], flip [K, n])."""
    if augment is None or (augment.crop_pad == 0 and not augment.flip):
        return None
    ps = [sample_augment_params(n, pad=augment.crop_pad, flip=bool(augment.flip), generator=g, device="cpu")
          for g in gens]
    shift = torch.stack([p.shift for p in ps])
    small = shift.to(torch.int8) if augment.crop_pad < 128 else shift  # 8x fewer bytes to send
    return small.to(device).long(), torch.stack([p.flip for p in ps]).to(device)


def _gather(data: TensorDataset, groups: list[tuple[DataView | None, list[int]]], idx: Tensor
            ) -> tuple[Tensor, Tensor]:
    """idx [K, B] -> x [K, B, *shape], y [K, B]; one gather per distinct view."""
    if len(groups) == 1:
        v = groups[0][0]
        flat = idx.flatten()
        x, y = (data.x[flat], data.y[flat]) if v is None else v.gather(flat)
        return x.view(*idx.shape, *x.shape[1:]), y.view(idx.shape)
    x = torch.empty(*idx.shape, *data.x.shape[1:], dtype=data.x.dtype, device=idx.device)
    y = torch.empty(idx.shape, dtype=torch.long, device=idx.device)
    for v, members in groups:
        rows = torch.tensor(members, device=idx.device)
        flat = idx[rows].flatten()
        xv, yv = (data.x[flat], data.y[flat]) if v is None else v.gather(flat)
        x[rows] = xv.view(len(members), idx.shape[1], *xv.shape[1:])
        y[rows] = yv.view(len(members), idx.shape[1])
    return x, y


COMPILED_NAN_HINT = ("recipe.compile is on, and inductor's kernels are not the eager ones (until 2026-12-07 fastcnn's "
                     "bf16 global max pool had NaN gradients compiled and none eager); retry with compile: false "
                     "(or precision: fp32) before lowering the learning rate")


def _raise_nonfinite(first_bad: Tensor, seeds: Sequence[int], spe: int, *, compiled: bool = False) -> None:
    fb = first_bad.cpu().tolist()
    i = next(j for j, s in enumerate(fb) if s >= 0)
    epoch, step = divmod(fb[i], spe)
    fix = COMPILED_NAN_HINT if compiled else "lower the learning rate or check the data for NaN/inf values"
    raise TrainingError(
        f"loss became NaN/inf for model {i} (seed {seeds[i]}) at epoch {epoch + 1}, step {step + 1} "
        f"(global step {fb[i] + 1}); {fix}",
        seed=seeds[i], epoch=epoch + 1, step=step + 1,
    )
