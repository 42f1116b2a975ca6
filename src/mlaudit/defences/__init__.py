"""Defences against poisoning that filter the training set (issue 17, deliverable 5): feature-space outlier
removal (seed 002, Table 1.4), spectral signatures (Tran et al. 2018), activation clustering (Chen et al.
2018) and deep kNN label consistency (Peri et al. 2020), in one registry with one call shape:

    kept, feats, labels = training_features(model, view, device="cuda")   # penultimate features of the set
    removed = FILTERS.get("spectral")(feats, labels, rate=0.1)           # bool [M]
    removal_summary(removed, is_poison, labels)   # poisons removed vs random filtering at the same rate

The certified defence, Deep Partition Aggregation, is :mod:`mlaudit.certify.partition`; the experiment
kind ``defend`` runs either against the poisoning kinds' attacks (docs/defend.md).
"""

from . import activation_clustering, knn, outlier, spectral  # noqa: F401  (register the filters)
from .base import (
    FILTERS,
    FilterEntry,
    class_quota,
    register_filter,
    removal_summary,
    remove_top,
    training_features,
)

__all__ = ["FILTERS", "FilterEntry", "class_quota", "register_filter", "removal_summary", "remove_top",
           "training_features"]
