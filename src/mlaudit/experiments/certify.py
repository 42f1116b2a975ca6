"""Experiment kind ``certify``: randomized smoothing of a model (Cohen, Rosenfeld & Kolter, ICML 2019;
issue 17, deliverables 1 and 6).

Protocol: the base classifier f is the external ``target`` checkpoint (hash- and fit-checked) or one
model trained by the factory under ``recipe`` (with Gaussian noise at ``sigma`` unless
``recipe.noise_sigma`` says otherwise, as Cohen et al. train). ``examples`` test examples (a seeded
draw) are certified by CERTIFY (``n0`` selection and ``n`` estimation samples, level ``alpha``;
:func:`mlaudit.certify.certify`) and classified by PREDICT (``predict_n`` samples). An example is
certified correct at radius r when CERTIFY returns its label with radius >= r. Rates carry 95%
Clopper-Pearson intervals over the examples; throughput is certified examples per second of CERTIFY.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from ..certify import certified_mask, certify, predict
from ..data.base import DataBundle
from ..factory import TrialSpec
from ..query import forward_batched, load_model
from ..report.figures import robust_accuracy_figure
from ..report.html import ReportTable
from .base import ExperimentOutput, Stream, register_experiment
from .certify_config import CertifyConfig, check_certify, load_target
from .context import RunContext
from .robustness import rate

CURVE_POINTS = 41
"""Radii of the report's certified-accuracy curve (evenly spaced from 0 to the largest certifiable radius)."""


def _model(config: CertifyConfig, ctx: RunContext, data: DataBundle) -> tuple[str, int | None, nn.Module]:
    """(trial id, seed, base classifier in eval mode on the device): the target, or one factory-trained model."""
    if config.target is not None:
        return "target", None, load_target(config, data).to(ctx.device).eval()
    (record,) = ctx.train(config.factory_job(data, (TrialSpec("model-0000", seed=config.trial_seed(0)),),
                                             device=ctx.device))
    model = load_model(config.model, ctx.out_dir / record.checkpoint, sha256=record.get("sha256"), data=data)
    return record.trial_id, record.seed, model.to(ctx.device).eval()


def _key(r: float) -> str:
    return f"{r:g}"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@register_experiment("certify", config=CertifyConfig, check=check_certify)
def run_certify(config: CertifyConfig, ctx: RunContext) -> ExperimentOutput:
    """Randomized smoothing (Cohen et al. 2019): certified accuracy vs l2 radius, abstention, clean and smoothed accuracy, throughput."""
    data = ctx.load_dataset(config.dataset)
    draw = torch.Generator().manual_seed(config.trial_seed(0, stream=Stream.ATTACK))
    rows = torch.randperm(len(data.test), generator=draw)[: config.examples].sort().values
    x, y = data.test.x[rows].to(ctx.device), data.test.y[rows]
    tid, seed, model = _model(config, ctx, data)
    clean = forward_batched(model, x, device=ctx.device).argmax(1).cpu() == y
    noise = torch.Generator(device=ctx.device).manual_seed(config.trial_seed(1, stream=Stream.ATTACK))
    opts: dict[str, Any] = dict(sigma=config.sigma, alpha=config.alpha, batch_size=config.batch_size,
                                num_classes=data.num_classes, generator=noise)
    _sync(ctx.device)
    t0 = time.perf_counter()
    cert = certify(model, x, n0=config.n0, n=config.n, **opts)  # returns CPU tensors: synchronised
    wall = time.perf_counter() - t0
    smoothed = predict(model, x, n=config.predict_samples, **opts)
    radii = list(config.radii)
    by_radius = [rate(m[None]) for m in certified_mask(cert.prediction, cert.radius, y, radii)]
    head = next((r for r in radii if r > 0), radii[0])
    metrics: dict[str, Any] = {
        "certified_accuracy": {_key(r): v for r, v in zip(radii, by_radius, strict=True)},
        "certified_at_radius": {"radius": head, **by_radius[radii.index(head)]},
        "abstention_rate": rate(cert.abstained[None]),
        "certified_incorrect": rate((~cert.abstained & (cert.prediction != y))[None]),
        "clean_accuracy": rate(clean[None]),
        "smoothed_accuracy": rate((smoothed == y)[None]),
        "predict_abstention_rate": rate((smoothed < 0)[None]),
        "radius_correct": _quartiles(cert.radius[~cert.abstained & (cert.prediction == y)]),
        "max_certifiable_radius": config.max_radius,
        "throughput": _throughput(config, len(rows), wall),
        "sigma": config.sigma, "alpha": config.alpha, "n0": config.n0, "n": config.n,
        "predict_n": config.predict_samples, "radii": radii, "examples": len(rows),
        "train_noise_sigma": None if config.target is not None else config.recipe.noise_sigma,
    }
    trials = [{"trial_id": tid, "seed": seed, "clean_accuracy": metrics["clean_accuracy"]["value"],
               "smoothed_accuracy": metrics["smoothed_accuracy"]["value"],
               **{f"certified@{_key(r)}": v["value"] for r, v in zip(radii, by_radius, strict=True)}}]
    return ExperimentOutput(metrics=metrics, trials=trials, tables=_tables(config, metrics, by_radius),
                            figures=_figure(config, cert.prediction, cert.radius, y, metrics),
                            notes=_notes(config, data, metrics))


