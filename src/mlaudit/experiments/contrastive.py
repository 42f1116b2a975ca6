"""Experiment kind ``contrastive``: poisoning and backdooring a CLIP-style image-text model (Carlini &
Terzis, "Poisoning and Backdooring Contrastive Learning", ICLR 2022), success against the number of poisons.

Data: the dataset's images, each captioned from its class name and a template (:mod:`mlaudit.contrastive.data`);
the model: a dual encoder (``model`` the image tower, ``encoder`` the text tower and embedding; or the user's
``encoder.dual``) trained from scratch with the symmetric InfoNCE loss under ``recipe``
(:mod:`mlaudit.contrastive.train`); classification is zero-shot by prompt (:mod:`mlaudit.contrastive.zeroshot`).

Threat model: the attacker adds (targeted) or replaces (backdoor) p image-caption pairs of the training set;
it knows the caption templates' style but neither the model's initialisation nor its data order.

Protocol, for each poison count p (``attack.poisons``, or floor(rate x N) for ``attack.rates``) and each trial
t < ``attack.trials``, one model trained from scratch with seed s_t (the same seed for every p and for the clean
model of trial t: paired):

* ``targeted``: trial t draws a target class (``attack.target_class`` or uniform) and a test image x* of
  another class; p pairs (x*, caption of the target) are appended. Success: x* zero-shot classified as the
  target; also the rank of the target class for x* (1 = top).
* ``backdoor``: trial t draws p training pairs, stamps the trigger on their images and captions them as the
  target class. Attack success rate (ASR): the fraction of triggered test images not of the target class that
  are zero-shot classified as the target; also the mean rank of the target on them.

Every model also reports its clean zero-shot test accuracy. With ``baseline: true`` the clean models (p = 0,
one per trial) give the rates the trigger or x* reach without poisons. Each model is committed to the run store
as it finishes (its scores, not its weights), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..attacks.poisoning.backdoor.trigger import apply_trigger
from ..contrastive.attacks import backdoor_poison, targeted_poison
from ..contrastive.data import CaptionedData, CaptionSpace, class_names, templates_for
from ..contrastive.model import build_dual_encoder, build_user_dual_encoder
from ..contrastive.train import init_seeded, train_contrastive
from ..contrastive.zeroshot import (
    backdoor_z_score,
    class_embeddings,
    class_rank,
    image_embeddings,
    zero_shot_accuracy,
    zero_shot_scores,
)
from ..data.base import DataBundle
from ..imports import resolve_import
from ..report.html import ReportTable
from ..stats import MeanSE
from .base import ExperimentOutput, Stream, register_experiment
from .context import RunContext
from .contrastive_config import ContrastiveConfig, check_contrastive, poison_counts


def substream(config: ContrastiveConfig, *keys: int) -> int:
    """A seed in [0, 2**31) for (config.seed, Stream.ATTACK, *keys): the attack's randomness of one trial."""
    return int(np.random.SeedSequence([config.seed, Stream.ATTACK, *keys]).generate_state(1)[0] % 2**31)


class Study:
    """What every model of the run shares: captioned training pairs, the caption space, the model builder."""

    def __init__(self, config: ContrastiveConfig, data: DataBundle, device: str) -> None:
        self.config, self.data, self.device = config, data, device
        enc = config.encoder
        self.names = class_names(data.name, data.train.classes)
        self.space = CaptionSpace.build(self.names, templates_for(data.name), distractors=enc.distractors)
        self.tokenize: Callable[[Any], torch.Tensor] = (resolve_import(enc.tokenizer, what="encoder.tokenizer")
                                                       if enc.tokenizer else self.space.tokenizer)
        clean = self.space.pair(data.train, seed=config.trial_seed(0, stream=Stream.ATTACK))
        self.clean = CaptionedData(clean.x, clean.captions, self.tokenize(clean.captions), clean.y)

    def build(self) -> nn.Module:
        c, enc = self.config, self.config.encoder
        tok = self.space.tokenizer
        if enc.dual:
            return build_user_dual_encoder(enc.dual, input_shape=self.data.input_shape, vocab_size=tok.vocab_size,
                                           context_length=tok.context_length, embed_dim=enc.embed_dim)
        return build_dual_encoder(c.model, input_shape=self.data.input_shape, vocab_size=tok.vocab_size,
                                  context_length=tok.context_length, embed_dim=enc.embed_dim,
                                  text_width=enc.text_width, text_layers=enc.text_layers, text_heads=enc.text_heads)

    def train(self, train_set: CaptionedData, seed: int) -> tuple[nn.Module, torch.Tensor, float]:
        """(trained model, class embeddings [K, D], clean zero-shot test accuracy)."""
        model = init_seeded(self.build, seed)
        train_contrastive(model, train_set, self.config.recipe, seed=seed, device=self.device)
        w = class_embeddings(model, self.names, self.space.templates, self.tokenize, device=self.device)
        return model, w, zero_shot_accuracy(model, self.data.test.x, self.data.test.y, w)


