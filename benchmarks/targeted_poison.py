"""Targeted-poisoning benchmark (issue 4), three parts:

``--part speed``   crafting time of Witches' Brew (gradient matching, eq. 1.3 of seed 002) for one
                   scenario of the paper's seed series on CIFAR-10 (JPEG): 500 poisons (budget 1%),
                   eps 16, M steps, R restarts, differentiable augmentation (crop 4 + flip), a ResNet-18
                   crafting model, in fp32 and bf16 autocast. Crafting cost does not depend on how well the
                   crafting model is trained, so it is trained for ``--crafter-epochs`` (default 2) here.
``--part success`` a `targeted-poison` config end to end through the runner (crafting model, poisons,
                   victims retrained from scratch by the factory, clean baseline). ``--workdir`` keeps
                   the run so that invoking it again resumes it; ``--set key=value`` changes the config.
``--part settings`` the config once per method (``--methods``) and victim setting (``--settings``: from scratch,
                   fine-tuned from, or transfer over the frozen features of, a model mlaudit pretrains on the
                   clean training split; ``_common.VICTIM_SETTINGS``), one table (feature collision is a
                   transfer-learning attack: Shafahi et al. 2018).
``--part merge``   pools the success results of runs that split one study by ``first_scenario`` (e.g.
                   scenarios 0-1 in one session's device time, 2-3 in the next) into one table.

    python benchmarks/targeted_poison.py --part speed --device cuda --restarts 2 --steps 250
    python benchmarks/targeted_poison.py --part success --config benchmarks/configs/cifar10_fastcnn_brew.yaml
    python benchmarks/targeted_poison.py --part merge --name pooled results/a.json results/b.json
    python benchmarks/targeted_poison.py --part settings --config benchmarks/configs/digits_mlp_targeted.yaml \
        --device cpu --methods poison-frogs,bullseye --name digits_settings

Writes benchmarks/results/targeted_poison_<part>[_name].{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_executor_args,
    cifar10_jpeg,
    cumulative_cost,
    environment,
    executor_kwargs,
    pct_se,
    pretrained_model,
    resume_run,
    sync,
    victim_block,
    workdir,
    write_results,
)

from mlaudit.attacks.poisoning import POISONERS, PoisonTask, Target  # noqa: E402
from mlaudit.attacks.poisoning.targeted.scenario import sample_scenario, scenario_seeds  # noqa: E402
from mlaudit.config import apply_overrides, load_yaml  # noqa: E402
from mlaudit.data.augment import AugmentSpec  # noqa: E402
from mlaudit.models import build_model  # noqa: E402
from mlaudit.train import train  # noqa: E402


def speed(args: argparse.Namespace) -> None:
    data = cifar10_jpeg()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes)
    t0 = time.perf_counter()
    train(model, data, {"name": "witches-brew", "epochs": args.crafter_epochs}, seed=0, device=dev, residual=True,
          dataset_name="cifar10")
    crafter_s = time.perf_counter() - t0
    model = model.to(dev).eval()
    sc = sample_scenario(0, scenario_seeds(2000000000, 1)[0], train_y=data.train.y, test_y=data.test.y,
                         num_classes=10, budget=0.01)
    task = PoisonTask(train=data.train, num_classes=10, eps=16 / 255, poison_ids=torch.tensor(sc.poison_ids),
                      target=Target(data.test.x[list(sc.target_ids)].to(dev), sc.target_class, sc.adv_class),
                      models=[model], augment=AugmentSpec(crop_pad=4, flip=True), seed=0, device=dev)
    gm = POISONERS.get("gradient-matching", family="targeted")
    rows = []
    variants = [(p, lay) for p in args.precisions.split(",") for lay in args.layouts.split(",")]
    for precision, layout in variants:
        fast = layout == "tuned"  # channels-last models/poisons and timed cuDNN algorithms (CraftingSettings)
        settings = {"steps": args.steps, "restarts": args.restarts, "lr": 0.1, "augment": True, "precision": precision,
                    "parallel_restarts": args.parallel_restarts, "channels_last": fast, "cudnn_benchmark": fast}
        # untimed warm-up of this variant (cuDNN's algorithm timing for the double-backward shapes, lazy
        # kernel loads), so neither the first variant nor the tuned one pays one-time costs in its time
        gm(dataclasses.replace(task, settings={**settings, "steps": 3, "restarts": 1}))
        sync()
        t0 = time.perf_counter()
        res = gm(dataclasses.replace(task, settings=settings))
        sync()
        wall = time.perf_counter() - t0
        per_restart = wall / args.restarts
        rows.append({"precision": precision, "layout": layout, "parallel_restarts": args.parallel_restarts, "restarts": args.restarts, "steps": args.steps, "wall_s": round(wall, 2),
                     "s_per_restart": round(per_restart, 2), "r8_extrapolated_s": round(8 * per_restart, 1),
                     "best_objective": res.info["objective"], "restart_objectives": res.info["restarts"],
                     "peak_gpu_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev.type == "cuda"
                     else None})
        print(rows[-1], flush=True)
    env = environment()
    md = (f"# Witches' Brew crafting time\n\n{env['date']}, {env['gpu'] or 'cpu'}, torch {env['torch']}; CIFAR-10 (JPEG); "
          f"crafting model {args.model} (witches-brew recipe, {args.crafter_epochs} epochs, {crafter_s:.1f} s); scenario "
          f"seed 2000000000 (target class {sc.target_class}, adversarial class {sc.adv_class}, target id "
          f"{sc.target_ids[0]}); {len(sc.poison_ids)} poisons, eps 16/255, signed Adam lr 0.1 (step schedule), "
          "differentiable crop 4 + flip.\n\n"
          "| precision | layout | parallel restarts | restarts | steps | wall s | s / restart | R = 8 (x8 of measured) | "
          "best objective |\n|---|---|---|---|---|---|---|---|---|\n" +
          "".join(f"| {r['precision']} | {r['layout']} | {r['parallel_restarts']} | {r['restarts']} | {r['steps']} | {r['wall_s']} | "
                  f"{r['s_per_restart']} | "
                  f"{r['r8_extrapolated_s']} | {r['best_objective']:.4f} |\n" for r in rows) +
          "\nReference (issue 4, same H100): ART 1.20.1 GradientMatchingAttack, no augmentation, no ensembles: "
          "79 s per restart, 631 s for R = 8.\n")
    write_results(f"targeted_poison_speed{'_' + args.name if args.name else ''}",
                  {"environment": env, "args": vars(args), "crafter_train_s": crafter_s, "scenario": sc.to_dict(),
                   "rows": rows}, md)


def scenario_table(scenarios: list[dict]) -> str:
    """The per-scenario markdown table of a success result (its ``metrics.scenarios``)."""
    return ("| scenario | seed | target class | adversarial class | target id | success | clean victims | crafting s |\n"
            "|---|---|---|---|---|---|---|---|\n"
            + "".join(f"| {s['index']} | {s['seed']} | {s['target_class_name']} | {s['poison_class_name']} | "
                      f"{s['target_ids'][0]} | {100 * s['success']:.1f}% | {_pct(s['clean_baseline_success'])} | "
                      f"{s['crafting_s']:.1f} |\n" for s in scenarios))


def _pct(x: float | None) -> str:
    return "not run" if x is None else f"{100 * x:.1f}%"


def setup(cfg: dict) -> str:
    """Crafting model and victims of a resolved targeted-poison config, in words."""
    def named(x: object) -> str:
        return x if isinstance(x, str) else x["name"]  # type: ignore[index]

    recipe = cfg["victim"]["recipe"] or cfg["recipe"]
    crafting = cfg["crafting"]
    crafter = ("checkpoint" if crafting.get("checkpoint") else
               f"{named(crafting.get('model') or cfg['model'])} trained from scratch")
    return (f"crafting model {crafter}; victims {named(cfg['victim']['model'] or cfg['model'])} "
            f"({named(recipe)} recipe, {recipe['epochs']} epochs, {cfg['victims']} per scenario)")


def success(args: argparse.Namespace) -> None:
    cfg = load_yaml(args.config)
    if args.method:  # a baseline on the same scenarios, seeds and victims (Table 1.2 of seed 002)
        cfg["attack"] = {**cfg["attack"], "method": args.method}
        cfg["name"] = f"{cfg.get('name', 'brew')}-{args.method}"
    if args.set_restarts:
        cfg["attack"] = {**cfg["attack"], "restarts": args.set_restarts}
    cfg = apply_overrides(cfg, args.overrides)
    name = args.name or (Path(args.config).stem + (f"_{args.method}" if args.method else ""))
    with workdir(args.workdir) as tmp:
        t0 = time.perf_counter()
        res = resume_run(cfg, tmp / name, args.device, tmp / "runs.db", **executor_kwargs(args))
        wall = time.perf_counter() - t0
        total = cumulative_cost(tmp / name)
    r = res.results
    m = r["metrics"]
    env = environment()

    c = r["cost"]
    md = (f"# Targeted poisoning: {r['name']}\n\n{env['date']}, {c['device']}, torch {env['torch']}; config "
          f"`{args.config}`; method {m['attack']['method']}, eps {m['attack']['eps']}, {m['attack']['poisons']} poisons, "
          f"R = {m['attack']['restarts']}, M = {m['attack']['steps']}; {setup(r['config'])}; factory executor "
          f"{r['executor']}{f' ({args.workers} workers)' if args.workers else ''}, max_chunk {r['config']['factory']['max_chunk']}.\n\n"
          f"**Average poison success {pct_se(m['poison_success'], '%')}** over {m['poison_success']['n']} scenarios "
          + (f"(clean victims: {pct_se(m['clean_baseline_success'], '%')}); " if "clean_baseline_success" in m
             else "(no clean victims: baseline false); ")
          + f"victim clean accuracy {pct_se(m['victim_accuracy'], '%')}"
          + (f" (clean victims {pct_se(m['clean_victim_accuracy'], '%')})" if "clean_victim_accuracy" in m else "")
          + ".\n\n"
          + scenario_table(m["scenarios"]) +
          f"\nCrafting {m['timing']['crafting_s_total']:.1f} s in all; {total['models_trained']} models trained "
          f"(crafting models, victims, clean victims); whole run {total['process_wall_s']:.1f} s"
          + (f" over {total['invocations']} invocations, {total['cut_short']} cut short by a time limit and resumed "
             "from the run store" if total["invocations"] > 1 else "") + ".\n")
    write_results(f"targeted_poison_success_{name}", {"environment": env, "config": r["config"], "metrics": m,
                                                      "cost": c, "cumulative_cost": total,
                                                      "executor": {"name": r["executor"], "workers": args.workers}, "process_wall_s": round(wall, 2)},
                  md)


def settings(args: argparse.Namespace) -> None:
    """Each method (``--methods``) in each victim setting (``--settings``) on the config's scenarios and seeds."""
    base = apply_overrides(load_yaml(args.config), args.overrides)
    name = args.name or f"{Path(args.config).stem}_settings"
    methods = [m.strip() for m in (args.methods or base["attack"]["method"]).split(",") if m.strip()]
    wanted = [x.strip() for x in args.settings.split(",") if x.strip()]
    rows, runs = [], {}
    with workdir(args.workdir) as tmp:
        pre = pretrained_model(base, tmp / "pretrained", device=args.device)
        for method in methods:
            for st in wanted:
                cfg = {**base, "name": f"{method}-{st}", "attack": {**base["attack"], "method": method},
                       "victim": victim_block(base, st, pre)}
                t0 = time.perf_counter()
                r = resume_run(cfg, tmp / f"{method}-{st}", args.device, tmp / "runs.db", **executor_kwargs(args)).results
                m, total = r["metrics"], cumulative_cost(tmp / f"{method}-{st}")
                runs[f"{method}/{st}"] = {"config": r["config"], "metrics": m, "cumulative_cost": total,
                                          "process_wall_s": round(time.perf_counter() - t0, 2)}
                v = m["victim"]
                frozen = f", {v['frozen_parameters']:,} of {v['parameters']:,} frozen" if v["frozen_parameters"] else ""
                rows.append(f"| {method} | {v['setting']}{frozen} | {pct_se(m['poison_success'])} | "
                            f"{pct_se(m['clean_baseline_success']) if 'clean_baseline_success' in m else '-'} | "
                            f"{pct_se(m['victim_accuracy'])} | {m['timing']['crafting_s_total']:.1f} | "
                            f"{total['models_trained']} | {total['process_wall_s']:.1f} |\n")
                print(rows[-1], end="", flush=True)
                env = {**environment(), "data": r["config"]["dataset"]["name"]}
                a = m["attack"]
                md = (f"# Targeted poisoning by victim setting: {name}\n\n{env['date']}, {r['cost']['device']}, torch "
                      f"{env['torch']}; config `{args.config}`; eps {a['eps']}, {a['poisons']} poisons, R = {a['restarts']}, "
                      f"M = {a['steps']}; {r['config']['scenarios']} scenarios x {r['config']['victims']} victims "
                      f"(paired seeds; the same scenarios in every row); victims {r['config']['model']['name']} with "
                      f"recipe {r['config']['recipe']['name']} ({r['config']['recipe']['epochs']} epochs).\n\n"
                      "| method | victims | poison success (%) | clean victims (%) | victim accuracy (%) | crafting s | "
                      "models trained | wall s |\n|---|---|---|---|---|---|---|---|\n" + "".join(rows)
                      + "\nPoison success: the target test image classified as the adversarial class, mean ± SE over "
                      "scenarios of each scenario's rate over its victims. From scratch, the crafting model is one "
                      "model trained by the factory on the clean training split (counted in models trained); fine-tuned "
                      "and transfer victims start from the pretrained model, which is also the crafting model (the "
                      f"attacker knows the feature extractor): the config's model trained by mlaudit on the clean "
                      f"training split with the config's recipe, sha256 {pre[1][:12]}… (not counted). Transfer: a "
                      "re-initialised classifier (last nn.Linear) retrained over the frozen features.\n")
                write_results(f"targeted_poison_{name}", {"environment": env, "pretrained_sha256": pre[1],
                                                          "runs": runs}, md)


