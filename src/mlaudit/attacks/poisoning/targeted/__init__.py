"""Targeted clean-label poisoning (seed 002 chapter 1), family ``targeted`` of the poisoner registry.

Threat model (section 1.3.1): the attacker perturbs P training images of the adversarial class
within an l-inf ball (labels kept), knowing pretrained crafting model(s) but not the victim's
initialisation, data order or augmentation; success means the victims classify the target as the
adversarial class. Methods (Table 1.2 and section 1.5), one file each, each ``fn(task) -> Poison``:

``gradient-matching``
    Witches' Brew (Geiping et al. 2021, Algorithm 1, eq. 1.3), averaged over an ensemble of crafting
    models; ``dp_clip`` / ``dp_noise`` give the DP-aware variant of section 1.5.5
    (:mod:`.gradient_matching`); ``adaptive`` adds a feature-space penalty that evades a known
    filtering defence (:mod:`.adaptive`).
``poison-frogs``
    Feature collision (Shafahi et al. 2018) at the penultimate layer (:mod:`.feature_collision`).
``bullseye``
    Bullseye Polytope (Aghakhani et al. 2021): the poisons' mean feature onto the target's (:mod:`.bullseye`).
``watermark``
    The target blended into every poison at the opacity eps allows (Shafahi et al.; :mod:`.watermark`).
``label-flip``
    A dirty-label baseline: relabel target-class images nearest the target (:mod:`.label_flip`).

The crafting methods run through :func:`.crafting.craft_poison`; scenarios (which target, which
poisons) are drawn by :mod:`.scenario`; :mod:`.alignment` is the gradient-alignment diagnostic.
"""

from . import label_flip  # noqa: F401  (registers the targeted label-flip; the other imports register theirs)
from .adaptive import PENALTY_FOR_FILTER, AdaptiveOptions, FilterPenalty
from .bullseye import Bullseye
from .crafting import TARGETED_CRAFTING, craft_poison, mean_objective
from .feature_collision import FeatureCollision
from .features import penultimate_features
from .gradient_matching import GradientMatching, GradientMatchingOptions, per_sample_cross_entropy
from .watermark import WatermarkOptions, watermark

__all__ = [
    "PENALTY_FOR_FILTER", "TARGETED_CRAFTING", "AdaptiveOptions", "Bullseye", "FilterPenalty", "FeatureCollision", "GradientMatching", "GradientMatchingOptions",
    "WatermarkOptions", "craft_poison", "mean_objective", "penultimate_features", "per_sample_cross_entropy",
    "watermark",
]
