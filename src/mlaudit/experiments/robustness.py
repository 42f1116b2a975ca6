"""Experiment kind ``robustness``: robust accuracy of a model under evasion attacks (issue 16, deliverable 4).

Protocol: the model is the external ``target`` checkpoint (hash- and fit-checked) or ``trials`` models
trained by the factory under ``recipe``. ``examples`` test examples (a seeded draw) are attacked with
each of ``attacks`` (:data:`mlaudit.attacks.evasion.EVASION_ATTACKS`) at every radius of ``threat.eps``;
an example is robust at eps under an attack when it is classified correctly clean and at the attack's
x_adv. The minimal-norm attacks (:data:`MINIMAL_NORM`: CW, FAB, FAB-T) run once without eps and count as
a success at eps when their (minimal) perturbation measured in ``threat.norm`` is <= eps; each one's
per-example minimal norm goes to ``artifacts/min_perturbation.npz`` (:func:`min_perturbation_arrays`).
The worst case per example is robust only if no attack fools it.
Rates carry 95% Clopper-Pearson intervals over the examples (one model) or percentile-bootstrap
intervals over the examples of the per-example mean over the models (several). The sanity section
(:mod:`mlaudit.attacks.evasion.sanity`) flags signs of gradient masking. Optional blocks: ``defence``
(an input transformation, non-adaptive vs adaptive attacks) and ``detector`` (a feature-space detector
of adversarial examples, non-adaptive PGD vs the detector-aware attack, through
:func:`mlaudit.attacks.evasion.detector.evaluate_detector`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..attacks.evasion import EVASION_ATTACKS, fgsm, pgd, square
from ..attacks.evasion.adaptive import evaluate_defence
from ..attacks.evasion.detector import FeatureDetector, evaluate_detector
from ..attacks.evasion.sanity import masking_flags, pgd_loss_curve
from ..data.base import DataBundle
from ..factory import TrialSpec
from ..query import forward_batched, load_model
from ..report.figures import perturbation_grid, robust_accuracy_figure
from ..report.html import ReportTable
from ..stats import bootstrap_ci, clopper_pearson
from .base import ExperimentOutput, Stream, register_experiment
from .context import RunContext
from .robustness_config import RobustnessConfig, check_robustness, load_target

WORST = "worst case"


def rate(robust: Tensor, *, seed: int = 0) -> dict[str, Any]:
    """Robust accuracy of bool [T, N] (T models, N examples) with a 95% interval: Clopper-Pearson over the
    N examples when T = 1, else a percentile bootstrap over examples of the per-example mean over models."""
    t, n = robust.shape
    per_example = robust.float().mean(0).numpy()
    value = float(per_example.mean())
    if t == 1:
        k = int(robust.sum())
        lo, hi = clopper_pearson(k, n)
        return {"value": value, "lo": lo, "hi": hi, "k": k, "n": n, "method": "clopper-pearson"}
    lo, hi = bootstrap_ci(np.mean, per_example, seed=seed)
    return {"value": value, "lo": lo, "hi": hi, "n": n, "models": t, "method": "bootstrap"}


def _models(config: RobustnessConfig, ctx: RunContext, data: DataBundle) -> list[tuple[str, int | None, nn.Module]]:
    """(trial id, seed, module in eval mode on the device): the target, or the factory's trained models."""
    if config.target is not None:
        return [("target", None, load_target(config, data).to(ctx.device).eval())]
    trials = tuple(TrialSpec(f"model-{i:04d}", seed=config.trial_seed(i)) for i in range(config.trials))
    records = ctx.train(config.factory_job(data, trials, device=ctx.device))
    return [(r.trial_id, r.seed, load_model(config.model, ctx.out_dir / r.checkpoint, sha256=r.get("sha256"),
                                            data=data).to(ctx.device).eval()) for r in records]


def _norms(d: Tensor) -> dict[str, Tensor]:
    flat = d.flatten(1)
    return {"linf": flat.abs().amax(1), "l2": flat.norm(dim=1), "l1": flat.abs().sum(1)}


