"""Shared helpers of the benchmark scripts: locate the CIFAR-10 (JPEG) pack, time factory runs,
count FLOPs, and write results (JSON + markdown) under benchmarks/results/."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mlaudit.data import load_dataset
from mlaudit.data.base import DataBundle
from mlaudit.factory import FactoryJob, TrialSpec, run_trials
from mlaudit.models import ModelSpec, build_model
from mlaudit.train.recipe import Recipe

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PACK_CANDIDATES = [os.environ.get("MLAUDIT_CIFAR10_NPZ", ""), str(HERE.parent / ".data" / "cifar10-jpeg.npz"),
                   str(HERE.parent.parent / "shared" / "data" / "cifar10-jpeg.npz")]


def cifar10_jpeg() -> DataBundle:
    """CIFAR-10 (JPEG) from the shared pack; exits with a clear message when it is absent."""
    for c in PACK_CANDIDATES:
        if c and Path(c).is_file():
            return load_dataset({"name": "cifar10", "root": c})
    raise SystemExit("CIFAR-10 (JPEG) pack not found; set MLAUDIT_CIFAR10_NPZ or copy it to .data/cifar10-jpeg.npz")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_factory(model: ModelSpec, recipe: Recipe, data: DataBundle, *, n_models: int, chunk: int,
                  device: str, seed0: int = 0, strategy: str = "auto") -> dict[str, Any]:
    """Train ``n_models`` models ``chunk`` at a time through the factory; wall time and accuracies."""
    trials = tuple(TrialSpec(f"m{i}", seed=seed0 + i) for i in range(n_models))
    job = FactoryJob(model=model, recipe=recipe, data=data, trials=trials, device=device,
                     batched=chunk > 1, max_chunk=chunk, strategy=strategy)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    out = run_trials(job)
    sync()
    wall = time.perf_counter() - t0
    acc = [m.metrics["test_accuracy"] for m in out]
    return {"n_models": n_models, "chunk": chunk, "strategy": strategy, "wall_s": round(wall, 3),
            "s_per_model": round(wall / n_models, 3), "models_per_minute": round(60 * n_models / wall, 3),
            "test_accuracy_mean": round(sum(acc) / len(acc), 5), "test_accuracy_min": round(min(acc), 5),
            "test_accuracy_max": round(max(acc), 5),
            "peak_gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None}


def train_step_flops(model: ModelSpec, data: DataBundle, batch_size: int) -> int:
    """FLOPs of one forward+backward of one model on a batch (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = data.train.x[:batch_size]
    m = build_model(model, input_shape=data.input_shape, num_classes=data.num_classes).to(x.device)
    with FlopCounterMode(display=False) as fc:
        m(x).sum().backward()
    return int(fc.get_total_flops())


def environment() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "data": "CIFAR-10 (JPEG), shared pack (50k train / 10k test)",
    }


def write_results(name: str, payload: dict[str, Any], table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{name}.md").write_text(table)
    print(table)


def time_step(fn: Any, n: int = 20, warmup: int = 3) -> float:
    """Mean seconds per call of ``fn`` on the GPU (after ``warmup`` calls, synchronised)."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n
