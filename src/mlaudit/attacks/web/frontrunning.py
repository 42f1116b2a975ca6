"""Frontrunning poisoning (Carlini et al. 2023, sec. 5 of "Poisoning Web-Scale Training Datasets is
Practical"; seed 001): datasets built from periodic snapshots of crowd-sourced content (e.g. Wikipedia
dumps) take each page as it is at the moment the snapshot reaches it. An attacker who can predict that
moment edits the page shortly before; moderators revert malicious edits, but only after some delay.
The edit is in the snapshot when it is live at the page's snapshot time.

:func:`simulate_frontrunning` draws, for each attacked page, the revert delay R from a distribution you
give (measure it on your own source: nothing here is a published estimate) and the attacker's error in
predicting the snapshot time, and counts the edits that are live when the page is captured:

* no defence: the attacker edits ``lead`` seconds before the predicted time; captured iff the edit is
  made before the true time and R exceeds the remaining gap;
* **trust delay** D (``trust_delay``): the snapshot takes a page's latest revision that has stood for
  at least D seconds at snapshot time, so an edit is captured only when it was made >= D before the
  snapshot and is still live then (R > T - t_edit >= D);
* **random order** (``random_order``): the snapshot visits pages in a random order over a window of
  ``window`` seconds, so the attacker's prediction error is uniform over the window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...errors import ConfigError

RevertSampler = Callable[[int, torch.Generator], torch.Tensor]


def exponential_reverts(mean_s: float) -> RevertSampler:
    """Revert delays ~ Exponential(mean ``mean_s`` seconds): an illustrative default, not a measurement."""
    if not mean_s > 0:
        raise ConfigError(f"mean revert delay = {mean_s}; allowed > 0 seconds")

    def sample(n: int, g: torch.Generator) -> torch.Tensor:
        return -mean_s * torch.log1p(-torch.rand(n, generator=g, dtype=torch.float64))

    return sample


@dataclass
class FrontrunResult:
    """Fractions of the attacked pages whose malicious edit was captured, per setting."""

    pages: int
    attacked: int
    captured: dict[str, float]

    def dataset_fraction(self, setting: str) -> float:
        """Poisoned share of the whole snapshot under ``setting``."""
        return self.captured[setting] * self.attacked / self.pages


def simulate_frontrunning(*, pages: int, attacked: int, lead: float, reverts: RevertSampler,
                          prediction_error: float = 0.0, trust_delay: float = 0.0, window: float = 86_400.0,
                          seed: int = 0) -> FrontrunResult:
    """Monte Carlo over the ``attacked`` pages (of ``pages``): returns the captured fractions for
    ``none`` (no defence), ``trust_delay`` (when > 0), ``random_order`` and both combined.

    ``lead``: seconds between the attacker's edit and the predicted snapshot time; ``prediction_error``:
    half-width (s) of the uniform error of that prediction without random order; ``window``: the span (s)
    a random-order snapshot spreads its visits over.
    """
    if pages < 1 or not 0 <= attacked <= pages:
        raise ConfigError(f"pages = {pages}, attacked = {attacked}; allowed pages >= 1 and 0 <= attacked <= pages")
    for name, v in (("lead", lead), ("prediction_error", prediction_error), ("trust_delay", trust_delay)):
        if not v >= 0:
            raise ConfigError(f"{name} = {v}; allowed >= 0 seconds")
    if not window > 0:
        raise ConfigError(f"window = {window}; allowed > 0 seconds")
    g = torch.Generator().manual_seed(seed)
    n = max(attacked, 1)
    r = reverts(n, g).to(torch.float64)
    if r.shape != (n,) or bool((r < 0).any()):
        raise ConfigError("reverts(n, generator) must return n non-negative delays in seconds")

    def captured(err_halfwidth: float, delay: float) -> float:
        # true snapshot time T = predicted + e; the edit is made at predicted - lead, live for r seconds
        e = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * err_halfwidth
        age = lead + e  # T - t_edit
        live = (age >= 0) & (r > age)
        return float((live & (age >= delay)).double().mean()) if attacked else 0.0

    out = {"none": captured(prediction_error, 0.0)}
    if trust_delay > 0:
        out["trust_delay"] = captured(prediction_error, trust_delay)
    out["random_order"] = captured(window / 2, 0.0)
    if trust_delay > 0:
        out["trust_delay+random_order"] = captured(window / 2, trust_delay)
    return FrontrunResult(pages, attacked, out)
