"""Explicit hooks into the training step: what an audit changes inside training, passed to the one
training loop (``train_stack(..., hooks=[...])``, one entry per model) and carried by each trial
(``TrialSpec.hooks``), never hidden in data-view metadata (as Opacus attaches step hooks to its
optimizer rather than to the data).

Today's hooks act on the DP-SGD step (:mod:`mlaudit.privacy.dpsgd`), for the ``dp-audit`` kind:

* ``gradient_canary`` (:class:`GradientCanary`): the Dirac canary of Nasr et al., "Tight auditing of
  differentially private machine learning" (USENIX Security 2023): whenever the placeholder example
  at virtual index ``index`` is sampled, its clipped gradient is replaced by C * e_j (j a coordinate of
  one parameter), so the white-box auditor knows exactly what the canary contributed.
* ``watch``: a (parameter, flat coordinate) whose update theta_T[j] - theta_0[j] training reports in the
  model's results (``dp_watch_update``): the white-box score of the Dirac-canary audit, read without saving,
  reloading or re-initialising the model (:func:`mlaudit.audit.scores.update_scores` from checkpoints gives
  the same number).
* ``broken`` (:data:`BROKEN`): a deliberately wrong DP-SGD, a fixture for testing audits; never used
  unless an audit config asks for it. The accountant still reports the epsilon of the correct
  mechanism, which is the claim the audit must refute.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

BROKEN: dict[str, str] = {
    "noise-over-batch": "the noise is divided by the expected batch size q*N before it is added to the clipped "
                        "sum (and the sum is divided by q*N again): noise std sigma*C/(qN) instead of sigma*C",
    "no-clip": "per-example gradients are not clipped (the noise is still calibrated for the clip norm C)",
}
"""Deliberately broken DP-SGD variants (audit fixtures): name -> what is wrong."""


@dataclass(frozen=True)
class GradientCanary:
    """A Dirac gradient canary: when the placeholder example at virtual ``index`` is sampled, its
    gradient is C * e_j with j the flat (row-major) ``coordinate`` of ``parameter`` (a name of
    ``named_parameters()``, the same as in the state_dict)."""

    index: int
    parameter: str
    coordinate: int


@dataclass(frozen=True)
class DPStepHooks:
    """Hooks of one model's DP-SGD step: a gradient canary and/or a broken-DP-SGD fixture."""

    gradient_canary: GradientCanary | None = None
    broken: str | None = None
    gradient_canaries: tuple[GradientCanary, ...] = ()
    """More Dirac canaries in the same model (the one-run audit's m canaries), each on its own
    placeholder index and coordinate."""
    watch: tuple[str, int] | None = None
    """(parameter name, flat coordinate): report theta_T[j] - theta_0[j] as ``dp_watch_update`` (theta_0 the
    seed's initialisation, before any data-dependent init, as :func:`mlaudit.audit.scores.update_scores`)."""

    @property
    def all_canaries(self) -> tuple[GradientCanary, ...]:
        """``gradient_canary`` (if any) followed by ``gradient_canaries``."""
        return ((self.gradient_canary,) if self.gradient_canary is not None else ()) + tuple(self.gradient_canaries)

    def __post_init__(self) -> None:
        if self.broken is not None and self.broken not in BROKEN:
            raise ConfigError(f"broken DP-SGD variant {self.broken!r} is unknown; valid: {', '.join(BROKEN)}")