MINIMAL_NORM = frozenset({"cw", "fab", "fab-t"})
"""Attacks that look for the smallest perturbation that fools (no eps): the kind runs each once and reads
its success at every eps off the perturbation's size in ``threat.norm``."""


def minimised_norm(name: str, threat_norm: str) -> str:
    """The norm a minimal-norm attack minimises: CW's is l2 (whatever the threat), FAB's the one it is run in."""
    return "l2" if name == "cw" else threat_norm


class _Evaluation:
    """One model's attacks: ``robust[name]`` bool [E, N], the minimal-norm attacks' per-example norms, the
    grid's adversarial points."""

    def __init__(self, config: RobustnessConfig, model: nn.Module, x: Tensor, y: Tensor, seed: int) -> None:
        self.config, self.model, self.x, self.y, self.seed = config, model, x, y, seed
        self.clean = self.correct(x)
        self.robust: dict[str, Tensor] = {}
        self.min_norm: dict[str, Tensor] = {}  # minimal-norm attack -> float64 [N], NaN where it did not fool
        self.grid_adv = x.clone()  # per example: the first fooling x_adv at the largest eps
        self.grid_by = ["" for _ in range(len(x))]

    def correct(self, x_adv: Tensor) -> Tensor:
        return forward_batched(self.model, x_adv, device=self.x.device).argmax(1).cpu() == self.y.cpu()

    def call(self, name: str, **kw: Any) -> Tensor:
        fn = EVASION_ATTACKS.get(name)
        opts = {**self.config.options_for(name), "box": self.config.threat.box, **kw}
        if "generator" in _params(fn):
            opts["generator"] = torch.Generator().manual_seed(self.seed)
        return fn(self.model, self.x, self.y, **opts)

    def run(self, name: str) -> None:
        th = self.config.threat
        if name in MINIMAL_NORM:  # one run without eps; x_adv is the smallest fooling point found (x where none)
            x_adv = self.call(name) if name == "cw" else self.call(name, norm=th.norm)
            fooled = self.clean & ~self.correct(x_adv)
            dist = _norms((x_adv - self.x).cpu())
            self.min_norm[name] = torch.where(fooled, dist[minimised_norm(name, th.norm)].double(),
                                              torch.tensor(math.nan, dtype=torch.float64))
            size = dist[th.norm]
            self.robust[name] = torch.stack([self.clean & ~(fooled & (size <= e * (1 + 1e-5))) for e in th.eps])
            self._keep(name, x_adv, fooled & (size <= th.eps[-1] * (1 + 1e-5)))
            return
        rows = []
        for e in th.eps:
            x_adv = self.call(name, eps=e, norm=th.norm)
            rows.append(self.clean & self.correct(x_adv))
        self.robust[name] = torch.stack(rows)
        self._keep(name, x_adv, self.clean & ~rows[-1])

    def _keep(self, name: str, x_adv: Tensor, fooled: Tensor) -> None:
        new = fooled & torch.tensor([not b for b in self.grid_by])
        self.grid_adv[new.to(self.x.device)] = x_adv[new.to(self.x.device)]
        for i in new.nonzero()[:, 0].tolist():
            self.grid_by[i] = name

    def sanity(self, surrogate: nn.Module | None = None) -> list[dict[str, Any]]:
        """Gradient-masking flags: PGD at the whole box, PGD's loss curve at the largest eps, FGSM vs PGD, and
        at the largest eps the Square Attack (black box; image inputs, ``sanity_queries`` > 0) and PGD crafted
        on ``surrogate`` (transfer; another model of the run) against the white-box worst case."""
        th = self.config.threat
        top = th.eps_max(self.x[0].numel())
        unbounded = float((self.clean & self.correct(pgd(self.model, self.x, self.y, eps=top, norm=th.norm,
                                                         box=th.box, steps=20))).float().mean())
        curve = pgd_loss_curve(self.model, self.x, self.y, eps=th.eps[-1], norm=th.norm, box=th.box) if th.eps[-1] else []
        f = self.robust.get("fgsm")
        if f is None:
            f = torch.stack([self.clean & self.correct(fgsm(self.model, self.x, self.y, eps=e, norm=th.norm, box=th.box))
                             for e in th.eps])
        p = self.robust.get("pgd")
        if p is None:
            p = torch.stack([self.clean & self.correct(self.call("pgd", eps=e, norm=th.norm)) for e in th.eps])
        pairs = [(e, int(f[i].sum()), int(p[i].sum()), len(self.x)) for i, e in enumerate(th.eps)]
        return masking_flags(unbounded_robust=unbounded, unbounded_eps=top, loss_curve=curve, fgsm_vs_pgd=pairs,
                             weaker_attacks=self._weaker(p[-1], surrogate))

    def _weaker(self, pgd_robust: Tensor, surrogate: nn.Module | None) -> list[tuple[str, float, int, int, int]]:
        """(label, eps, robust count, white-box robust count, N) at the largest eps for the black-box and
        transfer checks; the white-box worst case is PGD's and every gradient attack's of the run."""
        th, e, n = self.config.threat, self.config.threat.eps[-1], len(self.x)
        if not e:
            return []
        white = pgd_robust.clone()
        for name, r in self.robust.items():
            if name not in BLACK_BOX:
                white &= r[-1]
        out = []
        queries = self.config.sanity_queries
        if "square" in self.robust or (queries and self.x.dim() == 4):
            sq = self.robust.get("square")
            if sq is not None:
                bb = sq[-1]
            else:
                gen = torch.Generator().manual_seed(self.seed)
                bb = self.clean & self.correct(square(self.model, self.x, self.y, eps=e, norm=th.norm, box=th.box,
                                                      n_queries=queries, generator=gen))
            out.append(("black box (Square)", e, int(bb.sum()), int(white.sum()), n))
        if surrogate is not None:
            x_t = pgd(surrogate, self.x, self.y, eps=e, norm=th.norm, box=th.box, steps=20)
            out.append(("transfer (PGD-20 on another model)", e, int((self.clean & self.correct(x_t)).sum()),
                        int(white.sum()), n))
        return out


