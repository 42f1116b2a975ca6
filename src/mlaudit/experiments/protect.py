"""Experiment kind ``protect``: do protective perturbations (Fawkes, LowKey) protect users from a face
recognition model trained on their scraped photos? Radiya-Dixit, Hong, Carlini & Tramèr ("Data Poisoning
Won't Save You From Facial Recognition", ICLR 2022): no; a trainer who waits for a later extractor or who
trains robustly against the public attack recognises the users again.

Data: an identity-classification dataset (classes = identities; digits and CIFAR-10 stand in when no face
dataset is at hand: say so with the numbers). The training photos are split once (seeded) into *public*
photos (what feature extractors are trained on) and *scraped* photos (what the face-recognition classifier
is trained on): ``split: identities`` (default, as in the paper) makes a ``public_fraction`` of the
identities public and recognises the others; ``split: photos`` makes that fraction of each identity's photos
public and recognises every identity. The test split gives each identity's clean photos.

Threat model (the users are the attackers, the model trainer the defender): a user perturbs all their
scraped photos with a public attack (:mod:`mlaudit.attacks.protect`) against the attacked extractors
(``attack.extractors`` classifiers of ``model`` trained on the public photos, different seeds); the
trainer scrapes the photos with their identities, extracts features with its extractor, and trains a
linear classifier (``probe``: multinomial logistic regression on standardised penultimate features). A
user is protected on a clean test photo that the classifier does not recognise.

Trainers (``trainers``): ``attacked`` uses the first attacked extractor itself (the users' best case);
``oblivious`` an extractor trained independently on the public photos (its own seed, optionally a later
``model`` or a longer ``recipe``: "just wait"); ``adaptive`` an extractor trained on the public photos
plus their copies under the public attack, labelled correctly (the tool is public, so the trainer can run it).

Protocol: one trial per protected user (``users`` identities, a seeded draw without repetition). For each
user u and trainer: the classifier trained on the scraped photos with u's perturbed gives the
**protection rate** (fraction of u's clean test photos not classified as u) and the **clean accuracy**
(test photos of the other identities); the classifier trained on the unperturbed scraped photos gives
u's natural error (**baseline**). Mean ± SE over users.

Resumable: every extractor is committed to the run store as it finishes; the public attack's photos (per
user, and on the public photos for the adaptive trainer) and the per-user results are kept under
``artifacts/protect/``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.protect import protect
from ..data.base import DataBundle, TensorDataset
from ..data.view import DataView
from ..factory.spec import TrialSpec
from ..models.registry import build_model
from ..query import features_batched, forward_batched, load_model
from ..report.figures import accuracy_bars, perturbation_grid
from ..report.html import ReportTable
from ..stats import MeanSE
from ..train.api import train
from ..train.loop import init_models
from .base import ExperimentOutput, Stream, register_experiment
from .context import RunContext, TrialRecord
from .protect_config import ProtectConfig, ProtectTrainer, check_protect

log = logging.getLogger(__name__)

FOLDER = "protect"
GRID = 8
"""Photos shown in the report's grid."""


def split_public(config: ProtectConfig, data: DataBundle) -> tuple[Tensor, list[int]]:
    """(public [N] bool over the training photos, the recognised identities). ``split: identities``: a
    seeded floor(public_fraction x K) identities are public (all their photos), the others recognised;
    ``split: photos``: floor(public_fraction x n_k) photos of every identity k are public (seeded), every
    identity is recognised."""
    g = torch.Generator().manual_seed(config.trial_seed(0, stream=Stream.ATTACK))
    y, k = data.train.y.cpu(), data.num_classes
    if config.split == "identities":
        public_ids = torch.randperm(k, generator=g)[: int(k * config.public_fraction)]
        pub = torch.isin(y, public_ids)
        return pub, sorted(set(range(k)) - {int(i) for i in public_ids})
    pub = torch.zeros(len(y), dtype=torch.bool)
    for c in range(k):
        idx = (y == c).nonzero()[:, 0]
        pub[idx[torch.randperm(len(idx), generator=g)[: int(len(idx) * config.public_fraction)]]] = True
    return pub, list(range(k))


def protected_users(config: ProtectConfig, recognised: list[int]) -> list[int]:
    """The ``users`` identities (among the recognised ones) that protect themselves: a seeded draw without
    repetition."""
    g = torch.Generator().manual_seed(config.trial_seed(1, stream=Stream.ATTACK))
    return [recognised[int(i)] for i in torch.randperm(len(recognised), generator=g)[: config.users]]


