"""Which parameters of a model built from a :class:`~mlaudit.models.registry.ModelSpec` train.

``model.train: all`` (the default) trains every parameter. ``model.train: head`` trains only the model's
classifier, its last ``nn.Linear`` (in module registration order, which must output one logit per class):
every other parameter gets ``requires_grad=False`` (the training loop's ``trainable()`` skips it, so it
stays bit-identical), and every other leaf module is kept in eval mode while the model trains, so
BatchNorm running statistics of the frozen feature extractor never move and its dropout is off. That
is the transfer-learning setting of Shafahi et al. 2018 and Saha et al. 2020: a fixed (pretrained,
``model.init``) feature extractor, only the last layer retrained on the (poisoned) training set.

Eval mode is kept by a forward pre-hook on each frozen leaf module (:func:`_keep_eval`): whatever calls
``model.train()`` (the factory's loop or vmap layout, a user's trainer), the module is back in eval mode
before it runs. The hook is a module-level function, so the model still deep-copies and pickles.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from ..errors import ConfigError

TrainPart = Literal["all", "head"]

FROZEN_FLAG = "_mlaudit_frozen"
"""Attribute set (True) on every leaf module :func:`freeze_to_head` keeps in eval mode."""


def classifier_head(model: nn.Module, *, num_classes: int, name: str, field: str = "model.train") -> tuple[str, nn.Linear]:
    """``(qualified name, module)`` of ``model``'s classifier: its last ``nn.Linear``, which must have
    ``num_classes`` outputs. A :class:`ConfigError` naming ``field`` otherwise."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    need = (f"{field} = 'head' retrains only the classifier, which must be the model's last torch.nn.Linear "
            f"(in registration order) with one output per class ({num_classes})")
    if not linears:
        raise ConfigError(f"{need}; model {name!r} has no nn.Linear (use {field} = 'all', or end the model "
                          "in an nn.Linear classifier)")
    head_name, head = linears[-1]
    if head.out_features != num_classes:
        raise ConfigError(f"{need}; the last nn.Linear of model {name!r} ({head_name or 'the model itself'}) "
                          f"has {head.out_features} outputs, so it is not the classifier (use {field} = 'all', "
                          "or register the classifier last)")
    return head_name, head


def freeze_to_head(model: nn.Module, *, num_classes: int, name: str) -> nn.Module:
    """Freeze everything but the classifier (:func:`classifier_head`): parameters ``requires_grad=False``,
    leaf modules kept in eval mode while training. Returns ``model`` (changed in place)."""
    _, head = classifier_head(model, num_classes=num_classes, name=name)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    for m in model.modules():
        if m is head or next(m.children(), None) is not None or getattr(m, FROZEN_FLAG, False):
            continue
        setattr(m, FROZEN_FLAG, True)
        m.register_forward_pre_hook(_keep_eval)
        m.train(False)
    return model


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a frozen module: run in eval mode even when the model trains."""
    if module.training:
        module.training = False


def frozen_parameters(model: nn.Module) -> int:
    """How many scalar parameters of ``model`` do not train (``requires_grad=False``)."""
    return sum(p.numel() for p in model.parameters() if not p.requires_grad)


def training_setting(spec: Any) -> str:
    """Short name of how a model of ``spec`` trains: ``from scratch``, ``fine-tuned`` (all parameters,
    from ``init``), ``transfer`` (classifier only, on ``init``'s frozen features) or ``head on random
    features`` (classifier only, no ``init``)."""
    if spec.train == "head":
        return "transfer" if spec.init is not None else "head on random features"
    return "fine-tuned" if spec.init is not None else "from scratch"
