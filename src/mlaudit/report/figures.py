"""The report's figures: every experiment kind draws through these functions.

Each returns ``{caption: matplotlib.figure.Figure}`` (or one Figure), built with
``matplotlib.figure.Figure()`` and never pyplot, so drawing never touches matplotlib's global state;
:func:`mlaudit.report.html.fig_to_data_uri` renders and closes them. matplotlib is imported inside
the functions: importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..stats import fpr_key, roc_curve

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from torch import Tensor

PLOT_POINTS = 2000
"""A ROC curve is drawn through at most ~4 * PLOT_POINTS of its points (:func:`thin_curve`)."""


def _show(ax: Axes, img: Tensor) -> None:
    """One image [C, H, W] (C = 1: gray, C = 3: colour) or a vector (a 1-row strip), clipped to [0, 1]."""
    img = img.detach().float().cpu().clamp(0, 1)
    if img.dim() == 3 and img.shape[0] in (1, 3):
        pix = (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy()
        ax.imshow(pix, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.reshape(1, -1).numpy(), cmap="gray", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks([])
    ax.set_yticks([])


def perturbation_grid(x: Tensor, delta: Tensor, eps: float, *, n: int = 8, lead: Tensor | None = None,
                      lead_title: str = "", perturbed: str = "poisoned", titles: Sequence[str] = ()) -> Figure:
    """Clean examples ``x`` [B, *shape] (row 1), perturbed ``x + delta`` (row 2, labelled ``perturbed``)
    and ``delta`` mapped from [-eps, eps] to [0, 1] (row 3), for the first ``n`` examples. ``lead`` [*shape]
    (e.g. a targeted attack's target) opens row 1 in a column of its own, titled ``lead_title``;
    ``titles`` (one per example, e.g. "3 -> 8") head the example columns."""
    from matplotlib.figure import Figure

    n = min(n, x.shape[0])
    x, d = x[:n].detach().float().cpu(), delta[:n].detach().float().cpu()
    rows = [("clean", x), (perturbed, x + d), ("delta", d / (2 * eps) + 0.5)]
    first = int(lead is not None)
    fig = Figure(figsize=(1.1 * (n + first) + 0.8, 3.6 + 0.4 * first))
    axes = fig.subplots(3, n + first, squeeze=False)
    if lead is not None:
        _show(axes[0][0], lead)
        axes[0][0].set_title(lead_title, fontsize=7)
        axes[1][0].axis("off")
        axes[2][0].axis("off")
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            _show(axes[r][first + c], imgs[c])
        axes[r][first].set_ylabel(label)
    for c, title in enumerate(list(titles)[:n]):
        axes[0][first + c].set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


def image_rows(rows: Sequence[tuple[str, Tensor]], *, titles: Sequence[str] = ()) -> Figure:
    """Rows of images side by side, e.g. true inputs above their reconstructions: each row is (label,
    images [n, *shape]) with the same n; ``titles`` (one per column) head the columns."""
    from matplotlib.figure import Figure

    n = min(len(imgs) for _, imgs in rows)
    fig = Figure(figsize=(1.1 * n + 0.8, 1.2 * len(rows) + 0.2))
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            _show(axes[r][c], imgs[c])
        axes[r][0].set_ylabel(label)
    for c, title in enumerate(list(titles)[:n]):
        axes[0][c].set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


def thin_curve(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most ~4 * PLOT_POINTS points of a ROC curve, dense on both a log and a linear FPR grid."""
    if fpr.size <= 4 * PLOT_POINTS:
        return fpr, tpr
    grid = np.concatenate([np.logspace(-7, 0, PLOT_POINTS), np.linspace(0, 1, PLOT_POINTS)])
    idx = np.concatenate([np.searchsorted(fpr, grid, side="left"), np.searchsorted(fpr, grid, side="right") - 1])
    idx = np.unique(np.clip(np.concatenate([idx, [0, fpr.size - 1]]), 0, fpr.size - 1))
    return fpr[idx], tpr[idx]


def roc_figures(scores: Mapping[str, Tensor], keep: Tensor, metrics: Mapping[str, Any], *, what: str = "",
                curves: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Figure]:
    """Log-log (FPR 1e-5..1, both axes log) and linear ROC curves, one curve per attack: ``scores``
    name -> [M, N] against ``keep`` bool [M, N]; ``metrics`` name -> :func:`mlaudit.stats.roc_metrics`
    output (for the legend). ``curves`` name -> (fpr, tpr) already computed (e.g. by
    :func:`mlaudit.stats.roc_analysis`) are drawn as given instead of sorting the scores again."""
    from matplotlib.figure import Figure

    labels = keep.flatten().numpy()
    curves = {name: thin_curve(*(curves[name] if curves is not None and name in curves else
                                 roc_curve(s.flatten().numpy(), labels)[:2])) for name, s in scores.items()}
    figs: dict[str, Figure] = {}
    for scale in ("log", "linear"):
        fig = Figure(figsize=(4.8, 4.2))
        ax = fig.add_subplot()
        lo = 1e-5 if scale == "log" else 0.0
        for name, (fpr, tpr) in curves.items():
            mt = metrics.get(name, {})
            auc = mt.get("auc", {}).get("value", float("nan"))
            t3 = mt.get("tpr_at_fpr", {}).get(fpr_key(1e-3), {}).get("value")
            label = f"{name} (AUC {auc:.3f}" + (f", TPR@0.1% {100 * t3:.1f}%)" if t3 is not None else ")")
            ax.plot(fpr, tpr, label=label, lw=1.3)
        ax.plot([lo or 1e-7, 1], [lo or 1e-7, 1], ls="--", color="grey", lw=0.8, label="chance")
        n_neg = int((~keep.bool()).sum())
        if scale == "log" and n_neg > 0 and 1.0 / n_neg > lo:  # below one false positive: not resolved
            ax.axvspan(lo, 1.0 / n_neg, color="grey", alpha=0.15, lw=0,
                       label=f"unresolved: FPR < 1/{n_neg} negatives")
        if scale == "log":
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlim(lo, 1)
        ax.set_ylim(lo, 1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC{what} ({scale} scale)")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        figs[f"ROC curve{what}, {'log-log' if scale == 'log' else 'linear'} scale"] = fig
    return figs


def memorization_figure(mem: Tensor, member_score: Tensor | None = None, *, attack: str = "", rho: float = 0.0
                        ) -> Figure:
    """Histogram of self-influence ``mem`` [N] and, when given, its scatter against the mean
    ``attack`` score of each example over the models holding it (``member_score`` [N], Spearman ``rho``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.4, 3.2))
    ax = fig.add_subplot(1, 2, 1)
    ax.hist(mem.numpy(), bins=40, color="#4c72b0")
    ax.set_yscale("log")
    ax.set_xlabel("mem(i)")
    ax.set_ylabel("examples")
    ax.set_title("self-influence")
    if member_score is not None:
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.scatter(mem.numpy(), member_score.numpy(), s=4, alpha=0.4, color="#dd8452")
        ax2.set_xlabel("mem(i)")
        ax2.set_ylabel(f"mean {attack} score (IN)")
        ax2.set_title(f"Spearman rho = {rho:.2f}")
    fig.tight_layout()
    return fig


def canary_score_histogram(s_in: np.ndarray, s_out: np.ndarray, threshold: float, score: str) -> dict[str, Figure]:
    """DP audit: the canary scores of the models trained with (``s_in``) and without it (``s_out``)
    and the distinguishing ``threshold``; ``score`` "loss" (drawn as log10) or "gradient"."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    if score == "loss":  # losses span orders of magnitude: log scale
        tf: Callable[[np.ndarray], np.ndarray] = lambda v: np.log10(np.clip(v, 1e-12, None))  # noqa: E731
        label, title = "log10 canary loss", "Canary loss of the models trained with and without it"
    else:
        tf = np.asarray
        label, title = "parameter update along the canary direction", "White-box canary score of the models"
    both = tf(np.concatenate([s_in, s_out]))
    bins = np.linspace(both.min(), both.max() + 1e-9, 30)
    ax.hist(tf(s_out), bins=bins, alpha=0.6, label="out (trained on D)")
    ax.hist(tf(s_in), bins=bins, alpha=0.6, label="in (trained on D')")
    if np.isfinite(threshold) and (score != "loss" or threshold > 0):
        ax.axvline(float(tf(np.array([threshold]))[0]), color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel(label)
    ax.set_ylabel("models")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))  # tiny gradient scores: one offset, short ticks
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return {title: fig}


def alignment_figure(curves: Mapping[str, list[float]]) -> Figure:
    """Targeted poisoning: cosine between the target's adversarial gradient and the batch gradient
    per epoch of each victim (``curves`` name -> values at epochs 1, 2, ...; seed 002 Fig. 1.3b)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    for name, c in curves.items():
        ax.plot(range(1, len(c) + 1), c, marker="o", label=f"{name} victim")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cos(target adv. grad, batch grad)")
    ax.legend()
    fig.tight_layout()
    return fig


def accuracy_histogram(acc: np.ndarray) -> Figure:
    """Test accuracy ``acc`` [T] of T trained models (at most 20 bins)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 3))
    ax = fig.add_subplot()
    ax.hist(acc, bins=min(20, len(acc)), color="#4c72b0")
    ax.set_xlabel("test accuracy")
    ax.set_ylabel("models")
    ax.set_title("test accuracy across trials")
    fig.tight_layout()
    return fig


