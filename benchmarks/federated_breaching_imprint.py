"""Robbing the Fed's read-out: mlaudit's ``imprint`` next to breaching 0.1.2's ``imprint-readout`` attacker (the
paper's authors' library) on the same securely aggregated updates (issue 20, validation).

One malicious model (``plant_imprint``: a 3-conv ReLU ConvNet at initialisation behind k brightness bins at the
quantiles of public CIFAR-10 (JPEG) test images), U users x B CIFAR-10 (JPEG) training images, FedSGD, the server
sees only the sum of the users' gradients. Both read the same aggregate: mlaudit with its own recovery
(``imprint``), breaching's ``ImprintAttacker`` with the imprint layer's gradient indices and the
``cumulative`` structure (its bins are ordered as ours: ascending offsets, bin 0 catching everything).
Scored by one function (``metrics.match``, PSNR, data range 1): inputs recovered at >= 30 dB and exactly
(>= 80 dB). breaching's read-out forms differences with the *previous* bin, so its first row is the sum of all
inputs and the inputs above the top offset are not isolated; mlaudit differences with the next bin and reads the
top bin alone.

    python benchmarks/federated_breaching_imprint.py --setups 64x4x8,256x8x8,1024x16x8

(``BINSxUSERSxBATCH``). Writes benchmarks/results/federated_breaching_imprint_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_environment, write_results  # noqa: E402
from federated_breaching import ConvNet, cifar10_bundle, torchvision_stand_in  # noqa: E402

from mlaudit.attacks.federated import Observation, imprint, plant_imprint  # noqa: E402
from mlaudit.attacks.federated.metrics import match  # noqa: E402
from mlaudit.federated import secure_aggregate, user_gradients  # noqa: E402
from mlaudit.query import ParamVector  # noqa: E402

EXACT_DB = 80.0


def breaching_readout(mal: torch.nn.Module, grads: dict[str, Tensor], n: int, shape: tuple[int, ...]) -> Tensor:
    import breaching
    from omegaconf import OmegaConf

    cfg = breaching.get_attack_config("imprint")
    attacker = breaching.attacks.prepare_attack(mal, torch.nn.CrossEntropyLoss(), cfg,
                                                dict(dtype=torch.float, device=torch.device("cpu")))
    names = [name for name, _ in mal.named_parameters()]
    meta = OmegaConf.create({"shape": list(shape), "mean": [0.0] * shape[0], "std": [1.0] * shape[0],
                             "modality": "vision", "classes": 10, "task": "classification"})
    payload = [dict(parameters=[p.detach().clone() for p in mal.parameters()], buffers=None, metadata=meta)]
    shared = [dict(gradients=[grads[name].clone() for name in names], buffers=None,
                   metadata=dict(num_data_points=n, labels=None, local_hyperparams=None))]
    secrets = {"ImprintBlock": {"weight_idx": names.index("imprint.weight"), "bias_idx": names.index("imprint.bias"),
                                "shape": tuple(shape), "structure": "cumulative"}}
    rec, _ = attacker.reconstruct(payload, shared, secrets, dryrun=False)
    return rec["data"].detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default="64x4x8,256x8x8,1024x16x8", help="BINSxUSERSxBATCH, comma-separated")
    ap.add_argument("--public", type=int, default=5000, help="public test images the bins are placed on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="cifar10_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stand_in = torchvision_stand_in()
    import breaching  # noqa: F401  (fail early)

    train = cifar10_bundle().train
    public = cifar10_bundle().test.x[: args.public].float()
    shape = tuple(public.shape[1:])
    rows: list[dict[str, Any]] = []
    for setup in args.setups.split(","):
        bins, users, batch = (int(v) for v in setup.split("x"))
        torch.manual_seed(0)
        mal = plant_imprint(ConvNet(shape[0], 10).eval(), public, bins=bins)
        pick = torch.randperm(len(train.y), generator=torch.Generator().manual_seed(bins + users))[: users * batch]
        x, y = train.x[pick].float(), train.y[pick].long()
        agg = secure_aggregate(user_gradients(mal, x.view(users, batch, *shape), y.view(users, batch)))
        obs = Observation(grad=ParamVector(agg), users=users, batch=batch, input_shape=shape)
        for lib in ("mlaudit", "breaching"):
            t0 = time.perf_counter()
            rec = imprint(mal, obs).x if lib == "mlaudit" else breaching_readout(mal, dict(agg), users * batch, shape)
            wall = time.perf_counter() - t0
            m = match(x, rec.float().clamp(0, 1), data_range=1.0)
            row = {"bins": bins, "users": users, "batch": batch, "inputs": users * batch, "library": lib,
                   "candidates": len(rec), "recovered_30db": int(m.recovered(30.0).sum()),
                   "exact": int(m.recovered(EXACT_DB).sum()), "seconds": round(wall, 3)}
            rows.append(row)
            print(row, flush=True)
    env = cpu_environment(args.threads) | {
                           "breaching": "0.1.2", "torchvision_stand_in": stand_in}
    md = (f"# Robbing the Fed read-out: mlaudit vs breaching on the same aggregates\n\n{env['date']}, {env['machine']}, "
          f"{args.threads} torch thread(s), torch {env['torch']}, breaching 0.1.2"
          f"{' (torchvision replaced by an import-time stand-in)' if stand_in else ''}. CIFAR-10 (JPEG): bins on the "
          f"brightness quantiles of {args.public} test images; users' images from the training split; a 3-conv ReLU "
          "ConvNet at initialisation behind the imprint; FedSGD, secure aggregation (the sum). Recovered: matched "
          f"one-to-one (PSNR) at >= 30 dB; exact: >= {EXACT_DB:g} dB.\n\n"
          "| bins | users x batch | library | candidates | recovered (>= 30 dB) | exact | s |\n"
          "|---:|---:|---|---:|---:|---:|---:|\n")
    for r in rows:
        md += (f"| {r['bins']} | {r['users']} x {r['batch']} | {r['library']} | {r['candidates']} | "
               f"{r['recovered_30db']} / {r['inputs']} | {r['exact']} | {r['seconds']} |\n")
    write_results(f"federated_breaching_imprint_{args.name}", {"environment": env, "settings": vars(args),
                                                                "rows": rows}, md)


if __name__ == "__main__":
    main()
