"""FedAvg through Flower vs in process (issue 20): the ``federated`` kind with ``transport: flower`` and
``transport: simulated`` on the same seeds, an honest-but-curious server running Inverting Gradients on the
first and the last round, with and without client defences; the trained global model's test accuracy after
R rounds and the wall time per round of each transport.

    python benchmarks/federated_flower_fedavg.py                  # digits, CPU, about 20 minutes on 2 cores

Settings (defaults): digits (8x8), the zoo ``mlp`` width 32 without normalisation (``norm: none``) at
initialisation; 10 users (iid shares), each drawing 2 training images per round; FedAvg: 2 local epochs in
minibatches of 1 at lr 0.1 (4 local SGD steps per round); 100 rounds; no secure aggregation (the server inverts
each client's update: Inverting Gradients, 1000 steps, labels recovered from the last layer) on rounds 1 and
100; client defences: none, Gaussian noise sigma 0.01, pruning 90% (each client's update in gradient units,
each user's noise from its own generator). One more setting, the zoo ``mlp`` with its BatchNorm (minibatches of
2, so 2 local steps per round), without a defence, shows how the two transports drift apart when BatchNorm over
2 examples amplifies float32 rounding. Recovered: PSNR >= 30 dB after the one-to-one match of candidates to
the true images. Seconds per round: the users' local training, the defence and the server's FedAvg step (in
process); from sending the parameters to receiving every client's result (Flower: gRPC on 127.0.0.1, one
client thread per user); the attack and the test-set evaluation are not in it.

Writes benchmarks/results/federated_flower_fedavg_digits_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import cpu_environment, cpu_name, write_results  # noqa: E402

from mlaudit.experiments import run_experiment  # noqa: E402

DEFENCES: dict[str, dict[str, Any] | None] = {
    "none": None, "noise sigma 0.01": {"method": "noise", "sigma": 0.01}, "prune 0.9": {"method": "prune", "prune": 0.9},
    "quantise 2 bits": {"method": "quantise", "bits": 2}}
TRANSPORTS = ("simulated", "flower")


def config(args: argparse.Namespace, seed: int, transport: str, defence: dict[str, Any] | None,
           batchnorm: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "kind": "federated", "dataset": "digits", "model": {"name": "mlp", "width": 32, "norm": "none"},
        "recipe": "fast", "attack": "inverting-gradients", "users": args.users, "batch": args.batch, "seed": seed,
        "protocol": "fedavg", "local_epochs": args.local_epochs, "local_batch": args.local_batch,
        "local_lr": args.lr, "rounds": args.rounds, "attack_rounds": sorted({1, args.rounds}),
        "aggregation": {"secure": False}, "inversion": {"steps": args.steps}, "grid": 0, "transport": transport}
    if batchnorm:  # BatchNorm in train mode needs at least 2 examples per local step
        cfg |= {"model": {"name": "mlp", "width": 32}, "local_batch": max(2, args.local_batch)}
    if defence is not None:
        cfg["defence"] = defence
    return cfg


def run_one(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = run_experiment(cfg, out=where / "run", device="cpu", store=where / "runs.db", quiet=True).results["metrics"]
    wall = time.perf_counter() - t0
    tr = m["training"]
    per_round = [r["seconds"] for r in tr["rounds"]]
    n_round = cfg["users"] * cfg["batch"]
    attacked = {r["round"]: {"recovered": round(r["recovered"] * n_round), "of": n_round,
                             "psnr_median": r["psnr_median"]} for r in tr["rounds"] if r["attacked"]}
    out: dict[str, Any] = {
        "recovered": m["recovered"]["k"], "of": m["recovered"]["n"], "psnr_median": m["psnr"].get("median"),
        "label_accuracy": m["label_accuracy"], "rounds_attacked": attacked,
        "test_accuracy": [r["test_accuracy"] for r in tr["rounds"]], "test_accuracy_start": tr["test_accuracy_start"],
        "test_accuracy_end": tr["test_accuracy_end"], "local_steps": tr["local_steps"],
        "seconds_per_round": per_round, "seconds_per_round_median_after_1": statistics.median(per_round[1:] or per_round),
        "seconds_per_round_mean": statistics.fmean(per_round), "flower_run_seconds": tr.get("flower_run_seconds"),
        "attack_seconds": m["seconds"]["attack"], "kind_wall_seconds": wall}
    if "defence" in m:
        d = m["defence"]
        out["without_defence"] = {"recovered": d["without"]["recovered"]["k"], "of": d["without"]["recovered"]["n"],
                                  "psnr_median": d["without"]["psnr"].get("median")}
        out["update_distortion"] = d["update_distortion"]["mean"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--local-batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--defences", default="none,noise sigma 0.01,prune 0.9")
    ap.add_argument("--no-batchnorm", action="store_true", help="skip the BatchNorm setting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="federated_flower_fedavg_digits_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import flwr
    import flwr.common.logger  # noqa: F401 - sets the flwr logger's level on import; quieten it after

    logging.getLogger("flwr").setLevel(logging.WARNING)

    seeds = [int(s) for s in args.seeds.split(",")]
    cells = [("mlp (norm none)", name, DEFENCES[name], False) for name in args.defences.split(",")]
    if not args.no_batchnorm:
        cells.append(("mlp (BatchNorm)", "none", None, True))
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for model, name, defence, bn in cells:
            for seed in seeds:
                # alternate which transport goes first, so neither always runs on a warmer process
                order = TRANSPORTS if seed % 2 == 0 else TRANSPORTS[::-1]
                for transport in order:
                    cfg = config(args, seed, transport, defence, bn)
                    where = Path(tmp) / f"{len(runs)}"
                    r = run_one(cfg, where)
                    runs.append({"model": model, "defence": name, "seed": seed, "transport": transport, **r})
                    print(f"[{time.perf_counter() - t_all:7.1f} s] {model} | {name} | seed {seed} | {transport}: "
                          f"{r['recovered']}/{r['of']} recovered, PSNR median {r['psnr_median']:.1f} dB, test acc "
                          f"{r['test_accuracy_start']:.3f} -> {r['test_accuracy_end']:.3f}, "
                          f"{1000 * r['seconds_per_round_median_after_1']:.1f} ms/round, kind {r['kind_wall_seconds']:.1f} s",
                          flush=True)
    settings = vars(args) | {"seeds": seeds, "local_steps_norm_none": args.local_epochs * -(-args.batch // args.local_batch)}
    res = {"environment": cpu_environment(args.threads, data="digits (sklearn, 8x8)") | {"flwr": flwr.__version__},
           "cpu": cpu_name(), "settings": settings, "runs": runs, "summary": summarise(runs),
           "seconds": time.perf_counter() - t_all}
    write_results(args.name, res, table(res))


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, defence, transport): counts pooled over seeds, accuracy mean ± SE over seeds, median seconds
    per round; and per (model, defence) the largest difference between the transports on the same seed."""
    out = []
    keys = list(dict.fromkeys((r["model"], r["defence"]) for r in runs))
    for model, defence in keys:
        cell = [r for r in runs if (r["model"], r["defence"]) == (model, defence)]
        for transport in TRANSPORTS:
            rs = [r for r in cell if r["transport"] == transport]
            if not rs:
                continue
            last = max(rs[0]["rounds_attacked"])
            acc = [r["test_accuracy_end"] for r in rs]
            row: dict[str, Any] = {
                "model": model, "defence": defence, "transport": transport, "seeds": len(rs),
                "local_steps": rs[0]["local_steps"],
                "round1": [sum(r["rounds_attacked"][1]["recovered"] for r in rs), sum(r["rounds_attacked"][1]["of"] for r in rs)],
                "round_last": [sum(r["rounds_attacked"][last]["recovered"] for r in rs),
                               sum(r["rounds_attacked"][last]["of"] for r in rs)],
                "last_round": last,
                "psnr_median_of_seeds": statistics.median(r["psnr_median"] for r in rs),
                "accuracy_mean": statistics.fmean(acc),
                "accuracy_se": statistics.stdev(acc) / len(acc) ** 0.5 if len(acc) > 1 else float("nan"),
                "accuracy_start_mean": statistics.fmean(r["test_accuracy_start"] for r in rs),
                "seconds_per_round_median": statistics.median(s for r in rs for s in r["seconds_per_round"][1:]),
                "first_round_seconds_median": statistics.median(r["seconds_per_round"][0] for r in rs),
                "flower_run_seconds_mean": (statistics.fmean(r["flower_run_seconds"] for r in rs)
                                            if rs[0]["flower_run_seconds"] is not None else None),
                "kind_wall_seconds_mean": statistics.fmean(r["kind_wall_seconds"] for r in rs)}
            if "without_defence" in rs[0]:
                row["without_defence"] = [sum(r["without_defence"]["recovered"] for r in rs),
                                          sum(r["without_defence"]["of"] for r in rs)]
                row["without_psnr_median_of_seeds"] = statistics.median(r["without_defence"]["psnr_median"] for r in rs)
                row["distortion_mean"] = statistics.fmean(r["update_distortion"] for r in rs)
            out.append(row)
        pairs = [(a, b) for a in cell for b in cell
                 if a["seed"] == b["seed"] and (a["transport"], b["transport"]) == TRANSPORTS]
        if pairs:
            out.append({"model": model, "defence": defence, "transport": "difference", "pairs": len(pairs),
                        "max_abs_accuracy_difference_any_round": max(
                            max(abs(x - y) for x, y in zip(a["test_accuracy"], b["test_accuracy"], strict=True))
                            for a, b in pairs),
                        "max_abs_final_accuracy_difference": max(abs(a["test_accuracy_end"] - b["test_accuracy_end"])
                                                                 for a, b in pairs),
                        "recovered_difference": sum(abs(a["recovered"] - b["recovered"]) for a, b in pairs),
                        "max_abs_psnr_median_difference": max(abs(a["psnr_median"] - b["psnr_median"]) for a, b in pairs)})
    return out


