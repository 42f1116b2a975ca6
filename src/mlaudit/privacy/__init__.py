"""Differential privacy: DP-SGD training (:mod:`.dpsgd`) and privacy accounting (:mod:`.accountant`).

Training with DP is a recipe option (``recipe: {name: fast, dp: {epsilon: 4.0, delta: 1.0e-5, clip: 1.0}}``,
see :class:`mlaudit.train.recipe.DPConfig`); every model trained through the one training loop,
the factory's batched path included, can be private.
"""

from .accountant import ACCOUNTANTS, calibrate_noise, check_delta, epsilon

__all__ = ["ACCOUNTANTS", "calibrate_noise", "check_delta", "epsilon"]
