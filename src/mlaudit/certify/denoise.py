"""Denoised smoothing: a denoiser D in front of any classifier f, smoothed as one classifier.

    g(x) = argmax_c P(f(D(x + eps)) = c),   eps ~ N(0, sigma^2 I)

Salman, Sun, Yang, Kapoor & Kolter, "Denoised Smoothing: A Provable Defense for Pretrained Classifiers"
(NeurIPS 2020): f need not have been trained with noise; D removes it. The certificate of Cohen et al.
(2019) holds unchanged, since f o D is just another base classifier: :class:`Denoised` composes the two
into one ``nn.Module``, and :func:`~mlaudit.certify.certify`, :func:`~mlaudit.certify.predict` and
:func:`~mlaudit.certify.sample_counts` run on it as on any model (one sampling loop).

Two denoisers:

* :class:`DnCNN` (Zhang, Zuo, Chen, Meng & Zhang, "Beyond a Gaussian Denoiser: Residual Learning of Deep
  CNN for Image Denoising", IEEE TIP 2017): a conv-ReLU stack n(.) that predicts the noise, residual output
  D(x~) = x~ - n(x~). :func:`train_denoiser` fits it on the user's data at one sigma with Salman et al.'s
  MSE objective E ||D(x + eps) - x||^2, or their stability objective through the frozen classifier,
  E CE(f(D(x + eps)), argmax f(x)).
* :class:`DiffusionDenoiser` (Carlini, Tramer, Dvijotham, Rice, Sun & Kolter, "(Certified!!) Adversarial
  Robustness for Free!", ICLR 2023): one step of a pretrained DDPM (Ho, Jain & Abbeel 2020). The forward
  process is x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z, z ~ N(0, I); x + eps with eps ~ N(0, sigma^2 I)
  scaled by sqrt(abar_t) is exactly such an x_t when

      sigma^2 = (1 - abar_t) / abar_t                                  (Carlini et al., Sec. 3)

  (sigma in the model's units: 2 sigma for data in [0, 1] mapped to the model's [-1, 1]).
  :func:`ddpm_timestep` picks t* = argmin_t |(1 - abar_t) / abar_t - sigma^2|; :func:`ddpm_denoise`
  forms x_t* = sqrt(abar_t*) (x + eps), predicts the noise eps_hat = unet(x_t*, t*) and returns the
  one-shot estimate

      x_0 = (x_t* - sqrt(1 - abar_t*) eps_hat) / sqrt(abar_t*)                              (DDPM eq. 15)

  or, with ``steps = k > 1``, runs deterministic DDIM (Song, Meng & Ermon 2021, eq. 12 with eta = 0)
  from t* down to 0 in k model calls to compare one-shot with multi-step denoising.

The diffusion model is anything ``diffusers``-shaped: ``unet(x_t, t)`` returning a tensor or an object
with ``.sample`` (``diffusers.UNet2DModel``), and ``alphas_cumprod`` [T] (``DDPMScheduler.alphas_cumprod``).
:func:`load_diffusers_pipeline` loads a pipeline saved in a local folder (diffusers is optional).
"""

from __future__ import annotations

import importlib
import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ConfigError, TrainingError
from ..query import forward_batched
from ..query.modes import evaluating, training

Objective = Literal["mse", "stability"]
OBJECTIVES: tuple[str, ...] = ("mse", "stability")
DIFFUSERS_INSTALL = "pip install diffusers"


