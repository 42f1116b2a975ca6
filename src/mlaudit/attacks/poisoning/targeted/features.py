"""Penultimate-layer features of any classifier (the feature space of Poison Frogs and Bullseye
Polytope): :func:`mlaudit.query.penultimate_features`, re-exported where the targeted poisoners import it."""

from ....query.features import penultimate_features

__all__ = ["penultimate_features"]
