"""Factory benchmark: models per minute and accuracy, sequential vs batched, on CIFAR-10 (JPEG).

Part ``fast``: the fast CNN with the ``airbench`` recipe — sequential (K = 1, full 10 epochs for
accuracy, and 2 epochs for throughput) vs batched chunks of K = 8 in the ``loop`` and ``vmap``
layouts (2 epochs), and a narrow fast CNN (width 16, 2 epochs) where vmap batching may pay. Part ``resnet``: ResNet-18 with the ``witches-brew`` recipe for
``--epochs`` epochs — the plain eager PyTorch loop vs mlaudit K = 1 vs K = 8 (loop and vmap); the
80-model seed-002 protocol time is extrapolated from the measured per-epoch cost (stated as such).

    python benchmarks/factory.py --part fast|resnet [--epochs 2]
    python benchmarks/factory.py --part graph
    python benchmarks/factory.py --part procs [--models 6 --settings local:2,process:3:2,...]

Part ``graph``: each training step replayed as a CUDA graph (``recipe.cuda_graph``) against the eager
step, for the airbench network (the LiRA pool's model, K = 1 and K = 4), the fast CNN and ResNet-18.

Part ``procs``: the same models trained by the local executor and by several process workers that
share one device (docs/factory.md: three workers trained ResNet-18 victims 2.18x faster on an H100).

Writes benchmarks/results/factory_<part>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    cifar10_jpeg,
    cifar10_pack,
    environment,
    timed_factory,
    train_step_flops,
    write_results,
)
from _plain_loop import plain_train  # noqa: E402

from mlaudit.data import DatasetSpec  # noqa: E402
from mlaudit.factory import FactoryJob, TrialSpec, train_many  # noqa: E402
from mlaudit.models import ModelSpec  # noqa: E402
from mlaudit.train.recipe import resolve_recipe  # noqa: E402

PEAK_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 datasheet figure


def row(label: str, r: dict) -> str:
    return (f"| {label} | {r['chunk']} | {r['strategy']} | {r['n_models']} | {r['wall_s']} | {r['models_per_minute']} | "
            f"{r['test_accuracy_mean']:.4f} | {r.get('s_per_model_epoch', '')} | {r.get('tflops', '')} | {r['peak_gpu_mem_mb']} |\n")


def part_fast(data) -> tuple[dict, str]:  # noqa: ANN001
    rec = resolve_recipe("airbench")
    spec = ModelSpec(name="fastcnn")
    flops = train_step_flops(spec, data, rec.batch_size)
    steps = rec.epochs * -(-len(data.train) // rec.batch_size)
    timed_factory(spec, resolve_recipe({"name": "airbench", "epochs": 1}), data, n_models=1, chunk=1, device="cuda")
    runs = {}
    short = resolve_recipe({"name": "airbench", "epochs": 2})  # throughput runs: 2 epochs
    for label, n, k, strat, r_ in (("sequential-10ep", 2, 1, "auto", rec), ("sequential-2ep", 2, 1, "auto", short),
                                   ("batched-2ep", 8, 8, "loop", short), ("batched-2ep", 8, 8, "vmap", short)):
        r = timed_factory(spec, r_, data, n_models=n, chunk=k, device="cuda", strategy=strat)
        r["tflops"] = round(flops * (steps * r_.epochs // rec.epochs) * n / r["wall_s"] / 1e12, 1)
        r["s_per_model_epoch"] = round(r["wall_s"] / n / r_.epochs, 3)
        runs[f"{label}-K{k}-{strat}-n{n}"] = r
        print(label, r, flush=True)
    small = ModelSpec(name="fastcnn", width=16)
    srec = resolve_recipe({"name": "airbench", "epochs": 2})
    for label, n, k, strat in (("small-sequential", 4, 1, "auto"), ("small-batched", 32, 32, "vmap")):
        r = timed_factory(small, srec, data, n_models=n, chunk=k, device="cuda", strategy=strat)
        r["s_per_model_epoch"] = round(r["wall_s"] / n / srec.epochs, 3)
        runs[f"{label}-K{k}-{strat}-n{n}"] = r
        print(label, r, flush=True)
    md = ("| run | K | layout | models | wall s | models/min | mean test acc | s/model-epoch | TFLOP/s | peak MiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|\n" + "".join(row(k, v) for k, v in runs.items()))
    return {"recipe": rec.model_dump(mode="json"), "train_step_gflop": flops / 1e9, "runs": runs}, md


def part_resnet(data, epochs: int) -> tuple[dict, str]:  # noqa: ANN001
    rec = resolve_recipe({"name": "witches-brew", "epochs": epochs})
    spec = ModelSpec(name="resnet18")
    flops = train_step_flops(spec, data, rec.batch_size)
    steps = epochs * -(-len(data.train) // rec.batch_size)
    plain_train(data, model="resnet18", epochs=1, batch_size=128, lr=0.1)  # warm-up
    plain = plain_train(data, model="resnet18", epochs=epochs, batch_size=128, lr=0.1)
    print("plain", plain, flush=True)
    runs = {}
    for label, n, k, strat in (("sequential", 1, 1, "auto"), ("batched", 8, 8, "loop"), ("batched", 8, 8, "vmap")):
        r = timed_factory(spec, rec, data, n_models=n, chunk=k, device="cuda", strategy=strat)
        r["tflops"] = round(flops * steps * n / r["wall_s"] / 1e12, 1)
        r["s_per_model_epoch"] = round(r["wall_s"] / n / epochs, 3)
        runs[f"{label}-K{k}-{strat}"] = r
        print(label, r, flush=True)
    best = min(runs.values(), key=lambda r: r["s_per_model_epoch"])
    proto = {"models": 80, "epochs": 40,
             "plain_loop_s": round(80 * 40 * plain["s_per_epoch"], 0),
             "mlaudit_best_s": round(80 * 40 * best["s_per_model_epoch"], 0),
             "speedup": round(plain["s_per_epoch"] / best["s_per_model_epoch"], 2),
             "note": f"extrapolated from {epochs}-epoch runs (includes eval of each model once)"}
    md = (f"Plain eager PyTorch loop: {plain['s_per_epoch']} s/epoch.\n\n"
          "| run | K | layout | models | wall s | models/min | mean test acc | s/model-epoch | TFLOP/s | peak MiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|\n" + "".join(row(k, v) for k, v in runs.items()) +
          f"\nSeed-002 protocol (80 ResNet-18 x 40 epochs), {proto['note']}: plain loop {proto['plain_loop_s']} s, "
          f"mlaudit best layout {proto['mlaudit_best_s']} s, speedup {proto['speedup']}x "
          f"(goal: 8x). Peak dense bf16 of an H100 SXM: {PEAK_BF16_TFLOPS} TFLOP/s.\n")
    return {"recipe": rec.model_dump(mode="json"), "train_step_gflop": flops / 1e9, "plain_loop": plain,
            "runs": runs, "protocol_80x40": proto}, md


def part_procs(args: argparse.Namespace) -> tuple[dict, str]:
    """Several process workers sharing one device vs the local executor: the same ``--models`` trials
    (ids and seeds), each setting a fresh job whose workers reload the data from its spec. Wall time
    includes spawning the workers and their data loading, as a user would pay it."""
    spec = DatasetSpec(name="cifar10", root=cifar10_pack()) if args.dataset == "cifar10" else DatasetSpec(name=args.dataset)
    rec = resolve_recipe({"name": args.recipe, "epochs": args.epochs})
    trials = tuple(TrialSpec(f"m{i}", seed=i) for i in range(args.models))
    runs = {}
    for setting in args.settings.split(","):  # "local" or "process:<workers>", each with ":<max_chunk>" optional
        name, *rest = setting.split(":")
        workers = int(rest[0]) if name == "process" and rest else None
        chunk = int(rest[-1]) if (name == "local" and rest) or len(rest) == 2 else 1
        job = FactoryJob(model=ModelSpec(name=args.model), recipe=rec, data=None, data_spec=spec, trials=trials,
                         device=args.device, max_chunk=chunk, batched=chunk > 1)
        t0 = time.perf_counter()
        out = train_many(job, executor=name, **({"workers": workers} if workers else {}))
        wall = time.perf_counter() - t0
        acc = [m.metrics["test_accuracy"] for m in out]
        runs[setting] = {"executor": name, "workers": workers, "max_chunk": chunk, "models": args.models,
                         "wall_s": round(wall, 2), "s_per_model_epoch": round(wall / args.models / args.epochs, 3),
                         "models_per_minute": round(60 * args.models / wall, 3),
                         "test_accuracy_mean": round(sum(acc) / len(acc), 5)}
        print(setting, runs[setting], flush=True)
    base = runs[args.settings.split(",")[0]]["wall_s"]
    md = (f"{args.models} x {args.model}, `{args.recipe}` recipe for {args.epochs} epochs, {args.dataset}, device "
          f"{args.device}; speed-up against the first row.\n\n"
          "| setting | executor | workers | max_chunk | wall s | s/model-epoch | models/min | mean test acc | speed-up |\n"
          "|---|---|---|---|---|---|---|---|---|\n"
          + "".join(f"| {k} | {r['executor']} | {r['workers'] or ''} | {r['max_chunk']} | {r['wall_s']} | "
                    f"{r['s_per_model_epoch']} | {r['models_per_minute']} | {r['test_accuracy_mean']:.4f} | "
                    f"{base / r['wall_s']:.2f}x |\n" for k, r in runs.items()))
    return {"recipe": rec.model_dump(mode="json"), "dataset": args.dataset, "runs": runs}, md


GRAPH_SETTINGS = (  # (label, model, recipe, epochs, models, chunk, layout)
    ("airbench net, airbench-muon, K=1", "airbench", "airbench-muon", None, 4, 1, "auto"),
    ("airbench net, airbench-muon, K=4 loop", "airbench", "airbench-muon", None, 4, 4, "loop"),
    ("fastcnn, airbench, K=1", "fastcnn", "airbench", None, 3, 1, "auto"),
    ("resnet18, witches-brew 2 epochs, K=1", "resnet18", "witches-brew", 2, 1, 1, "auto"),
    ("resnet18, witches-brew 2 epochs, K=4 loop", "resnet18", "witches-brew", 2, 4, 4, "loop"),
    ("resnet18, witches-brew 2 epochs, K=8 loop", "resnet18", "witches-brew", 2, 8, 8, "loop"),
)


def part_graph(data, only: str = "", graph_only: bool = False, compile_: bool = False  # noqa: ANN001
               ) -> tuple[dict, str]:
    """Each setting trained with ``recipe.cuda_graph`` off and on (the same trials: seeds 0..n-1), after one
    warm-up model of each (cuDNN autotuning, the first capture, inductor's compile); s/model and accuracy side by
    side. With a ResNet-18 setting, the plain eager loop (benchmarks/_plain_loop.py) for the same epochs as
    reference. ``only``: settings whose label contains one of its |-separated parts; ``graph_only``: skip the
    eager factory runs;
    ``compile_``: graph on, with ``recipe.compile`` off and on (the graph captures the compiled step)."""
    runs = {}
    settings = [s for s in GRAPH_SETTINGS if any(o in s[0] for o in only.split("|"))]
    plain = None
    if any(s[1] == "resnet18" for s in settings):
        plain_train(data, model="resnet18", epochs=1, batch_size=128, lr=0.1)  # warm-up
        plain = plain_train(data, model="resnet18", epochs=2, batch_size=128, lr=0.1)
        print("plain", plain, flush=True)
    for label, model, recipe, epochs, n, k, strat in settings:
        spec = ModelSpec(name=model)
        over = {"name": recipe, **({"epochs": epochs} if epochs else {})}
        variants = ([(True, False), (True, True)] if compile_ else
                    [(g, False) for g in ((True,) if graph_only else (False, True))])
        for graph, comp in variants:
            rec = resolve_recipe({**over, "cuda_graph": graph, "compile": comp})
            timed_factory(spec, rec.model_copy(update={"epochs": 1}), data, n_models=k, chunk=k, device="cuda",
                          strategy=strat)  # warm-up, not timed
            r = timed_factory(spec, rec, data, n_models=n, chunk=k, device="cuda", strategy=strat)
            r.update(cuda_graph=graph, compile=comp, model=model, recipe=recipe, epochs=rec.epochs)
            runs[f"{label}, graph {'on' if graph else 'off'}{', compile' if comp else ''}"] = r
            print(label, graph, comp, r, flush=True)
    md = ("| setting | CUDA graph | compile | step path | models | epochs | wall s | s/model | mean test acc (min-max) "
          "| peak MiB |\n|---|---|---|---|---|---|---|---|---|---|\n"
          + "".join(f"| {k.rsplit(', graph', 1)[0]} | {'on' if r['cuda_graph'] else 'off'} | "
                    f"{'on' if r['compile'] else 'off'} | {', '.join(r['step_paths'])} | {r['n_models']} | "
                    f"{r['epochs']} | {r['wall_s']} | {r['s_per_model']} | {r['test_accuracy_mean']:.4f} "
                    f"({r['test_accuracy_min']:.4f}-{r['test_accuracy_max']:.4f}) | {r['peak_gpu_mem_mb']} |\n"
                    for k, r in runs.items()))
    if plain is not None:
        md += (f"\nPlain eager PyTorch loop, ResNet-18, batch 128, 2 epochs: {plain['s_per_epoch']} s/epoch "
               f"(the factory rows include evaluating each model on the 10k test set).\n")
    return {"settings": [list(s) for s in settings], "runs": runs, "plain_loop": plain}, md


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("fast", "resnet", "procs", "graph"), required=True)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--models", type=int, default=6, help="procs: models per setting")
    ap.add_argument("--model", default="resnet18", help="procs: architecture")
    ap.add_argument("--recipe", default="witches-brew", help="procs: training recipe")
    ap.add_argument("--dataset", default="cifar10", help="procs: cifar10 (the JPEG pack) or a built-in source")
    ap.add_argument("--device", default="cuda", help="procs: device of every worker")
    ap.add_argument("--settings", default="local:2,process:2:1,process:3:2,process:3:1,process:6:1",
                    help="procs: comma-separated local[:max_chunk] or process:<workers>[:max_chunk]")
    ap.add_argument("--name", default="", help="results file suffix")
    ap.add_argument("--only", default="", help="graph: settings whose label contains one of these (separated by |)")
    ap.add_argument("--graph-only", action="store_true", help="graph: skip the eager factory runs")
    ap.add_argument("--compile", action="store_true",
                    help="graph: graph on with recipe.compile off and on, instead of graph off and on")
    args = ap.parse_args()
    if args.part == "procs":
        payload, md = part_procs(args)
        env = environment()
        head = (f"# Factory benchmark (process workers sharing one device)\n\n{env['date']}, "
                f"{env['gpu'] if args.device != 'cpu' else 'cpu'}, torch {env['torch']}. ")
        write_results(f"factory_procs{'_' + args.name if args.name else ''}", {"environment": env, **payload}, head + md)
        return
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    if args.compile:  # one compiled call serves both architectures and every batch shape: keep all their graphs
        import torch._dynamo.config as dynamo_config

        dynamo_config.cache_size_limit = 64
    data = cifar10_jpeg().to("cuda")
    payload, md = (part_fast(data) if args.part == "fast" else part_graph(data, args.only, args.graph_only, args.compile)
                   if args.part == "graph" else part_resnet(data, args.epochs))
    env = environment()
    head = (f"# Factory benchmark ({args.part}) on CIFAR-10 (JPEG)\n\n{env['date']}, {env['gpu']}, torch {env['torch']}, "
            "bf16 autocast, data on the GPU; wall time includes evaluating each model on the 10k test set.\n\n")
    write_results(f"factory_{args.part}{'_' + args.name if args.name else ''}", {"environment": env, **payload}, head + md)


if __name__ == "__main__":
    main()
