"""Probe (issues 15 and 16): where a GPU call makes the host wait for the device.

A host synchronisation in the middle of a call (``.item()``, ``.tolist()``, a boolean mask index, a copy of a
pageable CPU tensor to the GPU, which PyTorch follows with a stream synchronisation) drains the CUDA queue: the
GPU then idles while the CPU launches the next kernels. On a ResNet-18 that is ~1-3 ms per sync, the size of the
gaps left between our FGSM / PGD-10 l2 and torchattacks' (issue 16), and a candidate for the part of the DP step
outside the clipped sum (issue 15).

This runs each call once to warm up, then again under ``torch.cuda.set_sync_debug_mode("warn")``, and prints
every distinct Python stack (frames inside the repository and benchmarks) that triggered a synchronising call,
with its count.

``--gaps`` instead profiles one call of each evasion part (and torchattacks' FGSM / PGDL2 beside it) with the
CUDA timeline and reports where the GPU sits idle inside the call: the time from the call's start to its first
kernel, from its last kernel to its end, and the largest gaps between kernels with the innermost Python
function (``with_stack``) that was running on the CPU when each gap began.

    python benchmarks/probes/sync_trace.py [--parts fgsm,pgd_l2,pgd_linf,dp] [--out sync_trace.txt]
    python benchmarks/probes/sync_trace.py --gaps --parts fgsm,pgd_l2 [--out gaps.txt]
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mlaudit.attacks.evasion import fgsm, pgd  # noqa: E402
from mlaudit.models import build_model  # noqa: E402


def traced(fn: Callable[[], object]) -> collections.Counter[str]:
    """The distinct repository stacks of the synchronising calls of one ``fn()`` (after a warm-up call)."""
    fn()
    torch.cuda.synchronize()
    seen: collections.Counter[str] = collections.Counter()
    old = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
        # (the notice that the debug mode is a prototype also says "synchronizing": not a sync)
        if "synchronizing" not in str(message) or "prototype" in str(message):
            return old(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if str(ROOT) in f.filename and "sync_trace" not in f.filename]
        seen[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1

    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        warnings.showwarning = old
    return seen


def gaps(fn: Callable[[], object], top: int = 12) -> list[str]:
    """Idle GPU time inside one profiled ``fn()`` (after two warm-up calls): lead, tail and largest gaps."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    fn(), fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        with record_function("probe_call"):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        ev = json.load(open(f.name))["traceEvents"]
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in ev
                 if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    call = next(e for e in ev if e.get("name") == "probe_call" and e.get("ph") == "X" and e.get("cat") != "gpu_user_annotation")
    c0, c1 = call["ts"], call["ts"] + call["dur"]
    py = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev
          if e.get("ph") == "X" and e.get("cat") == "python_function" and str(ROOT) in e["name"]]
    busy = sum(b - a for a, b, _ in gpu)
    holes = [(gpu[i + 1][0] - gpu[i][1], gpu[i][1], gpu[i][2], gpu[i + 1][2]) for i in range(len(gpu) - 1)]
    holes.sort(reverse=True)

    def running(t: float) -> str:
        inner = [p for p in py if p[0] <= t <= p[1]]
        if not inner:
            return "?"
        inner.sort(key=lambda p: p[1] - p[0])
        return " <- ".join(p[2].split("/")[-1] for p in inner[:3])

    out = [f"call {c1 - c0:.0f} us, GPU busy {busy:.0f} us over {len(gpu)} kernels/copies, lead (call start -> first "
           f"kernel) {gpu[0][0] - c0:.0f} us, tail (last kernel end -> call end) {c1 - gpu[-1][1]:.0f} us, "
           f"idle between kernels {sum(h[0] for h in holes if h[0] > 0):.0f} us ({sum(1 for h in holes if h[0] > 20)} "
           f"gaps > 20 us)"]
    for h, t, before, after in holes[:top]:
        out.append(f"  gap {h:8.0f} us after {before[:40]!r} before {after[:40]!r}; CPU in: {running(t + h / 2)}")
    return out


def dp_step_call() -> Callable[[], object]:
    """Two epochs of 4 fast DP-SGD steps of ResNet-18-GN at batch 256 through the training loop (synthetic
    CIFAR-shaped data: the syncs do not depend on the pixels)."""
    from mlaudit.data.base import DataBundle  # noqa: F401  (import check only)
    from mlaudit.train.loop import init_models, resolve_augment, train_stack
    from mlaudit.train.recipe import resolve_recipe
    from dp_throughput import training_split

    train, _ = training_split(256 * 4, synthetic=True)
    r = resolve_recipe({"name": "fast", "epochs": 2, "batch_size": 256, "precision": "fp32",
                        "dp": {"noise_multiplier": 1.0, "clip": 1.0, "sample_rate": 256 / len(train),
                               "clipping": "fast"}})

    def run() -> object:
        models = init_models(lambda: build_model({"name": "resnet18", "norm": "group"}, input_shape=(3, 32, 32),
                                                 num_classes=10), [0])
        return train_stack(models, train, r, seeds=[0], lr=r.resolved_lr(residual=True), device=torch.device("cuda"),
                           augment=resolve_augment(r, "cifar10", (3, 32, 32)), strategy="loop")
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="fgsm,pgd_l2,pgd_linf,dp")
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--out", default="")
    ap.add_argument("--gaps", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10).to(dev).eval()
    x = torch.rand(args.examples, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (args.examples,), device=dev)
    calls: dict[str, Callable[[], object]] = {
        "fgsm": lambda: fgsm(model, x, y, eps=8 / 255),
        "pgd_l2": lambda: pgd(model, x, y, eps=0.5, norm="l2", steps=10),
        "pgd_linf": lambda: pgd(model, x, y, eps=8 / 255, steps=20),
    }
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}; ResNet-18 at initialisation, "
             f"{args.examples} random inputs (evasion parts)"]
    if args.gaps:
        import torchattacks
        calls["torchattacks_fgsm"] = lambda: torchattacks.FGSM(model, eps=8 / 255)(x, y)
        calls["torchattacks_pgdl2"] = lambda: torchattacks.PGDL2(model, eps=0.5, alpha=0.125, steps=10)(x, y)
        for part in args.parts.split(","):
            lines += [f"\n== {part}", *gaps(calls[part])]
            print("\n".join(lines[-14:]), flush=True)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        return
    for part in args.parts.split(","):
        fn = dp_step_call() if part == "dp" else calls[part]
        seen = traced(fn)
        lines.append(f"\n== {part}: {sum(seen.values())} synchronising calls")
        lines += [f"{n:5d}  {stack}" for stack, n in seen.most_common()]
        print("\n".join(lines[-(len(seen) + 1):]), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
