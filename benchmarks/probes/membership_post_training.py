"""Where the membership-inference kind's post-training time goes (issue 23, goal 3), without training.

Fabricates a pool's outputs: logits float32 [M, N, A, C] (Gaussian, with the true class's logit raised
by ``--signal`` for members, so every attack finds something), labels [N], the LiRA reference inclusion
matrix keep bool [M, N]; then times each post-training phase of ``run_membership`` separately, with the
experiment's own functions:

    query       logits_from_checkpoints of M tiny saved models (Flatten-Linear(3072, 16)-ReLU-Linear(16, C))
                on ``--query-examples`` random images under identity + flip (load + stack + forward)
    score:NAME  score_pool for each attack (shokri with classifier=logistic, as the CIFAR-10 benchmark)
    roc:NAME    roc_metrics(n_boot=--n-boot) over all M * N pairs at FPR 1e-5, 1e-3, 1e-2
    memorization  add_memorization (self-influence, Spearman vs LiRA, its figure; infl skipped by size)
    figures     roc_figures for all attacks, drawn to PNG

    python benchmarks/probes/membership_post_training.py --models 64 --examples 50000
    python benchmarks/probes/membership_post_training.py --models 64 --boot-sample 20 --json out.json

``--boot-sample K`` runs roc_metrics with K replicates and extrapolates the bootstrap part linearly to
``--n-boot`` (reported as extrapolated). ``--device cuda`` runs the scoring/ROC on the GPU where the
functions take a device.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from mlaudit.attacks.membership import Observations, inclusion_matrix  # noqa: E402
from mlaudit.experiments import membership_report as rep  # noqa: E402
from mlaudit.query import logits_from_checkpoints  # noqa: E402
from mlaudit.report.figures import roc_figures  # noqa: E402
from mlaudit.stats import roc_metrics  # noqa: E402

ATTACKS = ("loss", "shokri", "lira-online", "lira-offline")
OPTIONS = {"shokri": {"classifier": "logistic"}}
FPR_TARGETS = (1e-5, 1e-3, 1e-2)


def fabricate(m: int, n: int, a: int, c: int, *, signal: float, seed: int) -> Observations:
    """A pool's outputs with a membership signal: logits [M, N, A, C], labels [N], keep [M, N]."""
    g = torch.Generator().manual_seed(seed)
    keep = inclusion_matrix(m, n, keep=0.5, seed=seed)
    labels = torch.randint(0, c, (n,), generator=g)
    hard = torch.rand(n, generator=g) * 2.0  # per-example difficulty, shared by all models
    logits = torch.randn(m, n, a, c, generator=g)
    lift = (2.0 - hard)[None, :, None] + signal * keep[:, :, None].float()
    logits.scatter_add_(-1, labels.view(1, n, 1, 1).expand(m, n, a, 1), lift.unsqueeze(-1).expand(m, n, a, 1).contiguous())
    queries = ("identity", "flip")[:a] if a <= 2 else tuple(["identity"] + [f"shift:{i},0" for i in range(1, a)])
    return Observations(logits, labels, keep, queries)