BLACK_BOX = frozenset({"square"})
"""Attacks of the registry that use no gradient (left out of the white-box worst case of the sanity checks)."""


def _params(fn: Any) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


def _key(e: float) -> str:
    return f"{e:g}"


@register_experiment("robustness", config=RobustnessConfig, check=check_robustness)
def run_robustness(config: RobustnessConfig, ctx: RunContext) -> ExperimentOutput:
    """Robust accuracy under evasion attacks vs eps, worst case per example, gradient-masking checks."""
    data = ctx.load_dataset(config.dataset)
    gen = torch.Generator().manual_seed(config.trial_seed(0, stream=Stream.ATTACK))
    rows = torch.randperm(len(data.test), generator=gen)[: config.examples].sort().values
    x, y = data.test.x[rows].to(ctx.device), data.test.y[rows].to(ctx.device)
    th = config.threat
    evals: list[tuple[str, int | None, _Evaluation]] = []
    for i, (tid, seed, model) in enumerate(_models(config, ctx, data)):
        ev = _Evaluation(config, model, x, y, config.trial_seed(i, stream=Stream.ATTACK))
        for name in config.attacks:
            ev.run(name)
        evals.append((tid, seed, ev))
    clean = torch.stack([ev.clean for _, _, ev in evals])  # [T, N]
    robust = {name: torch.stack([ev.robust[name] for _, _, ev in evals]) for name in config.attacks}  # [T, E, N]
    robust[WORST] = torch.stack(list(robust.values())).all(0)
    by_eps = {name: [rate(r[:, j], seed=config.seed) for j in range(len(th.eps))] for name, r in robust.items()}
    metrics: dict[str, Any] = {
        "clean_accuracy": rate(clean, seed=config.seed),
        "robust_accuracy": {name: {_key(e): v for e, v in zip(th.eps, vals, strict=True)}
                            for name, vals in by_eps.items()},
        "worst_case_at_max_eps": {**by_eps[WORST][-1], "eps": th.eps[-1]},
        "norm": th.norm, "eps": list(th.eps), "examples": len(rows), "models": len(evals),
    }
    tables = [_eps_table(config, by_eps)]
    notes = [f"{len(rows)} test examples of {data.name} (seeded draw; id {data.id}); threat model {th.norm} ball, "
             f"pixel box {list(th.box)}; intervals: 95% {by_eps[WORST][0]['method']}"]
    minimal = min_perturbation_arrays(config, [ev for _, _, ev in evals])
    if minimal:
        metrics["min_perturbation"] = {name: {"norm": minimised_norm(name, th.norm), **_quartiles(a)}
                                       for name, a in minimal.items()}
        if "cw" in minimal:
            metrics["cw_min_l2"] = _quartiles(minimal["cw"])
        ctx.write_artifact(MIN_PERTURBATION, lambda f: np.savez_compressed(
            f, **minimal, rows=rows.numpy().astype(np.int64), models=np.array([tid for tid, _, _ in evals]),
            attacks=np.array(list(minimal)), norms=np.array([minimised_norm(n, th.norm) for n in minimal])))
        keys = ("fooled", "n", "q1", "median", "q3")
        tables.append(ReportTable("Minimal perturbation per example (over the examples each attack fooled)",
                                  ["attack", "norm", "fooled", "of", "q1", "median", "q3"],
                                  [[name, q["norm"], *[q.get(k) for k in keys]]
                                   for name, q in metrics["min_perturbation"].items()],
                                  note=f"per example and model: artifacts/{MIN_PERTURBATION} (NaN where the attack "
                                       "did not fool the example, or it was misclassified clean)"))
    if config.sanity:
        # transfer check: each model is attacked with PGD crafted on the next one (several models only)
        surrogates = [evals[(i + 1) % len(evals)][2].model if len(evals) > 1 else None for i in range(len(evals))]
        checks = [{**c, "model": tid} for (tid, _, ev), sur in zip(evals, surrogates, strict=True)
                  for c in ev.sanity(sur)]
        metrics["gradient_masking_flags"] = sum(c["flagged"] for c in checks)
        metrics["sanity"] = checks
        tables.append(ReportTable("Sanity checks for gradient masking", ["model", "check", "flagged", "detail"],
                                  [[c["model"], c["check"], c["flagged"], c["detail"]] for c in checks],
                                  note="a flag means the robust accuracy above is likely an over-estimate; evaluate "
                                       "with adaptive attacks (EOT, BPDA) before trusting it"))
    if config.defence is not None:
        metrics["defence"], table = _defence(config, evals, x, y)
        tables.append(table)
    if config.detector is not None:
        metrics["detector"], table = _detector(config, data, evals, x, y)
        tables.append(table)
    trials = [{"trial_id": tid, "seed": seed, "clean_accuracy": float(ev.clean.float().mean()),
               **{f"robust_{name}@{_key(th.eps[-1])}": float(robust[name][i, -1].float().mean()) for name in robust}}
              for i, (tid, seed, ev) in enumerate(evals)]
    figures = {f"Robust accuracy vs eps ({th.norm}; 95% intervals shaded)":
               robust_accuracy_figure(th.eps, by_eps, norm=th.norm, clean=metrics["clean_accuracy"]["value"])}
    if config.grid:
        figures.update(_grid(config, evals[0][2]))
    return ExperimentOutput(metrics=metrics, trials=trials, tables=tables, figures=figures, notes=notes)


