"""The ``contrastive`` kind on an open_clip model loaded from disk (issue 18: "use open_clip_torch model code; a user
can plug a pretrained CLIP they have on disk"): the backdoor of Carlini & Terzis (ICLR 2022) while fine-tuning it.

1. Pretraining stand-in: open_clip's own ``CLIP`` class (``benchmarks/open_clip_digits.py``: a 2-layer ViT on
   8x8 images and open_clip's text transformer with its BPE tokenizer) is trained on the clean captioned digits
   (``--pretrain-epochs``), and its state_dict is saved to a file with its sha256. No weights are downloaded: the
   file is made here, as a user's pretrained CLIP would be on their disk.
2. The kind (``encoder: {dual: open_clip_digits:OpenClipDigits, tokenizer: open_clip_digits:tokenize}``) builds
   every model from that file (``MLAUDIT_OPENCLIP_WEIGHTS``, hash-checked) and fine-tunes it on the poisoned
   captioned set (``--epochs``): a 2x2 checkerboard patch on p training images captioned as "zero", p in
   ``--poisons``, ``--trials`` trials each, plus the clean fine-tuned models.

Needs open_clip_torch (and its torchvision) beside mlaudit:

    pip install --no-deps --target /tmp/oc open_clip_torch timm ftfy wcwidth torchvision==<yours>
    PYTHONPATH=/tmp/oc python benchmarks/contrastive_open_clip.py          # CPU, a few minutes

Writes benchmarks/results/contrastive_open_clip_digits_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import open_clip_digits as oc  # noqa: E402
import torch  # noqa: E402
from _common import cpu_environment, cpu_name, write_results  # noqa: E402

from mlaudit.config import load_yaml  # noqa: E402
from mlaudit.contrastive import (  # noqa: E402
    CaptionSpace,
    class_names,
    templates_for,
    train_contrastive,
    zero_shot_accuracy,
)
from mlaudit.contrastive.zeroshot import class_embeddings  # noqa: E402
from mlaudit.data import load_dataset  # noqa: E402
from mlaudit.experiments import run_experiment  # noqa: E402
from mlaudit.train.recipe import resolve_recipe  # noqa: E402

EXAMPLE = HERE.parent / "examples" / "contrastive.yaml"
RECIPE = {"optimizer": "adam", "lr": 0.002, "weight_decay": 0.0, "batch_size": 128, "schedule": "cosine",
          "augment": "none"}


def pretrain(epochs: int, seed: int) -> tuple[Path, str, float, int]:
    """Train the open_clip model on the clean captioned digits; (weights file, sha256, zero-shot accuracy, params)."""
    data = load_dataset({"name": "digits"})
    names = class_names(data.name, data.train.classes)
    space = CaptionSpace.build(names, templates_for(data.name))
    clean = space.pair(data.train, seed=seed)
    clean = type(clean)(clean.x, clean.captions, oc.tokenize(clean.captions), clean.y)
    torch.manual_seed(seed)
    model = oc.OpenClipDigits()
    train_contrastive(model, clean, resolve_recipe({**RECIPE, "epochs": epochs}), seed=seed, device="cpu")
    w = class_embeddings(model, names, space.templates, oc.tokenize, device="cpu")
    acc = zero_shot_accuracy(model, data.test.x, data.test.y, w)
    path = Path(tempfile.mkdtemp()) / "open_clip_digits.pt"
    torch.save(model.clip.state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), acc, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs on the poisoned set")
    ap.add_argument("--poisons", default="2,8,32")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="contrastive_open_clip_digits_cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    path, sha, pre_acc, params = pretrain(args.pretrain_epochs, args.seed)
    pre_s = time.perf_counter() - t0
    os.environ["MLAUDIT_OPENCLIP_WEIGHTS"], os.environ["MLAUDIT_OPENCLIP_SHA256"] = str(path), sha
    cfg = load_yaml(EXAMPLE)
    cfg.update(encoder={"dual": "open_clip_digits:OpenClipDigits", "tokenizer": "open_clip_digits:tokenize",
                        "embed_dim": 64}, recipe={**RECIPE, "epochs": args.epochs}, seed=args.seed, baseline=True)
    cfg["attack"] = {**cfg["attack"], "poisons": [int(p) for p in args.poisons.split(",")], "trials": args.trials}
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        r = run_experiment(cfg, out=Path(tmp) / "run", device="cpu", store=Path(tmp) / "runs.db", quiet=True).results
        kind_s = time.perf_counter() - t1
    curve = r["metrics"]["curve"]
    res = {"environment": cpu_environment(1, data="digits (sklearn, 8x8), captioned from class names and templates"),
           "cpu": cpu_name(), "open_clip": oc.open_clip.__version__, "settings": vars(args), "params": params,
           "pretrained": {"epochs": args.pretrain_epochs, "zero_shot_accuracy": pre_acc, "sha256": sha,
                          "seconds": pre_s},
           "curve": curve, "train_pairs": r["metrics"]["train_pairs"], "kind_seconds": kind_s,
           "models_trained": r["cost"]["models_trained"]}
    write_results(args.name, res, table(res))
    print(table(res))


def table(res: dict[str, Any]) -> str:
    st, pre = res["settings"], res["pretrained"]
    lines = ["# The contrastive kind on an open_clip model loaded from disk: the backdoor while fine-tuning", "",
             f"{res['environment']['date']}, CPU ({res['cpu']}), torch {res['environment']['torch']}, open_clip "
             f"{res['open_clip']}; digits captioned from class names and templates ({res['train_pairs']} training "
             f"pairs). Model: open_clip's `CLIP` (2-layer ViT, patch 2, on 8x8 images; 2-layer text transformer; "
             f"open_clip's BPE tokenizer, context 16; {res['params']:,} parameters), pretrained here on the clean "
             f"pairs for {pre['epochs']} epochs (zero-shot test accuracy {100 * pre['zero_shot_accuracy']:.1f}%), "
             f"saved, and loaded by every model of the kind from that file (sha256 {pre['sha256'][:12]}...). Each model "
             f"is then fine-tuned for {st['epochs']} epochs (Adam 0.002, cosine) on the set with p pairs replaced "
             f"by triggered images (2x2 checkerboard, bottom right) captioned as \"zero\"; {st['trials']} trials per "
             "p; mean ± SE over trials.", "",
             "| poisons p | rate | attack success (triggered non-zero test digits classified \"zero\") | rank of \"zero\" "
             "| clean zero-shot accuracy |", "|---:|---:|---:|---:|---:|"]
    for c in res["curve"]:
        s, k, a = c["success"], c["target_rank"], c["zero_shot_accuracy"]
        lines.append(f"| {c['poisons']} | {100 * c['rate']:.2f}% | {100 * s['mean']:.1f}% ± {100 * s['se']:.1f} | "
                     f"{k['mean']:.2f} | {100 * a['mean']:.1f}% |")
    lines += ["", f"Pretraining {pre['seconds']:.0f} s; the kind {res['kind_seconds']:.0f} s for "
              f"{res['models_trained']} models."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