class Tiny(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def timed(fn: Any, sync: str) -> tuple[Any, float]:
    if sync == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=64)
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=2)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--signal", type=float, default=0.5)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--boot-sample", type=int, default=None, help="replicates actually run (extrapolated)")
    ap.add_argument("--query-examples", type=int, default=5_000)
    ap.add_argument("--test-examples", type=int, default=10_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--phases", default="query,score,roc,memorization,figures")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    phases, attacks = args.phases.split(","), tuple(args.attacks.split(","))
    dev = torch.device(args.device)
    m, n, c = args.models, args.examples, args.classes
    rows: list[dict[str, Any]] = []

    def record(phase: str, seconds: float, note: str = "") -> None:
        rows.append({"phase": phase, "seconds": round(seconds, 3), "note": note})
        print(f"{phase:24s} {seconds:9.3f} s  {note}", flush=True)

    obs, t = timed(lambda: fabricate(m, n, args.queries, c, signal=args.signal, seed=args.seed), "cpu")
    print(f"fabricated M={m} N={n} A={args.queries} C={c} in {t:.1f} s (not a phase)", flush=True)
    if dev.type != "cpu":
        obs = Observations(obs.logits.to(dev), obs.labels.to(dev), obs.keep.to(dev), obs.queries)

    if "query" in phases:
        nq = args.query_examples
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for i in range(m):
                torch.manual_seed(i)
                p = Path(tmp) / f"m{i:04d}.pt"
                torch.save(Tiny(c).state_dict(), p)
                paths.append(p)
            x = torch.rand(nq, 3, 32, 32)
            _, t_load = timed(lambda: [torch.load(p, weights_only=True) for p in paths], args.device)
            record("query:load-only", t_load, f"{m} torch.load of tiny checkpoints")
            _, t = timed(lambda: logits_from_checkpoints(lambda: Tiny(c), paths, x, queries=obs.queries,
                                                         device=args.device), args.device)
            record("query", t, f"{m} tiny models x {nq} images x {len(obs.queries)} queries (N={nq}, not {n})")

    scores: dict[str, torch.Tensor] = {}
    if "score" in phases or "roc" in phases or "memorization" in phases or "figures" in phases:
        for name in attacks:
            (s, _), t = timed(lambda: rep.score_pool(obs, (name,), options=OPTIONS), args.device)
            scores.update(s)
            record(f"score:{name}", t, str(OPTIONS.get(name, "")))
    keep_np = obs.keep.cpu().flatten().numpy()
    metrics: dict[str, Any] = {}
    if "roc" in phases or "figures" in phases:
        k = args.n_boot if args.boot_sample is None else args.boot_sample
        for name in attacks:
            kw: dict[str, Any] = {"device": args.device} if "device" in roc_metrics.__kwdefaults__ else {}
            metrics[name], t = timed(lambda: roc_metrics(scores[name].flatten().numpy(), keep_np,
                                                         fpr_targets=FPR_TARGETS, n_boot=k, seed=0, **kw), args.device)
            note = f"n_boot={k}"
            if k != args.n_boot:
                _, t0 = timed(lambda: roc_metrics(scores[name].flatten().numpy(), keep_np, fpr_targets=FPR_TARGETS,
                                                  n_boot=0, seed=0, **kw), args.device)
                t = t0 + (t - t0) * args.n_boot / k
                note = f"n_boot={k} run, {t0:.2f} s without bootstrap, extrapolated to n_boot={args.n_boot}"
            record(f"roc:{name}", t, note)
    if "memorization" in phases:
        cfg = types.SimpleNamespace(pool=types.SimpleNamespace(in_per_example=m // 2))
        classes = [str(i) for i in range(c)]
        data = types.SimpleNamespace(train=types.SimpleNamespace(classes=classes), test=types.SimpleNamespace(
            classes=classes, y=torch.randint(0, c, (args.test_examples,))))
        test_logits = torch.randn(m, args.test_examples, 1, c)
        obs_cpu = Observations(obs.logits.cpu(), obs.labels.cpu(), obs.keep.cpu(), obs.queries)
        out0 = rep.ExperimentOutput(metrics={}, trials=[])
        with tempfile.TemporaryDirectory() as tmp:
            _, t = timed(lambda: rep.add_memorization(out0, cfg, obs_cpu, scores=scores, test_logits=test_logits,
                                                      data=data, rows=torch.arange(n), artifacts=Path(tmp)), "cpu")
        record("memorization", t, f"test split {args.test_examples}")
    if "figures" in phases:
        def draw() -> None:
            figs = roc_figures(scores, obs.keep.cpu(), metrics)
            for f in figs.values():
                f.savefig(io.BytesIO(), format="png", dpi=110)
        _, t = timed(draw, "cpu")
        record("figures", t, "roc_figures (log + linear) to PNG")
    total = sum(r["seconds"] for r in rows if not r["phase"].startswith("query:"))
    print(f"{'total':24s} {total:9.3f} s")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "torch": torch.__version__,
                                         "phases": rows, "total_s": round(total, 3)}, indent=1, default=str))


if __name__ == "__main__":
    main()
