"""Which setting makes the graphed compiled step's loss NaN (issue 23, 2026-12-07 sixth session)?

On an H100 the GPU test ``test_compile_auto_probe_and_the_factory_run_on_cuda`` failed: pick_compile's compiled
probe (fastcnn, 2 models, batch 32, bf16 autocast, 4 steps per epoch, triangular lr 0.05, momentum 0.9) raised
"loss became NaN/inf ... at epoch 1, step 2 (global step 2)", i.e. on the first captured step (two eager warm-up
steps, then capture). ``test_cuda_graph_captures_the_compiled_step`` (fp32, batch 64, same model) passed before it
in the same process. This probe trains that setting and one-change variants, each in its own process (a fresh
dynamo cache; run concurrently), and prints per variant: ok / the error, the final losses and the step path.

    python benchmarks/probes/compile_graph_nan.py --out /tmp/w/compile_graph_nan.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANTS: dict[str, dict] = {
    "bf16_b32_k2_graph_compile": {},
    "fp32": {"precision": "fp32"},
    "b64": {"batch_size": 64},
    "no_graph": {"cuda_graph": False},
    "k1": {"k": 1},
    "no_compile": {"compile": False},
    "lr_0.005": {"lr": 0.005},
    "no_streams": {"streams": False},
    "fp32_b64_after_bf16": {"sequence": [{}, {"precision": "fp32", "batch_size": 64}]},
    "bf16_after_fp32_b64": {"sequence": [{"precision": "fp32", "batch_size": 64}, {}]},
}


def one(change: dict) -> dict:
    import torch

    from mlaudit.data.registry import DatasetSpec, load_dataset
    from mlaudit.models import ModelSpec
    from mlaudit.models.registry import build_model
    from mlaudit.train import Recipe, init_models, train_stack

    out = []
    for part in change.get("sequence", [change]):
        part = dict(part)
        k = part.pop("k", 2)
        lr = part.pop("lr", 0.05)
        streams = part.pop("streams", True)
        if not streams:
            import mlaudit.train.loop as loop_mod
            loop_mod.model_streams = lambda device, k: None
        base = {"lr": lr, "momentum": 0.9, "epochs": 3, "batch_size": 32, "schedule": "triangular",
                "augment": "none", "compile": True, "cuda_graph": True}
        r = Recipe(**{**base, **part})
        spec = DatasetSpec(name="synthetic", options={"n_train": 256, "n_test": 64, "shape": [3, 32, 32],
                                                      "num_classes": 10})
        data = load_dataset(spec).train
        data = data.subset(torch.arange(128))
        fn = lambda: build_model(ModelSpec(name="fastcnn"), input_shape=(3, 32, 32), num_classes=10)  # noqa: E731
        losses: list[list[float]] = []
        try:
            res = train_stack(init_models(fn, range(k)), data, r, seeds=list(range(k)), lr=lr,
                              device=torch.device("cuda"), strategy="loop",
                              on_epoch=lambda e, loss: losses.append([round(float(v), 4) for v in loss]))
            out.append({"ok": True, "losses": losses, "path": [o.step_path for o in res]})
        except Exception as e:  # noqa: BLE001
            out.append({"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}", "losses": losses})
    return {"parts": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(VARIANTS[args.one])))
        return
    procs = {n: subprocess.Popen([sys.executable, __file__, "--one", n], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for n in VARIANTS}
    res = {}
    for n, p in procs.items():
        text, _ = p.communicate(timeout=400)
        lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        res[n] = json.loads(lines[-1][7:]) if lines else {"crashed": text[-1500:]}
        print(n, json.dumps(res[n]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
