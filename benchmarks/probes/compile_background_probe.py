"""The background compile of ``recipe.compile: auto`` in a real pool (issue 23): what each chunk did and how long.

Runs the lean 256-model LiRA pool config with ``compile: auto`` (``cifar10_membership_256_airbench_lean_auto.yaml``)
with ``--models`` models and the compile probe's threshold at 0 (a short job would otherwise not compile), and
records for every chunk (`mlaudit.factory.batched._train_chunk`, CUDA-synchronised) its start, wall time per model
and compile decision: the chunks trained eagerly while inductor compiled in the background thread, then the
compiled ones. Compare their per-model times with the eager and compiled steps measured alone (A/B/A, H100,
2026-12-07: 1.01-1.09 and 0.89 s per model, docs/membership.md).

    python benchmarks/probes/compile_background_probe.py --models 32 --out /tmp/w/compile_background.json
    python benchmarks/probes/compile_background_probe.py --models 8 --config tiny.yaml --device cpu  # a smoke run

``--foreground``: the factory's CompileProbe with ``background=False``, the compile inside the compiled probe on the
job's thread (the GPU idle meanwhile), as before 2026-12-07's seventh session: the A side of an A/B of the two. Run
each side in a fresh process with fresh inductor and Triton caches (``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``)
so that neither reuses the other's compiled kernels (benchmarks/probes/session_1208c.sh).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import mlaudit.factory.batched as fb
import mlaudit.factory.layout as fl
from mlaudit.config import load_yaml
from mlaudit.experiments import run_experiment

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10_membership_256_airbench_lean_auto.yaml"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=32)
    ap.add_argument("--out", default="compile_background.json")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (compile auto applies on CUDA only)")
    ap.add_argument("--foreground", action="store_true", help="compile on the job's thread, not in the background")
    args = ap.parse_args()
    if args.foreground:
        real_probe = fb.CompileProbe

        def foreground(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            return real_probe(*a, **{**kw, "background": False})

        fb.CompileProbe = foreground  # type: ignore[misc,assignment]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    fl.COMPILE_PROBE_MIN_S = 0.0
    chunks: list[dict[str, object]] = []
    t_start = time.perf_counter()
    orig = fb._train_chunk

    def chunk(job, trials, setup, on_epoch):  # noqa: ANN001, ANN202
        sync()
        t0 = time.perf_counter()
        out = orig(job, trials, setup, on_epoch)
        sync()
        reason = str(out[0].metrics["stack_layout_reason"]).split("; ", 1)[-1]
        chunks.append({"start_s": round(t0 - t_start, 2), "models": len(out),
                       "s_per_model": round((time.perf_counter() - t0) / len(out), 3), "reason": reason})
        print(json.dumps(chunks[-1]), flush=True)
        return out

    fb._train_chunk = chunk
    cfg = load_yaml(args.config)
    cfg["pool"]["models"] = args.models
    with tempfile.TemporaryDirectory() as tmp:
        res = run_experiment(cfg, out=Path(tmp) / "run", device=args.device, store=Path(tmp) / "runs.db", quiet=True)
    c = res.results["cost"]
    out = {"device": c["device"], "torch": torch.__version__, "models": args.models,
           "compile": "foreground" if args.foreground else "background",
           "train_wall_s": c["train_wall_s"], "training_paths": c["training_paths"], "chunks": chunks}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "chunks"}))


if __name__ == "__main__":
    main()
