"""Availability poisoning (seed 002 chapter 2): perturb the training images within an l-inf ball so
that models trained on them generalise poorly; victims are judged on clean test data.

Registered methods (:data:`METHODS`; each one small file, one uniform call, see :mod:`.base`):

* ``adversarial-untargeted`` — eq. 2.3, maximise a fixed crafting model's loss on the true label;
* ``adversarial-class-targeted`` — eq. 2.4, minimise the loss towards g(y), g without fixed points;
* ``error-minimizing`` — unlearnable examples (Huang et al. 2021), sample-wise min-min;
* ``random-noise`` — uniform or sign noise of the same eps (the control).

    from mlaudit.attacks.availability import METHODS, CraftBudget
    m = METHODS.get("adversarial-class-targeted")
    res = m.fn(x, y, models=[crafter], budget=CraftBudget(eps=8 / 255, steps=250, lr=0.01),
               num_classes=10, generator=torch.Generator().manual_seed(0), options=m.options())
"""

from . import adversarial, error_minimizing, random_noise  # noqa: F401  (register the methods)
from .adversarial import (
    AdversarialLoss,
    ClassTargetedOptions,
    check_permutation,
    crafter_predictions,
    random_derangement,
    resolve_permutation,
    shift_permutation,
)
from .base import METHODS, AvailabilityMethod, CraftBudget, NoOptions, PoisonResult, register_method
from .error_minimizing import ErrorMinimizingOptions, SurrogateLoss
from .random_noise import RandomNoiseOptions

__all__ = [
    "METHODS", "AdversarialLoss", "AvailabilityMethod", "ClassTargetedOptions", "CraftBudget",
    "ErrorMinimizingOptions", "NoOptions", "PoisonResult", "RandomNoiseOptions", "SurrogateLoss",
    "check_permutation", "crafter_predictions", "random_derangement", "register_method", "resolve_permutation",
    "shift_permutation",
]
