"""Denoised smoothing on digits (issue 17, item 2), CPU: certified accuracy of one classifier f trained
without noise, smoothed alone, behind a DnCNN (Salman et al. 2020) and behind a small DDPM denoising in one
shot or by DDIM in k steps (Carlini et al. 2023), all on the same test images and the same noise draws.

    python benchmarks/certify_denoised.py --device cpu                 # a few minutes on 2 CPU cores
    python benchmarks/certify_denoised.py --smoke --device cpu         # seconds: checks the script only

1. One ``certify`` run (examples/certify_denoised.yaml's settings, ``--sigma``): the zoo's mlp trained
   without noise (recipe ``fast``), a DnCNN trained at sigma with the MSE objective, CERTIFY of f alone and
   of f(DnCNN(.)).
2. A small DDPM on digits, trained here: an epsilon-prediction conv net (:class:`TinyUNet`, sinusoidal
   timestep embedding) on DDPM's linear beta schedule (1e-4 to 0.02, T = 1000), the digits mapped to
   [-1, 1], t uniform in [0, T), ``--ddpm-steps`` Adam steps of 256 images. It is plugged in through the
   diffusers-shaped interface (``unet(x_t, t)``, ``alphas_cumprod``) as
   :class:`mlaudit.certify.DiffusionDenoiser`, one-shot and with ``--ddim`` steps.
3. CERTIFY of f(D(.)) for each DDPM variant on the run's examples with the run's noise generator (seed
   ``trial_seed(1, stream=ATTACK)``), so every row sees the same noise. Also the per-pixel MSE of one noisy
   copy before and after each denoiser, and the wall time of CERTIFY.

Writes benchmarks/results/certify_denoised_<name>.{json,md}. The DDPM is tiny and trained for a minute:
its numbers describe this setting, not the pretrained ImageNet/CIFAR-10 diffusion models of the paper.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, workdir, write_results  # noqa: E402

from mlaudit.certify import Denoised, DiffusionDenoiser, certified_mask, certify  # noqa: E402
from mlaudit.config import load_yaml  # noqa: E402
from mlaudit.experiments import parse_config, run_experiment  # noqa: E402
from mlaudit.experiments.base import Stream  # noqa: E402
from mlaudit.experiments.robustness import rate  # noqa: E402
from mlaudit.query import forward_batched, load_model  # noqa: E402
from mlaudit.threads import configure_threads  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "certify_denoised.yaml"


class TinyUNet(nn.Module):
    """A small epsilon-prediction network for 8x8 images: conv in, ``blocks`` residual conv blocks
    (GroupNorm, SiLU) each adding a projection of the sinusoidal timestep embedding, conv out.
    ``forward(x_t [B, C, H, W], t int64 [B]) -> eps_hat [B, C, H, W]`` (the diffusers call shape)."""

    def __init__(self, channels: int = 1, width: int = 32, blocks: int = 3, emb: int = 64) -> None:
        super().__init__()
        self.emb_dim = emb
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.t_proj = nn.ModuleList(nn.Linear(emb, width) for _ in range(blocks))
        self.blocks = nn.ModuleList(nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                                  nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
                                    for _ in range(blocks))
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def embed(self, t: Tensor) -> Tensor:
        half = self.emb_dim // 2
        freq = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device) / half)
        arg = t.float()[:, None] * freq[None]
        return torch.cat([arg.sin(), arg.cos()], 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e = self.embed(t)
        h = self.inp(x)
        for proj, block in zip(self.t_proj, self.blocks, strict=True):
            h = h + block(h + proj(e)[:, :, None, None])
        return self.out(h)


def linear_alphas_cumprod(steps: int = 1000) -> Tensor:
    """abar_t of DDPM's linear schedule (Ho et al. 2020): beta_t from 1e-4 to 0.02."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, steps, dtype=torch.float64), 0)


