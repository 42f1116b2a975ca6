"""Availability poisoning (seed 002 chapter 2), family ``availability`` of the poisoner registry:
perturb the training images within an l-inf ball so that models trained on them generalise poorly;
victims are judged on clean test data.

Methods (one file each, each ``fn(task) -> Poison``, see :mod:`.base`):

* ``adversarial-untargeted`` — eq. 2.3, maximise a fixed crafting model's loss on the true label;
* ``adversarial-class-targeted`` — eq. 2.4, minimise the loss towards g(y), g without fixed points;
* ``error-minimizing`` — unlearnable examples (Huang et al. 2021), sample-wise min-min;
* ``random-noise`` — uniform or sign noise of the same eps (the control).

    from mlaudit.attacks.poisoning import POISONERS, PoisonTask
    m = POISONERS.get("adversarial-class-targeted", family="availability")
    poison = m(PoisonTask(train=data.train, num_classes=10, eps=8 / 255, models=[crafter],
                          settings={"steps": 250}, options={"permutation": "shift"}, seed=0))
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
from .base import AVAILABILITY_CRAFTING, check_inputs, ensemble_logits
from .error_minimizing import ErrorMinimizingOptions, SurrogateLoss
from .random_noise import RandomNoiseOptions

__all__ = [
    "AVAILABILITY_CRAFTING", "AdversarialLoss", "ClassTargetedOptions", "ErrorMinimizingOptions",
    "RandomNoiseOptions", "SurrogateLoss", "check_inputs", "check_permutation", "crafter_predictions",
    "ensemble_logits", "random_derangement", "resolve_permutation", "shift_permutation",
]
