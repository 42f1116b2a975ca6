"""Query models: logits, losses and predictions of modules, stacks or checkpoints; parameter
gradients and parameter vectors; the eval-mode guard; templates and checkpoint loading with one fit check.

    logits = forward_batched(model, x, batch_size=1024)               # [N, C], eval mode, no grad
    L = logits_from_checkpoints(template_fn, paths, x, queries=("identity", "flip"))  # [M, N, A, C]
    f = features_batched(model, x)                                    # penultimate features [N, D]
    g = param_grad(model, (x, y))                                     # ParamVector {name: [*shape]}
    g.cos(param_grad(model, (x_t, y_t)))                              # 0-dim tensor
    with evaluating(*models, requires_grad=False): ...                # eval + frozen, restored after
    model = load_model(spec, "a.pt", sha256=h, data=data)             # weights-only, hash- and fit-checked
"""

from .features import features_batched, penultimate_features
from .grads import Forward, Loss, LossFn, loss_and_grad, param_grad
from .load import describe, fit_weights, load_model, model_template
from .logits import (
    QUERY_KINDS,
    QUERY_PATTERNS,
    Checkpoint,
    Query,
    collect_logits,
    default_queries,
    forward_batched,
    logits_from_checkpoints,
    parse_queries,
    parse_query,
)
from .modes import evaluating, in_mode, training
from .params import ParamVector

__all__ = [
    "QUERY_KINDS", "QUERY_PATTERNS", "Checkpoint", "Forward", "Loss", "LossFn", "ParamVector", "Query",
    "collect_logits", "default_queries", "describe", "evaluating", "features_batched", "fit_weights",
    "forward_batched", "in_mode", "load_model", "logits_from_checkpoints", "loss_and_grad", "model_template",
    "param_grad", "parse_queries", "parse_query", "penultimate_features", "training",
]