def train_ddpm(x: Tensor, abar: Tensor, *, steps: int, batch: int = 256, lr: float = 2e-3, seed: int = 0,
               device: str = "cpu") -> tuple[TinyUNet, list[float], float]:
    """The DDPM objective (Ho et al. 2020, L_simple): ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2,
    x0 the images in [-1, 1], t uniform. Returns (model in eval mode, loss every 10% of the steps, wall s)."""
    torch.manual_seed(seed)
    g = torch.Generator(device=device).manual_seed(seed)
    model = TinyUNet(x.shape[1]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    x0 = (2 * x - 1).to(device)
    a = abar.float().to(device)
    losses, running, t0 = [], 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, x0.shape[0], (batch,), generator=g, device=device)
        t = torch.randint(0, len(a), (batch,), generator=g, device=device)
        eps = torch.randn((batch, *x0.shape[1:]), generator=g, device=device)
        at = a[t].view(-1, 1, 1, 1)
        loss = (model(at.sqrt() * x0[idx] + (1 - at).sqrt() * eps, t) - eps).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % max(1, steps // 10) == 0:
            losses.append(running / max(1, steps // 10))
            running = 0.0
    return model.eval(), losses, time.perf_counter() - t0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--ddpm-steps", type=int, default=3000, help="Adam steps of the DDPM (batch 256)")
    ap.add_argument("--ddim", default="2,5,10", help="comma-separated multi-step counts (DDIM from t* to 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: mlaudit's rule)")
    ap.add_argument("--smoke", action="store_true", help="20 images, n = 200, 200 DDPM steps (seconds)")
    ap.add_argument("--name", default=None, help="results file suffix (default: digits_cpu, or smoke)")
    ap.add_argument("--workdir", default=None, help="keep the certify run here (resumed when invoked again)")
    return ap.parse_args()


def _row(name: str, pred: Tensor, radius: Tensor, y: Tensor, radii: list[float], extra: dict[str, Any]) -> dict:
    acc = [rate(m[None]) for m in certified_mask(pred, radius, y, radii)]
    return {"name": name, "certified_accuracy": {f"{r:g}": a for r, a in zip(radii, acc, strict=True)}, **extra}


def main() -> None:
    args = parse_args()
    threads = configure_threads(args.threads)
    cfg = load_yaml(EXAMPLE)
    cfg["sigma"] = args.sigma
    if args.smoke:
        cfg.update(examples=20, n0=20, n=200, predict_n=100, alpha=0.01)
        cfg["denoiser"] = {**cfg["denoiser"], "epochs": 2}
        args.ddpm_steps = 200
    name = args.name or ("smoke" if args.smoke else "digits_cpu")
    config = parse_config(copy.deepcopy(cfg))
    with workdir(args.workdir) as tmp:
        out = tmp / "run"
        res = run_experiment(cfg, out=out, device=args.device, store=tmp / "runs.db", resume=out.exists(), quiet=True)
        r = res.results
        m, rec = r["metrics"], r["trials"][0]
        data = load_dataset_of(config)
        f = load_model(config.model, out / "artifacts" / "models" / f"{rec['trial_id']}.pt", data=data)
        f = f.to(args.device).eval()
    draw = torch.Generator().manual_seed(config.trial_seed(0, stream=Stream.ATTACK))
    rows = torch.randperm(len(data.test), generator=draw)[: config.examples].sort().values
    x, y = data.test.x[rows].to(args.device), data.test.y[rows]
    radii = list(config.radii)
    table = [
        {"name": "f alone (no denoiser)", "certified_accuracy": m["without_denoiser"]["certified_accuracy"],
         "certify_wall_s": m["without_denoiser"]["throughput"]["certify_wall_s"], "mse": None,
         "clean_accuracy": m["without_denoiser"]["clean_accuracy"]},
        {"name": f"f(D(.)), DnCNN (MSE, {cfg['denoiser'].get('epochs', 20)} epochs)",
         "certified_accuracy": m["certified_accuracy"], "certify_wall_s": m["throughput"]["certify_wall_s"],
         "mse": m["denoiser"]["mse_denoised"], "clean_accuracy": m["clean_accuracy"],
         "train_wall_s": m["denoiser"].get("train_wall_s_mse")},
    ]
    abar = linear_alphas_cumprod()
    unet, ddpm_loss, ddpm_wall = train_ddpm(data.train.x, abar, steps=args.ddpm_steps, device=args.device)
    print(f"DDPM: {args.ddpm_steps} steps in {ddpm_wall:.1f} s, loss {ddpm_loss[0]:.3f} -> {ddpm_loss[-1]:.3f}",
          flush=True)
    probe = torch.Generator(device=args.device).manual_seed(config.trial_seed(3, stream=Stream.ATTACK))
    noisy = x + config.sigma * torch.randn(x.shape, generator=probe, device=args.device, dtype=x.dtype)
    t_star = None
    for steps in [1, *(int(s) for s in args.ddim.split(",") if s.strip())]:
        den = DiffusionDenoiser(unet, abar, sigma=config.sigma, steps=steps)
        t_star = den.t_star
        model = Denoised(f, den)
        gen = torch.Generator(device=args.device).manual_seed(config.trial_seed(1, stream=Stream.ATTACK))
        t0 = time.perf_counter()
        cert = certify(model, x, sigma=config.sigma, n0=config.n0, n=config.n, alpha=config.alpha,
                       batch_size=config.batch_size, num_classes=data.num_classes, generator=gen)
        wall = time.perf_counter() - t0
        mse = float((forward_batched(den, noisy, batch_size=config.batch_size) - x).square().mean())
        clean = forward_batched(model, x, batch_size=config.batch_size).argmax(1).cpu() == y
        label = "one-shot" if steps == 1 else f"DDIM, {len(den.schedule)} steps"
        table.append(_row(f"f(D(.)), DDPM {label}", cert.prediction, cert.radius, y, radii,
                          {"certify_wall_s": round(wall, 2), "mse": mse, "clean_accuracy": rate(clean[None]),
                           "model_calls": len(den.schedule)}))
        print(f"DDPM {label}: " + ", ".join(f"r {k}: {100 * v['value']:.1f}%"
                                           for k, v in table[-1]["certified_accuracy"].items())
              + f"; MSE {mse:.4f}; {wall:.1f} s", flush=True)
    env = {**environment(), "data": "digits (sklearn, 8x8, 1438 train / 359 test)", "threads": threads,
           "device": r["cost"]["device"]}
    head = " | ".join(f"r = {k:g}" for k in radii)
    lines = [f"# Denoised smoothing on digits: {name}", "",
             f"{env['date']}, {env['device']}, torch {env['torch']}; {env['data']}; f = {config.model.name} "
             f"({config.recipe.name}, {config.recipe.epochs} epochs, no noise); sigma = {config.sigma:g}; CERTIFY n0 = "
             f"{config.n0}, n = {config.n}, alpha = {config.alpha:g}; {config.examples} test images (seeded draw), the "
             f"same noise draws in every row. DDPM: TinyUNet trained {args.ddpm_steps} steps ({ddpm_wall:.0f} s), "
             f"linear schedule T = 1000, t* = {t_star} (sigma^2 = (1 - abar_t)/abar_t closest to (2 sigma)^2). "
             "Certified accuracy in % [95% Clopper-Pearson]; MSE per pixel of one noisy copy after the denoiser "
             f"(noisy: {m['denoiser']['mse_noisy']:.4f}).", "",
             f"| smoothed classifier | {head} | clean f(D(x)) | MSE | CERTIFY s |",
             "|---|" + "---:|" * len(radii) + "---:|---:|---:|"]
    for row in table:
        cells = [f"{100 * v['value']:.1f} [{100 * v['lo']:.1f}, {100 * v['hi']:.1f}]"
                 for v in row["certified_accuracy"].values()]
        mse = "—" if row["mse"] is None else f"{row['mse']:.4f}"
        lines.append(f"| {row['name']} | {' | '.join(cells)} | {100 * row['clean_accuracy']['value']:.1f} | {mse} | "
                     f"{row['certify_wall_s']:.1f} |")
    if args.smoke:
        lines += ["", "Smoke run: the numbers mean nothing."]
    write_results(f"certify_denoised_{name}", {"environment": env, "config": r["config"], "rows": table,
                                               "ddpm": {"steps": args.ddpm_steps, "loss": ddpm_loss,
                                                        "wall_s": ddpm_wall, "t_star": t_star}},
                  "\n".join(lines) + "\n")


def load_dataset_of(config: Any) -> Any:
    from mlaudit.data import load_dataset

    return load_dataset(config.dataset)


if __name__ == "__main__":
    main()