def targeted_trial(config: ContrastiveConfig, data: DataBundle, t: int) -> tuple[int, int]:
    """(target class, test index of x*) of targeted trial ``t`` (seeded; x* not of the target class)."""
    g = torch.Generator().manual_seed(substream(config, t))
    k = data.num_classes
    target = config.attack.target if config.attack.target is not None else int(torch.randint(k, (1,), generator=g))
    pool = (data.test.y != target).nonzero()[:, 0]
    return target, int(pool[torch.randint(len(pool), (1,), generator=g)])


# trial t's seeds and draws do not depend on attack.trials or the other counts: a resumed run keeps every model
@register_experiment("contrastive", config=ContrastiveConfig, check=check_contrastive)
def run_contrastive(config: ContrastiveConfig, ctx: RunContext) -> ExperimentOutput:
    """Targeted poisoning and backdoors of a CLIP-style model (Carlini & Terzis 2022): success vs number of poisons."""
    data = ctx.load_dataset(config.dataset)
    study = Study(config, data, ctx.device)
    a = config.attack
    n = len(data.train)
    counts = poison_counts(config, n)
    plan = [(p, t) for p in ([0] if config.baseline else []) + counts for t in range(a.trials)]
    task = ctx.progress.task("training dual encoders", total=len(plan))
    records: dict[tuple[int, int], dict[str, Any]] = {}
    for p, t in plan:
        tid = f"clean-t{t:03d}" if p == 0 else f"{a.method}-p{p:07d}-t{t:03d}"
        if tid not in ctx.finished:
            rec = _one_model(config, study, p, t, tid)
            ctx.store.commit_trial(ctx.experiment_id, tid, rec, wall_s=rec["wall_s"])
            ctx.finished[tid] = rec
            ctx.cost.models_trained += 1
            ctx.cost.train_wall_s += rec["wall_s"]
        records[p, t] = dict(ctx.finished[tid])
        ctx.progress.advance(task)
    ctx.progress.done(task)
    curve = [_point(p, n, [records[p, t]["metrics"] for t in range(a.trials)]) for p in sorted({p for p, _ in plan})]
    metrics: dict[str, Any] = {"method": a.method, "train_pairs": n, "curve": curve,
                               "clean_zero_shot_accuracy": curve[0]["zero_shot_accuracy"] if config.baseline else None,
                               "templates": list(study.space.templates), "class_names": list(study.names),
                               "target_class": a.target, "most_poisons": curve[-1]}
    if a.method == "backdoor":
        metrics["trigger"] = a.trigger.model_dump(mode="json")
    trials = [{"trial_id": r["trial_id"], "poisons": p, "trial": t, "seed": r["seed"], **r["metrics"]}
              for (p, t), r in records.items()]
    what = ("x* zero-shot classified as the target (rank of the target class for x*)" if a.method == "targeted" else
            "triggered test images not of the target classified as the target (mean rank of the target)")
    notes = [f"{a.method} on {data.name}: {n} captioned training pairs; success = {what}; mean ± SE over "
             f"{a.trials} trial(s) per count, each a model trained from scratch (paired seeds across counts)."]
    return ExperimentOutput(metrics=metrics, trials=trials, tables=[_table(config, curve)], notes=notes)


