"""One headline metric per experiment kind, read from the stored (flattened, dotted) metrics.

train: test accuracy (mean +- SE over trials); membership-inference: the best attack's TPR at 0.1%
FPR (the smallest FPR target computed when 0.1% was not); dp-audit: the epsilon lower bound vs the
claimed epsilon (``eps>=1.84 > claim 0.897`` when the audit refutes the claim, ``<=`` when not); targeted-poison: poison success (mean +- SE); availability-poison and
indiscriminate-poison: the poisoned victims' accuracy and the drop from clean, in points; robustness:
the worst case over attacks' robust accuracy at the largest eps; backdoor: the attack success rate (mean
+- SE) and the poisoned victims' clean accuracy; certify: the smoothed classifier's certified accuracy at
the first positive radius of ``radii``; defend: the attack success without -> with the defence, and the
poisons a filter removed (``rm 41/43``) or the fraction of attacked inputs DPA certifies; federated: the users' inputs the server recovered (PSNR above the
threshold) out of those behind the updates, and whether through secure aggregation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

Metrics = Mapping[str, Any]
MAX_WIDTH = 26  # characters of a headline

# a top-level attack's TPR at an FPR target, e.g. "lira-online.tpr_at_fpr.0.001.value"
_TPR = re.compile(r"^([^.]+)\.tpr_at_fpr\.(.+)\.value$")


def _num(m: Metrics, name: str) -> float | None:
    v = m.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _mean_se(m: Metrics, name: str, label: str) -> str | None:
    mean, se = _num(m, f"{name}.mean"), _num(m, f"{name}.se")
    if mean is None:
        return None
    return f"{label} {_pct(mean)}" + (f" ±{100 * se:.1f}" if se is not None else "")


def _train(m: Metrics) -> str | None:
    return _mean_se(m, "test_accuracy", "acc")


def _membership(m: Metrics) -> str | None:
    by_fpr: dict[float, list[tuple[float, str]]] = {}
    for name in m:
        hit = _TPR.match(name)
        tpr = _num(m, name) if hit else None
        if hit and tpr is not None:
            try:
                fpr = float(hit.group(2))
            except ValueError:
                continue
            by_fpr.setdefault(fpr, []).append((tpr, hit.group(1)))
    if not by_fpr:
        return None
    fpr = 1e-3 if 1e-3 in by_fpr else min(by_fpr)
    tpr, attack = max(by_fpr[fpr])
    text = f"tpr@{100 * fpr:g}% {100 * tpr:.2f}% "
    return text + (attack if len(text) + len(attack) <= MAX_WIDTH else attack[: MAX_WIDTH - len(text) - 1] + "…")


def _dp_audit(m: Metrics) -> str | None:
    lb, claim = _num(m, "epsilon_lower_bound"), _num(m, "claimed_epsilon")
    if lb is None:
        return None
    if claim is None:
        return f"eps>={lb:.3g}"
    return f"eps>={lb:.3g} {'>' if m.get('claim_refuted') is True else '<='} claim {claim:.3g}"


def _targeted(m: Metrics) -> str | None:
    return _mean_se(m, "poison_success", "success")


def _availability(m: Metrics) -> str | None:
    acc, drop = _num(m, "poisoned_accuracy.mean"), _num(m, "drop.mean")
    if acc is None:
        return None
    return f"acc {_pct(acc)}" + (f" drop {100 * drop:.1f}" if drop is not None else "")


def _rate_at(m: Metrics, key: str, at: str, label: str, tag: str) -> str | None:
    """``<label> <key.value %> @<tag> <key.at>``, e.g. ``robust 12.5% @eps 0.1``."""
    v, where = _num(m, f"{key}.value"), _num(m, f"{key}.{at}")
    if v is None:
        return None
    return f"{label} {_pct(v)}" + (f" @{tag} {where:.3g}" if where is not None else "")


def _robustness(m: Metrics) -> str | None:
    return _rate_at(m, "worst_case_at_max_eps", "eps", "robust", "eps")


def _certify(m: Metrics) -> str | None:
    return _rate_at(m, "certified_at_radius", "radius", "cert", "r")


def _backdoor(m: Metrics) -> str | None:
    text = _mean_se(m, "attack_success_rate", "asr")
    acc = _num(m, "clean_accuracy.mean")
    return None if text is None else text + (f" acc {_pct(acc)}" if acc is not None else "")


def _defend(m: Metrics) -> str | None:
    before, after = _num(m, "attack_success.no_defence.mean"), _num(m, "attack_success.defence.mean")
    if before is None:
        return None
    if after is None:
        return f"asr {_pct(before)} undefended"
    text = f"asr {100 * before:.0f}%->{100 * after:.0f}%"
    hit, total = _num(m, "removal.poisons_removed"), _num(m, "removal.poisons")
    cert = _num(m, "dpa.certified_against_attack")
    if cert is None:
        cert = _num(m, "ndt.certified_against_attack")
    if hit is not None and total is not None:
        return f"{text} rm {hit:.0f}/{total:.0f}"
    return text if cert is None else f"{text} cert {_pct(cert)}"


def _federated(m: Metrics) -> str | None:
    k, n = _num(m, "recovered.k"), _num(m, "recovered.n")
    if k is None or n is None:
        return None
    text = f"recovered {k:.0f}/{n:.0f}"
    if m.get("secure_aggregation") is not True:
        return text
    return next((text + s for s in (" via secagg", " secagg") if len(text + s) <= MAX_WIDTH), text)


def _contrastive(m: Metrics) -> str | None:
    rate, p = _num(m, "most_poisons.success.mean"), _num(m, "most_poisons.poisons")
    if rate is None or p is None:
        return None
    return f"{'hit' if m.get('method') == 'targeted' else 'asr'} {_pct(rate)} @{p:.0f} poisons"


def _protect(m: Metrics) -> str | None:
    names = [k.split(".")[1] for k in m if k.startswith("trainers.") and k.endswith(".protection.mean")]
    vals = {n: _num(m, f"trainers.{n}.protection.mean") for n in names}
    if not vals or any(v is None for v in vals.values()):
        return None
    hi, lo = max(vals, key=lambda n: vals[n] or 0.0), min(vals, key=lambda n: vals[n] or 0.0)
    return f"prot {_pct(vals[hi] or 0.0)}→{_pct(vals[lo] or 0.0)} {lo}"[:MAX_WIDTH]


HEADLINES: dict[str, Callable[[Metrics], str | None]] = {
    "train": _train,
    "membership-inference": _membership,
    "dp-audit": _dp_audit,
    "targeted-poison": _targeted,
    "availability-poison": _availability,
    "indiscriminate-poison": _availability,
    "robustness": _robustness,
    "backdoor": _backdoor,
    "certify": _certify,
    "defend": _defend,
    "federated": _federated,
    "contrastive": _contrastive,
    "protect": _protect,
}

SHORT_KINDS = {"membership-inference": "membership", "targeted-poison": "targeted",
               "availability-poison": "availability", "indiscriminate-poison": "indiscrim."}


def headline(kind: str, metrics: Metrics) -> str | None:
    """The kind's headline as short text (at most about :data:`MAX_WIDTH` characters), or None when it is not recorded."""
    fn = HEADLINES.get(kind)
    return fn(metrics) if fn else None


