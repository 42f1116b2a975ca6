"""Shared helpers of the benchmark scripts: locate the CIFAR-10 (JPEG) pack, time factory runs,
count FLOPs, and write results (JSON + markdown) under benchmarks/results/."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
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


PACK_XZ = HERE.parent / ".data_xz" / "cifar10-jpeg.npz.xz"
"""The pack xz-compressed (55.8 MB -> 18.2 MB: the small JPEGs repeat their header tables), so that it fits a
device upload of 64 MiB beside the repository: ``xz -T2 -6 -c .data/cifar10-jpeg.npz > .data_xz/cifar10-jpeg.npz.xz``."""


def cifar10_pack() -> str:
    """Path of the CIFAR-10 (JPEG) pack; when only :data:`PACK_XZ` is there, it is unpacked to
    .data/cifar10-jpeg.npz first (the path the benchmark configs name). Exits with a clear message when absent."""
    for c in PACK_CANDIDATES:
        if c and Path(c).is_file():
            return str(c)
    if PACK_XZ.is_file():
        return str(unpack_xz(PACK_XZ, HERE.parent / ".data" / "cifar10-jpeg.npz"))
    raise SystemExit("CIFAR-10 (JPEG) pack not found; set MLAUDIT_CIFAR10_NPZ or copy it to .data/cifar10-jpeg.npz "
                     f"(or its xz-compressed copy to {PACK_XZ.relative_to(HERE.parent)})")


def unpack_xz(src: Path, dst: Path) -> Path:
    """Decompress ``src`` (xz) to ``dst`` through a temporary file beside it, so an interrupted unpack leaves no
    truncated pack behind."""
    import lzma
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    with lzma.open(src) as f, open(tmp, "wb") as out:
        shutil.copyfileobj(f, out, length=1 << 20)
    tmp.replace(dst)
    return dst


def cifar10_jpeg() -> DataBundle:
    """CIFAR-10 (JPEG) from the shared pack; exits with a clear message when it is absent."""
    return load_dataset({"name": "cifar10", "root": cifar10_pack()})


@contextlib.contextmanager
def workdir(path: str | None) -> Iterator[Path]:
    """The folder a benchmark's runs live in: a temporary one (deleted after), or ``path`` kept between
    invocations so that a benchmark cut short by a time limit resumes from its run store when run again
    (``run_experiment(..., resume=True)`` reuses every finished job, poison and kept output)."""
    if path is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
    else:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        yield p


def _invocation_log(out: Path) -> Path:
    return out.parent / f"{out.name}.invocations.json"


def add_executor_args(ap: Any) -> None:
    """``--executor`` / ``--workers`` for benchmarks that run experiments (see :func:`executor_kwargs`)."""
    ap.add_argument("--executor", default="local", help="factory executor for the experiment runs (local, process, ray)")
    ap.add_argument("--workers", type=int, default=0, help="workers of the process executor; several on one GPU "
                    "train chunks concurrently (3 gave 2.18x for ResNet-18 victims on an H100, docs/factory.md)")


def executor_kwargs(args: Any) -> dict[str, Any]:
    """The :func:`resume_run` keywords for the ``--executor`` / ``--workers`` arguments."""
    return {"executor": args.executor, "executor_options": {"workers": args.workers} if args.workers else None}


def resume_run(config: Any, out: Path, device: str, store: Path, *, executor: str = "local",
               executor_options: dict[str, Any] | None = None) -> Any:
    """``run_experiment`` into ``out`` (through ``executor``), resuming it when an earlier invocation
    left it there.

    Each invocation is logged in ``<out>.invocations.json``; a background thread rewrites its elapsed
    wall time every few seconds, so an invocation killed by a time limit still counts (to within that
    interval) in :func:`cumulative_cost`."""
    import threading

    from mlaudit.experiments import run_experiment

    log = _invocation_log(out)
    entries = json.loads(log.read_text()) if log.exists() else []
    entry: dict[str, Any] = {"finished": False, "process_wall_s": 0.0}
    entries.append(entry)
    t0 = time.perf_counter()
    done = threading.Event()

    def write() -> None:
        entry["process_wall_s"] = round(time.perf_counter() - t0, 2)
        log.write_text(json.dumps(entries, indent=1))

    def heartbeat() -> None:
        while not done.wait(5.0):
            write()

    write()
    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        res = run_experiment(config, out=out, device=device, store=store, quiet=True, resume=out.exists(),
                             executor=executor, executor_options=executor_options)
    finally:
        done.set()
        beat.join()  # its last write must not land after (and undo) the final one below
    entry.update(finished=True, cost=res.results["cost"])
    write()
    return res


def cumulative_cost(out: Path) -> dict[str, Any]:
    """The cost of the run in ``out`` over all its invocations (see :func:`resume_run`): process wall
    time summed (cut-short invocations to within 5 s), and the models trained (those of the last
    invocation plus those it resumed from the store, i.e. trained by earlier ones)."""
    log = _invocation_log(out)
    entries = json.loads(log.read_text()) if log.exists() else []
    last = next((e["cost"] for e in reversed(entries) if e.get("finished")), None)
    return {"invocations": len(entries), "cut_short": sum(not e.get("finished") for e in entries),
            "models_trained": (last["models_trained"] + last["models_resumed"]) if last else 0,
            "process_wall_s": round(sum(e["process_wall_s"] for e in entries), 2)}


_LOGGING: list[Any] = []


def run_each(configs: dict[str, Any], *, workdir_path: str | None, device: str) -> Iterator[tuple[str, Any, float]]:
    """Run each named experiment config into ``<workdir>/<name>`` through :func:`resume_run` (one run store
    for all; a rerun with the same ``workdir_path`` resumes them): yields (name, results dict, seconds).
    mlaudit's INFO log goes to stderr (the runs are quiet otherwise), so a log of a long run cut by a time
    limit shows how far it got."""
    if not _LOGGING:
        import logging

        from mlaudit.cli_views import console_logging

        handler = console_logging(1)
        if handler is not None:  # timestamps: where the time of a long run went
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        _LOGGING.append(handler)
    with workdir(workdir_path) as wd:
        for name, config in configs.items():
            t0 = time.perf_counter()
            res = resume_run(config, wd / name, device, wd / "runs.db").results
            yield name, res, time.perf_counter() - t0


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else the platform's machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pct(m: dict[str, Any]) -> str:
    """``mean% ± se`` with one decimal (no ± for one value: the results store a single value's SE as nan)."""
    se = m.get("se")
    ok = isinstance(se, (int, float)) and se == se
    return f"{100 * m['mean']:.1f}%" + (f" ± {100 * se:.1f}" if ok else "")


def pct_se(d: dict[str, Any], unit: str = "") -> str:
    """``mean ± se`` of a MeanSE dict as percentages; its ``se`` is the string "nan" in results JSON
    when it rests on one value."""
    se = d["se"] if isinstance(d["se"], (int, float)) else float("nan")
    return f"{100 * d['mean']:.2f}{unit} ± {100 * se:.2f}{unit}"


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
            "step_paths": sorted({str(m.metrics.get("step_path")) for m in out}),
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
        "data": _pack_description(),
    }


