"""Side-by-side reference (issue 23): KellerJordan/cifar10-airbench ``airbench94_muon.py`` run one model
at a time on the same CIFAR-10 (JPEG) pack and GPU as mlaudit's ``airbench`` recipe.

The reference file is not part of mlaudit (MIT, not vendored): place a copy at ``.ref/airbench94_muon.py``
(git-ignored). This harness writes the pack in the layout the script loads (``cifar10/{train,test}.pt``:
uint8 NHWC images, labels, class names) in a temporary folder, compiles the model as the script does
(``mode="max-autotune"``), runs one warm-up and ``--runs`` timed models, and reports wall seconds per
model (training + its TTA evaluation, CUDA-synchronised) and TTA accuracy.

    python benchmarks/probes/airbench_reference.py --runs 5 --out ref.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import cifar10_jpeg, environment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--script", default=".ref/airbench94_muon.py")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    script = Path(args.script).resolve()
    data = cifar10_jpeg()  # decoded once by mlaudit's loader: float [N, 3, 32, 32] = uint8 / 255
    tmp = Path(tempfile.mkdtemp())
    (tmp / "cifar10").mkdir()
    for split, d in (("train", data.train), ("test", data.test)):
        x = (d.x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # NHWC, as torchvision's CIFAR10
        torch.save({"images": x, "labels": d.y.long(), "classes": list(d.classes)}, tmp / "cifar10" / f"{split}.pt")
    os.chdir(tmp)
    spec = importlib.util.spec_from_file_location("airbench_ref", script)
    ref = importlib.util.module_from_spec(spec)
    sys.argv = [str(script)]
    spec.loader.exec_module(ref)  # defines everything; its __main__ block does not run
    model = ref.CifarNet().cuda().to(memory_format=torch.channels_last)
    model.compile(mode="max-autotune")
    t0 = time.perf_counter()
    ref.main("warmup", model)
    warm = time.perf_counter() - t0
    accs, walls = [], []
    for run in range(args.runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        accs.append(float(ref.main(run, model)))
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    a = np.array(accs)
    res = {"environment": environment(), "reference": "KellerJordan/cifar10-airbench airbench94_muon.py",
           "runs": args.runs, "warmup_compile_s": round(warm, 1), "s_per_model": round(float(np.mean(walls)), 3),
           "wall_s": [round(w, 3) for w in walls], "tta_acc_mean": round(float(a.mean()), 5),
           "tta_acc_sd": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 5), "tta_acc": [round(x, 4) for x in accs]}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
