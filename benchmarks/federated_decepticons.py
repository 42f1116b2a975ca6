"""Decepticons without secure aggregation, under FedAvg local steps and on a pretrained TinyGPT (issue 20): the
``federated`` kind with ``attack: decepticons`` on examples/federated_text.yaml (pydoc text, 8 users x one sequence of
32 characters, TinyGPT d_model 64, 2 layers, 4 heads, ReLU, 256 bins, a tag of 2 tokens, 3 trials, seed 0).

    python benchmarks/federated_decepticons.py          # CPU, a few minutes on 2 cores

Three parts, the bins at scale 1e-3 in every run (the Flower and FedAvg default; with ReLU the same bins fire as at
scale 1, so FedSGD in process recovers the same pairs):

1. **What the server reads**, FedSGD, user counts 1, 2, 4, 8: the secure aggregate of the first n users, or each of
   their updates alone (``aggregation.secure: false``; the rows read off each pooled), in process and through Flower.
2. **Local steps**: FedAvg with 1, 2, 4 and 8 local SGD steps (one sequence per user: ``local_batch`` 1,
   ``local_epochs`` = steps, lr ``--lr``), the server reading 1 and 4 users' sum or each update alone, both
   transports; FedSGD next to it as the reference.
3. **A pretrained model**: the same FedSGD and FedAvg cells in process on a TinyGPT trained first (``model.init``: a
   state_dict trained here with Adam on the training split's next-token loss, ``--pretrain-steps`` minibatches of 64;
   the benchmark's fixture, not mlaudit's training loop, which takes class targets only).

Writes benchmarks/results/federated_decepticons_pydoc_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import cpu_environment, cpu_name, write_results  # noqa: E402

from mlaudit.config import load_yaml  # noqa: E402
from mlaudit.data import load_dataset  # noqa: E402
from mlaudit.experiments import run_experiment  # noqa: E402
from mlaudit.models.gpt import tiny_gpt  # noqa: E402

READS = {"aggregate": True, "clients": False}


def protocol(steps: int | None) -> dict[str, Any]:
    """FedSGD (None) or FedAvg with ``steps`` local SGD steps on the user's one sequence."""
    if steps is None:
        return {"protocol": "fedsgd"}
    return {"protocol": "fedavg", "local_epochs": steps, "local_batch": 1}


def pretrain(base: dict[str, Any], steps: int, path: Path) -> dict[str, Any]:
    """A TinyGPT of the config's architecture trained with Adam (lr 3e-3, minibatches of 64 sequences) on the training
    split's next-token loss, saved to ``path``; returns the test loss before and after and the seconds."""
    data = load_dataset(base["dataset"])
    torch.manual_seed(1)
    model = tiny_gpt(data.num_classes, data.input_shape, **base["model"]["kwargs"])

    def split(s: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = s.x.round().long()
        return x, torch.cat([x[:, 1:], s.y.long()[:, None]], 1)

    (x, y), (xt, yt) = split(data.train), split(data.test)

    def test_loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(xt), yt))

    before = test_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    t0 = time.perf_counter()
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    torch.save(model.state_dict(), path)
    return {"steps": steps, "test_loss_before": before, "test_loss_after": test_loss(), "seconds": seconds,
            "train_sequences": len(x)}


