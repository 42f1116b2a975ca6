"""Honest-but-curious gradient inversion: mlaudit's Inverting Gradients next to the ``breaching`` library's
(JonasGeiping/breaching, PyPI 0.1.2, by the paper's first author) on the same updates (issue 20, validation).

Geiping et al. 2020, "Inverting Gradients": minimise 1 - cos(grad L(x, y), g*) + TV prior over x in the pixel
box with signed Adam and step decay. One user's FedSGD update (the gradient of its mean loss on a batch of B
images, labels given to both attacks), the same model weights, the same number of iterations; each library
with its own defaults otherwise (mlaudit: lr 0.1, tv 1e-4 on its TV; breaching ``invertinggradients``: step
0.1, TV scale 0.2 on its TV, random-normal start). Quality: PSNR of the best one-to-one assignment of
reconstructions to the user's images (``mlaudit.attacks.federated.metrics.match``, data range 1), so both
are scored by one function.

Data: CIFAR-10 (JPEG) test images when the pack is present (``--data cifar10``), else scikit-learn's digits
(8x8, upscaled to 16x16 by repetition); model: a small ReLU ConvNet defined here, seeded, at initialisation
(the setting where inversion works best; the paper's untrained-network rows).

breaching imports torchvision at import time for its datasets and model zoo, which its attacks do not use;
where torchvision cannot be imported (the PyPI wheel's C ops do not load with a CPU-only torch of another
build), this script puts a minimal stand-in for those import-time names in ``sys.modules`` first and says so
in the results.

    python benchmarks/federated_breaching.py --steps 2000 --batches 1,4 --images 3
    python benchmarks/federated_breaching.py --attack dlg --steps 300 --batches 1 --images 3 --name cifar10_dlg_cpu

``--attack dlg`` compares DLG (Zhu et al. 2019; l2 gradient matching with the labels optimised jointly, no
labels given): breaching's ``deepleakage`` (L-BFGS) against mlaudit's ``dlg`` (Adam), iterations equal.

Writes benchmarks/results/federated_breaching_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PACK_CANDIDATES, cifar10_jpeg, cifar10_pack, cpu_environment, write_results  # noqa: E402

from mlaudit.attacks.federated import Observation, dlg, inverting_gradients  # noqa: E402
from mlaudit.attacks.federated.metrics import match  # noqa: E402
from mlaudit.federated.updates import user_gradients  # noqa: E402
from mlaudit.query import ParamVector  # noqa: E402
from mlaudit.stats import mean_se  # noqa: E402


def torchvision_stand_in() -> bool:
    """Make ``import breaching`` work without torchvision's compiled ops; True when a stand-in was installed."""
    try:
        importlib.import_module("torchvision")
        return False
    except Exception:  # noqa: BLE001 - any import failure: ABI mismatch, missing ops, not installed
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

    def mod(name: str, **attrs: Any) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    def unavailable(*_: Any, **__: Any) -> None:
        raise RuntimeError("torchvision stand-in: not available in this benchmark")

    class _DenseLayer(nn.Module):  # breaching subclasses it at import time; never instantiated here
        pass

    tv = mod("torchvision")
    tv.transforms = mod("torchvision.transforms", ToTensor=unavailable, Normalize=unavailable, Compose=unavailable)
    tv.datasets = mod("torchvision.datasets", CIFAR10=unavailable, CIFAR100=unavailable, ImageNet=unavailable)
    tv.datasets.utils = mod("torchvision.datasets.utils", download_and_extract_archive=unavailable)
    tv.models = mod("torchvision.models", resnet50=unavailable)
    tv.models.densenet = mod("torchvision.models.densenet", _DenseLayer=_DenseLayer)
    tv.models.resnet = mod("torchvision.models.resnet")
    tv.utils = mod("torchvision.utils", save_image=unavailable)
    return True


