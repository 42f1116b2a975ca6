"""Experiment kind ``certify``: randomized smoothing of a model (Cohen, Rosenfeld & Kolter, ICML 2019;
issue 17, deliverables 1 and 6).

Protocol: the base classifier f is the external ``target`` checkpoint (hash- and fit-checked) or one
model trained by the factory under ``recipe`` (with Gaussian noise at ``sigma`` unless
``recipe.noise_sigma`` says otherwise, as Cohen et al. train). ``examples`` test examples (a seeded
draw) are certified by CERTIFY (``n0`` selection and ``n`` estimation samples, level ``alpha``;
:func:`mlaudit.certify.certify`) and classified by PREDICT (``predict_n`` samples). An example is
certified correct at radius r when CERTIFY returns its label with radius >= r. Rates carry 95%
Clopper-Pearson intervals over the examples; throughput is certified examples per second of CERTIFY.
Each example's certificate (prediction, radius, pA_lower, label) is kept in ``artifacts/certificates.npz``.

Denoised smoothing (issue 17, item 2; ``denoiser`` block): a denoiser D (a DnCNN trained here on the
training split at ``sigma``, Salman et al. 2020, or a local diffusers DDPM, Carlini et al. 2023; see
:mod:`mlaudit.certify.denoise`) goes in front of f, and the headline metrics certify f(D(.)); f alone is
certified on the same noise draws (``metrics.without_denoiser``) for the side-by-side curve. With a
denoiser the factory trains f without noise unless ``recipe.noise_sigma`` is given (Salman et al.'s
off-the-shelf classifier). Seeds: ``trial_seed(i, stream=ATTACK)`` with i = 0 the examples, 1 the
smoothing noise, 2 the denoiser's initial weights and training (12 for a second, stability stage), 3 the MSE
probe's noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..certify import Certificate, certified_mask, certify, predict
from ..certify.denoise import Denoised, DnCNN, train_denoiser
from ..data.base import DataBundle
from ..factory import TrialSpec
from ..query import forward_batched, load_model
from ..report.figures import robust_accuracy_figure
from ..report.html import ReportTable
from .base import ExperimentOutput, Stream, register_experiment
from .certify_config import CertifyConfig, DDPMDenoiser, DnCNNDenoiser, check_certify, load_target
from .context import RunContext
from .robustness import rate

CERTIFICATES = "certificates.npz"
"""Per-example certificates under ``artifacts/`` (:func:`certificate_arrays`): any certified-accuracy curve can
be redrawn from them."""
CURVE_POINTS = 41
"""Radii of the report's certified-accuracy curve (evenly spaced from 0 to the largest certifiable radius)."""
DENOISER_FOLDER = "denoiser"
"""Where a trained DnCNN is kept under ``artifacts/`` (a resumed run reloads it)."""


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


@dataclass
class _Smoothed:
    """One smoothed classifier's certificates and metrics (the run's model, or the model behind a denoiser)."""

    cert: Certificate
    metrics: dict[str, Any]
    by_radius: list[dict[str, Any]]


def _smooth(config: CertifyConfig, ctx: RunContext, model: nn.Module, x: Tensor, y: Tensor,
            num_classes: int) -> _Smoothed:
    """CERTIFY and PREDICT of ``model`` on x, and their scores. The noise generator is seeded the same for every
    model, so with and without a denoiser see the same noise draws (a paired comparison)."""
    clean = forward_batched(model, x, batch_size=config.batch_size, device=ctx.device).argmax(1).cpu() == y
    noise = torch.Generator(device=ctx.device).manual_seed(config.trial_seed(1, stream=Stream.ATTACK))
    opts: dict[str, Any] = dict(sigma=config.sigma, alpha=config.alpha, batch_size=config.batch_size,
                                num_classes=num_classes, generator=noise)
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
        "throughput": _throughput(config, len(y), wall),
    }
    return _Smoothed(cert, metrics, by_radius)