@register_experiment("protect", config=ProtectConfig, check=check_protect)
def run_protect(config: ProtectConfig, ctx: RunContext) -> ExperimentOutput:
    """Protective perturbations (Fawkes, LowKey) against attacked, oblivious and adaptive trainers."""
    data = ctx.load_dataset(config.dataset)
    pub, recognised = split_public(config, data)
    a = config.attack
    eps = a.eps / 255

    def load(spec_cfg: ProtectConfig, rec: TrialRecord) -> nn.Module:
        return load_model(spec_cfg.model, ctx.out_dir / rec["checkpoint"], sha256=rec.get("sha256"),
                          data=data).to(ctx.device).eval()

    trials = [TrialSpec(f"attacked-m{j}", seed=config.trial_seed(j, stream=Stream.MODELS), mask=pub,
                        tags={"role": "attacked"}) for j in range(a.extractors)]
    recs = ctx.train(config.factory_job(data, trials, device=ctx.device),
                     label="training the attacked extractor(s) on the public photos")
    attacked = [load(config, r) for r in recs]
    x_pub, y_pub = data.train.x[pub], data.train.y[pub]

    def public_attack(x: Tensor, user: int, name: str) -> tuple[Tensor, dict[str, Any]]:
        """The public attack on photos x of identity ``user`` (kept under artifacts/protect/<name>)."""
        kept = ctx.load_cached(name, folder=FOLDER)
        if kept is not None:
            return kept[0]["x"], kept[1]
        log.info("public attack (%s) on %d photos of identity %d (%s)", a.method, len(x), user, name)
        with ctx.cost.timed("protecting"):
            p = protect(attacked, x.to(ctx.device), method=a.method, eps=eps, steps=a.steps, lr=a.lr, user=user,
                        guides_x=x_pub.to(ctx.device), guides_y=y_pub.to(ctx.device),
                        generator=torch.Generator().manual_seed(config.trial_seed(user, stream=Stream.ATTACK)))
        meta = {"user": user, "target": p.target, "feature_shift": MeanSE.of(p.feature_shift.tolist()).to_dict()}
        ctx.save_cached(name, {"x": p.x.cpu()}, meta, folder=FOLDER)
        return p.x.cpu(), meta

    extractors: dict[str, nn.Module] = {}
    for i, t in enumerate(config.trainers):
        if t.strategy == "attacked":
            extractors[t.name] = attacked[0]
            continue
        cfg = config.model_copy(update={"model": config.trainer_model(t), "recipe": config.trainer_recipe(t)})
        seed = config.trial_seed(1000 + i, stream=Stream.MODELS)
        views: dict[str, DataView] = {}
        mask = pub
        if t.strategy == "adaptive":
            ids = [int(k) for k in y_pub.unique()]
            x_adv = torch.cat([public_attack(x_pub[y_pub == k], k, f"public-{k}")[0] for k in ids])
            y_adv = torch.cat([y_pub[y_pub == k] for k in ids])
            views = {t.name: DataView.identity(data.train).with_inserted(x_adv, y_adv)}
            mask = torch.cat([pub, torch.ones(len(y_adv), dtype=torch.bool)])
        trial = TrialSpec(f"trainer-{t.name}", seed=seed, mask=mask, view=t.name if views else None,
                          tags={"role": t.strategy})
        rec = ctx.train(cfg.factory_job(data, [trial], device=ctx.device, views=views),
                        label=f"training the {t.strategy} trainer's extractor {t.name!r}")[0]
        extractors[t.name] = load(cfg, rec)

    scraped = ~pub & torch.isin(data.train.y.cpu(), torch.tensor(recognised))
    x_s, y_s = data.train.x[scraped], data.train.y[scraped]
    seen = torch.isin(data.test.y.cpu(), torch.tensor(recognised))
    x_t, y_t = data.test.x[seen], data.test.y[seen].cpu()
    users = protected_users(config, recognised)
    feats = {n: _features(e, x_s, x_t, ctx.device) for n, e in extractors.items()}
    baseline = {n: _probe(config, f[0], y_s, f[1], data, seed=config.trial_seed(0, stream=Stream.VICTIMS), ctx=ctx)
                for n, f in feats.items()}
    results: list[dict[str, Any]] = []
    for u in users:
        kept = ctx.load_cached(f"user-{u}-results", folder=FOLDER)
        if kept is not None:
            results.append(kept[1])
            continue
        mine = y_s == u
        x_u, meta = public_attack(x_s[mine], u, f"user-{u}")
        row: dict[str, Any] = {"user": u, "target": meta["target"], "feature_shift": meta["feature_shift"]["mean"],
                               "trainers": {}}
        for n, e in extractors.items():
            f_tr = feats[n][0].clone()  # only u's photos changed: embed those, keep everyone else's
            f_tr[mine] = features_batched(e, x_u, device=ctx.device)
            pred = _probe(config, f_tr, y_s, feats[n][1], data, seed=config.trial_seed(0, stream=Stream.VICTIMS),
                          ctx=ctx)
            row["trainers"][n] = _scores(pred, baseline[n], y_t, u)
        ctx.save_cached(f"user-{u}-results", {}, row, folder=FOLDER)
        results.append(row)
    out = _output(config, data, extractors, results, recognised)
    kept = ctx.load_cached(f"user-{users[0]}", folder=FOLDER)
    if kept is not None:  # the first protected user's photos: clean, cloaked, and the cloak
        clean = x_s[y_s == users[0]][:GRID]
        out.figures[f"Identity {users[0]}'s scraped photos: clean, cloaked ({a.method}, eps {a.eps:g}/255) and the "
                    "cloak (scaled to ± eps)"] = perturbation_grid(clean, kept[0]["x"][:GRID] - clean, eps, n=GRID,
                                                                   perturbed="cloaked")
    out.figures["Protection rate per trainer (mean ± SE over users)"] = accuracy_bars(
        {n: p["protection"] for n, p in out.metrics["trainers"].items()}, title="protection rate")
    return out


