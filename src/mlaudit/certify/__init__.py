"""Certified robustness. Randomized smoothing (Cohen et al. 2019): PREDICT and CERTIFY of a smoothed
classifier, certified accuracy against radius. Deep Partition Aggregation (Levine & Feizi 2021): k models
on hash partitions of the training set, their plurality vote certified against poisoned samples.

    cert = certify(model, x, sigma=0.25, n0=100, n=10_000, alpha=0.001)   # Certificate of [B] tensors
    certified_accuracy(cert.prediction, cert.radius, y, [0, 0.25, 0.5])    # float64 [3]
    predict(model, x, sigma=0.25, n=1000, alpha=0.001)                     # int64 [B], -1 = abstain
    dpa = dpa_certify(vote_counts(pred, num_classes))   # pred [k, B] of k partition models -> DPACertificate

Denoised smoothing (Salman et al. 2020; Carlini et al. 2023): certify(Denoised(model, denoiser), x, ...)
with a trained :class:`DnCNN` (:func:`train_denoiser`) or a DDPM (:class:`DiffusionDenoiser`).

Noise, denoise, train, classify (seed 004, NDTCLASSIFY): M models trained on noised-then-denoised copies
of the training set, their votes certified against l2 perturbations of the training data.

    trained = train_ndt("logistic", recipe, data, sigma=0.25, seeds=range(20))   # through the factory
    res = certify_ensemble(load_models(trained, "logistic", data), x, sigma=0.25, alpha=0.001)
"""

from .curves import certified_accuracy, certified_curve, certified_mask
from .denoise import (
    Denoised,
    DiffusionDenoiser,
    DnCNN,
    check_denoiser,
    ddpm_denoise,
    ddpm_schedule,
    ddpm_timestep,
    load_diffusers_pipeline,
    model_sigma,
    train_denoiser,
)
from .ndt import (
    NDTResult,
    certify_ensemble,
    ensemble_votes,
    load_models,
    ndt_certify,
    ndt_inputs,
    ndt_trials,
    ndt_view,
    ndt_views,
    train_ndt,
)
from .partition import (
    DPACertificate,
    dpa_certify,
    partition_masks,
    partition_of,
    partition_trials,
    partitions_touched,
    symmetric_difference,
    view_partitions,
    vote_counts,
)
from .smoothing import (
    ABSTAIN,
    Certificate,
    binomial_pvalue,
    certify,
    certify_from_counts,
    max_radius,
    min_certify_n,
    min_predict_n,
    predict,
    predict_from_counts,
    sample_counts,
)

__all__ = [
    "ABSTAIN", "Certificate", "DPACertificate", "Denoised", "DiffusionDenoiser", "DnCNN", "check_denoiser", "ddpm_denoise",
    "ddpm_schedule", "ddpm_timestep", "load_diffusers_pipeline", "model_sigma", "train_denoiser", "binomial_pvalue", "certified_accuracy", "certified_curve",
    "certified_mask", "certify", "certify_from_counts", "dpa_certify", "max_radius", "min_certify_n", "min_predict_n",
    "partition_masks", "partition_of", "partition_trials", "partitions_touched", "predict", "predict_from_counts",
    "sample_counts", "symmetric_difference", "view_partitions", "vote_counts",
    "NDTResult", "certify_ensemble", "ensemble_votes", "load_models", "ndt_certify", "ndt_inputs", "ndt_trials",
    "ndt_view", "ndt_views", "train_ndt",
]
