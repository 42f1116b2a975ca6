"""The compile-auto probe (factory/layout.py pick_compile, median of 5 epochs after the first) on the 256-model
LiRA pool's setting, probe only (issue 23, goal 5): its per-model-step estimates next to the per-model training
times the A/B/A profile measured (H100, 2026-12-07: 1.013 / 1.090 s eager, 0.888 s compiled per pool model,
benchmarks/results/pool_profile_aba_compile_h100.md). Repeated ``--reps`` times (one compile, then warm caches).

    python benchmarks/probes/compile_probe_check.py --reps 3 --out /tmp/w/compile_probe_check.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.factory import layout
from mlaudit.models import ModelSpec
from mlaudit.models.registry import build_model
from mlaudit.train.loop import resolve_augment
from mlaudit.train.recipe import resolve_recipe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    data = load_dataset(DatasetSpec(name="cifar10", root=".data/cifar10-jpeg.npz"))
    recipe = resolve_recipe({"name": "airbench-muon", "cuda_graph": True, "compile": "auto"})
    spec = ModelSpec(name="airbench")
    lr = recipe.resolved_lr(residual=spec.residual)
    augment = resolve_augment(recipe, data.name, data.input_shape)
    train = data.train.to(torch.device("cuda"))
    steps_per_model = -(-25_000 // recipe.batch_size) * recipe.epochs  # a pool model trains on a half
    out = []
    for r in range(args.reps):
        t0 = time.perf_counter()
        use, why = layout.pick_compile(recipe, layout="loop", k=4, data=train, lr=lr, device=torch.device("cuda"),
                                       model_fn=lambda: build_model(spec, input_shape=data.input_shape, num_classes=10),
                                       augment=augment, job_sizes=[25_000] * 256)
        out.append({"rep": r, "compiled": use, "why": why, "probe_s": round(time.perf_counter() - t0, 2),
                    "steps_per_pool_model": steps_per_model})
        print(json.dumps(out[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
