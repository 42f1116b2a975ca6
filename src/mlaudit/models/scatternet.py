"""Wavelet scattering features (ScatterNet) and the DP models built on them.

The 2D scattering transform (Mallat, "Group invariant scattering", CPAM 2012; Bruna & Mallat, "Invariant
scattering convolution networks", TPAMI 2013; Oyallon & Mallat, "Deep roto-translation scattering for object
classification", CVPR 2015) is a *fixed* cascade of Morlet wavelet convolutions and moduli. Tramèr & Boneh,
"Differentially Private Learning Needs Better Features (or Much More Data)" (ICLR 2021) train a linear model or
a small CNN with DP-SGD on these handcrafted features and beat end-to-end DP CNNs on CIFAR-10: nothing in the
front end is learned, so no privacy budget is spent on it.

Transform (our own implementation; the filter parameters follow the conventions of kymatio's
``Scattering2D`` so that coefficients can be compared one to one, tests/models/test_scatternet.py). For an
image x (one channel), scales j in {0..J-1} and angles theta_l = (L/2 - 1 - l) pi / L, l in {0..L-1}:

* Gabor filter, defined by its Fourier transform on the DFT grid of the padded size M x N (omega =
  2 pi k / M), periodised over 2 pi (the DFT of the spatially periodised filter, by Poisson summation)::

      g_hat(omega) = sum_{n in Z^2} exp(-sigma^2 / 2 * (v_1^2 + v_2^2 / s^2)),
      v = R_theta^T (omega + 2 pi n - xi e_theta),   e_theta = (cos theta, sin theta)

  (peak 1; in space g(u) = exp(-u^T A u + i xi e_theta . u) / (2 pi sigma^2 / s), A = R D R^T / (2 sigma^2),
  D = diag(1, s^2)).
* Morlet wavelets psi_{j,l}: sigma = 0.8 * 2^j, xi = 3 pi / (4 * 2^j), slant s = 4 / L, with the
  Gaussian envelope's multiple subtracted so that psi_hat(0) = 0:
  ``psi_hat = g_hat[xi] - (g_hat[xi](0) / g_hat[0](0)) * g_hat[0]``.
* Low-pass phi_J: the Gaussian g_hat with sigma = 0.8 * 2^(J-1), xi = 0, s = 1.

Coefficients (``*`` circular convolution, done as products in the Fourier domain; ``down_k`` subsampling by
k, done by folding the spectrum: mean of its k x k aliased blocks)::

    S0 x           = down_{2^J}(x * phi_J)                                        1 channel
    S1 x[j1, l1]   = down_{2^J}(|x * psi_{j1,l1}| * phi_J)                        J L channels
    S2 x[j1,l1,j2,l2] = down_{2^J}(||x * psi_{j1,l1}| * psi_{j2,l2}| * phi_J),  j2 > j1    L^2 J (J-1) / 2

(the frequency-decreasing paths j2 > j1 only: the others carry little energy). Intermediate moduli are kept
at resolution 2^-j (critically subsampled), and filters at coarser resolution are the full filter cropped to
the coarse DFT grid. Input [N, C, H, W] is reflect-padded to M = 2^J (floor(H / 2^J) + 2) (likewise N) and
one coefficient is cropped on each side at the end, so the output is [N, C * K, H / 2^J, W / 2^J] with
K = 1 + J L + L^2 J (J - 1) / 2 (81 for J = 2, L = 8: CIFAR-10 gives 243 x 8 x 8), channel index
``c * K + k`` and k ordered S0, S1 by (j1, l1), S2 by (j1, l1, j2, l2).

Models (zoo): ``scatter-linear`` (ScatterNet -> GroupNorm -> linear) and ``scatter-cnn`` (ScatterNet ->
GroupNorm -> 2 conv blocks with tanh -> linear), after Tramèr & Boneh section 3. The front end has no
parameters (filters are buffers, not saved in the state dict) and runs without autograd, so DP-SGD's
per-example machinery (both the per-example and the book-keeping path) sees only the head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, UnsupportedModelError
from .norm import group_count, make_norm2d, uses_bias
from .registry import ModelSpec, register_model

DEFAULT_L = 8
"""Angles per scale (Tramèr & Boneh and kymatio use L = 8; the filters are designed for it)."""
SCATTER_GROUP_SIZE = 9
"""Channels per GroupNorm group on the scattering output: 243 CIFAR-10 channels -> 27 groups of 9."""
PERIODS = 3
"""Fourier periodisation range: the filter's spectrum is summed over shifts 2 pi n, |n_i| <= PERIODS
(the next term is below exp(-19) for j = 0)."""
CNN_WIDTH = 64
"""Channels of the scatter-cnn head's conv layers at the default width."""
MIN_SIDE = 4
"""Smallest image side of the zoo models (J = 1 reflect-pads 2 pixels, which needs a side > 2)."""