def _throughput(config: CertifyConfig, examples: int, wall: float) -> dict[str, Any]:
    forwards = examples * (config.n0 + config.n)
    return {"certified_per_s": examples / wall if wall > 0 else None, "certify_wall_s": round(wall, 4),
            "forwards_per_s": forwards / wall if wall > 0 else None, "n": config.n, "n0": config.n0,
            "batch_size": config.batch_size}


def _quartiles(r: Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {"n": int(r.numel())}
    if r.numel():
        q = torch.quantile(r.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        out.update(q1=float(q[0]), median=float(q[1]), q3=float(q[2]))
    return out


def _tables(config: CertifyConfig, m: dict[str, Any], by_radius: list[dict[str, Any]]) -> list[ReportTable]:
    t = m["throughput"]
    return [
        ReportTable(f"Certified accuracy vs l2 radius (smoothed classifier, sigma {config.sigma:g}, n {config.n}, "
                    f"alpha {config.alpha:g}) [95% Clopper-Pearson]",
                    ["", *[f"r {_key(r)}" for r in config.radii]], [["certified accuracy", *by_radius]],
                    note="an example counts at r when CERTIFY returns its label with radius >= r; abstentions "
                         "count as not certified"),
        ReportTable("Base and smoothed classifier [95% Clopper-Pearson]", ["quantity", "value"], [
            ["base classifier accuracy (no noise)", m["clean_accuracy"]],
            [f"smoothed classifier accuracy (PREDICT, n {m['predict_n']}; abstain = wrong)", m["smoothed_accuracy"]],
            ["PREDICT abstention rate", m["predict_abstention_rate"]],
            ["CERTIFY abstention rate", m["abstention_rate"]],
            ["certified but wrong", m["certified_incorrect"]],
        ]),
        ReportTable("Throughput of CERTIFY", ["examples", "n0", "n", "batch size", "wall s", "certified / s",
                                             "forwards / s"],
                    [[m["examples"], t["n0"], t["n"], t["batch_size"], t["certify_wall_s"], t["certified_per_s"],
                      t["forwards_per_s"]]]),
    ]


def _figure(config: CertifyConfig, pred: Tensor, radius: Tensor, y: Tensor, m: dict[str, Any]) -> dict[str, Any]:
    top = max(config.max_radius, config.radii[-1])
    grid = sorted({*torch.linspace(0, top, CURVE_POINTS).tolist(), *config.radii})
    curve = [rate(c[None]) for c in certified_mask(pred, radius, y, grid)]
    fig = robust_accuracy_figure(grid, {f"certified (sigma {config.sigma:g})": curve}, norm="l2",
                                 clean=m["clean_accuracy"]["value"], xlabel="l2 radius",
                                 ylabel="certified accuracy", clean_label="base classifier, no noise")
    return {"Certified accuracy vs l2 radius (95% Clopper-Pearson intervals shaded)": fig}


def _notes(config: CertifyConfig, data: DataBundle, m: dict[str, Any]) -> list[str]:
    trained = ("an external target checkpoint" if config.target is not None else
               f"a model trained with Gaussian noise sigma {config.recipe.noise_sigma:g}" if config.recipe.noise_sigma
               else "a model trained without noise (recipe.noise_sigma 0)")
    return [f"{m['examples']} test examples of {data.name} (seeded draw; id {data.id}); base classifier: {trained}.",
            f"The certificate is for the smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c), not for f; "
            f"each certificate is wrong with probability <= alpha = {config.alpha:g}. Radii are l2 distances in the "
            f"data's input units; with n = {config.n} no radius above {config.max_radius:.4g} can be certified "
            "(sigma * Phi^-1(alpha**(1/n)))."]
