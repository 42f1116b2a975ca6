"""Evasion attacks: mlaudit's FGSM / PGD / APGD / FAB-T / CW / Square / ensemble next to torchattacks 3.5.1, side by side
in one run on the same models and the same test examples (CPU, or a GPU with ``--device cuda``).

    pip install -e '.[bench]'            # torchattacks==3.5.1, a benchmark dependency only
    python benchmarks/evasion.py --examples 359 --name digits_cpu
    python benchmarks/evasion.py --examples 200 --seeds 5 --name digits_cpu_seeds    # mean and spread over seeds
    python benchmarks/evasion.py --dataset cifar10 --device cuda --models airbench --recipe airbench-muon \
        --adversarial 8/255 --eps 8/255 --eps-l2 0.5 --examples 1000 --name cifar10_airbench_h200

``--dataset cifar10`` uses the CIFAR-10 (JPEG) pack (benchmarks/_common.py); ``--adversarial EPS`` also
trains each architecture with PGD adversarial training (``recipe.adversarial``: l-inf PGD-7 at EPS, Madry
et al. 2018) and attacks both the standard and the adversarially trained model.

Models: the zoo's ``fastcnn`` (a small CNN) and ``mlp``, each trained by mlaudit's own loop
(``mlaudit.train.train``, recipe ``fast``) on sklearn digits (8x8, pixels in [0, 1]). Every pair of
attacks gets the same budget (eps, steps, restarts, loss) and both are timed on the same inputs.
Robust accuracy = accuracy on the attacked test examples (clean mistakes count as not robust);
for CW (minimal l2, no eps) the success rate, the median l2 of successes and robust accuracy at
l2 <= eps_l2. Square (``--square-queries`` queries, p_init 0.8, margin loss) runs twice on our side: with
the paper's window offsets 0 .. H - s (our default) and with the authors' code's 0 .. H - s - 1, the
range torchattacks' port also draws from. FAB-T: 100 steps, 1 restart, the 9 highest wrong classes, both sides.
``--seeds N`` repeats every attack with the random seeds 0 .. N-1 on both sides (random starts, Square's and
FAB's draws; CW and FGSM draw nothing) and reports the mean robust accuracy with its spread and the mean paired
difference: a single seed's gap of a point or two on 200 examples is within the spread of random starts
(docs/evasion.md). "AutoAttack linf" is each library's standard version (APGD-CE, APGD-T, FAB-T, Square with 5000 queries). Threads: 1 by default (the machine is shared; two threads were 20x slower under load).

FAB l1 (``--eps-l1``, default 2.0 on digits' 64 pixels in [0, 1]): untargeted FAB-100 and FAB-T-100 at that l1
eps, FAB-100 without eps (the median l1 norm of the smallest adversarial points) and FAB-100 with 3 restarts
(the random l1 starts). torchattacks 3.5.1's ``FAB(norm="L1")`` crashes in ``perturb`` (``res``, the
per-example size checked against eps, is computed for Linf and L2 only: UnboundLocalError), so its side runs
the class's own ``attack_single_run`` / ``attack_single_run_targeted`` per restart and target class, on the
still-unbroken examples, with the size measured in l1 (:func:`_torchattacks_fab_l1`), the loop ``perturb``
runs for the other norms.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torchattacks
from torch import Tensor, nn

from mlaudit.attacks.evasion import (
    apgd,
    apgd_targeted,
    autoattack,
    cw_l2,
    fab,
    fab_targeted,
    fgsm,
    pgd,
    square,
)
from mlaudit.data import load_dataset
from mlaudit.models import build_model
from mlaudit.train import train

try:
    from _common import RESULTS
except ImportError:  # run as a module
    from benchmarks._common import RESULTS


def _authors_offsets(attack: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``attack`` with the Square Attack's window offsets drawn as in the authors' code (0 .. H - s - 1)."""
    def run(m: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        mod = sys.modules["mlaudit.attacks.evasion.square"]
        old, mod._AUTHORS_OFFSETS = mod._AUTHORS_OFFSETS, True
        try:
            return attack(m, x, y)
        finally:
            mod._AUTHORS_OFFSETS = old
    return run


def _torchattacks_fab_l1(m: nn.Module, eps: float | None, steps: int, restarts: int = 1, targets: int = 0,
                         seed: int = 0) -> Callable[[Tensor, Tensor], Tensor]:
    """torchattacks 3.5.1's FAB in l1 through ``attack_single_run`` (untargeted; ``targets`` > 0: FAB-T over the
    2nd .. (targets + 1)-th highest classes through ``attack_single_run_targeted``), ``restarts`` runs per target
    (the later ones from its random start), each on the examples not yet broken within ``eps`` (any size
    without eps); x_adv [N, *shape] is x where none was found. ``FAB.perturb`` itself fails for L1 (see the
    module docstring)."""
    atk = torchattacks.FAB(m, norm="L1", eps=5.0 if eps is None else eps, steps=steps, n_restarts=restarts,
                           multi_targeted=targets > 0, n_classes=10, seed=seed)

    def run(x: Tensor, y: Tensor) -> Tensor:
        adv = x.clone()
        with torch.no_grad():
            todo = m(x).argmax(1) == y
            torch.random.manual_seed(seed)
            for tc in range(2, targets + 2) if targets else [None]:
                atk.target_class = tc
                for k in range(restarts):
                    rows = todo.nonzero()[:, 0]
                    if len(rows) == 0:
                        break
                    single = atk.attack_single_run if tc is None else atk.attack_single_run_targeted
                    a = single(x[rows], y[rows], use_rand_start=k > 0)
                    size = (a - x[rows]).flatten(1).abs().sum(1)
                    broken = (m(a).argmax(1) != y[rows]) & (size <= (math.inf if eps is None else eps))
                    adv[rows[broken]] = a[broken]
                    todo[rows[broken]] = False
        return adv
    return run


def pairs(eps: float, eps_l2: float, steps: int, queries: int = 1000, seed: int = 0,
          eps_l1: float = 2.0) -> dict[str, tuple[Callable[..., Tensor], Callable[..., Any]]]:
    """name -> (ours(model, x, y), torchattacks factory(model)), both with the same settings and random seed
    (ours: a CPU generator seeded ``seed``, a fresh one per call; seed 0 is each library's default)."""
    a = eps / 4

    def g() -> torch.Generator | None:
        return None if seed == 0 else torch.Generator().manual_seed(seed)
    sq_linf = (lambda m, x, y: square(m, x, y, eps=eps, n_queries=queries, generator=g()),
               lambda m: torchattacks.Square(m, norm="Linf", eps=eps, n_queries=queries, p_init=0.8, seed=seed))
    sq_l2 = (lambda m, x, y: square(m, x, y, eps=eps_l2, norm="l2", n_queries=queries, generator=g()),
             lambda m: torchattacks.Square(m, norm="L2", eps=eps_l2, n_queries=queries, p_init=0.8, seed=seed))
    return {
        "FGSM linf": (lambda m, x, y: fgsm(m, x, y, eps=eps), lambda m: torchattacks.FGSM(m, eps=eps)),
        "PGD-10 linf": (lambda m, x, y: pgd(m, x, y, eps=eps, steps=10, step_size=a, generator=g()),
                        lambda m: torchattacks.PGD(m, eps=eps, alpha=a, steps=10, random_start=True)),
        "PGD-20 linf": (lambda m, x, y: pgd(m, x, y, eps=eps, steps=20, step_size=eps / 8, generator=g()),
                        lambda m: torchattacks.PGD(m, eps=eps, alpha=eps / 8, steps=20, random_start=True)),
        "PGD-10 l2": (lambda m, x, y: pgd(m, x, y, eps=eps_l2, norm="l2", steps=10, step_size=eps_l2 / 4,
                                                  generator=g()),
                      lambda m: torchattacks.PGDL2(m, eps=eps_l2, alpha=eps_l2 / 4, steps=10, random_start=True)),
        f"APGD-CE-{steps} linf": (lambda m, x, y: apgd(m, x, y, eps=eps, steps=steps, loss="ce", generator=g()),
                                  lambda m: torchattacks.APGD(m, norm="Linf", eps=eps, steps=steps, loss="ce", seed=seed)),
        f"APGD-DLR-{steps} linf": (lambda m, x, y: apgd(m, x, y, eps=eps, steps=steps, loss="dlr", generator=g()),
                                   lambda m: torchattacks.APGD(m, norm="Linf", eps=eps, steps=steps, loss="dlr", seed=seed)),
        f"APGD-T-{steps} linf": (lambda m, x, y: apgd_targeted(m, x, y, eps=eps, steps=steps, targets=9,
                                                                       generator=g()),
                                 lambda m: torchattacks.APGDT(m, norm="Linf", eps=eps, steps=steps, n_classes=10, seed=seed)),
        "FAB-T-100 linf": (lambda m, x, y: fab_targeted(m, x, y, eps=eps, steps=100, restarts=1, n_target_classes=9,
                                                        generator=g()),
                           lambda m: torchattacks.FAB(m, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                                                      n_classes=10, seed=seed)),
        # both standard versions: APGD-CE, APGD-T, FAB-T, Square-5000 (ours: FAB-T 100 steps as in AutoAttack;
        # torchattacks' standard version builds its FAB with the class default, 10 steps)
        "AutoAttack linf": (lambda m, x, y: autoattack(m, x, y, eps=eps, generator=g()),
                            lambda m: torchattacks.AutoAttack(m, norm="Linf", eps=eps, version="standard", n_classes=10,
                                                              seed=seed)),
        # the same ensemble at each budget on both sides: torchattacks' "standard" runs APGD, APGD-T and FAB-T
        # with 10 steps each (its class defaults); Croce & Hein's standard version uses 100
        "AutoAttack linf, 10-step members (torchattacks' standard budget)": (
            lambda m, x, y: autoattack(m, x, y, eps=eps, members=_aa_members(10), generator=g()),
            lambda m: torchattacks.AutoAttack(m, norm="Linf", eps=eps, version="standard", n_classes=10, seed=seed)),
        "AutoAttack linf, 100-step members (Croce & Hein's standard budget)": (
            lambda m, x, y: autoattack(m, x, y, eps=eps, members=_aa_members(100), generator=g()),
            lambda m: torchattacks.MultiAttack([
                torchattacks.APGD(m, norm="Linf", eps=eps, steps=100, loss="ce", n_restarts=1, seed=seed),
                torchattacks.APGDT(m, norm="Linf", eps=eps, steps=100, n_classes=10, n_restarts=1, seed=seed),
                torchattacks.FAB(m, norm="Linf", eps=eps, steps=100, multi_targeted=True, n_classes=10, n_restarts=1,
                                 seed=seed),
                torchattacks.Square(m, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=seed)])),
        "CW-l2 c=1, 50 steps": (lambda m, x, y: cw_l2(m, x, y, c=1.0, steps=50, search_steps=1),
                                lambda m: torchattacks.CW(m, c=1.0, kappa=0, steps=50, lr=0.01)),
        "CW-l2 5x100 search": (lambda m, x, y: cw_l2(m, x, y, c=1.0, steps=100, search_steps=5),
                               lambda m: torchattacks.CW(m, c=1.0, kappa=0, steps=500, lr=0.01)),
        "FAB-100 l1": (lambda m, x, y: fab(m, x, y, eps=eps_l1, norm="l1", steps=100, generator=g()),
                       lambda m: _torchattacks_fab_l1(m, eps_l1, 100, seed=seed)),
        "FAB-100 l1, no eps (minimal l1)": (lambda m, x, y: fab(m, x, y, norm="l1", steps=100, generator=g()),
                                            lambda m: _torchattacks_fab_l1(m, None, 100, seed=seed)),
        "FAB-100 l1, 3 restarts": (lambda m, x, y: fab(m, x, y, eps=eps_l1, norm="l1", steps=100, restarts=3,
                                                       generator=g()),
                                   lambda m: _torchattacks_fab_l1(m, eps_l1, 100, restarts=3, seed=seed)),
        "FAB-T-100 l1": (lambda m, x, y: fab_targeted(m, x, y, eps=eps_l1, norm="l1", steps=100, n_target_classes=9,
                                                      generator=g()),
                         lambda m: _torchattacks_fab_l1(m, eps_l1, 100, targets=9, seed=seed)),
        f"Square-{queries} linf": sq_linf,
        f"Square-{queries} linf, authors' offsets": (_authors_offsets(sq_linf[0]), sq_linf[1]),
        f"Square-{queries} l2": sq_l2,
        f"Square-{queries} l2, authors' offsets": (_authors_offsets(sq_l2[0]), sq_l2[1]),
    }


def _aa_members(steps: int) -> tuple[tuple[str, dict[str, Any]], ...]:
    """AutoAttack's standard members (APGD-CE, APGD-T, FAB-T, Square-5000) with ``steps`` per gradient member."""
    return (("apgd", {"loss": "ce", "steps": steps}), ("apgd-t", {"steps": steps}), ("fab-t", {"steps": steps}),
            ("square", {}))


def _sync(x: Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _median_wall(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first call's measurements with wall_s replaced by the median over calls (all kept as wall_s_all)."""
    walls = sorted(r["wall_s"] for r in runs)
    out = dict(runs[0])
    out["wall_s"] = walls[len(walls) // 2] if len(walls) % 2 else 0.5 * (walls[len(walls) // 2 - 1] + walls[len(walls) // 2])
    if len(runs) > 1:
        out["wall_s_all"] = [r["wall_s"] for r in runs]
    return out


_DRAW_NOTHING = ("FGSM", "CW")


def _over_seeds(runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One library's calls for each seed -> the row's measurements: with one seed, :func:`_median_wall` of its
    calls; with several, seed 0's first call with robust_acc the mean over the seeds' first calls (each kept in
    robust_acc_seeds, with their sample sd, min and max) and wall_s the median over every call."""
    if len(runs) == 1:
        return _median_wall(runs[0])
    out = _median_wall([r for seed in runs for r in seed])
    accs = [seed[0]["robust_acc"] for seed in runs]
    out.update(robust_acc=statistics.fmean(accs), robust_acc_seeds=accs, robust_acc_sd=statistics.stdev(accs),
               robust_acc_min=min(accs), robust_acc_max=max(accs))
    return out


def _frac(v: str) -> float:
    a, _, b = v.partition("/")
    return float(a) / float(b) if b else float(a)


def measure(model: nn.Module, x: Tensor, y: Tensor, attack: Callable[[Tensor, Tensor], Tensor],
            eps_l2: float, eps_l1: float = 2.0) -> dict[str, float]:
    _sync(x)
    t0 = time.perf_counter()
    x_adv = attack(x, y).detach()
    _sync(x)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        correct = model(x_adv).argmax(1) == y
    d = (x_adv - x).flatten(1)
    fooled = ~correct
    l2, l1 = d.norm(dim=1), d.abs().sum(1)
    return {"robust_acc": 100 * float(correct.float().mean()), "wall_s": wall,
            "max_linf": float(d.abs().max()), "median_l2_fooled": float(l2[fooled].median()) if fooled.any() else None,
            "robust_acc_at_eps_l2": 100 * float((correct | (l2 > eps_l2 + 1e-6)).float().mean()),
            "max_l1": float(l1.max()), "median_l1_fooled": float(l1[fooled].median()) if fooled.any() else None,
            "robust_acc_at_eps_l1": 100 * float((correct | (l1 > eps_l1 + 1e-6)).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=359, help="test examples attacked (digits has 359)")
    ap.add_argument("--eps", type=_frac, default=0.1, help="l-inf budget (pixels in [0, 1]; digits has 17 levels); "
                    "a fraction such as 8/255 is accepted")
    ap.add_argument("--eps-l2", type=_frac, default=1.0)
    ap.add_argument("--eps-l1", type=_frac, default=2.0, help="l1 budget of the FAB l1 rows")
    ap.add_argument("--steps", type=int, default=50, help="APGD steps (both libraries)")
    ap.add_argument("--square-queries", type=int, default=1000, help="Square Attack queries per example (both)")
    ap.add_argument("--models", default="fastcnn,mlp")
    ap.add_argument("--dataset", default="digits", choices=("digits", "cifar10"))
    ap.add_argument("--recipe", default="fast", help="training recipe of every model: a preset name or a JSON "
                    "object such as '{\"name\": \"airbench\", \"epochs\": 15}'")
    ap.add_argument("--adv-steps", type=int, default=7, help="PGD steps of the adversarial training")
    ap.add_argument("--adversarial", type=_frac, default=None,
                    help="also train each model with l-inf PGD adversarial training (--adv-steps steps) at this eps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attacks", default="", help="semicolon-separated subset of the attack names (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per attack and library (median reported)")
    ap.add_argument("--seeds", type=int, default=1, help="random seeds per attack and library (0 .. N-1; the same "
                    "seed on both sides); N > 1 reports the mean robust accuracy, its sd and range, and the mean "
                    "paired difference with its standard error")
    ap.add_argument("--name", default="digits_cpu")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error(f"--seeds {args.seeds}: allowed >= 1")
    torch.set_num_threads(args.threads)
    if args.dataset == "cifar10":
        from _common import cifar10_jpeg

        data = cifar10_jpeg()
        described = "CIFAR-10 (JPEG), shared pack, test split"
    else:
        data = load_dataset({"name": "digits"})
        described = "digits (sklearn, 8x8, test split)"
    dev = torch.device(args.device)
    x, y = data.test.x[: args.examples].to(dev), data.test.y[: args.examples].to(dev)
    chosen = [a.strip() for a in args.attacks.split(";") if a.strip()]
    rows: list[dict[str, Any]] = []
    variants = [("standard", None)] + ([("PGD-AT", args.adversarial)] if args.adversarial else [])
    for arch in args.models.split(","):
        for variant, adv in variants:
            torch.manual_seed(0)
            base: Any = json.loads(args.recipe) if args.recipe.lstrip().startswith("{") else {"name": args.recipe}
            recipe: Any = base if adv is None else {**base, "adversarial": {"eps": adv, "steps": args.adv_steps}}
            t0 = time.perf_counter()
            model = train(build_model(arch, input_shape=data.input_shape, num_classes=data.num_classes), data, recipe,
                          seed=0, device=dev).eval().to(dev)
            train_s = time.perf_counter() - t0
            label = arch if adv is None else f"{arch} {variant} (eps {adv:.4g})"
            with torch.no_grad():
                clean = 100 * float((model(x).argmax(1) == y).float().mean())
            print(f"{label}: clean accuracy {clean:.1f}%, trained in {train_s:.1f} s", flush=True)
            # untimed warm-up on the full batch, both libraries: the first attack on a model otherwise pays
            # for the caching allocator's growth to a full-batch backward pass and for cuDNN's first choices
            # of backward kernels (it ran first and was ours in every row's pair)
            pgd(model, x, y, eps=args.eps, steps=1)
            torchattacks.PGD(model, eps=args.eps, alpha=args.eps / 4, steps=1)(x, y)
            _sync(x)
            table = [pairs(args.eps, args.eps_l2, args.steps, args.square_queries, seed=k, eps_l1=args.eps_l1)
                     for k in range(args.seeds)]
            for name in table[0]:
                if chosen and name not in chosen:
                    continue
                # --repeats > 1: the two libraries alternate (mlaudit first in even repetitions, torchattacks first
                # in odd ones), each row reporting the median wall time
                # (the robust accuracy is the first call's; every call's time is kept); --seeds N > 1: that for
                # each of the seeds 0 .. N-1, the row reporting the mean robust accuracy and its spread
                runs_a: list[list[dict[str, Any]]] = []
                runs_b: list[list[dict[str, Any]]] = []
                # FGSM and CW draw nothing: one seed gives every seed's numbers
                for k, attacks in enumerate(table[:1] if name.startswith(_DRAW_NOTHING) else table):
                    ours, theirs = attacks[name]
                    runs_a.append([])
                    runs_b.append([])
                    for rep in range(args.repeats):
                        # the order alternates between repetitions, so that neither library always runs just
                        # after the other's measurement (a first call of the pair may meet other GPU clocks)
                        for side in ((0, 1) if rep % 2 == 0 else (1, 0)):
                            if side == 0:
                                runs_a[-1].append(measure(model, x, y, lambda xx, yy, f=ours, m=model: f(m, xx, yy),
                                                          args.eps_l2, args.eps_l1))
                                continue
                            if args.seeds > 1:  # torchattacks' PGD and PGDL2 draw their starts from torch's global generator
                                torch.manual_seed(k)
                            runs_b[-1].append(measure(model, x, y, theirs(model), args.eps_l2, args.eps_l1))
                a, b = _over_seeds(runs_a), _over_seeds(runs_b)
                row = {"model": label, "clean_acc": clean, "train_s": round(train_s, 2), "attack": name,
                       "mlaudit": a, "torchattacks": b}
                if len(runs_a) > 1:
                    diffs = [p - q for p, q in zip(a["robust_acc_seeds"], b["robust_acc_seeds"], strict=True)]
                    row["diff"] = statistics.fmean(diffs)
                    row["diff_se"] = statistics.stdev(diffs) / math.sqrt(len(diffs))
                elif args.seeds > 1:
                    row["diff"], row["diff_se"] = a["robust_acc"] - b["robust_acc"], 0.0
                rows.append(row)
                spread = (f" (sd {a['robust_acc_sd']:.1f} | {b['robust_acc_sd']:.1f} over {args.seeds} seeds)"
                          if len(runs_a) > 1 else "")
                print(f"  {name:24s} ours {a['robust_acc']:5.1f}% {a['wall_s']:6.2f}s | torchattacks "
                      f"{b['robust_acc']:5.1f}% {b['wall_s']:6.2f}s{spread}", flush=True)
                write(args, described, dev, x, rows)  # after every row: a run cut off by a time limit keeps its rows
    write(args, described, dev, x, rows)


def write(args: argparse.Namespace, described: str, dev: torch.device, x: Tensor, rows: list[dict[str, Any]]) -> None:
    meta = {"date": time.strftime("%Y-%m-%d"), "device": args.device,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads, "torch": torch.__version__, "torchattacks": torchattacks.__version__,
            "dataset": described, "examples": len(x), "eps_linf": args.eps,
            "eps_l2": args.eps_l2, "eps_l1": args.eps_l1, "apgd_steps": args.steps, "square_queries": args.square_queries, "recipe": args.recipe, "adversarial_eps": args.adversarial,
            "adversarial_steps": args.adv_steps if args.adversarial else None,
            "seed": 0, "repeats": args.repeats, "seeds": args.seeds}
    out = RESULTS / f"evasion_{args.name}"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(meta, rows))


def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# Evasion attacks: mlaudit vs torchattacks {meta['torchattacks']} ({meta['date']})", "",
             f"{meta['dataset']}, first {meta['examples']} test examples; "
             + (f"{meta['gpu']}" if meta.get("gpu") else f"CPU ({meta['cpu']}, {meta['threads']} thread)")
             + f", torch {meta['torch']}; models trained by mlaudit (recipe `{meta['recipe']}`, seed "
             f"{meta['seed']}); eps_linf = {meta['eps_linf']}, eps_l2 = {meta['eps_l2']}, eps_l1 = {meta.get('eps_l1', '-')}, APGD steps = "
             f"{meta['apgd_steps']}, Square queries = {meta.get('square_queries', '-')}. Robust accuracy in % (lower = stronger attack); wall time of the attack call"
             + (f" (median of {meta['repeats']} calls per library, the order of the two alternating)." if meta.get("repeats", 1) > 1 else ".")]
    seeds = meta.get("seeds", 1)
    if seeds > 1:
        lines += ["", f"Each attack ran with the random seeds 0 .. {seeds - 1} on both sides (ours: a CPU generator seeded "
                  "k; torchattacks: seed=k and torch.manual_seed(k) before the call); robust accuracy is the mean "
                  f"over the {seeds} seeds ± its sample sd [min, max], wall time the median over all calls. "
                  "\"ours - theirs\": the mean paired difference ± its standard error; verdict against the issue's "
                  "bar (ours <= theirs + 0.5): **ok**, **noise** (above the bar by less than 2 s.e.) or **weaker**.",
                  "", "| model (clean %; training time) | attack | mlaudit robust % | torchattacks robust % | "
                  "ours - theirs | verdict | mlaudit s | torchattacks s |", "|---|---|---:|---:|---:|---|---:|---:|"]
    else:
        lines += ["", "| model (clean %; training time) | attack | mlaudit robust % | torchattacks robust % | mlaudit s "
                  "| torchattacks s |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["mlaudit"], r["torchattacks"]
        extra = ""
        if r["attack"].startswith("CW"):
            extra = (f" (median l2 of fooled: {_f(a['median_l2_fooled'])} vs {_f(b['median_l2_fooled'])}; robust at "
                     f"l2 <= {meta['eps_l2']}: {a['robust_acc_at_eps_l2']:.1f} vs {b['robust_acc_at_eps_l2']:.1f})")
        elif r["attack"].startswith("FAB") and " l1" in r["attack"]:
            extra = (f" (median l1 of fooled: {_f(a.get('median_l1_fooled'))} vs {_f(b.get('median_l1_fooled'))}; "
                     f"largest l1: {_f(a.get('max_l1'))} vs {_f(b.get('max_l1'))}; robust at l1 <= "
                     f"{meta.get('eps_l1')}: {a['robust_acc_at_eps_l1']:.1f} vs {b['robust_acc_at_eps_l1']:.1f})")
        head = f"| {r['model']} ({r['clean_acc']:.1f}; trained in {r['train_s']:.0f} s) | {r['attack']}{extra} | "
        if seeds > 1:
            d, se = r["diff"], r["diff_se"]
            verdict = "ok" if d <= 0.5 else "noise" if d - 0.5 < 2 * se else "weaker"
            lines.append(head + f"{_spread(a)} | {_spread(b)} | {d:+.1f} ± {se:.1f} | {verdict} | {a['wall_s']:.2f} | "
                         f"{b['wall_s']:.2f} |")
        else:
            lines.append(head + f"{a['robust_acc']:.1f} | {b['robust_acc']:.1f} | {a['wall_s']:.2f} | {b['wall_s']:.2f} |")
    return "\n".join(lines) + "\n"


def _spread(m: dict[str, Any]) -> str:
    if "robust_acc_sd" not in m:
        return f"{m['robust_acc']:.1f} (draws nothing: one seed)"
    return f"{m['robust_acc']:.1f} ± {m['robust_acc_sd']:.1f} [{m['robust_acc_min']:.1f}, {m['robust_acc_max']:.1f}]"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