class Denoised(nn.Module):
    """The composed base classifier x -> f(D(x)) of denoised smoothing (Salman et al. 2020).

    ``classifier`` f: [m, *shape] -> logits [m, C]; ``denoiser`` D: [m, *shape] -> [m, *shape] (same
    units as the inputs). Smoothing it (``certify(Denoised(f, D), x, sigma=...)``) certifies
    g(x) = argmax_c P(f(D(x + eps)) = c): the noise is added before D, by the sampling functions.
    f is registered first, so the sampling functions run on f's device.

    D must return its input's shape: with ``input_shape`` ([C, H, W], no batch dimension) D is run once at
    construction on one zero input (:func:`check_denoiser`), so a D that changes the shape is refused before
    any sampling; every forward pass checks the shape as well. Both raise a
    :class:`~mlaudit.errors.ConfigError` naming the denoiser, the input shape and the shape it returned.
    """

    def __init__(self, classifier: nn.Module, denoiser: nn.Module, *,
                 input_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.denoiser = denoiser
        if input_shape is not None:
            check_denoiser(denoiser, input_shape)

    def forward(self, x: Tensor) -> Tensor:
        out = self.denoiser(x)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ConfigError(_shape_message(self.denoiser, "", list(x.shape), out))
        return self.classifier(out)


def _name(denoiser: Any, where: str) -> str:
    return where or f"the denoiser {type(denoiser).__name__}"


def _shape_message(denoiser: Any, where: str, shape: list[int], out: Any) -> str:
    got = f"shape {list(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}, not a tensor,"
    return (f"{_name(denoiser, where)} returned {got} for inputs of shape {shape}; a denoiser must return its "
            f"input's shape (allowed: an output of shape {shape}, in the inputs' units)")


@torch.no_grad()
def check_denoiser(denoiser: Callable[[Tensor], Any], input_shape: Sequence[int], *, where: str = "",
                   device: torch.device | str | None = None) -> None:
    """Refuse a denoiser that does not map [B, *input_shape] to [B, *input_shape]: run it once on a zero
    input [2, *input_shape] (eval mode, no gradient, every mode flag restored; on ``device``, default the
    denoiser's first parameter's, else the CPU) and raise a :class:`~mlaudit.errors.ConfigError` naming
    ``where`` (default: "the denoiser <its class>"), the input shape and the shape it returned (or the error
    it raised on that input)."""
    shape = [2, *(int(s) for s in input_shape)]
    dev = torch.device(device) if device is not None else (
        _device_of(denoiser, torch.device("cpu")) if isinstance(denoiser, nn.Module) else torch.device("cpu"))
    first = next(denoiser.parameters(), None) if isinstance(denoiser, nn.Module) else None
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.zeros(shape, device=dev, dtype=dtype)
    with evaluating(*([denoiser] if isinstance(denoiser, nn.Module) else [])):
        try:
            out = denoiser(x)
        except (RuntimeError, ValueError) as e:  # ConfigError is a ValueError (e.g. a unet's own shape check)
            raise ConfigError(f"{_name(denoiser, where)} cannot denoise inputs of shape {shape}: {e}") from None
    if not isinstance(out, Tensor) or out.shape != x.shape:
        raise ConfigError(_shape_message(denoiser, where, shape, out))


# ----------------------------------------------------------------------------------------------- DnCNN


class DnCNN(nn.Module):
    """DnCNN of Zhang et al. (2017): D(x~) = x~ - n(x~), n a stack of ``depth`` 3x3 convolutions (padding 1):
    conv-ReLU, then ``depth - 2`` conv-BatchNorm-ReLU, then a conv back to ``channels`` (the predicted noise).

    Inputs and outputs [B, channels, H, W], any H and W. The paper uses depth 17 (20 for blind denoising)
    and width 64; the defaults here (depth 5, width 32) are small enough to train in seconds on a CPU for
    8x8 digits. The last convolution starts at zero, so the untrained denoiser is the identity.
    """

    def __init__(self, channels: int = 1, *, depth: int = 5, width: int = 32, batch_norm: bool = True) -> None:
        super().__init__()
        if depth < 2 or channels < 1 or width < 1:
            raise ConfigError(f"DnCNN needs depth >= 2, channels >= 1 and width >= 1, got depth {depth}, "
                              f"channels {channels}, width {width}")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=not batch_norm),
                       *([nn.BatchNorm2d(width)] if batch_norm else []), nn.ReLU(inplace=True)]
        last = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.noise = nn.Sequential(*layers, last)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ConfigError(f"DnCNN takes images [B, C, H, W], got inputs of shape {list(x.shape)}")
        return x - self.noise(x)


def _device_of(module: nn.Module, fallback: torch.device) -> torch.device:
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else fallback


