"""Attacks on federated updates: the server recovers users' inputs from what they send.

    from mlaudit.attacks.federated import FEDERATED_ATTACKS, Observation, plant_imprint, match
    rec = FEDERATED_ATTACKS.get("inverting-gradients")(model, obs, steps=2000)   # torchattacks-style call
    m = match(x_true, rec.x, data_range=1.0); m.recovered(30.0).sum()

Registered (:data:`FEDERATED_ATTACKS`, one call ``attack(model, obs, **options) -> Reconstruction``):
``inverting-gradients`` (Geiping et al. 2020), ``dlg`` (Zhu et al. 2019) and, on a causal language
model's update, ``text-inversion`` (TAG / LAMP style: embeddings optimised, projected to tokens, refined by
discrete moves), honest-but-curious optimisation through the one crafting engine; ``imprint`` (Robbing the Fed, Fowl et al. 2022), a
malicious server's closed-form read-out from the module :func:`plant_imprint` puts in front of the model, or
from the rows of the model's own first layer :func:`plant_imprint_parameters` sets (no architecture change). Label
recovery from the last layer in :mod:`.labels`; PSNR, SSIM and the assignment in :mod:`.metrics`.
"""

from __future__ import annotations

from .base import (
    FEDERATED_ATTACKS,
    FederatedAttack,
    Observation,
    Reconstruction,
    register_federated,
    total_variation,
)
from .decepticons import decepticons, plant_decepticon
from .dlg import dlg
from .imprint import Bins, ImprintBins, ImprintedModel, imprint, imprint_candidates, place_bins, plant_imprint
from .imprint_parameters import ParameterImprint, PlantedSlice, plant_imprint_parameters
from .inverting_gradients import inverting_gradients
from .labels import idlg_label, label_accuracy, label_counts, labels_from_counts, last_linear
from .lpips import LPIPS, lpips_alexnet
from .metrics import Match, match, psnr, psnr_matrix, ssim
from .objective import BoxThenFree, GradientInversion
from .text_inversion import EmbeddingsIn, next_token_prior, text_inversion, text_recovery

__all__ = [
    "FEDERATED_ATTACKS", "Bins", "BoxThenFree", "EmbeddingsIn", "FederatedAttack", "GradientInversion", "ImprintBins", "ImprintedModel", "LPIPS", "Match",
    "Observation", "ParameterImprint", "PlantedSlice", "Reconstruction", "decepticons", "dlg", "idlg_label", "imprint", "imprint_candidates", "inverting_gradients",
    "label_accuracy", "label_counts", "labels_from_counts", "last_linear", "lpips_alexnet", "match", "place_bins", "plant_decepticon", "plant_imprint",
    "plant_imprint_parameters", "psnr",
    "psnr_matrix", "register_federated", "ssim", "next_token_prior", "text_inversion", "text_recovery", "total_variation",
]
