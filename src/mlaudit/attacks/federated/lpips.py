"""LPIPS, the learned perceptual image patch similarity (Zhang, Isola, Efros, Shechtman & Wang, "The
Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018, eq. 1), for judging
reconstructions next to PSNR and SSIM (issue 20: "recovered exactly or above a PSNR/SSIM/LPIPS threshold").

For images x, x0 [N, 3, H, W] scaled to [-1, 1] and shifted per channel (shift (-0.030, -0.088, -0.188),
scale (0.458, 0.448, 0.450), the input normalisation of the released metric), a backbone gives feature maps
f_l [N, C_l, H_l, W_l] at L layers; each is unit-normalised over channels at every position, and

    d(x, x0) = sum_l 1 / (H_l W_l) sum_{h,w} sum_c w_lc (f^_l(x) - f^_l(x0))_{c,h,w}^2

with non-negative per-channel weights w_l [C_l] learned on human judgements (the paper's w_l ⊙ inside a
squared norm; the released files store the weights of a 1x1 convolution applied to the squared difference,
i.e. these w_lc). Lower is more similar; 0 for identical images.

Nothing is downloaded at run time. :func:`download_lpips_weights` (``mlaudit data lpips-weights DIR``) fetches
the two files once: torchvision's AlexNet weights, checked against the sha256 prefix in their file name, and the
``lpips`` package's v0.1 linear layers, checked by loading them (no digest is pinned here; the sha256 it reports
can be pinned with ``lin_sha256``). :func:`lpips_alexnet` builds AlexNet's convolutional trunk (the layer layout of
torchvision's ``alexnet().features``; LPIPS reads it after each of its five ReLUs) and loads two files the
user has on disk: the trunk's ImageNet weights (a torchvision AlexNet state_dict, ``features.*`` keys, or
the trunk's own ``0.weight`` ...) and the five linear layers of LPIPS v0.1 (the ``lpips`` package's
``weights/v0.1/alex.pth``: ``lin{l}.model.1.weight`` [1, C_l, 1, 1]). Both are read with
``weights_only=True`` and checked against a sha256 when one is given.

    metric = lpips_alexnet("alexnet-owt-7be5be79.pth", "alex.pth")
    d = metric(x_true, x_rec)           # [N], images in [0, 1] (box) with 1 or 3 channels
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ...errors import ConfigError, DataError
from ...train.checkpoint import load_checkpoint

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
ALEXNET_SHA256 = "7be5be79"
"""torchvision's AlexNet ImageNet weights; the file name carries the first 8 hex digits of its sha256."""
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"
"""LPIPS v0.1's linear layers for AlexNet (the ``lpips`` package's ``weights/v0.1/alex.pth``)."""
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
ALEX_CHANNELS = (64, 192, 384, 256, 256)