def merge(args: argparse.Namespace) -> None:
    """Pool the success results of runs that split one study by ``first_scenario`` (the same attack,
    models, recipes, victims and seed; different, non-overlapping scenarios) into one table: mean ±
    SE over all scenarios, victim accuracy over all poisoned victims."""
    import json

    import numpy as np

    from mlaudit.stats import MeanSE

    runs = [json.loads(Path(p).read_text()) for p in args.inputs]
    if len(runs) < 2:
        raise SystemExit("--part merge needs at least two result files")

    def study(cfg: dict) -> dict:
        # factory settings say how the victims were trained (chunking, layout), not what was studied
        return {k: v for k, v in cfg.items() if k not in ("scenarios", "first_scenario", "name", "factory")}

    ref = study(runs[0]["config"])
    for p, r in zip(args.inputs[1:], runs[1:], strict=True):
        this = study(r["config"])
        if this != ref:
            diff = sorted(k for k in set(this) | set(ref) if this.get(k) != ref.get(k))
            raise SystemExit(f"{p}: not the same study as {args.inputs[0]} (differs in {', '.join(diff)})")
    scen = sorted((s for r in runs for s in r["metrics"]["scenarios"]), key=lambda s: s["index"])
    idx = [s["index"] for s in scen]
    if len(set(idx)) != len(idx):
        raise SystemExit(f"the runs share scenarios ({idx}); merge runs with different first_scenario ranges")
    success = MeanSE.of(np.array([s["success"] for s in scen])).to_dict()
    base = [s["clean_baseline_success"] for s in scen if s["clean_baseline_success"] is not None]
    clean = MeanSE.of(np.array(base)).to_dict() if base else None
    clean_txt = "not run" if clean is None else f"{100 * clean['mean']:.2f}%"
    acc = MeanSE.of(np.array([a for s in scen for a in s["victim_accuracies"]])).to_dict()
    env = environment()
    cfg = runs[0]["config"]
    a = runs[0]["metrics"]["attack"]
    md = (f"# Targeted poisoning, pooled: {args.name}\n\nPooled on {env['date']} from "
          + ", ".join(f"`{Path(p).name}` ({r['environment']['date']}, {r['environment']['gpu'] or 'cpu'})"
                      for p, r in zip(args.inputs, runs, strict=True))
          + f"; method {a['method']}, eps {a['eps']}, {a['poisons']} poisons, R = {a['restarts']}, M = {a['steps']}; "
          f"{setup(cfg)}.\n\n**Average poison success {pct_se(success, '%')}** "
          f"over {success['n']} scenarios (clean victims: {clean_txt}); victim clean accuracy "
          f"{pct_se(acc, '%')}.\n\n" + scenario_table(scen) + "\nCost of each run: "
          + "; ".join(f"`{Path(p).name}`: {r['cumulative_cost']['models_trained']} models, whole run "
                      f"{r['cumulative_cost']['process_wall_s']:.1f} s (victims {r['metrics']['timing']['victims_s']:.1f} s), "
                      f"executor {(r.get('executor') or {}).get('name', 'local')}"
                      + (f" with {r['executor']['workers']} workers" if (r.get('executor') or {}).get('workers') else "")
                      for p, r in zip(args.inputs, runs, strict=True)) + ".\n")
    write_results(f"targeted_poison_success_{args.name}", {
        "environment": env, "inputs": list(args.inputs), "config": cfg, "scenarios": scen,
        "metrics": {"poison_success": success, "clean_baseline_success": clean, "victim_accuracy": acc}}, md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["speed", "success", "merge", "settings"], required=True)
    ap.add_argument("inputs", nargs="*", help="merge part: result JSON files of runs split by first_scenario")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--crafter-epochs", type=int, default=2)
    ap.add_argument("--restarts", type=int, default=2)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--layouts", default="plain",
                    help="speed part: comma-separated; 'plain' = contiguous NCHW, default cuDNN heuristics (CraftingSettings' "
                         "default), 'tuned' = channels-last + timed cuDNN algorithms (slower on an H100, "
                         "targeted_poison_speed_layouts.md)")
    ap.add_argument("--parallel-restarts", type=int, default=1, help="restarts optimised together (batched)")
    ap.add_argument("--config", default="benchmarks/configs/cifar10_fastcnn_brew.yaml")
    ap.add_argument("--name", default="")
    ap.add_argument("--method", default="", help="success part: replace attack.method (e.g. poison-frogs, bullseye)")
    ap.add_argument("--methods", default="", help="settings part: comma-separated methods (default: the config's)")
    ap.add_argument("--settings", default="scratch,fine-tuned,transfer", help="settings part: victim settings")
    ap.add_argument("--set-restarts", type=int, default=0, help="success part: replace attack.restarts")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=YAML",
                    help="success part: replace a config field, dotted keys (e.g. victim.recipe.epochs=20)")
    add_executor_args(ap)
    ap.add_argument("--workdir", default=None,
                    help="success part: keep the run here and resume it when invoked again (default: a temp dir)")
    args = ap.parse_args()
    if args.part == "merge" and not args.name:
        raise SystemExit("--part merge needs --name (the pooled results file's suffix)")
    {"speed": speed, "success": success, "merge": merge, "settings": settings}[args.part](args)


if __name__ == "__main__":
    main()
