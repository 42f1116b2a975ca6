"""Targeted clean-label poisoning objectives for :func:`mlaudit.craft.craft` (seed 002, chapter 1).

* :class:`GradientMatching` (Witches' Brew, Geiping et al. 2021, eq. 1.3), with ensembles and a
  DP-aware variant;
* :class:`FeatureCollision` (Poison Frogs, Shafahi et al. 2018);
* :class:`Bullseye` (Bullseye Polytope, Aghakhani et al. 2021);
* :func:`watermark` (blend the target into the poisons; no optimisation).
"""

from .bullseye import Bullseye
from .feature_collision import FeatureCollision
from .gradient_matching import GradientMatching, per_sample_cross_entropy
from .watermark import watermark

__all__ = ["Bullseye", "FeatureCollision", "GradientMatching", "per_sample_cross_entropy", "watermark"]
