"""How far the compiled step's losses drift from the eager step's over a compile-auto probe (issue 23, goal 5),
on the CPU (inductor's C++ backend, bf16 autocast): the check `factory.layout.compile_disagreement` allows 10% per
model and probe epoch; this measures what rounding alone does over the probe's 6 epochs x 4 steps.

The airbench network (``--width``) with the `airbench-muon` optimizer (Muon and the SGD groups, the
triangular schedule over the probe's 24 steps, label smoothing 0.2, summed loss), CIFAR-10 (JPEG) training images
(the first 4 x ``--batch`` rows, no augmentation), trained once through `stacked._compiled_call` and once eagerly
from the same initialisation; prints each epoch's mean loss and the largest relative difference.

    python benchmarks/probes/compile_loss_agreement_cpu.py --width 16 --batch 250
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.train.optim import apply_rates, make_optimizer, slot_active, slot_rates
from mlaudit.train.recipe import resolve_recipe
from mlaudit.train.stacked import _compiled_call


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(2)
    data = load_dataset(DatasetSpec(name="cifar10", root=".data/cifar10-jpeg.npz"))
    n = 4 * args.batch
    x, y = data.train.x[:n], data.train.y[:n]
    recipe = resolve_recipe({"name": "airbench-muon", "batch_size": args.batch, "epochs": args.epochs})
    spec = ModelSpec(name="airbench", width=args.width)
    runs = {}
    for name, fn in (("compiled", _compiled_call()), ("eager", lambda m, xb: m(xb))):
        torch.manual_seed(0)
        m = build_model(spec, input_shape=(3, 32, 32), num_classes=10)
        m.data_init(x)
        names = [k for k, p in m.named_parameters() if p.requires_grad]
        params = [p for p in m.parameters() if p.requires_grad]
        opt = make_optimizer(recipe, params, names=names, leading_k=False, base_lr=recipe.lr)
        losses = []
        for epoch in range(args.epochs):
            total = 0.0
            for s in range(4):
                xb, yb = x[s * args.batch:(s + 1) * args.batch], y[s * args.batch:(s + 1) * args.batch]
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(fn(m, xb).float(), yb, label_smoothing=recipe.label_smoothing)
                grads = torch.autograd.grad(loss * len(yb), params)
                assert all(torch.isfinite(g).all() for g in grads), (name, epoch, s)
                rates = slot_rates(opt, recipe, recipe.lr, epoch + s / 4)  # as train_stack: progress in epochs
                apply_rates(opt, list(grads), rates, slot_active(opt, rates))
                total += loss.item()
            losses.append(round(total / 4, 5))
        runs[name] = losses
        print(name, losses, flush=True)
    rel = [abs(a - b) / max(abs(b), 0.5) for a, b in zip(runs["compiled"], runs["eager"], strict=True)]
    out = {"settings": vars(args), "losses": runs, "relative_difference": [round(r, 5) for r in rel],
           "max_relative_difference": round(max(rel), 5), "torch": torch.__version__}
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
