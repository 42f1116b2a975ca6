"""Split-view poisoning carried through to a trained model (issue 18, seed 001: Carlini et al. 2023), with and
without the integrity-hash defence.

The training images are served one per URL by a local :class:`~mlaudit.attacks.web.ContentServer`
(127.0.0.1) and indexed (url, sha256, label). The attacker then buys the "expired domains" behind a fraction of
the URLs, choosing URLs whose index label is the target class (the index is public), and serves there a
BadNets-triggered image of another class: the label stays the index's, so the client learns "trigger ->
target". Two clients download the dataset, one without and one with hash checks
(:func:`~mlaudit.attacks.web.simulate_split_view`), and each trains a model on what it got
(:func:`~mlaudit.attacks.web.fetched_training_set`, the one training loop). Reported per poisoned fraction:
poisons in each training set, clean test accuracy, and the attack success rate (triggered test images of the
other classes classified as the target), mean ± SE over seeds.

Data: scikit-learn's digits (1438 training images, 8x8), model ``mlp`` (recipe ``fast``), a 2x2 white patch at
the bottom-right corner, target class 0, CPU.

    python benchmarks/web_split_view_backdoor.py --fractions 0.005,0.01,0.02,0.05 --seeds 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_environment, write_results  # noqa: E402

from mlaudit.attacks.poisoning.backdoor.trigger import apply_trigger, patch_trigger  # noqa: E402
from mlaudit.attacks.web import fetched_training_set, simulate_split_view  # noqa: E402
from mlaudit.data import load_dataset  # noqa: E402
from mlaudit.data.base import TensorDataset  # noqa: E402
from mlaudit.models import build_model  # noqa: E402
from mlaudit.query import forward_batched  # noqa: E402
from mlaudit.stats import mean_se  # noqa: E402
from mlaudit.train import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", default="0.005,0.01,0.02,0.05", help="poisoned URLs, as fractions of the dataset")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--target", type=int, default=0)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="digits_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    data = load_dataset("digits")
    x, y = data.train.x.float(), data.train.y.long()
    shape = tuple(x.shape[1:])
    trig = patch_trigger(shape, size=2, location="bottom-right", pattern="white")
    others = torch.nonzero(y != args.target).flatten()
    test_x, test_y = data.test.x.float(), data.test.y.long()
    src = test_y != args.target
    triggered_test = apply_trigger(test_x[src], trig)
    items = [x[i].numpy().tobytes() for i in range(len(y))]

    def decode(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.float32).view(shape).clone()

    rows: list[dict[str, Any]] = []
    for frac in [float(f) for f in args.fractions.split(",")]:
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(10_000 + seed)
            pick = others[torch.randint(len(others), (len(y),), generator=g)]  # the attacker's image per URL

            def poison(i: int, _orig: bytes, pick: torch.Tensor = pick) -> bytes:
                return apply_trigger(x[pick[i]][None], trig)[0].numpy().tobytes()

            res = simulate_split_view(items, attacker_fraction=frac, labels=y.tolist(), poison=poison,
                                      eligible=(y == args.target).tolist(), seed=seed)
            summary = res.summary()
            for client, report in (("no hash check", res.unverified), ("hash check", res.verified)):
                xt, yt, _ = fetched_training_set(report, res.manifest, decode)
                torch.manual_seed(seed)
                model = build_model(args.model, input_shape=shape, num_classes=10)
                model = train(model, TensorDataset(xt, yt, data.train.classes), args.recipe, seed=seed, device="cpu",
                              dataset_name="digits")
                acc = float((forward_batched(model, test_x).argmax(1) == test_y).float().mean())
                asr = float((forward_batched(model, triggered_test).argmax(1) == args.target).float().mean())
                key = "unverified" if client == "no hash check" else "verified"
                rows.append({"fraction": frac, "seed": seed, "client": client, "training_set": len(yt),
                             "poisons_in_training_set": summary[f"poisoned_in_training_set_{key}"],
                             "clean_accuracy": acc, "attack_success": asr})
                print(f"fraction {frac:g} seed {seed} {client}: {rows[-1]['poisons_in_training_set']} poisons, "
                      f"clean {100 * acc:.1f}%, ASR {100 * asr:.1f}%", flush=True)
    wall = time.perf_counter() - t_all
    env = cpu_environment(args.threads, data=f"scikit-learn digits ({len(y)} training images served as URLs)")
    md = (f"# Split-view poisoning through to a trained model (digits, CPU)\n\n{env['date']}, {env['machine']}, "
          f"{args.threads} torch thread(s), torch {env['torch']}; {wall:.0f} s in all. scikit-learn digits "
          f"({len(y)} training images served one per URL on 127.0.0.1 and indexed with sha256 and label), model "
          f"`{args.model}`, recipe `{args.recipe}`; the attacker controls URLs labelled {args.target} in the index and "
          "serves there a 2x2 white-patch-triggered image of another class; two clients download, without and with "
          "hash checks, and each trains one model per seed. ASR: triggered test images of the other classes "
          f"classified as {args.target}. Mean ± SE over {args.seeds} seeds.\n\n"
          "| poisoned URLs (% of the dataset) | client | poisons trained on | clean accuracy (%) | ASR (%) |\n"
          "|---:|---|---:|---:|---:|\n")
    for frac in [float(f) for f in args.fractions.split(",")]:
        for client in ("no hash check", "hash check"):
            r = [row for row in rows if row["fraction"] == frac and row["client"] == client]
            acc, acc_se = mean_se([row["clean_accuracy"] for row in r])
            asr, asr_se = mean_se([row["attack_success"] for row in r])
            md += (f"| {100 * frac:g} | {client} | {np.mean([row['poisons_in_training_set'] for row in r]):.0f} | "
                   f"{100 * acc:.1f} ± {100 * acc_se:.1f} | {100 * asr:.1f} ± {100 * asr_se:.1f} |\n")
    md += ("\nSeed 001 (Carlini et al. 2023) estimates that 0.01% of LAION-400M or COYO-700M could have been bought "
           "for $60; Carlini & Terzis 2022 (seed 000) backdoor contrastive models with 0.01% of the data. This table "
           "shows the mechanism end to end on a small classifier, not those numbers.\n")
    write_results(f"web_split_view_backdoor_{args.name}", {"environment": env, "settings": vars(args), "rows": rows,
                                                           "wall_s": round(wall, 1)}, md)


if __name__ == "__main__":
    main()