def train_denoiser(denoiser: nn.Module, x: Tensor, *, sigma: float, epochs: int = 20, batch_size: int = 128,
                   lr: float = 1e-3, objective: Objective = "mse", classifier: nn.Module | None = None,
                   seed: int = 0, device: torch.device | str | None = None,
                   on_epoch: Callable[[int, float], None] | None = None) -> list[float]:
    """Fit ``denoiser`` (in place, Adam) to remove N(0, sigma^2 I) from the inputs ``x`` [N, *shape].

    Objectives of Salman et al. (2020), Sec. 3.2, per batch of clean inputs x and fresh noise eps:

    * ``mse``: mean over elements of (D(x + eps) - x)^2 (their L_MSE);
    * ``stability``: CE(f(D(x + eps)), argmax f(x)) through the frozen ``classifier`` f (their L_Stab; f's
      own labels on the clean inputs, computed once; f runs in eval mode and receives no gradient). Salman
      et al. start it from an MSE-trained denoiser: call this function twice.

    Args:
        denoiser: any module [b, *shape] -> [b, *shape] (e.g. :class:`DnCNN`), trained in train mode
            (every mode flag restored after); runs on ``device`` (default: its first parameter's).
        x: clean training inputs [N, *shape], in the units the noise is measured in.
        sigma: the noise level the denoiser is trained for.
        epochs, batch_size, lr: passes over x (a seeded shuffle each), inputs per step, Adam's step size.
        seed: seeds the shuffles (CPU generator) and the noise (a generator on ``device``).
        on_epoch: called with (epoch, mean loss) after each epoch (progress).

    Returns: the mean training loss of each epoch (float, ``epochs`` values).
    Raises: :class:`~mlaudit.errors.TrainingError` when a loss is not finite.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if objective == "stability" and classifier is None:
        raise ConfigError("the stability objective needs the classifier: CE(f(D(x + eps)), f(x))")
    for name, v in (("sigma", sigma), ("lr", lr)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
    if epochs < 1 or batch_size < 1 or x.shape[0] == 0:
        raise ConfigError(f"train_denoiser needs epochs >= 1, batch_size >= 1 and inputs, got epochs {epochs}, "
                          f"batch_size {batch_size}, {x.shape[0]} inputs")
    dev = torch.device(device) if device is not None else _device_of(denoiser, x.device)
    denoiser.to(dev)
    x = x.to(dev)
    labels = None
    if classifier is not None and objective == "stability":
        labels = forward_batched(classifier, x, device=dev).argmax(1)
    order_gen = torch.Generator().manual_seed(int(seed))
    noise_gen = torch.Generator(device=dev).manual_seed(int(seed))
    opt = torch.optim.Adam(denoiser.parameters(), lr=lr)
    n, losses = x.shape[0], []
    frozen = (classifier,) if classifier is not None and objective == "stability" else ()
    with training(denoiser), evaluating(*frozen, requires_grad=False):
        for epoch in range(1, int(epochs) + 1):
            order = torch.randperm(n, generator=order_gen).to(dev)
            total = torch.zeros((), device=dev)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                xb = x[idx]
                out = denoiser(xb + sigma * torch.randn(xb.shape, generator=noise_gen, device=dev, dtype=xb.dtype))
                if labels is None:
                    loss = (out - xb).square().mean()
                else:
                    assert classifier is not None
                    loss = nn.functional.cross_entropy(classifier(out), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
            mean = float(total) / n
            if not math.isfinite(mean):
                raise TrainingError(f"denoiser training diverged: mean {objective} loss {mean} in epoch {epoch} "
                                    f"(lower lr = {lr:g})", epoch=epoch)
            losses.append(mean)
            if on_epoch is not None:
                on_epoch(epoch, mean)
    return losses


# ------------------------------------------------------------------------------------------------ DDPM


def _alphas(alphas_cumprod: Tensor | Sequence[float]) -> Tensor:
    a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if a.dim() != 1 or a.numel() == 0 or not bool(((a > 0) & (a < 1)).all()):
        raise ConfigError(f"alphas_cumprod must be a 1-D tensor [T] of values in (0, 1) (a DDPM schedule's "
                          f"cumulative products abar_t), got shape {list(a.shape)}"
                          + (f", range [{float(a.min()):.3g}, {float(a.max()):.3g}]" if a.numel() else ""))
    return a


def _affine(data_range: tuple[float, float] | None) -> tuple[float, float]:
    """(a, b) of the map x -> a x + b from the data's range onto the model's [-1, 1] ((1, 0) for None)."""
    if data_range is None:
        return 1.0, 0.0
    lo, hi = (float(v) for v in data_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"data_range must be (lo, hi) with lo < hi, got {data_range!r}")
    a = 2.0 / (hi - lo)
    return a, -1.0 - a * lo


def model_sigma(sigma: float, data_range: tuple[float, float] | None = (0.0, 1.0)) -> float:
    """sigma in the diffusion model's units: sigma * 2 / (hi - lo) when the data's range (lo, hi) is mapped
    onto [-1, 1] (2 sigma for pixels in [0, 1], as Carlini et al. note); sigma for ``data_range=None``."""
    return sigma * _affine(data_range)[0]


def ddpm_timestep(alphas_cumprod: Tensor | Sequence[float], sigma: float) -> int:
    """t* of Carlini et al. (2023): the step whose noise-to-signal ratio is closest to sigma^2,

        t* = argmin_t |(1 - abar_t) / abar_t - sigma^2|,

    so that sqrt(abar_t*) (x + eps), eps ~ N(0, sigma^2 I), is (nearly) a sample of the forward process
    q(x_t* | x) (exactly when sigma^2 = (1 - abar_t*) / abar_t*). ``sigma`` is in the model's units (see
    :func:`model_sigma`); ``alphas_cumprod`` [T], indexed by the timestep (0-based, as diffusers)."""
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ConfigError(f"sigma must be a finite number > 0, got {sigma!r}")
    a = _alphas(alphas_cumprod)
    return int(((1 - a) / a - float(sigma) ** 2).abs().argmin())


def _eps(unet: Callable[..., Any], x_t: Tensor, t: int) -> Tensor:
    """The noise predicted by ``unet`` at x_t [B, C, H, W] and timestep t (an int64 [B] tensor is passed)."""
    first = next(unet.parameters(), None) if isinstance(unet, nn.Module) else None
    inp = x_t.to(first.dtype) if first is not None and first.is_floating_point() else x_t
    out = unet(inp, torch.full((x_t.shape[0],), t, dtype=torch.int64, device=x_t.device))
    out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(out, Tensor):
        raise ConfigError(f"unet(x_t, t) must return a tensor or an object with .sample, got {type(out).__name__}")
    c = x_t.shape[1]
    if out.dim() == 4 and out.shape[1] == 2 * c and out.shape[0] == x_t.shape[0]:
        out = out[:, :c]  # learned-variance models (Nichol & Dhariwal 2021) output [eps, variance]
    if out.shape != x_t.shape:
        raise ConfigError(f"unet(x_t, t) returned shape {list(out.shape)}; the noise prediction must have x_t's "
                          f"shape {list(x_t.shape)} (an epsilon-prediction model for these inputs)")
    return out.to(x_t.dtype)


def ddpm_schedule(t_star: int, steps: int) -> list[int]:
    """The timesteps one denoising visits: [t*] for ``steps = 1`` (one-shot), else ``steps`` timesteps
    evenly spaced from t* down to 0 (rounded, repeats dropped, so at most t* + 1)."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    ts = torch.linspace(float(t_star), 0.0, int(steps), dtype=torch.float64).round().long()
    return ts.unique_consecutive().tolist()