class LPIPS(nn.Module):
    """``LPIPS(slices, weights)(x, x0) -> d [N]``: ``slices`` are consecutive backbone stages (each takes the
    previous one's output; the metric reads after each), ``weights`` one non-negative [C_l] per stage.
    Inputs [N, C, H, W] in ``box`` (default [0, 1]); one channel is repeated to three. Frozen, eval mode."""

    def __init__(self, slices: Sequence[nn.Module], weights: Sequence[Tensor], *,
                 box: tuple[float, float] = (0.0, 1.0)) -> None:
        super().__init__()
        if len(slices) != len(weights) or not slices:
            raise ConfigError(f"LPIPS needs one channel-weight vector per backbone stage; got {len(slices)} stages "
                              f"and {len(weights)} weight vectors")
        if any(w.dim() != 1 or bool((w < 0).any()) for w in weights):
            raise ConfigError("LPIPS channel weights must be non-negative vectors [C_l] (one per stage)")
        self.slices = nn.ModuleList(slices)
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w.detach().float().clone())
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.box = box
        self.requires_grad_(False)
        self.eval()

    def _prepare(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ConfigError(f"LPIPS compares images [N, 1 or 3, H, W]; got shape {list(x.shape)}")
        lo, hi = self.box
        x = x.to(self.shift) * (2 / (hi - lo)) - (hi + lo) / (hi - lo)  # the box -> [-1, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.shift) / self.scale

    def features(self, x: Tensor) -> list[Tensor]:
        """The unit-normalised feature maps [N, C_l, H_l, W_l] of x [N, C, H, W]."""
        out, h = [], self._prepare(x)
        for stage in self.slices:
            h = stage(h)
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        if x.shape != x0.shape:
            raise ConfigError(f"LPIPS compares pairs of the same shape; got {list(x.shape)} and {list(x0.shape)}")
        d = torch.zeros(len(x), device=self.shift.device)
        for i, (a, b) in enumerate(zip(self.features(x), self.features(x0), strict=True)):
            w = getattr(self, f"w{i}").view(1, -1, 1, 1)
            d = d + (w * (a - b).pow(2)).sum(1).mean((1, 2))
        return d

    def check_size(self, shape: Sequence[int]) -> None:
        """ConfigError when images of ``shape`` [C, H, W] are too small for the backbone (a stage would be empty)."""
        try:
            with torch.no_grad():
                self.features(torch.full((1, *shape), self.box[0], device=self.shift.device))
        except (RuntimeError, ConfigError) as e:
            raise ConfigError(f"LPIPS cannot compare images of shape {list(shape)} with this backbone ({e}); AlexNet "
                              "needs sides of at least 31 pixels (upsample smaller images, or use PSNR/SSIM)") from e


def alexnet_trunk() -> list[nn.Module]:
    """AlexNet's convolutional trunk (Krizhevsky et al. 2012, in the one-GPU layout torchvision uses) cut after
    each ReLU into LPIPS' five stages; the modules keep torchvision's ``features.<i>`` numbering in
    :func:`load_alexnet_trunk`."""
    return [
        nn.Sequential(nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU()),
        nn.Sequential(nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU()),
        nn.Sequential(nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(384, 256, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()),
    ]


_ALEX_CONV = {0: (0, 0), 3: (1, 1), 6: (2, 1), 8: (3, 0), 10: (4, 0)}
"""torchvision ``features.<i>`` conv index -> (LPIPS stage, position inside the stage)."""


def load_alexnet_trunk(stages: list[nn.Module], state: Mapping[str, Tensor]) -> None:
    """Copy an AlexNet state_dict (``features.<i>.weight`` / ``.bias``, or ``<i>.weight`` for the trunk alone;
    classifier keys ignored) into :func:`alexnet_trunk` stages; ConfigError naming missing or misshapen keys."""
    feats = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    for i, (stage, pos) in _ALEX_CONV.items():
        conv = stages[stage][pos]
        for name in ("weight", "bias"):
            key = f"{i}.{name}"
            if key not in feats:
                raise ConfigError(f"the AlexNet weights have no 'features.{key}' (an AlexNet state_dict as torchvision "
                                  f"saves it is expected; found keys {sorted(feats)[:6]})")
            if feats[key].shape != getattr(conv, name).shape:
                raise ConfigError(f"the AlexNet weights' 'features.{key}' has shape {list(feats[key].shape)}, expected "
                                  f"{list(getattr(conv, name).shape)}")
            getattr(conv, name).data.copy_(feats[key])


def lin_weights(state: Mapping[str, Tensor], channels: Sequence[int] = ALEX_CHANNELS) -> list[Tensor]:
    """The per-stage channel weights [C_l] from an LPIPS linear-layer file (``lin<l>.model.1.weight`` [1, C_l, 1, 1],
    or ``lin<l>...weight`` of any nesting)."""
    found: dict[int, Tensor] = {}
    for k, v in state.items():
        m = re.match(r"lin(\d+)\..*weight$", k)
        if m:
            found[int(m.group(1))] = v.detach().reshape(-1).float()
    if sorted(found) != list(range(len(channels))):
        raise ConfigError(f"the LPIPS linear-layer weights need lin0 .. lin{len(channels) - 1} (one per stage); found "
                          f"{sorted(found)} in keys {sorted(state)[:6]}")
    for i, c in enumerate(channels):
        if found[i].numel() != c:
            raise ConfigError(f"LPIPS lin{i} has {found[i].numel()} weights; the backbone's stage {i} has {c} channels")
    return [found[i] for i in range(len(channels))]


def lpips_alexnet(backbone: str | Path | Mapping[str, Tensor], lin: str | Path | Mapping[str, Tensor], *,
                  backbone_sha256: str | None = None, lin_sha256: str | None = None,
                  box: tuple[float, float] = (0.0, 1.0)) -> LPIPS:
    """LPIPS (AlexNet, v0.1 linear layers) from the user's files or state_dicts (module docstring)."""
    def read(src: str | Path | Mapping[str, Tensor], sha: str | None, what: str) -> Mapping[str, Tensor]:
        if isinstance(src, Mapping):
            return src
        if not Path(src).is_file():
            raise ConfigError(f"LPIPS {what}: no file at {str(src)!r} (no weights are downloaded: save them there)")
        return load_checkpoint(src, sha256=sha)

    stages = alexnet_trunk()
    load_alexnet_trunk(stages, read(backbone, backbone_sha256, "backbone weights"))
    return LPIPS(stages, lin_weights(read(lin, lin_sha256, "linear-layer weights")), box=box)


def download_lpips_weights(root: str | Path, *, backbone_url: str = ALEXNET_URL, lin_url: str = LPIPS_LIN_URL,
                           backbone_sha256: str | None = ALEXNET_SHA256, lin_sha256: str | None = None,
                           timeout: float = 60.0) -> dict[str, str]:
    """Download the two files :func:`lpips_alexnet` reads into ``root`` (kept when already there and valid):
    torchvision's AlexNet weights (checked against ``backbone_sha256``, a whole digest or a prefix of at least 8
    hex digits) and LPIPS v0.1's linear layers (checked against ``lin_sha256`` when given). Each file is then
    loaded weights-only and checked for the layers LPIPS needs. Returns {"backbone", "lin": paths,
    "backbone_sha256", "lin_sha256": their full sha256, to pin in a config's ``lpips`` block}. ``file://`` URLs
    serve local mirrors (and the tests)."""
    from ...data.sources._util import download_file, file_digest

    root = Path(root)
    out: dict[str, str] = {}
    for key, url, sha in (("backbone", backbone_url, backbone_sha256), ("lin", lin_url, lin_sha256)):
        dest = root / url.rstrip("/").rsplit("/", 1)[-1]
        digest = file_digest(dest) if dest.is_file() else ""
        if not digest or (sha is not None and not digest.startswith(sha.lower())):
            download_file(url, dest, sha256=sha, timeout=timeout, unchecked=sha is None)
            digest = file_digest(dest)
        try:
            state = load_checkpoint(dest)
            if key == "backbone":
                load_alexnet_trunk(alexnet_trunk(), state)
            else:
                lin_weights(state)
        except (ConfigError, DataError) as e:
            dest.unlink()
            raise ConfigError(f"{url} is not what LPIPS needs ({e}); nothing was kept at {dest}") from None
        out[key], out[f"{key}_sha256"] = str(dest), digest
    return out
