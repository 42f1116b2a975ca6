"""``airbench``: the network of Jordan's airbench94 (2024, "94% on CIFAR-10 in 3.29 Seconds on a Single
GPU", arXiv:2404.00498, and its Muon variant), written here from the paper's description.

``[B, C, H, W] -> logits [B, num_classes]`` for H, W >= 16:

* **Input standardisation** by per-channel mean and std estimated from training images at
  :meth:`AirbenchNet.data_init` (buffers, saved in the state_dict).
* **Whitening stem** (paper section 3.2): a frozen 2x2 convolution without padding whose filters are
  the eigenvectors of the covariance of 2x2 training patches scaled by ``1/sqrt(lambda + eps)``, and
  their negatives (``2 * C * 4 = 24`` channels for RGB), then GELU. Only its bias trains (the
  ``airbench-muon`` recipe trains it for the first 3 epochs).
* **Three blocks** ``conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU`` of widths
  ``(w, 4w, 4w)`` = 64, 256, 256; convolutions without bias and with identity (Dirac) initialisation
  of their first ``c_in`` filters (section 3.3); BatchNorm with frozen scale 1 (only the shift
  trains), ``eps = 1e-12`` and running-statistics momentum 0.4 (PyTorch convention; section 3.4).
* **Head**: global max pooling, a bias-free linear layer initialised to unit-std weights and logits
  divided by the feature width (256), as the paper scales its output.

Without :meth:`data_init` the stem is the identity-like random init (standardisation off), so a
model built and trained by other code still works, only less well. The one training loop calls
``data_init`` for every model that has it, on a seeded sample of that model's own training set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norm import make_norm2d, scale_channels
from .registry import ModelSpec, register_model

DEFAULT_WIDTH = 64
BLOCK_MULTIPLIERS = (1, 4, 4)
WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4  # added to the patch-covariance eigenvalues before 1/sqrt (the paper's value)
BN_MOMENTUM = 0.4  # weight of the new batch statistic: short runs need fast running statistics
BN_EPS = 1e-12
DATA_INIT_IMAGES = 5000
"""Images :meth:`AirbenchNet.data_init` is given by the training loop (the paper whitens from 5000)."""


def _norm(norm: str, c: int) -> nn.Module:
    if norm != "batch":
        return make_norm2d(norm, c, momentum=BN_MOMENTUM)
    bn = nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)  # scale fixed at 1; optimisers skip parameters without grad
    return bn


def _dirac_conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():  # the first min(c_in, c_out) filters pass their input channel through
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


class AirbenchBlock(nn.Module):
    """``[B, c_in, H, W] -> [B, c_out, H//2, W//2]``."""

    def __init__(self, c_in: int, c_out: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = _dirac_conv(c_in, c_out)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = _dirac_conv(c_out, c_out)
        self.norm2 = _norm(norm, c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """The airbench94 network (see the module docstring); ``width`` is the first block's width."""

    def __init__(self, *, in_channels: int, num_classes: int, width: int | None = None, norm: str = "batch") -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_channels))
        self.register_buffer("input_std", torch.ones(in_channels))
        stem = 2 * in_channels * WHITEN_KERNEL**2
        self.whiten = nn.Conv2d(in_channels, stem, WHITEN_KERNEL, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        with torch.no_grad():
            self.whiten.bias.zero_()
        widths = [scale_channels(DEFAULT_WIDTH * m, width, DEFAULT_WIDTH) for m in BLOCK_MULTIPLIERS]
        self.blocks = nn.Sequential(*[AirbenchBlock(a, b, norm) for a, b in zip([stem, *widths[:-1]], widths)])
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        with torch.no_grad():
            self.head.weight.div_(self.head.weight.std())
        # the paper divides the logits by the width of BatchNorm-ed features; unnormalised features are small
        self.feature_scale = 1.0 / widths[-1] if norm != "none" else 1.0

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        """Set the input statistics and the whitening filters from training images ``x`` [n, C, H, W].

        Patch covariance ``Sigma`` [C*k*k, C*k*k] of all k x k patches of the standardised images;
        ``Sigma = V diag(lambda) V^T``; filters ``V^T / sqrt(lambda + eps)`` and their negatives.
        Runs on ``x``'s device (the training loop passes images already on the GPU; the model may
        still be on the CPU); only the 12 x 12 eigendecomposition is done in float64 on the CPU.
        """
        x = x.float()
        mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-6)
        z = (x - mean[:, None, None]) / std[:, None, None]
        c, k = z.shape[1], WHITEN_KERNEL
        patches = F.unfold(z, k)  # [n, C*k*k, L]
        # one small product per image, then a sum: a single [C*k*k, n*L] @ [n*L, C*k*k] product has a
        # tiny output and a reduction of millions, which cuBLAS ran serially (~1 s on an H200)
        cov = torch.bmm(patches, patches.transpose(1, 2)).sum(0).double().cpu() / (patches.shape[0] * patches.shape[2])
        evals, evecs = torch.linalg.eigh(cov)
        filt = (evecs.T / (evals.clamp_min(0) + WHITEN_EPS).sqrt()[:, None]).reshape(-1, c, k, k)
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)
        self.whiten.weight.copy_(torch.cat([filt, -filt]))

    def forward(self, x: Tensor) -> Tensor:
        x = (x - self.input_mean[:, None, None].to(x.dtype)) / self.input_std[:, None, None].to(x.dtype)
        h = self.blocks(F.gelu(self.whiten(x)))
        # a max-pool, not Tensor.amax: under torch.compile + bf16 autocast amax's backward gave NaN (torch 2.13, CPU)
        return self.head(F.adaptive_max_pool2d(h, 1).flatten(1)) * self.feature_scale


@register_model("airbench", residual=False, image_only=True, min_size=16)
def build_airbench(
    spec: ModelSpec, *, input_shape: tuple[int, ...], in_channels: int, num_classes: int
) -> nn.Module:
    """airbench94's network (Jordan 2024): whitening stem, blocks 64-256-256, frozen-scale BatchNorm.

    Train it with the ``airbench-muon`` recipe (Muon for the filters, Nesterov SGD for biases and
    head, label smoothing 0.2, alternating flip, 2-pixel reflect translation, flip+translate TTA).
    ``spec.width`` scales the block widths (default 64); ``norm: group`` / ``none`` replace the
    frozen-scale BatchNorm (the recipe was tuned with BatchNorm). Images must be at least 16x16 (the
    unpadded stem and three floor-mode pools take 16 -> 15 -> 7 -> 3 -> 1).
    """
    return AirbenchNet(in_channels=in_channels, num_classes=num_classes, width=spec.width, norm=spec.norm)