def ddpm_denoise(unet: Callable[..., Any], alphas_cumprod: Tensor | Sequence[float], x_noisy: Tensor, *,
                 sigma: float, steps: int = 1, data_range: tuple[float, float] | None = (0.0, 1.0),
                 clip: bool = True, t_star: int | None = None) -> Tensor:
    """Denoise x_noisy = x + eps, eps ~ N(0, sigma^2 I), with a DDPM (Carlini et al. 2023).

    1. Map to the model's units: x' = a x_noisy + b with a = 2 / (hi - lo), b = -1 - a lo, onto [-1, 1]
       (``data_range=(lo, hi)``; None: no map, a = 1); the noise becomes a eps, sigma' = a sigma.
    2. t* = :func:`ddpm_timestep` (alphas_cumprod, sigma') (or ``t_star``); x_t* = sqrt(abar_t*) x'.
    3. eps_hat = unet(x_t, t); x_0 = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), clamped to [-1, 1]
       with ``clip``. ``steps = 1`` returns this one-shot x_0. With ``steps = k > 1`` the timesteps of
       :func:`ddpm_schedule` are visited with the deterministic DDIM update (eta = 0): eps_hat is recomputed
       from the clamped x_0, x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s) eps_hat for the next timestep s,
       and the x_0 of the last one (t = 0) is returned (k model calls).
    4. Map back: (x_0 - b) / a.

    Args:
        unet: called ``unet(x_t, t)``, x_t [B, C, H, W] (cast to its parameters' dtype), t int64 [B];
            returns the predicted noise [B, C, H, W] as a tensor or ``.sample`` (first C channels kept if
            it returns 2C, as learned-variance models do). Only epsilon-prediction models.
        alphas_cumprod: abar_t [T] of the model's noise schedule.
        x_noisy: [B, C, H, W] in the data's units; sigma: its noise level, in the same units.

    Returns: the denoised inputs [B, C, H, W], x_noisy's dtype and device, in the data's units
    (differentiable through the unet when called with gradients on; the sampling functions call it without).
    """
    abar = _alphas(alphas_cumprod)
    a, b = _affine(data_range)
    t0 = ddpm_timestep(abar, sigma * a) if t_star is None else int(t_star)
    if not 0 <= t0 < abar.numel():
        raise ConfigError(f"t_star = {t0} is outside the schedule's timesteps 0..{abar.numel() - 1}")
    ts = ddpm_schedule(t0, steps)
    x = x_noisy * a + b
    x = math.sqrt(float(abar[t0])) * x
    x0 = x
    for i, t in enumerate(ts):
        s_a, s_1a = math.sqrt(float(abar[t])), math.sqrt(1.0 - float(abar[t]))
        eps = _eps(unet, x, t)
        x0 = (x - s_1a * eps) / s_a
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x - s_a * x0) / s_1a
        if i + 1 < len(ts):
            nxt = float(abar[ts[i + 1]])
            x = math.sqrt(nxt) * x0 + math.sqrt(1.0 - nxt) * eps
    return (x0 - b) / a