DEFENCE_ROWS = (("clean_defended", "clean, defended"), ("robust_undefended", "PGD on the bare model"),
                ("robust_transfer", "non-adaptive: transfer from the bare model"),
                ("robust_naive", "non-adaptive: PGD through the defence"),
                ("robust_adaptive", "adaptive: PGD with BPDA / EOT"))


def _defence(config: RobustnessConfig, evals: list[tuple[str, int | None, _Evaluation]], x: Tensor, y: Tensor
             ) -> tuple[dict[str, Any], ReportTable]:
    """Non-adaptive vs adaptive accuracy of the models behind ``config.defence`` at every eps (mean over models)."""
    d = config.defence
    assert d is not None
    th = config.threat
    per_eps: dict[str, dict[str, float]] = {}
    for e in th.eps:
        runs = [evaluate_defence(ev.model, x, y, transform=d.transform, eps=e, norm=th.norm, steps=d.steps,
                                 eot=d.eot, draws=d.draws, seed=ev.seed, box=th.box, **d.options())
                for _, _, ev in evals]
        per_eps[_key(e)] = {k: float(np.mean([r[k] for r in runs])) for k, _ in DEFENCE_ROWS}
    first = runs[0]
    out = {"transform": d.transform, "options": d.options(), "steps": d.steps, "eot": first["eot"],
           "bpda": first["bpda"], "draws": first["draws"], "by_eps": per_eps,
           "adaptive_gap_at_max_eps": per_eps[_key(th.eps[-1])]["robust_naive"]
           - per_eps[_key(th.eps[-1])]["robust_adaptive"]}
    cols = ["evaluation", *[f"eps {_key(e)}" for e in th.eps]]
    rows = [[label, *[per_eps[_key(e)][k] for e in th.eps]] for k, label in DEFENCE_ROWS]
    how = ("BPDA (identity backward)" if first["bpda"] else "autograd") + (
        f", EOT over {first['eot']} draws" if first["eot"] > 1 else "")
    note = (f"defence {d.transform} {d.options()}; PGD-{d.steps}; adaptive attack: {how}; accuracies of a randomised "
            f"defence are means over {first['draws']} draws. A defence that holds only against the non-adaptive rows "
            "is masking gradients (Athalye et al. 2018).")
    return out, ReportTable("Defence: non-adaptive vs adaptive robust accuracy", cols, rows, note=note)


