"""Differential privacy: DP-SGD training (:mod:`.dpsgd`) and privacy accounting (:mod:`.accountant`).

Training with DP is a recipe option (``recipe: {name: fast, dp: {epsilon: 4.0, delta: 1.0e-5, clip: 1.0}}``,
see :class:`mlaudit.train.recipe.DPConfig`); every model trained through the one training loop,
the factory's batched path included, can be private.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .accountant import ACCOUNTANTS, calibrate_noise, check_delta, epsilon

if TYPE_CHECKING:
    from ..api import AuditResult, DataLike, ModelLike, TrainerLike

__all__ = ["ACCOUNTANTS", "audit", "calibrate_noise", "check_delta", "epsilon"]


def audit(*, model: ModelLike, data: DataLike, out: str | Path, trainer: TrainerLike = None,
          claimed_epsilon: float | None = None, claimed_delta: float | None = None, canary: str = "mislabeled",
          models_per_side: int = 100, confidence: float = 0.95, recipe: Any = "fast", device: str = "auto",
          seed: int = 0, executor: str = "local", store: str | Path | None = None, resume: bool = False,
          quiet: bool = True, **config: Any) -> AuditResult:
    """Audit a DP training pipeline (the kind ``dp-audit``; Jagielski et al. 2020, Nasr et al. 2021):
    ``models_per_side`` models trained on D + {canary} and as many on D, by ``trainer`` (your DP-SGD) or
    by mlaudit's DP-SGD (``recipe`` with ``dp``); ``metrics["epsilon_lower_bound"]`` holds with
    probability >= ``confidence``, and ``metrics["claim_refuted"]`` says whether it exceeds the claim.

    >>> r = mlaudit.privacy.audit(model=MyNet, data=(x, y), trainer=my_dp_train, claimed_epsilon=1.0,
    ...                           models_per_side=100, out="runs/dpa")
    """
    from ..api import run_kind

    return run_kind("dp-audit", model=model, data=data, trainer=trainer, recipe=recipe, out=out, device=device,
                    seed=seed, executor=executor, store=store, resume=resume, quiet=quiet, canary=canary,
                    models_per_side=models_per_side, confidence=confidence, claimed_epsilon=claimed_epsilon,
                    claimed_delta=claimed_delta, **config)