def run_one(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = run_experiment(cfg, out=where / "run", device="cpu", store=where / "runs.db", quiet=True).results["metrics"]
    wall = time.perf_counter() - t0
    per = [{"users": p["users"], "pairs": p["pairs"]["k"], "occurrences": p["occurrences"],
            "pairs_lo": p["pairs"]["lo"], "pairs_hi": p["pairs"]["hi"], "in_sequence": p["in_sequence"],
            "whole": p["whole"], "nonempty_bins": p["nonempty_bins"], "rejected": p["rejected"],
            "bag_of_tokens_recall": p["bag_of_tokens_recall"]} for p in m["decepticons"]["per_users"]]
    return {"per_users": per, "local_steps": m["settings"]["local_steps"], "scale": m["settings"]["scale"],
            "seconds": m["seconds"], "kind_wall_seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="1,2,4,8", help="FedAvg local steps")
    ap.add_argument("--lr", type=float, default=0.1, help="the users' local SGD step size")
    ap.add_argument("--pretrain-steps", type=int, default=1500, help="Adam minibatches of the pretrained TinyGPT (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="federated_decepticons_pydoc_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import flwr
    import flwr.common.logger  # noqa: F401 - sets the flwr logger's level on import; quieten it after

    logging.getLogger("flwr").setLevel(logging.WARNING)
    date = subprocess.run(["date"], capture_output=True, text=True, check=False).stdout.strip()
    base = load_yaml(HERE.parent / "examples" / "federated_text.yaml")
    base = copy.deepcopy(dict(base)) | {"local_lr": args.lr}
    base["decepticons"] = dict(base["decepticons"]) | {"scale": 1e-3, "samples": 0}
    steps = [int(s) for s in args.steps.split(",")]
    cells: list[dict[str, Any]] = []
    for read in READS:  # part 1
        for transport in ("simulated", "flower"):
            cells.append({"part": "reads", "reads": read, "transport": transport, "steps": None, "model": "init"})
    for s in [None, *steps]:  # part 2
        for read in READS:
            for transport in ("simulated", "flower"):
                cells.append({"part": "steps", "reads": read, "transport": transport, "steps": s, "model": "init"})
    if args.pretrain_steps:  # part 3
        for s in [None, *steps]:
            for read in READS:
                cells.append({"part": "pretrained", "reads": read, "transport": "simulated", "steps": s,
                              "model": "pretrained"})
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    fixture = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.pretrain_steps:
            fixture = pretrain(base, args.pretrain_steps, Path(tmp) / "tiny_gpt.pt")
            print(f"[{time.perf_counter() - t_all:7.1f} s] pretrained: {fixture}", flush=True)
        for c in cells:
            cfg = copy.deepcopy(base) | protocol(c["steps"]) | {"transport": c["transport"],
                                                                 "aggregation": {"secure": READS[c["reads"]]}}
            if c["part"] != "reads":
                cfg["decepticons"] = cfg["decepticons"] | {"user_counts": [1, 4]}
            if c["model"] == "pretrained":
                cfg["model"] = dict(cfg["model"]) | {"init": str(Path(tmp) / "tiny_gpt.pt")}
            r = run_one(cfg, Path(tmp) / f"r{len(runs)}")
            runs.append(c | r)
            pairs = ", ".join(f"{p['users']}: {p['pairs']}/{p['occurrences']}" for p in r["per_users"])
            print(f"[{time.perf_counter() - t_all:7.1f} s] {c['part']} | {c['model']} | steps {c['steps']} | "
                  f"{c['reads']} | {c['transport']}: pairs {pairs} ({r['kind_wall_seconds']:.1f} s)", flush=True)
    res = {"date": date, "environment": cpu_environment(args.threads, data="pydoc-text (CPython help topics, "
                                                        "32-character windows)")
           | {"flwr": flwr.__version__, "note": "2-core CPU shared with other jobs: times are indicative"},
           "cpu": cpu_name(), "config": base, "settings": vars(args) | {"steps": steps, "scale": 1e-3},
           "pretrained": fixture, "runs": runs, "seconds": time.perf_counter() - t_all}
    write_results(args.name, res, table(res))


def pct(p: dict[str, Any]) -> str:
    return f"{100 * p['pairs'] / p['occurrences']:.1f}%"


def table(res: dict[str, Any]) -> str:
    env, cfg, st = res["environment"], res["config"], res["settings"]
    runs = res["runs"]
    lines = [
        "# Decepticons without secure aggregation, under FedAvg local steps, and on a pretrained TinyGPT", "",
        f"{res['date']}; {env['machine']} ({res['cpu']}), shared with other jobs (times indicative); torch "
        f"{env['torch']}, flwr {env['flwr']}, {env['threads']} torch thread(s), Python {env['python']}. "
        f"examples/federated_text.yaml: pydoc text, {cfg['users']} users x {cfg['batch']} sequence of 32 characters, "
        f"TinyGPT d_model {cfg['model']['kwargs']['d_model']} (2 layers, 4 heads, ReLU), {cfg['decepticons']['bins']} "
        f"bins at scale 1e-3, a tag of {cfg['decepticons']['tag_tokens']} tokens, {cfg['trials']} trials (rounds) "
        f"pooled, seed {cfg['seed']}; users' local SGD at lr {st['lr']:g}. Cells: the users' (token, position) pairs "
        "recovered [% of the occurrences typed by the first n users]; the server reads their secure aggregate "
        "(aggregate) or each of their updates alone, the rows pooled (each user).", ""]

    def find(**kw: Any) -> dict[str, Any] | None:
        return next((r for r in runs if all(r.get(k) == v for k, v in kw.items())), None)

    part1 = [r for r in runs if r["part"] == "reads"]
    if part1:
        counts = [p["users"] for p in part1[0]["per_users"]]
        lines += ["## 1. What the server reads (FedSGD)", "",
                  "| server reads | transport | " + " | ".join(f"{n} user{'s' * (n > 1)}" for n in counts) + " |",
                  "|---|---|" + "---:|" * len(counts)]
        for r in part1:
            lines.append(f"| {r['reads']} | {r['transport']} | " + " | ".join(
                f"{pct(p)} ({p['pairs']}/{p['occurrences']})" for p in r["per_users"]) + " |")
        lines += ["", "In its sequence (the tag's group), same rows:", "",
                  "| server reads | transport | " + " | ".join(f"{n}" for n in counts) + " |",
                  "|---|---|" + "---:|" * len(counts)]
        for r in part1:
            lines.append(f"| {r['reads']} | {r['transport']} | " + " | ".join(
                f"{100 * p['in_sequence']:.1f}%" for p in r["per_users"]) + " |")
    for model, title in (("init", "## 2. Local steps (FedAvg), the model at initialisation"),
                         ("pretrained", "## 3. A pretrained TinyGPT (model.init), in process")):
        rows = [r for r in runs if r["part"] in ("steps", "pretrained") and r["model"] == model]
        if not rows:
            continue
        lines += ["", title, ""]
        if model == "pretrained" and res.get("pretrained"):
            f = res["pretrained"]
            lines += [f"Pretrained with Adam (lr 3e-3, {f['steps']} minibatches of 64 of the {f['train_sequences']} "
                      f"training sequences, {f['seconds']:.0f} s): test next-token loss {f['test_loss_before']:.3f} -> "
                      f"{f['test_loss_after']:.3f}. Its embeddings and first block are overwritten by the planting; "
                      "the later block, final LayerNorm and head keep the pretrained values.", ""]
        transports = sorted({r["transport"] for r in rows}, key=["simulated", "flower"].index)
        lines += ["| local steps | " + " | ".join(f"{rd}, {n} user{'s' * (n > 1)}, {t}" for rd in READS for n in (1, 4)
                                                  for t in transports) + " |",
                  "|---|" + "---:|" * (4 * len(transports))]
        for s in [None, *st["steps"]]:
            cells = []
            for rd in READS:
                for i in (0, 1):
                    for t in transports:
                        r = find(part="pretrained" if model == "pretrained" else "steps", model=model, steps=s,
                                 reads=rd, transport=t)
                        cells.append(pct(r["per_users"][i]) if r else "")
            lines.append(f"| {'FedSGD' if s is None else f'FedAvg {s}'} | " + " | ".join(cells) + " |")
        lines += ["", "Rejected candidates (a bin's candidate not within tolerance of a code; mean per round) at 4 users, "
                  "aggregate / each user (summed over the users' reads), in process:", "",
                  "| local steps | non-empty bins, aggregate | rejected, aggregate | non-empty bins, each user | "
                  "rejected, each user |", "|---|---:|---:|---:|---:|"]
        for s in [None, *st["steps"]]:
            a = find(part="pretrained" if model == "pretrained" else "steps", model=model, steps=s, reads="aggregate",
                     transport="simulated")
            c = find(part="pretrained" if model == "pretrained" else "steps", model=model, steps=s, reads="clients",
                     transport="simulated")
            if a and c:
                lines.append(f"| {'FedSGD' if s is None else f'FedAvg {s}'} | {a['per_users'][1]['nonempty_bins']:.1f} | "
                             f"{a['per_users'][1]['rejected']:.1f} | {c['per_users'][1]['nonempty_bins']:.1f} | "
                             f"{c['per_users'][1]['rejected']:.1f} |")
    lines += ["", f"Whole benchmark: {res['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
