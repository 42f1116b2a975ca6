"""DP-SGD throughput (issue 6): mlaudit's DP-SGD vs non-private SGD for the same model and batch size,
and Opacus (hooks and ghost clipping) beside them.

Model: ResNet-18 with GroupNorm (``model: {name: resnet18, norm: group}``), batch 256, CIFAR-10
(the JPEG pack when present, else random 3x32x32 data: the step time does not depend on the pixels).

* **mlaudit** runs the one training loop (``mlaudit.train.loop.train_stack``, K = 1) with the
  ``fast`` recipe (SGD-Nesterov, crop + flip), non-private (bf16 autocast on CUDA, the recipe's
  default, and fp32) and private (``dp: {noise_multiplier: 1, clip: 1, sample_rate: 256/n}``;
  per-example gradients with torch.func, float32). One epoch of ``--steps`` steps warms up, the
  next epoch of ``--steps`` steps is timed (the loop synchronises at the end of every epoch).
  mlaudit computes per-example gradients for the widest Poisson batch of the step rounded up to a
  multiple of 32 (at most B_max = ceil(qn + 6 sqrt(qn)) + 1 = 353 slots for an expected 256).
* **Opacus** (optional: skipped when not installed) wraps the same architecture with
  ``PrivacyEngine.make_private`` (``grad_sample_mode="hooks"``, and ``"ghost"`` when supported), on a
  fixed batch of 256 on the device, plain SGD-momentum, fp32; beside it the same hand-written loop
  without privacy (fp32). ``--steps`` steps are timed after ``--warmup`` steps.

Usage::

    python benchmarks/dp_throughput.py --device cuda [--steps 20]
    python benchmarks/dp_throughput.py --device cpu --steps 2 --batch-size 8 --width 8 --name cpu_dryrun

Writes benchmarks/results/dp_throughput[_<name>].{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PACK_CANDIDATES, environment, sync, time_step, write_results  # noqa: E402

from mlaudit.data import load_dataset  # noqa: E402
from mlaudit.data.base import TensorDataset  # noqa: E402
from mlaudit.models import ModelSpec, build_model  # noqa: E402
from mlaudit.privacy.dpsgd import max_batch  # noqa: E402
from mlaudit.train.loop import init_models, resolve_augment, train_stack  # noqa: E402
from mlaudit.train.recipe import Recipe, resolve_recipe  # noqa: E402


def training_split(n: int, *, synthetic: bool) -> tuple[TensorDataset, str]:
    """n CIFAR-10 training images (the JPEG pack) or n random 3x32x32 images; and a description."""
    if not synthetic:
        for c in PACK_CANDIDATES:
            if c and Path(c).is_file():
                train = load_dataset({"name": "cifar10", "root": c}).train
                if len(train) >= n:
                    return train.subset(torch.arange(n)), f"CIFAR-10 (JPEG pack {c}), first {n} training images"
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x, y, tuple(str(i) for i in range(10))), f"synthetic uniform 3x32x32, {n} images"


def time_mlaudit(spec: ModelSpec, train: TensorDataset, recipe: Recipe, *, steps: int, device: torch.device,
                 name: str) -> float:
    """Steady-state seconds per step: epoch 1 (``steps`` steps) warms up, epoch 2 is timed."""
    marks: list[float] = []

    def on_epoch(_e: int, _loss: torch.Tensor) -> None:  # called after the loop's end-of-epoch sync
        sync()
        marks.append(time.perf_counter())

    fn = lambda: build_model(spec, input_shape=(3, 32, 32), num_classes=10)  # noqa: E731
    r = recipe.model_copy(update={"epochs": 2})
    augment = resolve_augment(r, "cifar10", (3, 32, 32))
    sync()
    out = train_stack(init_models(fn, [0]), train, r, seeds=[0], lr=r.resolved_lr(residual=True), device=device,
                      augment=augment, on_epoch=on_epoch)
    assert out[0].steps == 2 * steps, (name, out[0].steps)
    return (marks[1] - marks[0]) / steps


def opacus_step(spec: ModelSpec, mode: str | None, x: torch.Tensor, y: torch.Tensor, *, batch: int,
                bf16: bool = False) -> Callable[[], None]:
    """One training step of a hand-written loop: plain PyTorch (``mode`` None) or Opacus ``mode``."""
    model = build_model(spec, input_shape=(3, 32, 32), num_classes=10).to(x.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit: Any = nn.CrossEntropyLoss()
    if mode is not None:
        from opacus import PrivacyEngine

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=batch)
        kw: dict[str, Any] = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                  max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)
        if mode == "ghost":
            model, opt, crit, _ = PrivacyEngine().make_private(criterion=crit, **kw)
        else:
            model, opt, _ = PrivacyEngine().make_private(**kw)
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
        loss = crit(out.float(), y)
        loss.backward()
        opt.step()

    return step


def opacus_version() -> str | None:
    try:
        import opacus
    except ImportError:
        return None
    return str(opacus.__version__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (and as many warm-up steps)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps of the hand-written Opacus/PyTorch loops")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--width", type=int, default=None, help="model width (default: the zoo's)")
    ap.add_argument("--synthetic", action="store_true", help="random data even when the CIFAR-10 pack exists")
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--name", default=None, help="results file suffix")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="(Secure RNG turned off|Full backward hook is firing)")
    device = torch.device(args.device)
    bsz, steps = args.batch_size, args.steps
    spec = ModelSpec(name="resnet18", norm="group", width=args.width)
    n = bsz * steps
    train, data_desc = training_split(n, synthetic=args.synthetic)
    base = resolve_recipe({"name": "fast", "batch_size": bsz, "schedule": "constant"})
    dp = {"noise_multiplier": 1.0, "clip": 1.0, "sample_rate": bsz / n}
    runs: dict[str, dict[str, Any]] = {}

    def record(key: str, s: float, **extra: Any) -> None:
        runs[key] = {"s_per_step": round(s, 5), "examples_per_s": round(bsz / s, 1), **extra}
        print(f"{key}: {s * 1e3:.1f} ms/step", flush=True)

    cuda = device.type == "cuda"
    record("mlaudit_sgd_recipe", time_mlaudit(spec, train, base, steps=steps, device=device, name="sgd"),
           precision="bf16 autocast" if cuda else "fp32")
    if cuda:
        fp32 = base.model_copy(update={"precision": "fp32"})
        record("mlaudit_sgd_fp32", time_mlaudit(spec, train, fp32, steps=steps, device=device, name="sgd32"),
               precision="fp32")
    private = resolve_recipe({**base.model_dump(), "dp": dp})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    record("mlaudit_dpsgd", time_mlaudit(spec, train, private, steps=steps, device=device, name="dp"),
           precision="fp32", per_example_slots=max_batch(bsz / n, n),
           peak_gpu_mem_mb=round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None)

    version = None if args.no_opacus else opacus_version()
    opacus_note = "skipped (--no-opacus)" if args.no_opacus else "skipped (opacus not installed)"
    x, y = train.x[:bsz].to(device), train.y[:bsz].to(device)
    record("torch_sgd_fp32", time_step(opacus_step(spec, None, x, y, batch=bsz), n=steps, warmup=args.warmup),
           precision="fp32")
    if version is not None:
        opacus_note = f"opacus {version}"
        for mode in ("hooks", "ghost"):
            try:
                fn = opacus_step(spec, mode, x, y, batch=bsz)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                record(f"opacus_{mode}", time_step(fn, n=steps, warmup=args.warmup), precision="fp32",
                       peak_gpu_mem_mb=round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None)
            except Exception as e:  # noqa: BLE001 - an Opacus mode this version lacks is reported, not fatal
                runs[f"opacus_{mode}"] = {"error": f"{type(e).__name__}: {e}"}
                print(f"opacus {mode}: {type(e).__name__}: {e}", flush=True)

    ref = runs["mlaudit_sgd_recipe"]["s_per_step"]
    ratios = {"mlaudit_dpsgd / mlaudit_sgd_recipe": runs["mlaudit_dpsgd"]["s_per_step"] / ref}
    if "mlaudit_sgd_fp32" in runs:
        ratios["mlaudit_dpsgd / mlaudit_sgd_fp32"] = runs["mlaudit_dpsgd"]["s_per_step"] / runs["mlaudit_sgd_fp32"]["s_per_step"]
    for mode in ("hooks", "ghost"):
        if "s_per_step" in runs.get(f"opacus_{mode}", {}):
            ratios[f"opacus_{mode} / torch_sgd_fp32"] = runs[f"opacus_{mode}"]["s_per_step"] / runs["torch_sgd_fp32"]["s_per_step"]
    ratios = {k: round(v, 2) for k, v in ratios.items() if math.isfinite(v)}
    env = environment() | {"data": data_desc, "device": str(device), "opacus": version}
    md = (f"# DP-SGD throughput: ResNet-18 (GroupNorm), batch {bsz}\n\n{env['date']}, "
          f"{env['gpu'] or 'CPU'}, torch {env['torch']}, {opacus_note}; {data_desc}; {steps} timed steps after "
          f"warm-up.\n\n| run | precision | ms/step | examples/s |\n|---|---|---|---|\n")
    for k, v in runs.items():
        md += (f"| {k} | {v.get('precision', '')} | {v['s_per_step'] * 1e3:.1f} | {v['examples_per_s']} |\n"
               if "s_per_step" in v else f"| {k} | | failed: {v['error'][:80]} | |\n")
    md += "\n| ratio (slower by) | x |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in ratios.items())
    md += (f"\nmlaudit's DP step computes per-example gradients for the sampled batch rounded up to a multiple of "
           f"32 (at most {max_batch(bsz / n, n)} slots) "
           f"(expected batch {bsz}); goal: mlaudit_dpsgd / mlaudit_sgd <= 2.\n")
    write_results(f"dp_throughput{'_' + args.name if args.name else ''}",
                  {"environment": env, "model": spec.model_dump(), "batch_size": bsz, "steps": steps,
                   "recipe": base.model_dump(mode="json"), "dp": dp, "runs": runs, "ratios": ratios}, md)


if __name__ == "__main__":
    main()
