"""Probe (issue 23): where one ``airbench`` model's time goes in the factory (CIFAR-10 (JPEG), random half).

Phase wall times (CUDA-synchronised) of train_stack, its data_init and evaluation, and a torch.profiler
table of the heaviest CUDA kernels and CPU operators for one model after a warm-up model.

    python benchmarks/probes/airbench_profile.py [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cifar10_jpeg  # noqa: E402
from airbench_probe import run  # noqa: E402

import mlaudit.factory.batched as fb  # noqa: E402
import mlaudit.train.loop as loop  # noqa: E402
from mlaudit.train.recipe import resolve_recipe  # noqa: E402

PHASES: dict[str, float] = defaultdict(float)


def timed(mod, name: str) -> None:  # noqa: ANN001
    fn = getattr(mod, name)

    def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*a, **k)
        torch.cuda.synchronize()
        PHASES[f"{mod.__name__.split('.')[-1]}.{name}"] += time.perf_counter() - t0
        return out

    setattr(mod, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--models", type=int, default=4)
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    data = cifar10_jpeg()
    r = resolve_recipe({"name": "airbench-muon", "compile": args.compile})
    run(data, r, 1, halves=True, seed0=99)
    for mod, name in ((fb, "train_stack"), (fb, "evaluate"), (loop, "_data_init"), (fb, "init_models"),
                      (loop, "_alternating_flips")):
        timed(mod, name)
    res = run(data, r, args.models, halves=True, seed0=0)
    print("per model:", res["s_per_model"], "s;", {k: round(v / args.models, 4) for k, v in PHASES.items()})
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(data, r, 1, halves=True, seed0=7)
    ka = prof.key_averages()
    print(ka.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
