"""Membership inference on your own model, data and training function: ``mlaudit.membership.audit``.

>>> import mlaudit.membership
>>> result = mlaudit.membership.audit(model=MyNet, data=(train_set, test_set), trainer=my_train,
...                                   models=16, target=my_trained_net, members=member_mask, out="runs/mi")
>>> result.metrics["lira-online"]["tpr_at_fpr"]      # TPR at 1e-5 / 1e-3 / 1e-2 FPR with intervals

The kind ``membership-inference`` (Carlini et al. 2022, "Membership Inference Attacks From First
Principles"): ``models`` shadow models, each trained by ``trainer`` (the factory when None) on a
random ``keep`` fraction of the training split, attacked leave-one-out by every attack in
``attacks`` (LOSS, Shokri, LiRA online/offline), scored by AUC and TPR at low FPR with bootstrap
intervals. With ``target`` (a trained ``nn.Module`` of the same architecture, or a state_dict file)
the same attacks score that model, the user's own, on every training example; ``members`` (bool [N]
over the training split) adds its ROC.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .api import AuditResult, DataLike, ModelLike, TrainerLike, run_kind
from .attacks.membership import ATTACKS
from .store import default_store_path
from .train.checkpoint import save_checkpoint, sha256_file

__all__ = ["ATTACKS", "audit"]


def audit(*, model: ModelLike, data: DataLike, out: str | Path, trainer: TrainerLike = None,
          target: nn.Module | str | Path | None = None, members: Any = None, models: int = 16, keep: float = 0.5,
          attacks: tuple[str, ...] = ("loss", "shokri", "lira-online", "lira-offline"), recipe: Any = "fast",
          device: str = "auto", seed: int = 0, executor: str = "local", store: str | Path | None = None,
          resume: bool = False, quiet: bool = True, **config: Any) -> AuditResult:
    """Run a membership-inference audit; returns the result (``result.report`` is the HTML report).

    ``target`` given as a module and ``members`` (bool array-like [N_train]) are written, content
    addressed, to ``inputs/<sha256>.pt`` / ``.npy`` beside the run store (``~/.mlaudit/`` by default),
    so the same objects give the same config and the run resumes. Further config fields
    (``attack_options``, ``queries``, ``fpr_targets``, ``n_boot``, ``truth_serum``, ``memorization``,
    ``pool.size``, ``pool.query_precision``, ``pool.accuracy``, ``factory``) go in ``config``, the pool's as
    ``pool={...}``; see docs/membership.md.
    """
    pool = {"models": models, "keep": keep, **config.pop("pool", {})}
    inputs = Path(store).expanduser().parent if store is not None else default_store_path().parent
    tgt = _target(target, members, inputs / "inputs") if target is not None else None
    return run_kind("membership-inference", model=model, data=data, trainer=trainer, recipe=recipe, out=out,
                    device=device, seed=seed, executor=executor, store=store, resume=resume, quiet=quiet,
                    pool=pool, attacks=list(attacks), target=tgt, **config)


def _target(target: nn.Module | str | Path, members: Any, inputs: Path) -> dict[str, Any]:
    if isinstance(target, nn.Module):
        tmp = inputs / "target.tmp.pt"
        sha = save_checkpoint({k: v.detach().cpu() for k, v in target.state_dict().items()}, tmp)
        path = inputs / f"{sha}.pt"
        tmp.replace(path)
    else:
        path = Path(target).expanduser()
        sha = sha256_file(path) if path.is_file() else None
    spec: dict[str, Any] = {"checkpoint": str(path), **({"sha256": sha} if sha else {})}
    if members is not None:
        mask = (members.cpu().numpy() if isinstance(members, torch.Tensor) else np.asarray(members)).astype(bool)
        name = hashlib.sha256(mask.tobytes() + str(mask.shape).encode()).hexdigest()
        spec["members"] = str(inputs / f"{name}.npy")
        if not Path(spec["members"]).is_file():
            np.save(spec["members"], mask)
    return spec
