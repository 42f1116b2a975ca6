"""Probe (issue 16): the host timeline of one FGSM / PGD-10 l2 call on a GPU, without a profiler.

The profiler's own overhead on Python code is as large as the gaps it is meant to find (~2 ms of a 25 ms FGSM
call), so this probe only reads ``time.perf_counter`` at a few points of each call, medians over ``--reps``
alternating calls after warm-ups, with the device idle at each call's start:

* ``lead``: call start -> the model's first forward is called (validation and setup on the CPU, the GPU idle);
* ``forwards``: the times of later forward calls (for PGD: how far ahead the CPU runs);
* ``return``: call start -> the attack returns (for an asynchronous call: before the GPU is done);
* ``wall``: call start -> the result is ready on the device (``torch.cuda.synchronize``).

Then mlaudit's FGSM call split by host stamps: when ``check_inputs`` returns, when ``run_engine``, ``craft`` and the
deferred range read (``EvasionObjective.run_pending``) are entered, when that read returns, and the first forward;
and the same call with the range read dropped (``no range read``: ``check_inputs`` appends no deferred check), to size
that device read.

The same wrapper model serves mlaudit and torchattacks 3.5.1, so the two leads compare directly.

    python benchmarks/probes/fgsm_timeline.py [--examples 1000] [--reps 21] [--out timeline.txt]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from mlaudit.attacks.evasion import fgsm  # noqa: E402
from mlaudit.attacks.evasion.base import check_inputs, run_engine  # noqa: E402
from mlaudit.models import build_model  # noqa: E402


class Stamped(nn.Module):
    """``inner`` with the host time of every forward call recorded in ``marks``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.marks = inner, []

    def forward(self, x: Tensor) -> Tensor:
        self.marks.append(time.perf_counter())
        return self.inner(x)


def timeline(model: Stamped, fn: Callable[[], object], reps: int) -> dict[str, float]:
    rows = []
    for _ in range(reps):
        torch.cuda.synchronize()
        model.marks = []
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        marks = [1e3 * (m - t0) for m in model.marks]
        rows.append({"lead": marks[0], "last_forward": marks[-1], "forwards": len(marks), "return": 1e3 * (t1 - t0),
                     "wall": 1e3 * (t2 - t0)})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    import torchattacks

    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = Stamped(build_model("resnet18", input_shape=(3, 32, 32), num_classes=10)).to(dev).eval()
    x = torch.rand(args.examples, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.examples,), device=dev)
    ta_fgsm, ta_l2 = torchattacks.FGSM(model, eps=8 / 255), torchattacks.PGDL2(model, eps=0.5, alpha=0.125, steps=10)

    def pgd_l2() -> Tensor:  # ``pgd(norm="l2", steps=10)`` without early stop (the model at initialisation
        # misclassifies most random inputs at once, and torchattacks runs every step on every example)
        check_inputs(model, x, y, eps=0.5, norm="l2")
        return run_engine(model, x, y, eps=0.5, norm="l2", box=(0.0, 1.0), loss="ce", steps=10, optimizer="pgd",
                          lr=0.25, random_start=True, keep_best=False, early_stop=False)

    calls: dict[str, Callable[[], object]] = {
        "mlaudit fgsm": lambda: fgsm(model, x, y, eps=8 / 255),
        "torchattacks FGSM": lambda: ta_fgsm(x, y),
        "mlaudit pgd l2-10": pgd_l2,
        "torchattacks PGDL2-10": lambda: ta_l2(x, y),
    }
    for fn in calls.values():  # warm-ups: cuDNN plans, the stochastic-model probe's cache, the allocator
        fn(), fn()
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ResNet-18 at initialisation, {args.examples} "
             f"random 3x32x32 inputs; medians of {args.reps} calls, ms from the call's start"]
    res: dict[str, list[dict[str, float]]] = {k: [] for k in calls}
    for _ in range(3):  # alternate the libraries: three rounds of reps // 3 calls each
        for k, fn in calls.items():
            res[k].append(timeline(model, fn, max(1, args.reps // 3)))
    for k, rounds in res.items():
        med = {f: statistics.median(r[f] for r in rounds) for f in rounds[0]}
        lines.append(f"{k:24s} " + "  ".join(f"{f} {v:8.2f}" for f, v in med.items()))
        print(lines[-1], flush=True)
    lines += breakdown(model, x, y, args.reps)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def breakdown(model: Stamped, x: Tensor, y: Tensor, reps: int) -> list[str]:
    """Medians of the host intervals inside mlaudit's FGSM lead (see the module docstring), in ms."""
    import importlib

    from mlaudit.attacks.evasion import base
    fgsm_module = importlib.import_module("mlaudit.attacks.evasion.fgsm")  # the package exports the function by name

    stamps: dict[str, float] = {}

    def stamp(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def wrapped(*a: object, **k: object) -> object:
            stamps.setdefault(name, time.perf_counter())
            out = fn(*a, **k)
            stamps.setdefault(name + " returned", time.perf_counter())
            return out
        return wrapped

    saved = (fgsm_module.check_inputs, fgsm_module.run_engine, base.craft, base.EvasionObjective.run_pending)

    def no_read(*a: object, later: object = None, **k: object) -> object:  # fgsm's own `later` stays empty
        return saved[0](*a, later=[], **k)

    fgsm_module.run_engine = stamp("run_engine", saved[1])
    base.craft = stamp("craft", saved[2])
    base.EvasionObjective.run_pending = stamp("range read", saved[3])
    order = ["check_inputs returned", "run_engine", "craft", "range read", "range read returned"]
    out = [f"-- mlaudit fgsm lead, ms from the call's start (medians of {reps} calls; the first forward = lead)"]
    try:
        for label, drop_read in (("with the range read", False), ("no range read", True)):
            rows = []
            for _ in range(reps + 2):
                torch.cuda.synchronize()
                stamps.clear()
                model.marks = []
                # without the deferred range read: not a supported path, only for this measurement
                fgsm_module.check_inputs = stamp("check_inputs", no_read if drop_read else saved[0])
                t0 = time.perf_counter()
                engine_x = fgsm(model, x, y, eps=8 / 255)
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                del engine_x
                row = {k: 1e3 * (v - t0) for k, v in stamps.items()}
                row["first forward"], row["wall"] = 1e3 * (model.marks[0] - t0), 1e3 * (t2 - t0)
                rows.append(row)
            rows = rows[2:]  # warm-ups
            keys = [k for k in [*order, "first forward", "wall"] if all(k in r for r in rows)]
            out.append(f"{label:22s} " + "  ".join(f"{k} {statistics.median(r[k] for r in rows):.3f}" for k in keys))
            print(out[-1], flush=True)
    finally:
        fgsm_module.check_inputs, fgsm_module.run_engine, base.craft, base.EvasionObjective.run_pending = saved
    return out


if __name__ == "__main__":
    main()
