"""Probe (issue 16): where FGSM and PGD-10 l2 spend their fixed costs on a GPU, next to torchattacks.

On the H200 (2026-12-03) two rows stayed slower than torchattacks 3.5.1: FGSM (0.04 s vs 0.02 s) and
PGD-10 l2 on a robust ResNet-18 (0.27 s vs 0.24 s, 1000 CIFAR-10 images). This probe splits one call into
its parts on a ResNet-18 at initialisation (the work per step does not depend on the weights; early stop
is switched off where it would, so both sides do the same number of steps):

* ``check_inputs`` alone (the box check's host sync, the label check, the two probe forward passes that
  detect a stochastic model);
* the engine alone (``run_engine``: the craft loop, its setup and bookkeeping);
* one bare forward + backward to the input with frozen parameters (the floor of one step);
* the public call (``fgsm``; ``run_engine`` with ``early_stop=False`` for PGD-10 l2) and torchattacks'.

Each time is the median of ``--reps`` CUDA-synchronised calls after one warm-up; then a ``torch.profiler``
table of one call of each (self CPU time, count of calls), so the launch count is visible.

    python benchmarks/probes/fgsm_l2_profile.py --examples 1000 --out fgsm_l2_profile.txt
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torchattacks
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median_time, sync  # noqa: E402

from mlaudit.attacks.evasion import fgsm  # noqa: E402
from mlaudit.attacks.evasion.base import check_inputs, run_engine  # noqa: E402
from mlaudit.models import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--out", default="")
    ap.add_argument("--device", default="cuda", help="cuda (the measurement); cpu only checks the script runs")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10).to(dev).eval()
    x = torch.rand(args.examples, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.examples,), device=dev)
    eps, eps2 = 8 / 255, 0.5

    def bare() -> Tensor:
        for p in model.parameters():
            p.requires_grad_(False)
        xx = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xx), y)
        (g,) = torch.autograd.grad(loss, xx)
        for p in model.parameters():
            p.requires_grad_(True)
        return (x + eps * g.sign()).clamp(0, 1)

    def pgd_l2() -> Tensor:
        check_inputs(model, x, y, eps=eps2, norm="l2")
        return run_engine(model, x, y, eps=eps2, norm="l2", box=(0.0, 1.0), loss="ce", steps=10, optimizer="pgd",
                          lr=0.25, random_start=True, early_stop=False, generator=torch.Generator().manual_seed(0))

    ta_fgsm = torchattacks.FGSM(model, eps=eps)
    ta_l2 = torchattacks.PGDL2(model, eps=eps2, alpha=eps2 / 4, steps=10, random_start=True)
    parts: dict[str, Callable[[], object]] = {
        "check_inputs": lambda: check_inputs(model, x, y, eps=eps, norm="linf"),
        "FGSM engine alone (run_engine, steps 1)": lambda: run_engine(
            model, x, y, eps=eps, norm="linf", box=(0.0, 1.0), loss="ce", steps=1, optimizer="pgd", lr=1.0,
            random_start=False, keep_best=False, early_stop=False, generator=torch.Generator().manual_seed(0)),
        "bare forward+backward to the input (+ sign step)": bare,
        "mlaudit fgsm": lambda: fgsm(model, x, y, eps=eps),
        "torchattacks FGSM": lambda: ta_fgsm(x, y),
        "mlaudit PGD-10 l2 (check_inputs + run_engine, no early stop)": pgd_l2,
        "torchattacks PGDL2-10": lambda: ta_l2(x, y),
    }
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    lines = [f"{where}, torch {torch.__version__}, ResNet-18 at initialisation, "
             f"{args.examples} random 3x32x32 inputs; median of {args.reps} synchronised calls after a warm-up", ""]
    for name, fn in parts.items():
        lines.append(f"{name}: {1000 * median_time(fn, args.reps):.2f} ms")
    for name in ("mlaudit fgsm", "torchattacks FGSM", "mlaudit PGD-10 l2 (check_inputs + run_engine, no early stop)",
                 "torchattacks PGDL2-10"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            parts[name]()
            sync()
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC"))
        syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
        copies = sum(e.count for e in events if e.key in ("cudaMemcpyAsync", "cudaMemcpy"))
        lines += ["", f"== {name}: {launches} kernel launches, {syncs} stream/device syncs, {copies} memcpy calls",
                  events.table(sort_by="self_cpu_time_total", row_limit=20)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