DETECTOR_ATTACKS = (("pgd", "non-adaptive: PGD"), ("feature-collision", "adaptive: feature collision"),
                    ("detector-aware", "adaptive: detector-aware"))
DETECTOR_FIELDS = ("misclassified", "flagged", "undetected_success")


def _detector(config: RobustnessConfig, data: DataBundle, evals: list[tuple[str, int | None, _Evaluation]], x: Tensor,
              y: Tensor) -> tuple[dict[str, Any], ReportTable]:
    """Per model, a :class:`FeatureDetector` fitted on ``detector.fit`` training inputs and thresholded on
    ``detector.calibrate`` others; :func:`evaluate_detector` at each radius; rates are means over models."""
    d = config.detector
    assert d is not None
    th = config.threat
    gen = torch.Generator().manual_seed(config.trial_seed(0, stream=Stream.ATTACK) + 1)
    perm = torch.randperm(len(data.train), generator=gen)
    fit_rows, cal_rows = perm[: d.fit].sort().values, perm[d.fit: d.fit + d.calibrate].sort().values
    x_fit, y_fit = data.train.x[fit_rows].to(x.device), data.train.y[fit_rows].to(x.device)
    x_cal = data.train.x[cal_rows].to(x.device)
    detectors = [FeatureDetector.fit(ev.model, x_fit, y_fit, x_cal, method=d.method, fpr=d.fpr, k=d.k)
                 for _, _, ev in evals]
    per_eps: dict[str, dict[str, Any]] = {}
    for e in config.detector_eps():
        runs = [evaluate_detector(ev.model, x, y, det, pool_x=x_fit, pool_y=y_fit, eps=e, norm=th.norm, steps=d.steps,
                                  box=th.box) for (_, _, ev), det in zip(evals, detectors, strict=True)]
        per_eps[_key(e)] = {
            "clean_accuracy": float(np.mean([r["clean_accuracy"] for r in runs])),
            "clean_flagged": float(np.mean([r["clean_flagged"] for r in runs])),
            **{name: {f: float(np.mean([r[name][f] for r in runs])) for f in DETECTOR_FIELDS}
               for name, _ in DETECTOR_ATTACKS}}
    top = per_eps[_key(config.detector_eps()[-1])]
    out = {"method": d.method, "k": d.k if d.method == "knn" else None, "fpr": d.fpr, "steps": d.steps,
           "fit": d.fit, "calibrate": d.calibrate, "thresholds": [det.threshold for det in detectors],
           "clean_flagged": top["clean_flagged"], "by_eps": per_eps, "eps_max": config.detector_eps()[-1],
           "undetected_non_adaptive_at_max_eps": top["pgd"]["undetected_success"],
           "undetected_adaptive_at_max_eps": top["detector-aware"]["undetected_success"],
           "adaptive_gain_at_max_eps": top["detector-aware"]["undetected_success"] - top["pgd"]["undetected_success"]}
    cols = ["evaluation", "eps", "misclassified", "flagged", "undetected and fooled"]
    rows: list[list[Any]] = []
    for key, at in per_eps.items():
        rows.append(["clean (false positives)", key, 1 - at["clean_accuracy"], at["clean_flagged"], None])
        rows += [[label, key, *[at[name][f] for f in DETECTOR_FIELDS]] for name, label in DETECTOR_ATTACKS]
    how = f"k = {d.k} nearest clean features" if d.method == "knn" else "nearest class mean, tied covariance"
    note = (f"{d.method} detector ({how}) on penultimate features, fitted on {d.fit} training inputs, threshold at the "
            f"{1 - d.fpr:g} quantile of {d.calibrate} other training inputs (target false-positive rate {d.fpr:g}; the "
            f"clean rows give the rate measured on the attacked test examples); each attack {d.steps} steps"
            f"{'; rates are means over ' + str(len(evals)) + ' models' if len(evals) > 1 else ''}. 'Undetected and "
            "fooled' is the attack's success against the detector-defended model: a detector that stops only the "
            "non-adaptive row is not a defence (Carlini & Wagner 2017).")
    return out, ReportTable("Detector: non-adaptive vs detector-aware attack", cols, rows, note=note)