def _features(model: nn.Module, x_train: Tensor, x_test: Tensor, device: str) -> tuple[Tensor, Tensor]:
    return features_batched(model, x_train, device=device), features_batched(model, x_test, device=device)


def _probe(config: ProtectConfig, f_train: Tensor, y_train: Tensor, f_test: Tensor, data: DataBundle, *, seed: int,
           ctx: RunContext) -> Tensor:
    """Predictions [N_test] of the face-recognition classifier: logistic regression (the zoo's
    ``logistic`` under ``config.probe``) on the features standardised with the training photos' mean and
    standard deviation."""
    mu, sd = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    tr = TensorDataset((f_train - mu) / sd, y_train.cpu(), data.train.classes)
    with ctx.cost.timed("probes"):
        head = init_models(lambda: build_model("logistic", input_shape=tuple(tr.shape), num_classes=data.num_classes),
                           [seed])[0]
        head = train(head, tr, config.probe, seed=seed, device=ctx.device)
        return forward_batched(head, (f_test - mu) / sd).argmax(1).cpu()


def _scores(pred: Tensor, base: Tensor, y: Tensor, u: int) -> dict[str, float]:
    mine, others = y == u, y != u
    return {"protection": float((pred[mine] != u).float().mean()),
            "baseline_error": float((base[mine] != u).float().mean()),
            "clean_accuracy": float((pred[others] == y[others]).float().mean())}


def _output(config: ProtectConfig, data: DataBundle, extractors: dict[str, nn.Module],
            results: list[dict[str, Any]], recognised: list[int]) -> ExperimentOutput:
    # each extractor as a classifier of the identities it was trained on (the public ones)
    known = ~torch.isin(data.test.y.cpu(), torch.tensor(recognised)) if config.split == "identities" else \
        torch.ones(len(data.test.y), dtype=torch.bool)
    per: dict[str, Any] = {}
    for t in config.trainers:
        rows = [r["trainers"][t.name] for r in results]
        acc = float((forward_batched(extractors[t.name], data.test.x[known]).argmax(1).cpu() == data.test.y.cpu()[known])
                    .float().mean())
        per[t.name] = {"strategy": t.strategy, "model": config.trainer_model(t).name,
                       **{k: MeanSE.of([r[k] for r in rows]).to_dict()
                          for k in ("protection", "baseline_error", "clean_accuracy")},
                       "extractor_test_accuracy": acc}
    metrics: dict[str, Any] = {"method": config.attack.method, "eps": config.attack.eps, "users": len(results),
                               "identities": data.num_classes, "recognised_identities": recognised,
                               "split": config.split, "trainers": per,
                               "feature_shift": MeanSE.of([r["feature_shift"] for r in results]).to_dict()}
    trials = [{"trial_id": f"user-{r['user']}-{n}", "user": r["user"], "trainer": n, "target": r["target"], **s}
              for r in results for n, s in r["trainers"].items()]
    pct = lambda m: {**m, "mean": 100 * m["mean"], "se": 100 * m["se"]}  # noqa: E731
    table = ReportTable(f"{config.attack.method} (eps {config.attack.eps:g}/255) against each trainer",
                        ["trainer", "strategy", "extractor", "protection rate (%)", "baseline error (%)",
                         "clean accuracy (%)"],
                        [[n, p["strategy"], p["model"], pct(p["protection"]), pct(p["baseline_error"]),
                          pct(p["clean_accuracy"])] for n, p in per.items()],
                        note=f"mean ± SE over {len(results)} protected user(s); protection: the user's clean test "
                             "photos not recognised; baseline: the same without perturbation")
    public = (f"the photos of {data.num_classes - len(recognised)} public identities" if config.split == "identities"
              else f"{config.public_fraction:g} of each identity's training photos")
    notes = [f"{data.name}: {data.num_classes} identities (classes stand in for people unless the data are faces); "
             f"extractors trained on {public}; the face-recognition classifier (logistic regression on standardised "
             f"penultimate features) on the other training photos of the {len(recognised)} recognised identities."]
    return ExperimentOutput(metrics=metrics, trials=trials, tables=[table], notes=notes)


__all__ = ["ProtectTrainer", "protected_users", "run_protect", "split_public"]