HEADLINE_LABELS = {
    "train": "test accuracy (mean ± SE over the trials)", "membership-inference": "strongest attack, TPR at 0.1% FPR",
    "dp-audit": "empirical epsilon lower bound vs the claim", "targeted-poison": "poison success",
    "availability-poison": "poisoned accuracy (drop from clean)",
    "indiscriminate-poison": "poisoned accuracy (drop from clean)",
    "robustness": "robust accuracy, worst case over attacks at the largest eps",
    "backdoor": "attack success rate (and clean accuracy) of the poisoned victims",
    "certify": "certified accuracy of the smoothed classifier at the first l2 radius > 0",
    "defend": "attack success without -> with the defence (filters: poisons removed; DPA, NDT: attacked inputs certified)",
    "contrastive": "targeted: x* classified as the target, backdoor: attack success rate; at the largest number of "
                   "poisons (mean over trials)",
    "protect": "protection rate of the users' clean photos (not recognised) per trainer, mean over users",
    "federated": "users' inputs the server recovered from one round (PSNR >= psnr_threshold; secagg: through secure "
                 "aggregation)",
}
"""What each kind's headline measures, spelled out for the first line of its report."""


def verdict(kind: str, metrics: Metrics) -> str | None:
    """The report's first line: :func:`headline` with what it measures, e.g. ``test accuracy (mean ± SE over
    the trials): 97.9% ±0.1``; None when the kind records no headline."""
    head = headline(kind, metrics)
    return None if head is None else f"{HEADLINE_LABELS.get(kind, 'result')}: {head.removeprefix('acc ')}"


def short_kind(kind: str) -> str:
    """A kind's name in at most 12 characters (for an 80-column table)."""
    return SHORT_KINDS.get(kind, kind if len(kind) <= 12 else kind[:11] + "…")