class DiffusionDenoiser(nn.Module):
    """:func:`ddpm_denoise` as a module for one noise level: [B, C, H, W] -> [B, C, H, W] (data units).

    t* is fixed at construction from ``sigma`` (the smoothing noise, in data units) and ``data_range``
    (:attr:`t_star`, :attr:`model_sigma`); ``steps`` 1 is Carlini et al.'s one-shot denoiser, > 1 DDIM.
    An ``nn.Module`` unet is a submodule (moved and put in eval mode with this module); ``alphas_cumprod``
    is kept on the CPU in float64.
    """

    def __init__(self, unet: Callable[..., Any], alphas_cumprod: Tensor | Sequence[float], *, sigma: float,
                 steps: int = 1, data_range: tuple[float, float] | None = (0.0, 1.0), clip: bool = True) -> None:
        super().__init__()
        self.unet = unet
        self.alphas_cumprod = _alphas(alphas_cumprod)
        self.sigma, self.steps, self.data_range, self.clip = float(sigma), int(steps), data_range, bool(clip)
        self.model_sigma = model_sigma(self.sigma, data_range)
        self.t_star = ddpm_timestep(self.alphas_cumprod, self.model_sigma)
        self.schedule = ddpm_schedule(self.t_star, self.steps)

    @property
    def ratio_at_t_star(self) -> float:
        """sqrt((1 - abar_t*) / abar_t*): the model-units sigma that t* stands for (compare :attr:`model_sigma`)."""
        a = float(self.alphas_cumprod[self.t_star])
        return math.sqrt((1 - a) / a)

    def forward(self, x: Tensor) -> Tensor:
        return ddpm_denoise(self.unet, self.alphas_cumprod, x, sigma=self.sigma, steps=self.steps,
                            data_range=self.data_range, clip=self.clip, t_star=self.t_star)


def require_diffusers() -> Any:
    """Import the optional ``diffusers`` package, or raise a :class:`ConfigError` saying how to install it."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as e:
        raise ConfigError(f"the DDPM denoiser needs the optional package 'diffusers', which is not installed "
                          f"({e}); install it with `{DIFFUSERS_INSTALL}` (it is not an mlaudit dependency)") from None


def load_diffusers_pipeline(path: str | Path, *, device: torch.device | str | None = None) -> tuple[nn.Module, Tensor]:
    """(unet, alphas_cumprod [T] float64 CPU) of a diffusers pipeline saved in the local folder ``path``.

    The folder is what ``pipeline.save_pretrained(path)`` writes (model_index.json, unet/, scheduler/), e.g. a
    ``DDPMPipeline``; it is loaded with ``local_files_only=True`` (nothing is downloaded) and
    ``use_safetensors=True`` (no pickled weights). The unet must predict the noise (scheduler
    ``prediction_type: epsilon``). ``diffusers`` is imported here only (optional: ``pip install diffusers``).
    """
    diffusers = require_diffusers()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"denoiser path {str(path)!r} is not a folder; give the local folder of a diffusers "
                          "pipeline saved with pipeline.save_pretrained(path) (nothing is downloaded)")
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a diffusers pipeline from {str(folder)!r}: {e} (a folder written by "
                          "pipeline.save_pretrained(path, safe_serialization=True) is needed)") from None
    unet, scheduler = getattr(pipe, "unet", None), getattr(pipe, "scheduler", None)
    abar = getattr(scheduler, "alphas_cumprod", None)
    if unet is None or abar is None:
        raise ConfigError(f"the pipeline in {str(folder)!r} has no unet or no scheduler with alphas_cumprod "
                          "(a DDPM/DDIM pipeline is needed)")
    config = getattr(scheduler, "config", {}) or {}
    pred = config.get("prediction_type", "epsilon") if hasattr(config, "get") else "epsilon"
    if pred != "epsilon":
        raise ConfigError(f"the scheduler in {str(folder)!r} has prediction_type {pred!r}; the DDPM denoiser needs "
                          "an epsilon-prediction model")
    if device is not None and isinstance(unet, nn.Module):
        unet = unet.to(device)
    return unet.eval() if isinstance(unet, nn.Module) else unet, _alphas(abar)