def robust_accuracy_figure(eps: Sequence[float], curves: Mapping[str, Sequence[Mapping[str, float]]], *,
                           norm: str, clean: float | None = None, xlabel: str | None = None,
                           ylabel: str = "robust accuracy", clean_label: str = "clean") -> Figure:
    """Robust accuracy against eps, one line per attack: ``curves`` name -> one ``{"value", "lo", "hi"}``
    per eps (shaded between lo and hi); ``clean`` accuracy as a dotted line. The axis labels default to
    the evasion kind's (``eps (norm)``, robust accuracy); the certify kind plots certified accuracy against radius."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4))
    ax = fig.add_subplot()
    e = np.asarray(eps, dtype=float)
    for name, pts in curves.items():
        v = np.array([p["value"] for p in pts])
        worst = name == "worst case"
        line = ax.plot(e, v, marker="o", ms=3, lw=2.2 if worst else 1.2, color="k" if worst else None, label=name)[0]
        ax.fill_between(e, [p["lo"] for p in pts], [p["hi"] for p in pts], color=line.get_color(), alpha=0.12, lw=0)
    if clean is not None:
        ax.axhline(clean, color="grey", ls=":", lw=1, label=clean_label)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel or f"eps ({norm})")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def success_figure(per_scenario: Sequence[Sequence[float]], *, clean: Sequence[float] | None = None) -> Figure:
    """Targeted poisoning: each scenario's success (mean over its victims, error bar = SE over victims)
    and, as a band, the mean +- SE over scenarios (seed 002's headline); ``clean`` the clean victims'
    success per scenario (the baseline), drawn as hollow markers."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(4.5, 0.35 * len(per_scenario) + 2), 3.2))
    ax = fig.add_subplot()
    means = np.array([np.mean(v) for v in per_scenario])
    ses = np.array([np.std(v, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0 for v in per_scenario])
    idx = np.arange(len(means))
    ax.bar(idx, means, yerr=ses, capsize=3, color="#c44e52", alpha=0.85, label="poisoned victims")
    if clean is not None:
        ax.plot(idx, clean, "o", mfc="none", color="k", label="clean victims")
    m = float(means.mean())
    se = float(means.std(ddof=1) / np.sqrt(len(means))) if len(means) > 1 else 0.0
    ax.axhspan(m - se, m + se, color="grey", alpha=0.2, lw=0)
    ax.axhline(m, color="grey", lw=1, label=f"mean {100 * m:.1f}% ± {100 * se:.1f}%")
    ax.set_xticks(idx)
    ax.set_xlabel("scenario")
    ax.set_ylabel("poison success")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def accuracy_bars(groups: Mapping[str, Mapping[str, float]], *, title: str = "test accuracy") -> Figure:
    """Clean vs poisoned victims: one bar per group ``name -> {"mean", "se"}`` with its SE."""
    from matplotlib.figure import Figure

    names = list(groups)
    fig = Figure(figsize=(max(3.5, 1.1 * len(names) + 1.5), 3.2))
    ax = fig.add_subplot()
    means = [float(groups[n]["mean"]) for n in names]
    ses = [float(groups[n].get("se", 0.0) or 0.0) for n in names]
    ax.bar(range(len(names)), means, yerr=ses, capsize=4, color=["#4c72b0"] + ["#c44e52"] * (len(names) - 1))
    for i, v in enumerate(means):
        ax.text(i, v + 0.02, f"{100 * v:.1f}%", ha="center", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(title)
    fig.tight_layout()
    return fig
