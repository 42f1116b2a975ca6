"""Probe (issue 23): the ``airbench`` network with the ``airbench-muon`` recipe on CIFAR-10 (JPEG).

Times one-model-at-a-time training through the factory, eager and with ``compile: true``, on the full
50k training set (accuracy with test-time augmentation) and on random halves (a LiRA pool's models);
reports FLOPs per step, achieved TFLOP/s and how many graphs torch.compile built.

    python benchmarks/probes/airbench_probe.py [--models 4] [--halves 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import cifar10_jpeg, environment, train_step_flops  # noqa: E402

from mlaudit.factory import FactoryJob, TrialSpec, run_trials  # noqa: E402
from mlaudit.models import ModelSpec  # noqa: E402
from mlaudit.train.recipe import resolve_recipe  # noqa: E402


def run(data, recipe, n: int, *, halves: bool, seed0: int) -> dict:  # noqa: ANN001
    n_train = len(data.train)
    trials = []
    for i in range(n):
        mask = None
        if halves:
            g = torch.Generator().manual_seed(1000 + seed0 + i)
            mask = torch.zeros(n_train, dtype=torch.bool)
            mask[torch.randperm(n_train, generator=g)[: n_train // 2]] = True
        trials.append(TrialSpec(f"m{i}", seed=seed0 + i, mask=mask))
    job = FactoryJob(model=ModelSpec(name="airbench"), recipe=recipe, data=data, trials=tuple(trials), device="cuda",
                     batched=False, max_chunk=1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = run_trials(job)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    acc = [m.metrics["test_accuracy"] for m in out]
    mean = sum(acc) / len(acc)
    sd = (sum((a - mean) ** 2 for a in acc) / max(len(acc) - 1, 1)) ** 0.5
    return {"models": n, "halves": halves, "wall_s": round(wall, 3), "s_per_model": round(wall / n, 3),
            "acc_mean": round(mean, 5), "acc_sd": round(sd, 5), "acc": [round(a, 4) for a in acc],
            "steps": out[0].steps, "model_wall_s": [round(m.wall_s, 3) for m in out]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--halves", type=int, default=8)
    ap.add_argument("--out", default="")
    ap.add_argument("--modes", default="eager,compiled")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    data = cifar10_jpeg()
    res: dict = {"environment": environment()}
    base = resolve_recipe("airbench-muon")
    res["flops_per_step"] = train_step_flops(ModelSpec(name="airbench"), data, base.batch_size)
    for compile_ in [m == "compiled" for m in args.modes.split(",")]:
        r = base.model_copy(update={"compile": compile_})
        key = "compiled" if compile_ else "eager"
        t0 = time.perf_counter()
        run(data, r, 1, halves=False, seed0=99)  # warm-up (and compilation)
        res[f"{key}_warmup_s"] = round(time.perf_counter() - t0, 1)
        full = run(data, r, args.models, halves=False, seed0=0)
        half = run(data, r, args.halves, halves=True, seed0=100)
        for d in (full, half):
            d["tflops"] = round(res["flops_per_step"] * d["steps"] * d["models"] / d["wall_s"] / 1e12, 1)
        res[key] = {"full": full, "halves": half}
        if compile_:
            from torch._dynamo.utils import counters

            res["dynamo_stats"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles")}
        print(json.dumps({key: res[key]}, indent=1), flush=True)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