def table(res: dict[str, Any]) -> str:
    env, st = res["environment"], res["settings"]
    rows = [r for r in res["summary"] if r["transport"] != "difference"]
    diffs = [r for r in res["summary"] if r["transport"] == "difference"]
    last = rows[0]["last_round"] if rows else st["rounds"]

    def frac(kn: list[int]) -> str:
        return f"{kn[0]}/{kn[1]}"

    lines = [
        "# FedAvg through Flower vs in process: Inverting Gradients on the first and last round, client defences, "
        "the trained model", "",
        f"{env['date']}, {env['machine']} ({res['cpu']}), torch {env['torch']}, flwr {env['flwr']}, {env['threads']} "
        f"torch thread(s); digits (8x8); seeds {', '.join(map(str, st['seeds']))}. {st['users']} users (iid), "
        f"{st['batch']} training images each per round; FedAvg: {st['local_epochs']} local epochs at lr {st['lr']:g} "
        f"(mlp, norm none: minibatches of {st['local_batch']}, {st['local_steps_norm_none']} local steps; mlp with "
        f"BatchNorm: minibatches of {max(2, st['local_batch'])}); {st['rounds']} rounds; no secure aggregation: the "
        f"server inverts each client's update with Inverting Gradients ({st['steps']} steps, labels recovered) on "
        f"rounds 1 and {st['rounds']}. Recovered: PSNR >= 30 dB (one-to-one match), pooled over seeds. Test "
        "accuracy: the global model after the last round, mean ± SE over seeds (before round 1: "
        + ", ".join(f"{r['model']} {100 * r['accuracy_start_mean']:.1f}%" for r in rows if r["transport"] == "simulated"
                    and r["defence"] == "none") + "). Seconds per round: median over rounds 2.. and seeds (round 1 "
        "apart: warm-up).", "",
        f"| model | client defence | transport | recovered, round 1 | recovered, round {last} | median PSNR dB "
        "(both rounds) | the same rounds' plain updates (both rounds) | test accuracy after the last round | s per round (round 1) | "
        "Flower run s | kind run s |",
        "|---|---|---|---:|---:|---:|---|---:|---|---:|---:|"]
    for r in rows:
        without = (f"{frac(r['without_defence'])}, {r['without_psnr_median_of_seeds']:.1f} dB"
                   if "without_defence" in r else "")
        se = r["accuracy_se"]
        acc = f"{100 * r['accuracy_mean']:.1f}%" + (f" ± {100 * se:.1f}" if se == se else "")
        fl = f"{r['flower_run_seconds_mean']:.1f}" if r["flower_run_seconds_mean"] is not None else ""
        lines.append(f"| {r['model']} | {r['defence']} | {r['transport']} | {frac(r['round1'])} | "
                     f"{frac(r['round_last'])} | {r['psnr_median_of_seeds']:.1f} | {without} | {acc} | "
                     f"{1000 * r['seconds_per_round_median']:.1f} ms ({1000 * r['first_round_seconds_median']:.0f} ms) | "
                     f"{fl} | {r['kind_wall_seconds_mean']:.1f} |")
    lines += ["", "Flower vs in process on the same seed (largest difference over the seeds):", "",
              "| model | client defence | test accuracy, any round | test accuracy, last round | recovered inputs "
              "(summed) | median PSNR dB |", "|---|---|---:|---:|---:|---:|"]
    for d in diffs:
        lines.append(f"| {d['model']} | {d['defence']} | {100 * d['max_abs_accuracy_difference_any_round']:.2f} points | "
                     f"{100 * d['max_abs_final_accuracy_difference']:.2f} points | {d['recovered_difference']} | "
                     f"{d['max_abs_psnr_median_difference']:.4f} |")
    lines += ["", f"Whole benchmark: {res['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
