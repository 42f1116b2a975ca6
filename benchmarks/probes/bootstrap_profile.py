"""Where `roc_analysis`'s time goes on a device, for one attack of a 256-model LiRA pool (issue 23, goal 2's tail).

The 256-model pool's `roc_bootstrap` phase took 9.1 s for four attacks on an H100 (2026-12-07,
benchmarks/results/membership_cifar10_membership_256_airbench_lean_compile_h100.md): 12.8M (model, example) pairs,
200 bootstrap replicates each. This probe times its parts on synthetic scores of that size (members shifted up by
``--shift`` so the ROC is not degenerate; continuous scores, so no ties): the sort and host-side preparation
(`stats._prepare`), the point curve (`stats._curve`), the resample counts alone (`stats._boot_counts`, randint +
bincount), and the whole bootstrap (`stats._bootstrap_roc_stats`), each CUDA-synchronised, medians of ``--reps``.
It decides whether a faster exact multinomial draw (Poisson counts corrected to n) is worth writing.

    python benchmarks/probes/bootstrap_profile.py --pairs 12800000 --boot 200 --out /tmp/w/bootstrap_profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mlaudit import stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=12_800_000)
    ap.add_argument("--boot", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shift", type=float, default=0.5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device(args.device)
    rng = np.random.default_rng(0)
    labels = rng.random(args.pairs) < 0.5
    scores = rng.standard_normal(args.pairs) + args.shift * labels
    targets = (1e-5, 1e-3, 1e-2)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn):  # noqa: ANN001, ANN202
        out, times = None, []
        for _ in range(args.reps):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
        return out, statistics.median(times)

    (s, yb, ends), t_prep = timed(lambda: stats._prepare(scores, labels, dev))
    _, t_curve = timed(lambda: stats._curve(yb, ends))
    budget = stats.BOOT_MEMORY_BYTES.get(dev.type, stats.BOOT_MEMORY_BYTES["cpu"])
    chunk = int(max(1, min(args.boot, budget // (stats.BOOT_BYTES_PER_PAIR * args.pairs))))
    gen = None if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(0)
    _, t_counts = timed(lambda: stats._boot_counts(args.pairs, chunk, np.random.default_rng(0), gen, dev))
    _, t_boot = timed(lambda: stats._bootstrap_roc_stats(yb, ends, targets, n_boot=args.boot, seed=0, device=dev))
    _, t_all = timed(lambda: stats.roc_analysis(scores, labels, fpr_targets=targets, n_boot=args.boot, device=dev))
    batches = -(-args.boot // chunk)
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "pairs": args.pairs, "n_boot": args.boot, "replicates_per_batch": chunk, "batches": batches,
           "prepare_s": round(t_prep, 4), "curve_s": round(t_curve, 4),
           "counts_one_batch_s": round(t_counts, 4), "counts_all_batches_s_est": round(t_counts * batches, 4),
           "bootstrap_s": round(t_boot, 4), "roc_analysis_s": round(t_all, 4)}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
