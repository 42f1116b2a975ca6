"""Probe (issue 16): do two mlaudit trees give the same adversarial examples? Runs the evasion calls (fgsm; pgd l-inf /
l2 with ce / dlr / margin, 1 and 3 restarts, targeted, mini-batches, eot 2, no random start, a 0-255 box; apgd,
apgd-dlr, apgd-t, cw, autoattack; fab / fab-t in l-inf, l2 and l1; square in l-inf and l2; pgd_loss_curve) on a small
MLP with some examples fooled early, and crafting-engine calls as the poisoning, canary and inversion code makes them
(signed Adam with augmentation, restarts, keep-best and early stop; losses of -0.0; Adam on l2 with mini-batches; parallel restarts of
a batched objective; a joint (scalar) objective on the box with the step schedule and on_step; Free; a given init
with the cosine schedule; APGD; the CUDA early-stop policy forced on the CPU; zero steps; final_eval off), saving
every result field (delta, objective, per_sample, history, restarts, done) and the messages of refused calls (a
non-finite objective, a wrong objective shape, bad labels). On the CPU with one thread; ``--compare`` lists the calls
whose outputs differ (bitwise: tensors with torch.equal, floats by repr, so -0.0 is not 0.0) between two saved files.

    git archive <commit> src | tar -x -C /tmp/before
    python benchmarks/probes/evasion_same_results.py --src /tmp/before/src --save /tmp/before.pt
    python benchmarks/probes/evasion_same_results.py --save /tmp/after.pt
    python benchmarks/probes/evasion_same_results.py --compare /tmp/before.pt /tmp/after.pt
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(save: Path) -> None:
    import torch
    from torch import nn

    import mlaudit
    from mlaudit.attacks.evasion import EVASION_ATTACKS, apgd, apgd_targeted, cw_l2, fgsm, pgd

    print(f"mlaudit from {Path(mlaudit.__file__).parents[1]}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(40, 1, 8, 8)
    y = model(x).argmax(1)          # all correct at the start, some fooled along the way
    y[::7] = (y[::7] + 1) % 10      # and some misclassified from the start
    tgt = (y + 3) % 10
    out = {}

    def gen(s: int) -> torch.Generator:
        return torch.Generator().manual_seed(s)

    for norm, eps in (("linf", 0.05), ("l2", 0.5)):
        out[f"fgsm {norm}"] = fgsm(model, x, y, eps=eps, norm=norm)
        out[f"fgsm {norm} margin"] = fgsm(model, x, y, eps=eps, norm=norm, loss="margin")
        for loss in ("ce", "dlr", "margin"):
            for restarts in (1, 3):
                out[f"pgd {norm} {loss} r{restarts}"] = pgd(model, x, y, eps=eps, norm=norm, loss=loss, steps=7,
                                                            restarts=restarts, generator=gen(1))
            out[f"pgd {norm} {loss} targeted"] = pgd(model, x, y, eps=eps, norm=norm, loss=loss, steps=7, target=tgt,
                                                     generator=gen(2))
        out[f"pgd {norm} batch_size 16"] = pgd(model, x, y, eps=eps, norm=norm, steps=5, batch_size=16, generator=gen(3))
        out[f"pgd {norm} eot 2"] = pgd(model, x, y, eps=eps, norm=norm, steps=5, eot=2, generator=gen(4))
        out[f"pgd {norm} no random start"] = pgd(model, x, y, eps=eps, norm=norm, steps=5, random_start=False)
        out[f"apgd {norm}"] = apgd(model, x, y, eps=eps, norm=norm, steps=20)
        out[f"apgd {norm} dlr"] = apgd(model, x, y, eps=eps, norm=norm, steps=20, loss="dlr")
        out[f"apgd-t {norm}"] = apgd_targeted(model, x, y, eps=eps, norm=norm, steps=10)
    out["cw"] = cw_l2(model, x, y, steps=20, search_steps=2)
    out["pgd box 0-255"] = pgd(model, x * 255, y, eps=8.0, box=(0.0, 255.0), steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["autoattack"] = EVASION_ATTACKS.get("autoattack")(model, x[:12], y[:12], eps=0.05, square_queries=50)
    for norm, eps in (("linf", 0.05), ("l2", 0.5), ("l1", 2.0)):
        out[f"fab {norm}"] = EVASION_ATTACKS.get("fab")(model, x, y, eps=eps, norm=norm, steps=10, generator=gen(5))
    out["fab-t linf"] = EVASION_ATTACKS.get("fab-t")(model, x, y, eps=0.05, steps=10, generator=gen(6))
    for norm, eps in (("linf", 0.05), ("l2", 0.5)):
        out[f"square {norm}"] = EVASION_ATTACKS.get("square")(model, x, y, eps=eps, norm=norm, n_queries=40,
                                                              generator=gen(7))
    from mlaudit.attacks.evasion.sanity import pgd_loss_curve
    out["pgd_loss_curve"] = pgd_loss_curve(model, x, y, eps=0.05, steps=6)
    out.update(engine_calls(model, x, y))
    torch.save(out, save)
    print(f"{len(out)} outputs saved to {save}")


def engine_calls(model, x, y) -> dict:
    """Crafting-engine calls with every result field, as the poisoning / canary / inversion / training code makes
    them, and the messages of refused calls."""
    import torch
    import torch.nn.functional as F

    from mlaudit.craft import Box, Free, L2Ball, LinfBall, craft, engine
    from mlaudit.data.augment import AugmentSpec
    from mlaudit.errors import ConfigError
    from mlaudit.query.modes import evaluating

    def gen(s: int) -> torch.Generator:
        return torch.Generator().manual_seed(s)

    class Separable:
        """CE with a done flag (misclassified), and its batched form for parallel restarts."""

        def __call__(self, xa, idx):
            z = model(xa)
            return -F.cross_entropy(z, y[idx], reduction="none"), z.argmax(1) != y[idx]

        def batched(self, xa, idx):
            g, b = xa.shape[:2]
            z = model(xa.flatten(0, 1))
            yy = y[idx].repeat(g)
            return -F.cross_entropy(z, yy, reduction="none").view(g, b), (z.argmax(1) != yy).view(g, b)

    def joint(xa, idx):  # a scalar, as gradient matching returns
        return F.cross_entropy(model(xa), (y[idx] + 1) % 10)

    def fields(res) -> dict:
        return {"delta": res.delta, "objective": res.objective, "per_sample": res.per_sample,
                "history": res.history, "restarts": res.restarts, "done": res.done}

    seen: list[tuple[int, float]] = []
    calls = {
        "signed-adam augment restarts keep_best early_stop": dict(
            objective=Separable(), constraint=LinfBall(0.05), steps=8, optimizer="signed-adam", lr=0.1, restarts=2,
            init="random", augment=AugmentSpec(crop_pad=2, flip=True), generator=gen(8), keep_best=True,
            early_stop=True),
        "adam l2 batch_size 16 restarts 2": dict(
            objective=Separable(), constraint=L2Ball(0.5), steps=6, optimizer="adam", lr=0.2, schedule="constant",
            restarts=2, init="random", batch_size=16, generator=gen(9), keep_best=True),
        "parallel restarts 3 of a batched objective": dict(
            objective=Separable(), constraint=LinfBall(0.05), steps=5, optimizer="pgd", lr=0.25, restarts=3,
            parallel_restarts=3, init="random", generator=gen(10), keep_best=True, early_stop=True),
        "joint objective on the box, step schedule, on_step": dict(
            objective=joint, constraint=Box(), steps=9, optimizer="signed-adam", lr=0.05, schedule="step",
            on_step=lambda s, v: seen.append((s, v))),
        "joint objective, 2 restarts, mini-batches": dict(
            objective=joint, constraint=LinfBall(0.1), steps=4, optimizer="pgd", lr=0.5, restarts=2, batch_size=16,
            init="random", generator=gen(11)),
        "free pgd keep_best": dict(objective=Separable(), constraint=Free(), steps=5, optimizer="pgd", lr=0.01,
                                   schedule="constant", keep_best=True),
        "given init, cosine": dict(objective=Separable(), constraint=L2Ball(0.3), steps=5, optimizer="pgd", lr=0.3,
                                   schedule="cosine", init=torch.rand(x.shape, generator=gen(12)) - 0.5),
        "apgd l2 early_stop": dict(objective=Separable(), constraint=L2Ball(0.5), steps=12, optimizer="apgd", lr=2.0,
                                   init="random", generator=gen(13), keep_best=True, early_stop=True),
        "pgd linf early_stop, no keep_best, final_eval off": dict(
            objective=Separable(), constraint=LinfBall(0.05), steps=7, optimizer="pgd", lr=0.25,
            schedule="constant", init="random", generator=gen(14), early_stop=True, final_eval=False),
        "pgd l2 early_stop, no keep_best, final_eval on": dict(
            objective=Separable(), constraint=L2Ball(0.5), steps=7, optimizer="pgd", lr=0.25, schedule="constant",
            init="random", generator=gen(15), early_stop=True),
        "losses of -0.0 (totals 0.0)": dict(objective=lambda xa, idx: -(xa.flatten(1).sum(1) * 0.0),
                                            constraint=LinfBall(0.05), steps=2, optimizer="pgd", lr=0.25,
                                            on_step=lambda s, v: seen.append((s, v))),
        "zero steps": dict(objective=Separable(), constraint=LinfBall(0.05), steps=0, optimizer="pgd", lr=0.25),
        "fgsm-like, no flag": dict(objective=lambda xa, idx: -F.cross_entropy(model(xa), y[idx], reduction="none"),
                                   constraint=LinfBall(0.05), steps=1, optimizer="pgd", lr=1.0, schedule="constant",
                                   final_eval=False),
    }
    out: dict = {}
    with evaluating(model, requires_grad=False):
        for name, kw in calls.items():
            out[f"engine: {name}"] = fields(craft(x=x, **kw))
        out["engine: on_step values"] = seen
        # the CUDA early-stop policy (counts read a step late, done samples held until they cost 2 passes) on the CPU
        lagged, shrink = engine._lagged_counts, engine._shrink_passes
        engine._lagged_counts, engine._shrink_passes = (lambda _: True), (lambda _: 2.0)
        try:
            for name in ("pgd linf early_stop, no keep_best, final_eval off", "apgd l2 early_stop",
                         "signed-adam augment restarts keep_best early_stop"):
                kw = dict(calls[name])
                if "generator" in kw:
                    kw["generator"] = gen(16)
                out[f"engine lagged: {name}"] = fields(craft(x=x, **kw))
        finally:
            engine._lagged_counts, engine._shrink_passes = lagged, shrink

        def bad(kw: dict) -> str:
            try:
                craft(x=x, **kw)
            except ConfigError as e:
                return str(e)
            return "no error"

        def nan_at(k: int, per_sample: bool):
            n = [0]

            def obj(xa, idx):
                n[0] += 1
                v = -F.cross_entropy(model(xa), y[idx], reduction="none")
                v = v * float("nan") if n[0] > k else v
                return (v, torch.zeros_like(v, dtype=torch.bool)) if per_sample else v.sum()
            return obj

        out["refused: nan, fgsm-like"] = bad(dict(objective=nan_at(0, False), constraint=LinfBall(0.05), steps=1,
                                                  optimizer="pgd", final_eval=False))
        out["refused: nan at step 3, early stop"] = bad(dict(objective=nan_at(3, True), constraint=LinfBall(0.05),
                                                             steps=6, optimizer="pgd", early_stop=True))
        out["refused: nan at step 2, joint"] = bad(dict(objective=nan_at(2, False), constraint=LinfBall(0.05),
                                                        steps=5, optimizer="signed-adam"))
        out["refused: wrong shape"] = bad(dict(objective=lambda xa, idx: model(xa), constraint=LinfBall(0.05),
                                               steps=2, optimizer="pgd"))
        out["refused: keep_best on a scalar"] = bad(dict(objective=joint, constraint=LinfBall(0.05), steps=2,
                                                         optimizer="pgd", keep_best=True))
    from mlaudit.attacks.evasion import fgsm, pgd

    def refused(fn) -> str:
        try:
            fn()
        except ConfigError as e:
            return str(e)
        return "no error"

    out["refused: fgsm labels"] = refused(lambda: fgsm(model, x, y + 10))
    out["refused: pgd eps"] = refused(lambda: pgd(model, x, y, eps=2.0))
    out["refused: pgd x range"] = refused(lambda: pgd(model, x + 1, y))
    out["refused: fgsm nan model"] = refused(lambda: fgsm(lambda_nan(model), x, y))
    return out


def lambda_nan(model):
    """The model with NaN logits after its first call (the probe of check_inputs passes, the attack does not)."""
    import torch
    from torch import nn

    class Nan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.calls = model, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            z = self.inner(x)
            return z * float("nan") if self.calls > 2 else z

    return Nan().eval()


def same(a: object, b: object) -> bool:
    """Bitwise equality of saved outputs: tensors (dtype, shape, values; NaN equal to NaN), floats by repr, and
    lists, tuples and dicts of them."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
                and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.signbit(), b.signbit())
                if a.is_floating_point() else torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return type(a) is type(b) and repr(a) == repr(b)


def compare(a: Path, b: Path) -> None:
    import torch

    ra, rb = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    differ = [k for k in ra if k not in rb or not same(ra[k], rb[k])]
    missing = [k for k in rb if k not in ra]
    print(f"{len(ra)} calls; bitwise different: {differ or 'none'}" + (f"; only in the second: {missing}" if missing else ""))
    sys.exit(1 if differ or missing else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=str(ROOT / "src"), help="the tree mlaudit is imported from")
    ap.add_argument("--save", type=Path)
    ap.add_argument("--compare", type=Path, nargs=2)
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    sys.path.insert(0, args.src)
    run(args.save)


if __name__ == "__main__":
    main()
