"""Where a LiRA pool model's time goes in the factory (issue 23, goal 2), measured on a few chunks.

Runs the 256-model airbench pool config (`benchmarks/configs/cifar10_membership_256_airbench_graph.yaml`)
with ``--models`` models through ``run_experiment``, with timers (CUDA-synchronised) around the three parts
of each chunk in `mlaudit.factory.batched._train_chunk`: ``train_stack``, ``evaluate`` (test accuracy with
the recipe's TTA) and ``query_outputs`` (the pool's logits). On every chunk it also times the pool query in
bf16 autocast and compares it with the float32 one on LiRA's statistic: phi = z_y - logsumexp(z_{j != y})
per (model, row, query), reported as the largest and mean |phi_fp32 - phi_bf16| next to the spread of phi
over the chunk's models (LiRA's per-example Gaussians are fitted over models, so an error far below that
spread does not move the attack).

    python benchmarks/probes/pool_chunk_profile.py --models 16 --max-chunk 4 --out /tmp/w/pool_profile.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

import mlaudit.factory.batched as fb
from mlaudit.config import load_yaml
from mlaudit.experiments import run_experiment

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10_membership_256_airbench_graph.yaml"


def phi(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LiRA's logit-scaled confidence: [K, N, A, C], y [N] -> [K, N, A] (float64)."""
    z = logits.double()
    idx = y.view(1, -1, 1, 1).expand(*z.shape[:3], 1)
    zy = z.gather(-1, idx).squeeze(-1)
    rest = z.scatter(-1, idx, float("-inf"))
    return zy - torch.logsumexp(rest, -1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--max-chunk", type=int, default=4)
    ap.add_argument("--out", default="pool_profile.json")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    times: dict[str, list[float]] = {"train": [], "evaluate": [], "query": [], "query_bf16": []}
    errs: list[dict[str, float]] = []
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed(name, fn):
        def wrapper(*a, **kw):
            sync()
            t0 = time.perf_counter()
            r = fn(*a, **kw)
            sync()
            times[name].append(time.perf_counter() - t0)
            return r
        return wrapper

    orig_query = fb.query_outputs

    def query(job, stack, data, **kw):
        out = timed("query", orig_query)(job, stack, data, **kw)
        bf = dataclasses.replace(job, queries={n: dataclasses.replace(p, bf16=True) for n, p in job.queries.items()})
        out16 = timed("query_bf16", orig_query)(bf, stack, data, **kw)
        plan = job.queries["pool"]
        y = data.train.y[plan.rows] if plan.rows is not None else data.train.y
        p32 = phi(torch.stack([o["pool"] for o in out]), y.cpu())
        p16 = phi(torch.stack([o["pool"] for o in out16]), y.cpu())
        d = (p32 - p16).abs()
        errs.append({"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                     "phi_std_over_models_mean": float(p32.std(0).mean()) if p32.shape[0] > 1 else float("nan")})
        return out

    fb.train_stack = timed("train", fb.train_stack)
    fb.evaluate = timed("evaluate", fb.evaluate)
    fb.query_outputs = query
    cfg = load_yaml(args.config)
    cfg["pool"] = {**cfg["pool"], "models": args.models}
    cfg["factory"] = {**cfg.get("factory", {}), "max_chunk": args.max_chunk}
    cfg["attacks"] = ["loss", "lira-online"]
    cfg.pop("attack_options", None)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run_experiment(cfg, out=Path(tmp) / "run", device=args.device, store=Path(tmp) / "runs.db", quiet=True)
        wall = time.perf_counter() - t0
    cost = res.results["cost"]
    k = args.max_chunk
    rec = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "models": args.models, "max_chunk": k,
           "wall_s": wall, "train_wall_s": cost["train_wall_s"],
           "per_chunk_s": times, "per_model_s_after_first_chunk": {n: sum(v[1:]) / max(1, k * (len(v) - 1))
                                                                   for n, v in times.items()},
           "phi_fp32_vs_bf16": errs}
    Path(args.out).write_text(json.dumps(rec, indent=1))
    print(json.dumps({kk: rec[kk] for kk in ("gpu", "models", "max_chunk", "wall_s", "train_wall_s",
                                             "per_model_s_after_first_chunk")}, indent=1))
    print("phi errors:", errs[-1] if errs else None)


if __name__ == "__main__":
    main()