@register_experiment("certify", config=CertifyConfig, check=check_certify)
def run_certify(config: CertifyConfig, ctx: RunContext) -> ExperimentOutput:
    """Randomized smoothing (Cohen et al. 2019): certified accuracy vs l2 radius, abstention, clean and smoothed accuracy, throughput."""
    data = ctx.load_dataset(config.dataset)
    draw = torch.Generator().manual_seed(config.trial_seed(0, stream=Stream.ATTACK))
    rows = torch.randperm(len(data.test), generator=draw)[: config.examples].sort().values
    x, y = data.test.x[rows].to(ctx.device), data.test.y[rows]
    tid, seed, model = _model(config, ctx, data)
    with ctx.cost.timed("certify"):
        plain = _smooth(config, ctx, model, x, y, data.num_classes)
    den: _Smoothed | None = None
    metrics = dict(plain.metrics)
    if config.denoiser is not None:
        denoiser, info = _denoiser(config, ctx, data, model, x)
        with ctx.cost.timed("certify with the denoiser"):
            den = _smooth(config, ctx, Denoised(model, denoiser), x, y, data.num_classes)
        metrics = {**den.metrics, "without_denoiser": plain.metrics, "denoiser": info}
    run = den if den is not None else plain
    arrays = certificate_arrays(rows, y, run.cert, plain.cert if den is not None else None)
    ctx.write_artifact(CERTIFICATES, lambda f: np.savez_compressed(f, **arrays))
    radii = list(config.radii)
    metrics.update({
        "max_certifiable_radius": config.max_radius,
        "sigma": config.sigma, "alpha": config.alpha, "n0": config.n0, "n": config.n,
        "predict_n": config.predict_samples, "radii": radii, "examples": len(rows),
        "train_noise_sigma": None if config.target is not None else config.recipe.noise_sigma,
    })
    trials = [{"trial_id": tid, "seed": seed, "clean_accuracy": metrics["clean_accuracy"]["value"],
               "smoothed_accuracy": metrics["smoothed_accuracy"]["value"],
               **{f"certified@{_key(r)}": v["value"] for r, v in zip(radii, run.by_radius, strict=True)}}]
    if den is not None:
        trials[0].update({"denoiser": config.denoiser.kind if config.denoiser else None,
                          **{f"no denoiser certified@{_key(r)}": v["value"]
                             for r, v in zip(radii, plain.by_radius, strict=True)}})
    return ExperimentOutput(metrics=metrics, trials=trials, tables=_tables(config, metrics, plain, den),
                            figures=_figure(config, y, plain, den), notes=_notes(config, data, metrics))


def certificate_arrays(rows: Tensor, y: Tensor, cert: Certificate,
                       without_denoiser: Certificate | None = None) -> dict[str, np.ndarray]:
    """The arrays of ``artifacts/certificates.npz``, one entry per certified example (in test-split order):
    ``rows`` (int64, index in the test split), ``label`` (int64), ``prediction`` (int64, -1 = abstained),
    ``radius`` (float64, 0 where abstained) and ``pa_lower`` (float64) of the headline smoothed classifier
    (f, or f(D(.)) with a denoiser), and with a denoiser the same three of f alone prefixed
    ``without_denoiser_``. Certified accuracy at r is mean((prediction == label) & (radius >= r))."""
    out = {"rows": rows.cpu().numpy().astype(np.int64), "label": y.cpu().numpy().astype(np.int64)}
    for prefix, c in (("", cert), ("without_denoiser_", without_denoiser)):
        if c is not None:
            out.update({f"{prefix}prediction": c.prediction.cpu().numpy().astype(np.int64),
                        f"{prefix}radius": c.radius.cpu().numpy().astype(np.float64),
                        f"{prefix}pa_lower": c.pa_lower.cpu().numpy().astype(np.float64)})
    return out


def _denoiser(config: CertifyConfig, ctx: RunContext, data: DataBundle, model: nn.Module,
              x: Tensor) -> tuple[nn.Module, dict[str, Any]]:
    """The denoiser D of the config on the device (a trained DnCNN, kept under artifacts/denoiser/ so a resumed
    run reloads it, or a loaded DDPM) and what it is: its settings, training losses, and the per-element MSE
    of one noisy copy of the certified examples before and after D."""
    spec = config.denoiser
    assert spec is not None
    info: dict[str, Any] = {**spec.model_dump(mode="json"), "label": spec.label}
    if isinstance(spec, DDPMDenoiser):
        with ctx.cost.timed("denoiser loading"):
            ddpm = spec.build(config.sigma, device=ctx.device)
        info.update(spec.info(ddpm))
        den: nn.Module = ddpm
    else:
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, the global generator untouched
            torch.manual_seed(config.trial_seed(2, stream=Stream.ATTACK))
            den = DnCNN(data.input_shape[0], depth=spec.depth, width=spec.width, batch_norm=spec.batch_norm)
        kept = ctx.load_cached("dncnn", folder=DENOISER_FOLDER)
        if kept is not None:
            den.load_state_dict(kept[0])
            info.update({k: v for k, v in kept[1].items() if k.startswith("train_")}, resumed=True)
        else:
            info.update(_train_dncnn(config, ctx, data, model, den), resumed=False)
            ctx.save_cached("dncnn", den.state_dict(), {k: v for k, v in info.items() if k.startswith("train_")},
                            folder=DENOISER_FOLDER)
        den = den.to(ctx.device).eval()
        info["parameters"] = sum(p.numel() for p in den.parameters())
    g = torch.Generator(device=ctx.device).manual_seed(config.trial_seed(3, stream=Stream.ATTACK))
    noisy = x + config.sigma * torch.randn(x.shape, generator=g, device=ctx.device, dtype=x.dtype)
    with ctx.cost.timed("denoiser mse"):
        out = forward_batched(den, noisy, batch_size=config.batch_size, device=ctx.device)
    info.update(mse_noisy=float((noisy - x).square().mean()), mse_denoised=float((out - x).square().mean()))
    return den, info