def _one_model(config: ContrastiveConfig, study: Study, p: int, t: int, tid: str) -> dict[str, Any]:
    """Poison (p > 0), train and score the model of (p, trial t); the record committed to the store."""
    a, data = config.attack, study.data
    seed = config.trial_seed(t, stream=Stream.VICTIMS)
    t0 = time.perf_counter()
    train_set = study.clean
    if a.method == "targeted":
        target, j = targeted_trial(config, data, t)
        if p:
            train_set, _ = targeted_poison(study.clean, data.test.x[j], target, study.space, poisons=p,
                                             seed=substream(config, t, p), tokenize=study.tokenize)
        model, w, acc = study.train(train_set, seed)
        scores = zero_shot_scores(model, data.test.x[j:j + 1], w)
        metrics = {"success": float(int(scores.argmax(-1)) == target), "target_rank": int(class_rank(scores, target)),
                   "target": target, "image": j, "image_class": int(data.test.y[j])}
    else:
        target = int(a.target or 0)
        trig = a.trigger.build(data.input_shape)
        if p:
            train_set, _ = backdoor_poison(study.clean, trig, target, study.space, poisons=p,
                                             seed=substream(config, t, p), tokenize=study.tokenize)
        model, w, acc = study.train(train_set, seed)
        keep = data.test.y != target
        e_trig = image_embeddings(model, apply_trigger(data.test.x[keep], trig), device=w.device)
        e_clean = image_embeddings(model, data.test.x[keep], device=w.device)
        scores = e_trig @ w.T
        metrics = {"success": float((scores.argmax(-1) == target).float().mean()),
                   "target_rank": float(class_rank(scores, target).float().mean()), "target": target,
                   "triggered_images": int(keep.sum()), "z_score": backdoor_z_score(e_clean, e_trig)}
    metrics["zero_shot_accuracy"] = acc
    return {"trial_id": tid, "seed": seed, "tags": {"poisons": p, "trial": t}, "metrics": metrics,
            "wall_s": time.perf_counter() - t0}


def _point(p: int, n: int, ms: list[dict[str, Any]]) -> dict[str, Any]:
    point = {"poisons": p, "rate": p / n,
             "success": MeanSE.of([m["success"] for m in ms]).to_dict(),
             "target_rank": MeanSE.of([m["target_rank"] for m in ms]).to_dict(),
             "zero_shot_accuracy": MeanSE.of([m["zero_shot_accuracy"] for m in ms]).to_dict()}
    if all("z_score" in m for m in ms):  # backdoor trials (records from before the z-score have none)
        point["z_score"] = MeanSE.of([m["z_score"] for m in ms]).to_dict()
    return point


def _table(config: ContrastiveConfig, curve: list[dict[str, Any]]) -> ReportTable:
    pct = lambda m: {**m, "mean": 100 * m["mean"], "se": 100 * m["se"]}  # noqa: E731
    z = all("z_score" in c for c in curve)
    rows = [[c["poisons"], f"{100 * c['rate']:.3g}%", pct(c["success"]), c["target_rank"],
             *([c["z_score"]] if z else []), pct(c["zero_shot_accuracy"])] for c in curve]
    succ = "x* classified as target (%)" if config.attack.method == "targeted" else "attack success rate (%)"
    return ReportTable(f"{config.attack.method}: success vs number of poisons",
                       ["poisons", "rate", succ, "rank of target class", *(["backdoor z-score"] if z else []),
                        "clean zero-shot accuracy (%)"], rows,
                       note=f"mean ± SE over {config.attack.trials} model(s) per row; row 0 = clean models"
                       + ("; backdoor z-score: Carlini & Terzis's statistic, mean pairwise cosine similarity of the "
                          "triggered images' embeddings minus that of the same images clean, over the clean pairs' "
                          "std (mlaudit.contrastive.backdoor_z_score)" if z else ""))
