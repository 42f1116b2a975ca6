"""The malicious imprint server through Flower vs in process under FedAvg and client defences (issue 20): the
``federated`` kind with ``attack: imprint`` and ``transport: flower`` / ``transport: simulated`` on the same
seeds, the users' inputs the server reads off one round's aggregate, and the wall time of that round.

    python benchmarks/federated_flower_imprint.py                 # digits, CPU, a few minutes on 2 cores

Settings (defaults): digits (8x8), the zoo ``mlp`` width 128 without normalisation (``norm: none``) at
initialisation; 10 users (iid shares) with 8 training images each; secure aggregation (the server reads the
FedAvg aggregate alone); 64 imprint bins on brightness at the quantiles of the test split, at scale 1e-3 in both
transports (the Flower default: float32 weights on the wire); the imprint as an extra module (``variant:
module``) and in the rows of the model's own first Linear (``variant: parameters``). Protocols: FedSGD (one
gradient; the reference), FedAvg with 1 local epoch in minibatches of 4 (2 local SGD steps at lr 0.1) and with 2
local epochs in minibatches of 2 (8 steps). Client defences: none, 8-bit quantisation, pruning 50% (each client's
update in gradient units); one more setting adds server-side clipping (norm 1) and noise (multiplier 1e-4) on the
sum, FedAvg 2 steps, no client defence. Recovered: PSNR >= 30 dB after the one-to-one match of candidates to the
true images; exact: >= 80 dB. Seconds per round: in process, the users' updates, the defence and the aggregate
(``metrics.seconds.updates``); through Flower, from sending the parameters to receiving every client's result
(``metrics.imprint.flower.round_seconds``: one thread per client, gRPC on 127.0.0.1); the read-out is not in it.
A one-round run's Flower round includes the first round's warm-up, so a last setting times ``rounds: R`` (default
5; FedAvg 2 steps, no defence; each round a fresh batch) in both transports: per round after the first through
Flower, and the in-process total over R rounds divided by R.

``--reads aggregate,clients`` runs every cell twice: the server reading the FedAvg aggregate (secure aggregation, the
default) and, without secure aggregation, each user's update alone (``ImprintStrategy(target="clients")``; the
server-side clipping and noise then go on each update); the same users, batches and bins in both, so the second
table compares the per-user read with the aggregate's on the same round.

    python benchmarks/federated_flower_imprint.py --reads aggregate,clients --timing-rounds 0 \
        --name federated_flower_imprint_per_user_digits_cpu

Writes benchmarks/results/federated_flower_imprint_digits_cpu.{json,md} (or ``--name``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import cpu_environment, cpu_name, write_results  # noqa: E402

from mlaudit.experiments import run_experiment  # noqa: E402

PROTOCOLS: dict[str, dict[str, Any]] = {
    "FedSGD": {"protocol": "fedsgd"},
    "FedAvg 2 steps": {"protocol": "fedavg", "local_epochs": 1, "local_batch": 4},
    "FedAvg 8 steps": {"protocol": "fedavg", "local_epochs": 2, "local_batch": 2}}
DEFENCES: dict[str, dict[str, Any]] = {
    "none": {}, "quantise 8 bits": {"defence": {"method": "quantise", "bits": 8}},
    "prune 0.5": {"defence": {"method": "prune", "prune": 0.5}},
    "server clip 1, noise 1e-4": {"aggregation": {"secure": True, "clip": 1.0, "noise_multiplier": 1e-4}}}
TRANSPORTS = ("simulated", "flower")


READS = {"aggregate": True, "clients": False}
"""What the server reads -> aggregation.secure."""


def config(args: argparse.Namespace, seed: int, transport: str, variant: str, protocol: str, defence: str,
           reads: str = "aggregate") -> dict[str, Any]:
    cfg = {"kind": "federated", "dataset": "digits", "model": {"name": "mlp", "width": args.width, "norm": "none"},
           "recipe": "fast", "attack": "imprint", "users": args.users, "batch": args.batch, "seed": seed,
           "local_lr": args.lr, "imprint": {"bins": args.bins, "scale": 1e-3, "variant": variant}, "grid": 0,
           "transport": transport, **PROTOCOLS[protocol], **DEFENCES[defence]}
    cfg["aggregation"] = {**cfg.get("aggregation", {}), "secure": READS[reads]}
    return cfg


def run_one(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = run_experiment(cfg, out=where / "run", device="cpu", store=where / "runs.db", quiet=True).results["metrics"]
    wall = time.perf_counter() - t0
    flower = m["imprint"].get("flower")
    out: dict[str, Any] = {
        "recovered": m["recovered"]["k"], "exact": m["exact"]["k"], "of": m["recovered"]["n"],
        "alone": m["imprint"]["inputs_alone_in_a_bin"], "psnr_median": m["psnr"].get("median"),
        "psnr_q1": m["psnr"].get("q1"), "round_seconds": flower["round_seconds"][0] if flower else m["seconds"]["updates"],
        "flower_run_seconds": flower["run_seconds"][0] if flower else None, "kind_wall_seconds": wall,
        "local_steps": m["settings"].get("local_steps", 1)}
    if "defence" in m:
        d = m["defence"]
        out["without"] = {"recovered": d["without"]["recovered"]["k"], "exact": d["without"]["exact"]["k"],
                          "psnr_median": d["without"]["psnr"].get("median")}
        out["update_distortion"] = d["update_distortion"]["mean"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--users", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bins", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--variants", default="module,parameters")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS))
    ap.add_argument("--defences", default="none,quantise 8 bits,prune 0.5")
    ap.add_argument("--server-dp", default="FedAvg 2 steps", help="protocol of the server clip + noise setting ('' none)")
    ap.add_argument("--timing-rounds", type=int, default=5, help="rounds of the timing setting (0: skip it)")
    ap.add_argument("--reads", default="aggregate", help="what the server reads, comma-separated: aggregate (secure "
                    "aggregation), clients (each user's update alone)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="federated_flower_imprint_digits_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import flwr
    import flwr.common.logger  # noqa: F401 - sets the flwr logger's level on import; quieten it after

    logging.getLogger("flwr").setLevel(logging.WARNING)
    date = subprocess.run(["date"], capture_output=True, text=True, check=False).stdout.strip()
    seeds = [int(s) for s in args.seeds.split(",")]
    reads = args.reads.split(",")
    cells = [(v, p, d) for v in args.variants.split(",") for p in args.protocols.split(",")
             for d in args.defences.split(",")]
    if args.server_dp:
        cells += [(v, args.server_dp, "server clip 1, noise 1e-4") for v in args.variants.split(",")]
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for variant, protocol, defence in cells:
            for read in reads:
                for seed in seeds:
                    order = TRANSPORTS if seed % 2 == 0 else TRANSPORTS[::-1]  # neither always on a warmer process
                    for transport in order:
                        where = Path(tmp) / f"{len(runs)}"
                        r = run_one(config(args, seed, transport, variant, protocol, defence, read), where)
                        runs.append({"variant": variant, "protocol": protocol, "defence": defence, "reads": read,
                                     "seed": seed, "transport": transport, **r})
                        print(f"[{time.perf_counter() - t_all:7.1f} s] {variant} | {protocol} | {defence} | {read} | "
                              f"seed {seed} | {transport}: {r['recovered']}/{r['of']} recovered, {r['exact']} exact, "
                              f"{r['alone']} alone, PSNR median {r['psnr_median']:.1f} dB, "
                              f"{1000 * r['round_seconds']:.1f} ms/round", flush=True)
    timing: list[dict[str, Any]] = []
    if args.timing_rounds > 1:
        with tempfile.TemporaryDirectory() as tmp:
            for variant in args.variants.split(","):
                for seed in seeds:
                    for transport in TRANSPORTS:
                        cfg = config(args, seed, transport, variant, "FedAvg 2 steps", "none") | {
                            "rounds": args.timing_rounds}
                        t0 = time.perf_counter()
                        m = run_experiment(cfg, out=Path(tmp) / f"t{len(timing)}", device="cpu",
                                           store=Path(tmp) / "runs.db", quiet=True).results["metrics"]
                        fl = m["imprint"].get("flower")
                        timing.append({"variant": variant, "seed": seed, "transport": transport,
                                       "rounds": args.timing_rounds, "exact_per_round": [r["exact"] for r in m["imprint"]["rounds"]],
                                       "round_seconds": fl["round_seconds"] if fl else None,
                                       "updates_seconds_total": m["seconds"]["updates"],
                                       "flower_run_seconds": fl["run_seconds"][0] if fl else None,
                                       "kind_wall_seconds": time.perf_counter() - t0})
                        print(f"[{time.perf_counter() - t_all:7.1f} s] timing {variant} seed {seed} {transport}: "
                              f"{timing[-1]['round_seconds'] or timing[-1]['updates_seconds_total']}", flush=True)
    res = {"date": date, "environment": cpu_environment(args.threads, data="digits (sklearn, 8x8)")
           | {"flwr": flwr.__version__, "note": "2-core CPU shared with other jobs: times are indicative"},
           "cpu": cpu_name(), "settings": vars(args) | {"seeds": seeds, "imprint_scale": 1e-3}, "runs": runs,
           "summary": summarise(runs), "timing": timing, "seconds": time.perf_counter() - t_all}
    write_results(args.name, res, table(res))


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, protocol, defence, reads, transport): counts pooled over seeds, the median of the seeds' median
    PSNRs, the median seconds per round; and per (variant, protocol, defence, reads) the differences between the
    transports on the same seed."""
    out = []
    for key in dict.fromkeys((r["variant"], r["protocol"], r["defence"], r.get("reads", "aggregate")) for r in runs):
        cell = [r for r in runs if (r["variant"], r["protocol"], r["defence"], r.get("reads", "aggregate")) == key]
        for transport in TRANSPORTS:
            rs = [r for r in cell if r["transport"] == transport]
            row: dict[str, Any] = {
                "variant": key[0], "protocol": key[1], "defence": key[2], "reads": key[3], "transport": transport,
                "seeds": len(rs),
                "local_steps": rs[0]["local_steps"], "recovered": sum(r["recovered"] for r in rs),
                "exact": sum(r["exact"] for r in rs), "alone": sum(r["alone"] for r in rs), "of": sum(r["of"] for r in rs),
                "psnr_median_of_seeds": statistics.median(r["psnr_median"] for r in rs),
                "round_seconds_median": statistics.median(r["round_seconds"] for r in rs),
                "flower_run_seconds_median": (statistics.median(r["flower_run_seconds"] for r in rs)
                                              if rs[0]["flower_run_seconds"] is not None else None)}
            if "without" in rs[0]:
                row["without"] = {"recovered": sum(r["without"]["recovered"] for r in rs),
                                  "exact": sum(r["without"]["exact"] for r in rs),
                                  "psnr_median_of_seeds": statistics.median(r["without"]["psnr_median"] for r in rs)}
                row["distortion_mean"] = statistics.fmean(r["update_distortion"] for r in rs)
            out.append(row)
        pairs = [(a, b) for a in cell for b in cell
                 if a["seed"] == b["seed"] and (a["transport"], b["transport"]) == TRANSPORTS]

        def capped(v: float | None) -> float:
            return min(v, 80.0) if v is not None else float("nan")

        out.append({"variant": key[0], "protocol": key[1], "defence": key[2], "reads": key[3],
                    "transport": "difference", "pairs": len(pairs),
                    "recovered_difference": sum(abs(a["recovered"] - b["recovered"]) for a, b in pairs),
                    "exact_difference": sum(abs(a["exact"] - b["exact"]) for a, b in pairs),
                    "max_abs_psnr_median_difference_capped_80": max(
                        abs(capped(a["psnr_median"]) - capped(b["psnr_median"])) for a, b in pairs),
                    "max_abs_psnr_q1_difference_capped_80": max(
                        abs(capped(a["psnr_q1"]) - capped(b["psnr_q1"])) for a, b in pairs)})
    return out