def _train_dncnn(config: CertifyConfig, ctx: RunContext, data: DataBundle, model: nn.Module,
                 den: nn.Module) -> dict[str, Any]:
    """Train the DnCNN on the training split at sigma (Salman et al.'s objectives; ``mse+stability``: MSE first,
    then stability from there). Returns the per-epoch losses and wall time of each stage."""
    spec = config.denoiser
    assert isinstance(spec, DnCNNDenoiser)
    stages = ["mse", "stability"] if spec.objective == "mse+stability" else [spec.objective]
    out: dict[str, Any] = {}
    for i, objective in enumerate(stages):
        task = ctx.progress.task(f"training the denoiser ({objective})", total=spec.epochs)
        t0 = time.perf_counter()
        with ctx.cost.timed("denoiser training"):
            out[f"train_loss_{objective}"] = train_denoiser(
                den, data.train.x, sigma=config.sigma, epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
                objective=objective, classifier=model, seed=config.trial_seed(2 + 10 * i, stream=Stream.ATTACK),
                device=ctx.device, on_epoch=lambda e, _loss, t=task: ctx.progress.set(t, completed=e))
        out[f"train_wall_s_{objective}"] = round(time.perf_counter() - t0, 3)
        ctx.progress.done(task)
    return out


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


def _tables(config: CertifyConfig, m: dict[str, Any], plain: _Smoothed, den: _Smoothed | None) -> list[ReportTable]:
    label = _label(config)
    runs = [(label, den), ("f alone (no denoiser)", plain)] if den is not None else [("", plain)]
    title = "smoothed classifier" if den is None else "smoothed classifier with and without the denoiser"
    tables = [
        ReportTable(f"Certified accuracy vs l2 radius ({title}, sigma {config.sigma:g}, n {config.n}, "
                    f"alpha {config.alpha:g}) [95% Clopper-Pearson]",
                    ["", *[f"r {_key(r)}" for r in config.radii]],
                    [[f"certified accuracy{f', {name}' if name else ''}", *s.by_radius] for name, s in runs
                     if s is not None],
                    note="an example counts at r when CERTIFY returns its label with radius >= r; abstentions "
                         "count as not certified" + ("; both smoothed classifiers saw the same noise draws"
                                                     if den is not None else "")),
    ]
    quantities = [
        ("clean_accuracy", "base classifier accuracy (no noise)" if den is None else
         "base classifier accuracy on clean inputs (f(D(x)) | f(x))"),
        ("smoothed_accuracy", f"smoothed classifier accuracy (PREDICT, n {m['predict_n']}; abstain = wrong)"),
        ("predict_abstention_rate", "PREDICT abstention rate"),
        ("abstention_rate", "CERTIFY abstention rate"),
        ("certified_incorrect", "certified but wrong"),
    ]
    if den is None:
        tables.append(ReportTable("Base and smoothed classifier [95% Clopper-Pearson]", ["quantity", "value"],
                                  [[text, m[k]] for k, text in quantities]))
    else:
        tables.append(ReportTable("Base and smoothed classifier, with and without the denoiser [95% Clopper-Pearson]",
                                  ["quantity", label, "no denoiser"],
                                  [[text, den.metrics[k], plain.metrics[k]] for k, text in quantities]))
        tables.append(_denoiser_table(config, m["denoiser"]))
    tables.append(ReportTable("Throughput of CERTIFY", ["", "examples", "n0", "n", "batch size", "wall s",
                                                        "certified / s", "forwards / s"],
                              [[name or "smoothed classifier", m["examples"], t["n0"], t["n"], t["batch_size"],
                                t["certify_wall_s"], t["certified_per_s"], t["forwards_per_s"]]
                               for name, s in runs if s is not None for t in (s.metrics["throughput"],)]))
    return tables