class ConvNet(nn.Module):
    """[B, C, H, W] -> [B, classes]: three 3x3 ReLU convs (16, 32, 64 channels, the last two stride 2), mean pool."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def load_images(data: str, count: int, seed: int) -> tuple[Tensor, Tensor, str]:
    """count images in [0, 1] [N, C, H, W], labels [N], a description."""
    g = np.random.default_rng(seed)
    if data == "cifar10":
        test = cifar10_bundle().test
        idx = torch.from_numpy(g.choice(len(test.y), count, replace=False))
        return test.x[idx].float(), test.y[idx].long(), f"CIFAR-10 (JPEG) test images ({cifar10_pack()})"
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = g.choice(len(d.target), count, replace=False)
    x = torch.from_numpy(d.images[idx]).float().div(16).unsqueeze(1).repeat_interleave(2, 2).repeat_interleave(2, 3)
    return x, torch.from_numpy(d.target[idx]).long(), "scikit-learn digits, 8x8 upscaled to 16x16"


@functools.lru_cache(maxsize=1)
def cifar10_bundle() -> Any:
    """CIFAR-10 (JPEG), decoded once per process (the imprint benchmark reuses it)."""
    return cifar10_jpeg()


def run_mlaudit(model: nn.Module, grads: dict[str, Tensor], y: Tensor, shape: tuple[int, ...], steps: int,
                seed: int, tv: float | None = None) -> Tensor:
    obs = Observation(grad=ParamVector(grads), users=1, batch=len(y), input_shape=shape)
    opts = {} if tv is None else {"tv": tv}
    return inverting_gradients(model, obs, labels=y, steps=steps, generator=torch.Generator().manual_seed(seed),
                               **opts).x


def run_mlaudit_dlg(model: nn.Module, grads: dict[str, Tensor], y: Tensor, shape: tuple[int, ...], steps: int,
                    seed: int) -> Tensor:
    """DLG (Zhu et al. 2019): l2 gradient matching, labels optimised jointly (none given)."""
    obs = Observation(grad=ParamVector(grads), users=1, batch=len(y), input_shape=shape)
    return dlg(model, obs, steps=steps, generator=torch.Generator().manual_seed(seed)).x


def run_breaching(model: nn.Module, grads: dict[str, Tensor], y: Tensor, shape: tuple[int, ...], steps: int,
                  seed: int, attack: str = "invertinggradients") -> Tensor:
    import breaching
    from omegaconf import OmegaConf

    cfg = breaching.get_attack_config(attack)
    cfg.optim.max_iterations = steps
    cfg.optim.callback = steps + 1  # no progress printing
    torch.manual_seed(seed)
    attacker = breaching.attacks.prepare_attack(model, nn.CrossEntropyLoss(), cfg,
                                                dict(dtype=torch.float, device=torch.device("cpu")))
    meta = OmegaConf.create({"shape": list(shape), "mean": [0.0] * shape[0], "std": [1.0] * shape[0],
                             "modality": "vision", "classes": int(model.head.out_features), "task": "classification"})
    payload = [dict(parameters=[p.detach().clone() for p in model.parameters()], buffers=None, metadata=meta)]
    shared = [dict(gradients=[grads[n].clone() for n, _ in model.named_parameters()], buffers=None,
                   metadata=dict(num_data_points=len(y), labels=None if attack == "deepleakage" else y.clone(),
                                 local_hyperparams=None))]
    rec, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    return rec["data"].detach().clamp(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=["cifar10", "digits"], default="cifar10" if any(p and Path(p).is_file()
                    for p in PACK_CANDIDATES) else "digits")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batches", default="1,4", help="comma-separated batch sizes of the one user")
    ap.add_argument("--images", type=int, default=3, help="updates per batch size (different images and seeds)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mlaudit-tv", type=float, default=None, help="mlaudit's TV weight (default: its default)")
    ap.add_argument("--libraries", default="mlaudit,breaching")
    ap.add_argument("--attack", choices=["ig", "dlg"], default="ig",
                    help="ig: Inverting Gradients (labels given); dlg: DLG (labels optimised jointly; breaching's "
                         "deepleakage config, L-BFGS, vs mlaudit's dlg, Adam)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stand_in = torchvision_stand_in()
    import breaching  # noqa: F401  (fail early, before any work)

    batches = [int(b) for b in args.batches.split(",")]
    rows: list[dict[str, Any]] = []
    desc = ""
    for b in batches:
        for i in range(args.images):
            seed = 1000 * b + i
            x, y, desc = load_images(args.data, b, seed)
            torch.manual_seed(seed)
            model = ConvNet(x.shape[1], 10).eval()
            g = user_gradients(model, x[None], y[None])
            grads = {n: t[0] for n, t in g.items()}
            runs = ({"mlaudit": functools.partial(run_mlaudit, tv=args.mlaudit_tv), "breaching": run_breaching}
                    if args.attack == "ig" else
                    {"mlaudit": run_mlaudit_dlg, "breaching": functools.partial(run_breaching, attack="deepleakage")})
            for lib in args.libraries.split(","):
                t0 = time.perf_counter()
                rec = runs[lib](model, grads, y, tuple(x.shape[1:]), args.steps, seed)
                wall = time.perf_counter() - t0
                m = match(x, rec.float(), data_range=1.0)
                rows.append({"library": lib, "batch": b, "update": i, "psnr_mean": float(m.psnr.nanmean()),
                             "psnr": m.psnr.tolist(), "ssim_mean": float(m.ssim.nanmean()) if m.ssim is not None else None,
                             "wall_s": round(wall, 2)})
                print(f"batch {b} update {i} {lib}: PSNR {rows[-1]['psnr_mean']:.2f} dB, {wall:.1f} s", flush=True)
    env = cpu_environment(args.threads, data=desc) | {
                           "breaching": "0.1.2", "torchvision_stand_in": stand_in}
    title = "Inverting Gradients" if args.attack == "ig" else "DLG"
    labels_note = ("labels given to both" if args.attack == "ig" else
                   "no labels given (both optimise them jointly; breaching's deepleakage with L-BFGS, mlaudit's dlg "
                   "with Adam)")
    md = (f"# {title}: mlaudit vs breaching on the same updates\n\n{env['date']}, {env['machine']}, "
          f"{args.threads} torch thread(s), torch {env['torch']}, breaching 0.1.2"
          f"{' (torchvision replaced by an import-time stand-in, see the script)' if stand_in else ''}. Data: {desc}; "
          f"model: a 3-conv ReLU ConvNet at initialisation (seeded per update); one user's FedSGD update (mean-loss "
          f"gradient of its batch), {labels_note}; {args.steps} iterations each; each library's own defaults "
          f"otherwise{'' if args.mlaudit_tv is None else f' (mlaudit tv = {args.mlaudit_tv:g})'}. PSNR (dB, higher = closer) of the best one-to-one assignment, by one function for both; "
          f"mean ± SE over {args.images} updates per batch size.\n\n"
          "| batch | library | PSNR (dB) | SSIM | s per attack |\n|---|---|---:|---:|---:|\n")
    summary = {}
    for b in batches:
        for lib in args.libraries.split(","):
            r = [row for row in rows if row["batch"] == b and row["library"] == lib]
            p = np.array([row["psnr_mean"] for row in r])
            s = np.array([row["ssim_mean"] for row in r], dtype=float)
            w = np.array([row["wall_s"] for row in r])
            _, se = mean_se(p)
            summary[f"{lib}@{b}"] = {"psnr": float(p.mean()), "psnr_se": float(se), "ssim": float(np.nanmean(s)),
                                     "wall_s": float(w.mean())}
            md += f"| {b} | {lib} | {p.mean():.2f} ± {se:.2f} | {np.nanmean(s):.3f} | {w.mean():.1f} |\n"
    write_results(f"federated_breaching{'_' + args.name if args.name else ''}",
                  {"environment": env, "settings": vars(args), "data": desc, "rows": rows, "summary": summary}, md)


if __name__ == "__main__":
    main()