def scatter_channels(*, J: int, L: int = DEFAULT_L, order: int = 2) -> int:
    """Coefficients per input channel: K = 1 + J L (+ L^2 J (J - 1) / 2 for order 2)."""
    return 1 + J * L + (L * L * J * (J - 1) // 2 if order == 2 else 0)


def padded_size(n: int, J: int) -> int:
    """Padded side for an input side n: the next multiple of 2^J above n, plus 2^J (one coefficient of
    margin on each side at the output resolution, cropped at the end)."""
    return ((n + 2**J) // 2**J + 1) * 2**J


def _check_options(*, J: int, L: int, order: int, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of ``input_shape`` after validating J, L, order and the divisibility of H, W by 2^J."""
    if isinstance(J, bool) or not isinstance(J, int) or J < 1:
        raise ConfigError(f"scattering J must be an integer >= 1, got {J!r}")
    if isinstance(L, bool) or not isinstance(L, int) or L < 1:
        raise ConfigError(f"scattering L (angles) must be an integer >= 1, got {L!r}; the usual value is 8")
    if order not in (1, 2):
        raise ConfigError(f"scattering order must be 1 or 2, got {order!r}")
    if len(input_shape) != 3:
        raise ConfigError(f"scattering input_shape must be [C, H, W], got {list(input_shape)}")
    c, h, w = (int(s) for s in input_shape)
    k = 2**J
    if h % k or w % k or min(h, w) < k:
        raise ConfigError(f"scattering J={J} needs H and W divisible by 2^J = {k} (and at least {k}), got input "
                          f"{h}x{w}; choose J with 2^J dividing both sides (J=1 for 8x8 digits, J=2 for 32x32)")
    return c, h, w


def _gabor_hat(m: int, n: int, *, sigma: float, theta: float, xi: float, slant: float) -> Tensor:
    """The periodised Fourier transform [m, n] (float64, real) of the Gabor filter in the module docstring."""
    two_pi = 2 * math.pi
    shifts = torch.arange(-PERIODS, PERIODS + 1, dtype=torch.float64) * two_pi
    w1 = (torch.arange(m, dtype=torch.float64) * two_pi / m)[:, None] + shifts  # [m, P]
    w2 = (torch.arange(n, dtype=torch.float64) * two_pi / n)[:, None] + shifts  # [n, P]
    c, s = math.cos(theta), math.sin(theta)
    d1 = (w1 - xi * c)[:, :, None, None]  # [m, P, 1, 1]
    d2 = (w2 - xi * s)[None, None]  # [1, 1, n, P]
    v1 = c * d1 + s * d2
    v2 = -s * d1 + c * d2
    return torch.exp(-0.5 * sigma**2 * (v1**2 + v2**2 / slant**2)).sum(dim=(1, 3))


def morlet_hat(m: int, n: int, *, sigma: float, theta: float, xi: float, slant: float) -> Tensor:
    """Morlet wavelet [m, n] in the Fourier domain: Gabor minus its envelope scaled to zero mean."""
    g = _gabor_hat(m, n, sigma=sigma, theta=theta, xi=xi, slant=slant)
    env = _gabor_hat(m, n, sigma=sigma, theta=theta, xi=0.0, slant=slant)
    return g - (g[0, 0] / env[0, 0]) * env


def crop_spectrum(f: Tensor, res: int) -> Tensor:
    """The filter ``f`` [..., m, n] on the DFT grid of the signal subsampled by 2^res: the frequencies
    |k| < m / 2^(res+1) (negative ones at the end), [..., m / 2^res, n / 2^res]."""
    if res == 0:
        return f
    m, n = f.shape[-2:]
    hm, hn = m // 2 ** (res + 1), n // 2 ** (res + 1)
    rows = torch.cat([torch.arange(hm), torch.arange(m - hm, m)])
    cols = torch.cat([torch.arange(hn), torch.arange(n - hn, n)])
    return f.index_select(-2, rows).index_select(-1, cols)


def fold(xf: Tensor, k: int) -> Tensor:
    """Subsampling by k in space as folding in Fourier: [..., m, n] -> [..., m/k, n/k], the mean of the
    k x k aliased blocks (its inverse DFT is the inverse DFT of ``xf`` at every k-th pixel)."""
    if k == 1:
        return xf
    m, n = xf.shape[-2:]
    return xf.reshape(*xf.shape[:-2], k, m // k, k, n // k).mean(dim=(-4, -2))


class ScatterNet(nn.Module):
    """The fixed 2D scattering transform ``[N, C, H, W] -> [N, C * K, H / 2^J, W / 2^J]`` (module docstring).

    Keyword-only options: ``J`` (scales; H and W must be divisible by 2^J), ``L`` (angles), ``order`` (1 or 2),
    ``input_shape`` [C, H, W]. No parameters; filters are non-persistent buffers (float32, real: the filters
    are symmetric in space, so their spectra are real), so ``.to(device)`` moves them and checkpoints stay
    small. Runs in float32 (float64 for float64 inputs) with autocast off (FFTs have no bf16 kernels); batched over examples and channels
    with a loop over the J scales only. Works under ``torch.func.vmap``.
    """

    def __init__(self, *, J: int, L: int = DEFAULT_L, order: int = 2, input_shape: Sequence[int]) -> None:
        super().__init__()
        c, h, w = _check_options(J=J, L=L, order=order, input_shape=input_shape)
        self.J, self.L, self.order = J, L, order
        self.in_channels, self.height, self.width = c, h, w
        self.m, self.n = padded_size(h, J), padded_size(w, J)
        psi = torch.stack([
            morlet_hat(self.m, self.n, sigma=0.8 * 2**j, theta=(L // 2 - 1 - a) * math.pi / L,
                       xi=3.0 / 4.0 * math.pi / 2**j, slant=4.0 / L)
            for j in range(J) for a in range(L)])  # [J L, m, n], index j * L + angle a
        phi = _gabor_hat(self.m, self.n, sigma=0.8 * 2 ** (J - 1), theta=0.0, xi=0.0, slant=1.0)
        for res in range(J):
            self.register_buffer(f"phi_{res}", crop_spectrum(phi, res).float(), persistent=False)
        for res in range(max(1, J - 1)):  # order 2 uses psi at resolution j1 <= J - 2
            self.register_buffer(f"psi_{res}", crop_spectrum(psi, res).float(), persistent=False)

    @property
    def channels_per_input(self) -> int:
        """K = 1 + J L + L^2 J (J - 1) / 2 (order 2) or 1 + J L (order 1)."""
        return scatter_channels(J=self.J, L=self.L, order=self.order)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """[C * K, H / 2^J, W / 2^J]."""
        return (self.in_channels * self.channels_per_input, self.height // 2**self.J, self.width // 2**self.J)

    def _filter(self, kind: str, res: int) -> Tensor:
        return getattr(self, f"{kind}_{res}")

    def _low(self, uf: Tensor, j: int) -> Tensor:
        """Real coefficients from a spectrum at resolution 2^-j: * phi_J, subsample to 2^-J, crop the margin."""
        s = torch.fft.ifft2(fold(uf * self._filter("phi", j), 2 ** (self.J - j))).real
        return s[..., 1:-1, 1:-1]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.height, self.width):
            raise ValueError(f"ScatterNet built for inputs [N, {self.in_channels}, {self.height}, {self.width}], "
                             f"got {list(x.shape)}")
        b = x.shape[0]
        with torch.autocast(device_type=x.device.type, enabled=False):
            h, w = self.height, self.width
            xp = F.pad(x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, 1, h, w),
                       ((self.n - w) // 2, (self.n - w + 1) // 2, (self.m - h) // 2, (self.m - h + 1) // 2),
                       mode="reflect")
            u0 = torch.fft.fft2(xp)  # [B C, 1, m, n]
            s0 = [self._low(u0, 0)]
            s1, s2 = [], []
            psi0 = self._filter("psi", 0)
            L = self.L
            for j1 in range(self.J):
                v = fold(u0 * psi0[j1 * L:(j1 + 1) * L], 2**j1)  # [B C, L, m / 2^j1, n / 2^j1]
                u1 = torch.fft.fft2(torch.fft.ifft2(v).abs())
                s1.append(self._low(u1, j1))
                if self.order < 2:
                    continue
                psi = self._filter("psi", j1) if j1 < self.J - 1 else None
                per_j2 = []
                for j2 in range(j1 + 1, self.J):
                    assert psi is not None
                    v2 = fold(u1.unsqueeze(2) * psi[j2 * L:(j2 + 1) * L], 2 ** (j2 - j1))  # [B C, L, L, ...]
                    u2 = torch.fft.fft2(torch.fft.ifft2(v2).abs())
                    per_j2.append(self._low(u2, j2))
                if per_j2:
                    s2.append(torch.cat(per_j2, dim=2).flatten(1, 2))  # (l1, j2, l2) order
            out = torch.cat(s0 + s1 + s2, dim=1)  # [B C, K, H / 2^J, W / 2^J]
        return out.reshape(b, -1, *out.shape[-2:])


def scatter_features(x: Tensor, *, J: int, L: int = DEFAULT_L, order: int = 2, batch_size: int = 1024,
                     device: str | torch.device | None = None) -> Tensor:
    """Scattering features of a whole dataset, computed once (the transform is fixed).

    ``x`` [N, C, H, W] (any device) -> float32 [N, C * K, H / 2^J, W / 2^J] on ``device`` (default: x's),
    ``batch_size`` examples at a time. Training a head on these equals training ``scatter-linear`` /
    ``scatter-cnn`` on the images (the zoo models compute the same features in their forward).
    """
    if batch_size < 1:
        raise ConfigError(f"scatter_features batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else x.device
    net = ScatterNet(J=J, L=L, order=order, input_shape=tuple(x.shape[1:])).to(dev)
    with torch.no_grad():
        return torch.cat([net(x[i:i + batch_size].to(dev)) for i in range(0, len(x), batch_size)])


def auto_J(height: int, width: int) -> int:
    """J for the zoo models: 2 (Tramèr & Boneh's choice for 28x28 and 32x32 images) when both sides are at
    least 16, else 1 (8x8 digits -> 4x4 maps). Sides not divisible by 2^J are padded by the classifier."""
    return 2 if min(height, width) >= 16 else 1


DP_STATS_EPS = 1e-6
"""Added to the variance of :class:`DPStatsNorm` (the smallest CIFAR-10 scattering channel variances are
near 6e-7, so BatchNorm's 1e-5 would flatten them)."""


class DPStatsNorm(nn.Module):
    """``[N, F, h, w] -> (z - mean[c]) / sqrt(var[c] + eps)`` with *fixed* per-channel statistics, no affine.

    ``mean`` and ``var`` are persistent buffers (saved with the model), set once before training by
    :func:`mlaudit.privacy.normstats.fit_dp_stats` from differentially private estimates over the
    training set (``recipe.dp.normalisation``; Tramèr & Boneh 2021's data-dependent option). Until then
    they are 0 and 1 (the identity). Per example at train and test time, so DP-SGD may train after it.
    """

    def __init__(self, channels: int, *, eps: float = DP_STATS_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))

    def set_stats(self, mean: Tensor, var: Tensor) -> None:
        """Fix the statistics (each [F]; var must be >= 0)."""
        if mean.shape != self.mean.shape or var.shape != self.var.shape:
            raise ConfigError(f"DPStatsNorm has {self.mean.numel()} channels, got statistics of shapes "
                              f"{list(mean.shape)} and {list(var.shape)}")
        if bool((var < 0).any()) or not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
            raise ConfigError("DPStatsNorm statistics must be finite with var >= 0")
        self.mean.copy_(mean)
        self.var.copy_(var)

    def forward(self, z: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return (z - self.mean.view(shape)) * torch.rsqrt(self.var.view(shape) + self.eps)


def input_norm(kind: str, channels: int) -> nn.Module:
    """Normalisation of the scattering output [N, F, h, w], without affine parameters (the head that follows
    has its own). GroupNorm with F / 9 groups (27 for CIFAR-10's 243 channels; per example, so DP-safe: Tramèr &
    Boneh's data-independent choice) for zoo norm ``group`` and ``none`` (the features' scale varies by
    orders of magnitude between orders, so they are never left raw); BatchNorm2d for ``batch`` (batch
    statistics: refused by DP-SGD like every BatchNorm); :class:`DPStatsNorm` (fixed per-channel statistics
    estimated with DP before training) for ``dp-stats``."""
    if kind in ("group", "none"):
        return nn.GroupNorm(group_count(channels, min_group_size=SCATTER_GROUP_SIZE), channels, affine=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=False)
    if kind == "dp-stats":
        return DPStatsNorm(channels)
    raise ConfigError(f"unknown norm {kind!r}; valid norms: batch, group, none, dp-stats")


class _FeatureHead(nn.Module):
    """A head on scattering features whose ``norm`` sees its input unchanged."""

    def dp_stats_features(self, z: Tensor) -> Tensor:
        """What ``self.norm`` normalises: the input itself (for :func:`~mlaudit.privacy.normstats.fit_dp_stats`)."""
        return z


class ScatterLinearHead(_FeatureHead):
    """Tramèr & Boneh's ScatterNet+linear head: ``[N, F, h, w] -> norm (GroupNorm, F / 9 groups, no affine)
    -> flatten -> Linear(F h w, num_classes)``."""

    def __init__(self, *, feature_shape: Sequence[int], num_classes: int, norm: str = "group") -> None:
        super().__init__()
        f, h, w = feature_shape
        self.norm = input_norm(norm, f)
        self.fc = nn.Linear(f * h * w, num_classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc(self.norm(z).flatten(1))


class ScatterCNNHead(_FeatureHead):
    """A small CNN on scattering features, after Tramèr & Boneh's ScatterNet+CNN (tanh, GroupNorm):
    ``[N, F, h, w] -> norm (no affine) -> [conv3x3(width) -> norm -> tanh -> maxpool2] x 2 -> flatten ->
    Linear(width * ceil(h/4) * ceil(w/4), num_classes)``. ``norm`` is the zoo's norm (``group`` for DP-SGD;
    ``dp-stats`` normalises the input by :class:`DPStatsNorm` and the conv layers by GroupNorm)."""

    def __init__(self, *, feature_shape: Sequence[int], num_classes: int, width: int | None = None,
                 norm: str = "group") -> None:
        super().__init__()
        f, h, w = feature_shape
        c = width or CNN_WIDTH
        inner = "group" if norm == "dp-stats" else norm
        bias = uses_bias(inner)
        self.norm = input_norm(norm, f)
        self.features = nn.Sequential(
            nn.Conv2d(f, c, 3, padding=1, bias=bias), make_norm2d(inner, c), nn.Tanh(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(c, c, 3, padding=1, bias=bias), make_norm2d(inner, c), nn.Tanh(), nn.MaxPool2d(2, ceil_mode=True),
        )
        self.fc = nn.Linear(c * math.ceil(h / 4) * math.ceil(w / 4), num_classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc(self.features(self.norm(z)).flatten(1))


class ScatterClassifier(nn.Module):
    """``[N, C, H, W] -> logits``: a frozen :class:`ScatterNet` (``front``, run without autograd) and a trainable
    ``head`` on its output. Only the head has parameters, so DP-SGD clips and noises only the head's gradient.

    When H or W is not a multiple of 2^J the input is first reflect-padded at the bottom/right up to the
    front's input size (``front.height`` x ``front.width``).
    """

    def __init__(self, front: ScatterNet, head: nn.Module, *, input_hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.front = front
        self.head = head
        h, w = input_hw or (front.height, front.width)
        self.pad = (0, front.width - w, 0, front.height - h)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dp_stats_features(x))

    def dp_stats_features(self, x: Tensor) -> Tensor:
        """The scattering features of images ``x`` (padded as in the forward), without autograd: the input of
        the head and of its normalisation (what :func:`~mlaudit.privacy.normstats.fit_dp_stats` estimates)."""
        with torch.no_grad():
            if any(self.pad):
                x = F.pad(x, self.pad, mode="reflect")
            return self.front(x).detach()


def _build(spec: ModelSpec, input_shape: tuple[int, ...], in_channels: int, num_classes: int,
           head: str) -> nn.Module:
    if len(input_shape) != 3:
        raise UnsupportedModelError(f"model {spec.name!r} needs image inputs [C, H, W], got {list(input_shape)}")
    _, h, w = input_shape
    J = auto_J(h, w)
    k = 2**J
    front = ScatterNet(J=J, L=DEFAULT_L, order=2, input_shape=(in_channels, -(-h // k) * k, -(-w // k) * k))
    if head == "linear":
        out: nn.Module = ScatterLinearHead(feature_shape=front.output_shape, num_classes=num_classes, norm=spec.norm)
    else:
        out = ScatterCNNHead(feature_shape=front.output_shape, num_classes=num_classes, width=spec.width,
                             norm=spec.norm)
    return ScatterClassifier(front, out, input_hw=(h, w))


@register_model("scatter-linear", residual=False, image_only=True, min_size=MIN_SIDE)
def build_scatter_linear(spec: ModelSpec, *, input_shape: tuple[int, ...], in_channels: int,
                         num_classes: int) -> nn.Module:
    """ScatterNet (L=8, order 2; J=2 for sides >= 16, else J=1) -> GroupNorm -> linear (Tramèr & Boneh 2021).

    The scattering output is normalised by GroupNorm (9 channels per group, no affine; per example, the DP-safe
    choice) for ``norm: group`` and ``norm: none``, by BatchNorm (refused by DP-SGD) for ``norm: batch``, by
    fixed per-channel statistics estimated with DP before training for ``norm: dp-stats`` (needs
    ``recipe.dp.normalisation``).
    ``width`` is ignored (no hidden layer). Only the linear layer trains.
    """
    return _build(spec, input_shape, in_channels, num_classes, "linear")


@register_model("scatter-cnn", residual=False, image_only=True, min_size=MIN_SIDE)
def build_scatter_cnn(spec: ModelSpec, *, input_shape: tuple[int, ...], in_channels: int,
                      num_classes: int) -> nn.Module:
    """ScatterNet (as scatter-linear) -> norm -> 2 x (conv3x3 -> norm -> tanh -> maxpool2) -> linear
    (Tramèr & Boneh's ScatterNet+CNN).

    ``width`` is the conv channels (default 64); ``norm`` (``group`` for DP-SGD) is the conv layers' norm; the
    scattering output is normalised as in scatter-linear (GroupNorm unless ``norm: batch``).
    """
    return _build(spec, input_shape, in_channels, num_classes, "cnn")