def table(res: dict[str, Any]) -> str:
    env, st = res["environment"], res["settings"]
    rows = [r for r in res["summary"] if r["transport"] != "difference"]
    diffs = {(d["variant"], d["protocol"], d["defence"], d.get("reads", "aggregate")): d
             for d in res["summary"] if d["transport"] == "difference"}
    reads = st.get("reads", "aggregate").split(",")
    seen = {"aggregate": "the FedAvg aggregate (secure aggregation)",
            "clients": "each user's update alone (no secure aggregation)"}
    lines = [
        "# The imprint through Flower vs in process: FedAvg local steps, client defences, server-side clipping", "",
        f"{res['date']}; {env['machine']} ({res['cpu']}), shared with other jobs (times indicative); torch "
        f"{env['torch']}, flwr {env['flwr']}, {env['threads']} torch thread(s). Digits (8x8); mlp width {st['width']}, "
        f"norm none, at initialisation; seeds {', '.join(map(str, st['seeds']))}; {st['users']} users (iid) x "
        f"{st['batch']} images, one round; the server reads {' / '.join(seen[r] for r in reads)}; {st['bins']} "
        "brightness bins on the test split, scale "
        f"1e-3 in both transports; lr {st['lr']:g}. Recovered: PSNR >= 30 dB; exact: >= 80 dB; pooled over seeds "
        f"({st['users'] * st['batch'] * len(st['seeds'])} inputs per row). Median PSNR: the median over seeds of each "
        "run's median (above 80 dB it measures float rounding only). Seconds per round: median over seeds; in "
        "process the users' updates, defence and aggregate; through Flower from sending the parameters to receiving "
        "every result.", "",
        "| imprint | protocol (local steps) | defence | server reads | transport | recovered | exact | alone in a bin "
        "| median PSNR dB | the same round without the client defence | ms per round | Flower run s |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        without = (f"{r['without']['recovered']} recovered, {r['without']['exact']} exact"
                   if "without" in r else "")
        fl = f"{r['flower_run_seconds_median']:.2f}" if r["flower_run_seconds_median"] is not None else ""
        lines.append(f"| {r['variant']} | {r['protocol']} ({r['local_steps']}) | {r['defence']} | "
                     f"{r.get('reads', 'aggregate')} | {r['transport']} | {r['recovered']}/{r['of']} | {r['exact']} | "
                     f"{r['alone']} | {r['psnr_median_of_seeds']:.1f} | {without} | "
                     f"{1000 * r['round_seconds_median']:.1f} | {fl} |")
    lines += ["", "Flower vs in process on the same seed (summed over seeds; PSNR capped at 80 dB, largest over seeds):",
              "", "| imprint | protocol | defence | server reads | recovered, summed difference | exact, summed difference "
              "| median PSNR difference dB | q1 PSNR difference dB |", "|---|---|---|---|---:|---:|---:|---:|"]
    for (v, p, dname, rd), d in diffs.items():
        lines.append(f"| {v} | {p} | {dname} | {rd} | {d['recovered_difference']} | {d['exact_difference']} | "
                     f"{d['max_abs_psnr_median_difference_capped_80']:.4f} | {d['max_abs_psnr_q1_difference_capped_80']:.4f} |")
    if len(reads) > 1:
        lines += ["", "Each user's update alone vs the aggregate, on the same rounds (Flower; pooled over seeds; "
                  "recovered / exact / alone in a bin):", "",
                  "| imprint | protocol (local steps) | defence | aggregate | each user alone | exact, per user - aggregate |",
                  "|---|---|---|---:|---:|---:|"]
        fl_rows = {(r["variant"], r["protocol"], r["defence"], r.get("reads", "aggregate")): r
                   for r in rows if r["transport"] == "flower"}
        for (v, p, dname, rd), a in fl_rows.items():
            if rd != "aggregate" or (v, p, dname, "clients") not in fl_rows:
                continue
            c = fl_rows[v, p, dname, "clients"]
            lines.append(f"| {v} | {p} ({a['local_steps']}) | {dname} | {a['recovered']} / {a['exact']} / {a['alone']} | "
                         f"{c['recovered']} / {c['exact']} / {c['alone']} | {c['exact'] - a['exact']:+d} |")
    if res.get("timing"):
        t = res["timing"]
        r = t[0]["rounds"]
        lines += ["", f"Timing over {r} FedAvg rounds (2 local steps, no defence, a fresh batch per round; medians over "
                  "seeds): through Flower the rounds after the first; in process the users' updates and aggregate "
                  f"summed over the {r} rounds, / {r}.", "",
                  "| imprint | in process, ms per round | Flower, ms per round (rounds 2..) | Flower, round 1 ms | "
                  "Flower run s |", "|---|---:|---:|---:|---:|"]
        for v in dict.fromkeys(x["variant"] for x in t):
            sim = [x["updates_seconds_total"] / x["rounds"] for x in t if x["variant"] == v and x["transport"] == "simulated"]
            fl = [x for x in t if x["variant"] == v and x["transport"] == "flower"]
            later = statistics.median(s for x in fl for s in x["round_seconds"][1:])
            first = statistics.median(x["round_seconds"][0] for x in fl)
            run = statistics.median(x["flower_run_seconds"] for x in fl)
            lines.append(f"| {v} | {1000 * statistics.median(sim):.1f} | {1000 * later:.1f} | {1000 * first:.0f} | "
                         f"{run:.2f} |")
    lines += ["", f"Whole benchmark: {res['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