def _denoiser_table(config: CertifyConfig, d: dict[str, Any]) -> ReportTable:
    rows: list[list[Any]] = [["denoiser", d["label"]]]
    if d["kind"] == "dncnn":
        rows += [["architecture", f"depth {d['depth']}, width {d['width']}, batch norm {d['batch_norm']} "
                                  f"({d['parameters']} parameters)"],
                 ["training", f"{d['epochs']} epochs per objective, batch {d['batch_size']}, Adam lr {d['lr']:g}, "
                              f"objective {d['objective']}{' (reloaded from artifacts)' if d['resumed'] else ''}"]]
        rows += [[f"final training loss ({k.removeprefix('train_loss_')})", v[-1]]
                 for k, v in d.items() if k.startswith("train_loss_")]
        rows += [[f"training wall s ({k.removeprefix('train_wall_s_')})", v]
                 for k, v in d.items() if k.startswith("train_wall_s_")]
    else:
        rows += [["model", f"{d['path']} (data_range {d['data_range']}, clip {d['clip']})"],
                 ["t* (sigma^2 = (1 - abar_t) / abar_t closest)", f"{d['t_star']} of {d['timesteps']}"],
                 ["sigma in model units | at t*", f"{d['model_sigma']:.4g} | {d['sigma_at_t_star']:.4g}"],
                 ["model calls per denoising", d["model_calls"]]]
    rows += [[f"MSE per element of x + eps vs x (sigma^2 = {config.sigma ** 2:.4g})", d["mse_noisy"]],
             ["MSE per element of D(x + eps) vs x", d["mse_denoised"]]]
    return ReportTable("The denoiser", ["quantity", "value"], rows,
                       note="MSE over one noise draw of the certified test examples")


def _label(config: CertifyConfig) -> str:
    return f"f(D(.)), {config.denoiser.label}" if config.denoiser is not None else "f"


def _figure(config: CertifyConfig, y: Tensor, plain: _Smoothed, den: _Smoothed | None) -> dict[str, Any]:
    top = max(config.max_radius, config.radii[-1])
    grid = sorted({*torch.linspace(0, top, CURVE_POINTS).tolist(), *config.radii})

    def curve(s: _Smoothed) -> list[dict[str, Any]]:
        return [rate(c[None]) for c in certified_mask(s.cert.prediction, s.cert.radius, y, grid)]

    curves = ({f"certified, {_label(config)}": curve(den), "certified, f alone (no denoiser)": curve(plain)}
              if den is not None else {f"certified (sigma {config.sigma:g})": curve(plain)})
    fig = robust_accuracy_figure(grid, curves, norm="l2", clean=plain.metrics["clean_accuracy"]["value"],
                                 xlabel="l2 radius", ylabel="certified accuracy",
                                 clean_label="base classifier, no noise")
    return {"Certified accuracy vs l2 radius (95% Clopper-Pearson intervals shaded)": fig}


def _notes(config: CertifyConfig, data: DataBundle, m: dict[str, Any]) -> list[str]:
    trained = ("an external target checkpoint" if config.target is not None else
               f"a model trained with Gaussian noise sigma {config.recipe.noise_sigma:g}" if config.recipe.noise_sigma
               else "a model trained without noise (recipe.noise_sigma 0)")
    notes = [f"{m['examples']} test examples of {data.name} (seeded draw; id {data.id}); base classifier: {trained}.",
             f"The certificate is for the smoothed classifier g(x) = argmax_c P({'f(D(x + eps))' if config.denoiser else 'f(x + eps)'} "
             f"= c), eps ~ N(0, sigma^2 I), not for f; each certificate is wrong with probability <= alpha = {config.alpha:g}. Radii are l2 distances in "
             f"the data's input units; with n = {config.n} no radius above {config.max_radius:.4g} can be certified "
             "(sigma * Phi^-1(alpha**(1/n)))."]
    if config.denoiser is not None:
        what = ("a DnCNN (Zhang et al. 2017) trained here on the training split at sigma (Salman et al. 2020)"
                if config.denoiser.kind == "dncnn" else
                "one-shot DDPM denoising (Carlini et al. 2023)" if config.denoiser.steps == 1 else
                f"DDPM denoising by {config.denoiser.steps} deterministic DDIM steps from t*")
        notes.append(f"Denoised smoothing: the headline metrics certify g(x) = argmax_c P(f(D(x + eps)) = c) with D "
                     f"{what}; metrics.without_denoiser holds f alone, smoothed on the same noise draws.")
    return notes
