"""Foundation benchmark: single-model training speed and accuracy on CIFAR-10 (JPEG).

* ``resnet18`` with the ``witches-brew`` recipe (seed 002, section 1.7.3): seconds per epoch and
  final test accuracy.
* ``fastcnn`` with the ``airbench`` recipe: seconds per model and test accuracy (mean over seeds).

Both run through mlaudit's training loop with K = 1 (the sequential path), data resident on the
GPU, bf16 autocast, channels_last. Usage (on a CUDA machine)::

    python benchmarks/train_cifar10.py [--resnet-epochs 40] [--fast-seeds 3] [--sweep]

Writes benchmarks/results/train_cifar10.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cifar10_jpeg, environment, sync, timed_factory, train_step_flops, write_results  # noqa: E402

from mlaudit.factory import FactoryJob, TrialSpec, run_trials  # noqa: E402
from mlaudit.models import ModelSpec  # noqa: E402
from mlaudit.train.recipe import resolve_recipe  # noqa: E402


def resnet_run(data, epochs: int, *, cuda_graph: str = "auto", seed: int = 0) -> dict:  # noqa: ANN001
    recipe = resolve_recipe({"name": "witches-brew", "epochs": epochs, "cuda_graph": cuda_graph})
    flops = train_step_flops(ModelSpec(name="resnet18"), data, recipe.batch_size)
    marks: list[float] = []

    def on_epoch(e: int, k: int) -> None:
        sync()
        marks.append(time.perf_counter())

    job = FactoryJob(model=ModelSpec(name="resnet18"), recipe=recipe, data=data,
                     trials=(TrialSpec("r0", seed=seed),), device="cuda", batched=False)
    sync()
    t0 = time.perf_counter()
    out = run_trials(job, on_epoch=on_epoch)
    sync()
    wall = time.perf_counter() - t0
    per_epoch = [b - a for a, b in zip([t0] + marks[:-1], marks)]
    steady = sorted(per_epoch[1:])[len(per_epoch[1:]) // 2] if len(per_epoch) > 1 else per_epoch[0]
    steps = out[0].steps
    return {"model": "resnet18", "recipe": recipe.model_dump(mode="json"), "epochs": epochs, "seed": seed,
            "cuda_graph": cuda_graph, "wall_s": round(wall, 2),
            "first_epoch_s": round(per_epoch[0], 3), "median_epoch_s": round(steady, 3),
            "test_accuracy": out[0].metrics["test_accuracy"], "steps": steps,
            "step_path": out[0].metrics.get("step_path"),
            "train_step_gflop": round(flops / 1e9, 2),
            "achieved_tflops": round(flops * steps / sum(per_epoch) / 1e12, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resnet-epochs", type=int, default=40)
    ap.add_argument("--fast-seeds", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="also sweep lr/epochs of the airbench recipe")
    ap.add_argument("--resnet-graph", default="auto",
                    help="recipe.cuda_graph settings to train ResNet-18 with, comma-separated (e.g. auto,false: the same "
                         "seed with and without CUDA graphs)")
    ap.add_argument("--resnet-seeds", default="0", help="ResNet-18 trial seeds, comma-separated")
    ap.add_argument("--name", default="train_cifar10", help="results file name")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    t = time.perf_counter()
    data = cifar10_jpeg().to("cuda")
    load_s = time.perf_counter() - t
    payload = {"environment": environment(), "data_load_s": round(load_s, 2), "runs": {}}
    sweep = []
    if args.sweep:
        for lr in (0.1, 0.2, 0.4):
            for epochs in (10, 16):
                r = resolve_recipe({"name": "airbench", "lr": lr, "epochs": epochs})
                res = timed_factory(ModelSpec(name="fastcnn"), r, data, n_models=1, chunk=1, device="cuda")
                sweep.append({"lr": lr, "epochs": epochs, **res})
                print("sweep", sweep[-1], flush=True)
        payload["airbench_sweep"] = sweep
    fast = resolve_recipe("airbench")
    fres = None
    if args.fast_seeds > 0:
        timed_factory(ModelSpec(name="fastcnn"), resolve_recipe({"name": "airbench", "epochs": 1}), data,
                      n_models=1, chunk=1, device="cuda")  # warm-up (cuDNN autotuning), not recorded
        fres = timed_factory(ModelSpec(name="fastcnn"), fast, data, n_models=args.fast_seeds, chunk=1, device="cuda",
                             seed0=100)
        payload["runs"]["fastcnn_airbench"] = {"recipe": fast.model_dump(mode="json"), **fres}
        print("fastcnn", fres, flush=True)
    rruns = []
    for seed in (int(v) for v in args.resnet_seeds.split(",")):
        for graph in args.resnet_graph.split(","):
            rres = resnet_run(data, args.resnet_epochs, cuda_graph=graph, seed=seed)
            payload["runs"][f"resnet18_witches_brew_seed{seed}_graph_{graph}"] = rres
            rruns.append(rres)
            print("resnet18", rres, flush=True)
    env = payload["environment"]
    table = (
        f"# Single-model training on CIFAR-10 (JPEG)\n\n{env['date']}, {env['gpu']}, torch {env['torch']}, "
        f"bf16 autocast + channels_last, data on the GPU, mlaudit loop with K = 1.\n\n"
        "| model | recipe | epochs | seed | cuda_graph (step path) | s/epoch (median) | s/model | test accuracy |\n"
        "|---|---|---|---|---|---|---|---|\n"
        + "".join(f"| resnet18 | witches-brew | {r['epochs']} | {r['seed']} | {r['cuda_graph']} ({r['step_path']}) | "
                  f"{r['median_epoch_s']} | {r['wall_s']} | {r['test_accuracy']:.4f} |\n" for r in rruns)
        + (f"| fastcnn | airbench | {fast.epochs} | 100.. | auto | {fres['s_per_model'] / fast.epochs:.3f} | "
           f"{fres['s_per_model']} | {fres['test_accuracy_mean']:.4f} (mean of {args.fast_seeds}; min "
           f"{fres['test_accuracy_min']:.4f}) |\n" if fres else "")
        + f"\nResNet-18: {rruns[0]['train_step_gflop']} GFLOP per training step (batch 128); achieved TFLOP/s over "
        "training: " + ", ".join(f"{r['achieved_tflops']} (seed {r['seed']}, cuda_graph {r['cuda_graph']})" for r in rruns)
        + ".\n"
    )
    if sweep:
        table += "\nairbench recipe sweep (fastcnn, 1 seed):\n\n| lr | epochs | s/model | test accuracy |\n|---|---|---|---|\n"
        table += "".join(f"| {s['lr']} | {s['epochs']} | {s['s_per_model']} | {s['test_accuracy_mean']:.4f} |\n" for s in sweep)
    write_results(args.name, payload, table)


if __name__ == "__main__":
    main()