def _pack_description() -> str:
    """The CIFAR-10 (JPEG) pack a run reads, with its split sizes read from the file (a pack cut to fit an upload
    says so by its sizes)."""
    for c in PACK_CANDIDATES:
        if c and Path(c).is_file():
            import numpy as np

            with np.load(c, allow_pickle=False) as z:
                n_train, n_test = len(z["train_labels"]), len(z["test_labels"])
            return f"CIFAR-10 (JPEG), pack {Path(c).name} ({n_train} train / {n_test} test)"
    return "CIFAR-10 (JPEG), shared pack"


def cpu_environment(threads: int, *, data: str | None = None) -> dict[str, Any]:
    """:func:`environment` of a CPU run: the machine, its cores and the torch threads used, and ``data`` in place
    of the CIFAR-10 pack's description when the run used other data."""
    env = environment() | {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "threads": threads}
    return env if data is None else env | {"data": data}


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


def median_time(fn: Any, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``reps`` separately synchronised calls of ``fn`` after ``warmup`` calls (per call,
    unlike :func:`time_step`'s mean over a back-to-back run)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


VICTIM_SETTINGS = ("scratch", "fine-tuned", "transfer")
"""The victim settings of the poisoning benchmarks' ``--settings``: trained from scratch, fine-tuned from a
pretrained model (``model.init``, every parameter trains), transfer (only a re-initialised classifier
retrained over the pretrained model's frozen features: ``train: head``, ``reset_head``)."""


def pretrained_model(config: dict[str, Any], out: Path, *, device: str, seed: int = 0xF00D) -> tuple[Path, str]:
    """The config's model trained by mlaudit (``mlaudit.train.train``, the factory's loop) on the clean training
    split of its dataset with its recipe, saved as a state_dict under ``out`` (reused when already there):
    the pretrained model of the fine-tuned and transfer victims. Returns (path, sha256)."""
    from mlaudit.experiments import parse_config
    from mlaudit.train import train
    from mlaudit.train.checkpoint import save_checkpoint, sha256_file

    cfg = parse_config(config)
    path = out / f"pretrained_{cfg.model.name}_{cfg.dataset.name}_seed{seed}.pt"
    if not path.is_file():
        data = load_dataset(cfg.dataset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes)
        train(model, data, cfg.recipe, seed=seed, device=device, residual=cfg.model.residual)
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model.state_dict(), path)
    return path, sha256_file(path)


def victim_block(config: dict[str, Any], setting: str, pretrained: tuple[Path, str]) -> dict[str, Any]:
    """The ``victim`` block of ``setting`` (:data:`VICTIM_SETTINGS`) for a poisoning config whose victims are
    its ``model``; the crafting model is then left to its default (the pretrained model itself when the
    victims start from it)."""
    if setting not in VICTIM_SETTINGS:
        raise SystemExit(f"unknown victim setting {setting!r}; valid: {', '.join(VICTIM_SETTINGS)}")
    if setting == "scratch":
        return {}
    model = config["model"] if isinstance(config["model"], dict) else {"name": config["model"]}
    extra = {"train": "head", "reset_head": True} if setting == "transfer" else {"train": "all"}
    return {"model": {**model, "init": str(pretrained[0]), "init_sha256": pretrained[1], **extra}}


def import_torchvision_models_only() -> None:
    """Import torchvision where only its model code is needed (lpips, open_clip). A CUDA build of torchvision
    (PyPI's) on a CPU torch cannot register its C++ operators, and registering their fake kernels fails at
    import; the models use none of them, so that registration is stubbed and the import retried."""
    import sys

    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        torch.library.register_fake = lambda *a, **k: (lambda f: f)  # type: ignore[assignment]
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        import torchvision  # noqa: F401,F811