def _eps_table(config: RobustnessConfig, by_eps: dict[str, list[dict[str, Any]]]) -> ReportTable:
    cols = ["attack", *[f"eps {_key(e)}" for e in config.threat.eps]]
    return ReportTable(f"Robust accuracy vs eps ({config.threat.norm}) [95% interval]", cols,
                       [[name, *vals] for name, vals in by_eps.items()])


MIN_PERTURBATION = "min_perturbation.npz"
"""Artifact with each minimal-norm attack's per-example perturbation norms (:func:`min_perturbation_arrays`)."""


def min_perturbation_arrays(config: RobustnessConfig, evals: list[_Evaluation]) -> dict[str, np.ndarray]:
    """Per minimal-norm attack of the run (:data:`MINIMAL_NORM`, in ``config.attacks`` order): float64
    [T, N] (models x examples), the norm (:func:`minimised_norm`) of the perturbation of the smallest
    fooling point the attack found, NaN where it fooled nothing (or the example was misclassified clean)."""
    return {name: torch.stack([ev.min_norm[name] for ev in evals]).numpy()
            for name in config.attacks if name in MINIMAL_NORM}


def _quartiles(d: np.ndarray) -> dict[str, Any]:
    ok = d[np.isfinite(d)]
    out: dict[str, Any] = {"fooled": int(ok.size), "n": int(d.size)}
    if ok.size:
        q1, med, q3 = np.quantile(ok, [0.25, 0.5, 0.75])
        out.update(q1=float(q1), median=float(med), q3=float(q3))
    return out


def _grid(config: RobustnessConfig, ev: _Evaluation) -> dict[str, Any]:
    fooled = [i for i, b in enumerate(ev.grid_by) if b][: config.grid]
    if not fooled:
        return {}
    idx = torch.tensor(fooled, device=ev.x.device)
    pred = forward_batched(ev.model, ev.grid_adv[idx], device=ev.x.device).argmax(1).tolist()
    titles = [f"{ev.grid_by[i]}: {int(ev.y[i])}->{p}" for i, p in zip(fooled, pred, strict=True)]
    d = ev.grid_adv[idx] - ev.x[idx]
    scale = float(d.abs().max()) or 1.0
    return {f"Adversarial examples at eps {_key(config.threat.eps[-1])} (first model; delta scaled to its max "
            f"{scale:.3g})": perturbation_grid(ev.x[idx], d, scale, n=len(fooled), perturbed="adversarial",
                                               titles=titles)}
