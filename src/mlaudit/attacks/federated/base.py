"""The shared shape of attacks on federated updates: what the server observes, what an attack returns,
one registry and one call.

    obs = Observation(grad=agg, users=16, batch=4, input_shape=(1, 8, 8))
    rec = FEDERATED_ATTACKS.get("inverting-gradients")(model, obs, steps=2000, box=(0, 1))
    rec.x        # [M, *input_shape] candidate inputs, order unknown (match them with metrics.match)

Every attack is ``attack(model, obs, **options) -> Reconstruction`` where ``model`` is the global model
the users computed their updates on (for a malicious server: the modified model it sent) and ``obs``
the update the server received. Honest-but-curious attacks optimise inputs through the one crafting
engine (:func:`mlaudit.craft.craft`); the malicious ``imprint`` reads inputs off the update in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...query import ParamVector, evaluating, param_grad, training
from ...registry import Registry


@dataclass(frozen=True)
class Observation:
    """One update as the server sees it.

    ``grad``: {name: [*shape]} for the global model's trainable parameters, in gradient units: FedSGD's
    sum over the ``users`` aggregated of each user's mean-loss gradient on its ``batch`` inputs
    (``users = 1``: one user's own update, no secure aggregation); for FedAvg the summed weight updates
    divided by lr * local steps (an average gradient). ``train_mode``: the mode the users' forward ran in.
    """

    grad: ParamVector
    users: int
    batch: int
    input_shape: tuple[int, ...]
    train_mode: bool = False

    def __post_init__(self) -> None:
        if self.users < 1 or self.batch < 1:
            raise ConfigError(f"an observation needs users >= 1 and batch >= 1, got users={self.users}, "
                              f"batch={self.batch}")

    @property
    def inputs(self) -> int:
        """How many inputs are behind the update: users * batch."""
        return self.users * self.batch

    def simulate(self, model: nn.Module, x: Tensor, labels: Tensor, *, create_graph: bool = True) -> ParamVector:
        """The update candidate inputs ``x`` [users*batch, *shape] with ``labels`` (int [n], or soft
        probabilities [n, C], float) would produce: sum_u (1/B) sum_b grad CE = (1/B) * grad of the summed CE,
        differentiable w.r.t. x when ``create_graph``. Sequence models (logits [n, C, L]) take labels int
        [n, L] or soft [n, C, L], and the CE is the mean over a user's B * L targets, as
        :func:`mlaudit.federated.user_gradients` takes it."""
        names = list(self.grad)
        owned = dict(model.named_parameters())
        params = ParamVector({n: owned[n].detach() for n in names})
        mode = training(model) if self.train_mode else evaluating(model)

        def loss(f: Callable[[Tensor], Tensor]) -> Tensor:
            out = f(x).float()
            per = math.prod(out.shape[2:])  # targets per input: 1, or L for a sequence
            if labels.is_floating_point():
                return -(labels * F.log_softmax(out, 1)).sum() / (self.batch * per)
            return F.cross_entropy(out, labels, reduction="sum") / (self.batch * per)

        with mode:
            return param_grad(model, loss, params=params, create_graph=create_graph)


@dataclass
class Reconstruction:
    """An attack's output: candidate inputs ``x`` [M, *shape] (M may differ from the number of inputs
    behind the update; their order is unknown), their ``labels`` [M] when the attack infers them, and
    JSON-able ``info`` (settings, diagnostics)."""

    x: Tensor
    labels: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


class FederatedAttack(Protocol):
    """The uniform call: ``attack(model, obs, **options) -> Reconstruction``."""

    def __call__(self, model: nn.Module, obs: Observation, /, **options: Any) -> Reconstruction: ...


FEDERATED_ATTACKS: Registry[FederatedAttack] = Registry("federated attack")


def register_federated(name: str) -> Callable[[FederatedAttack], FederatedAttack]:
    """Decorator adding an attack to :data:`FEDERATED_ATTACKS` under ``name``."""
    return FEDERATED_ATTACKS.register(name)


def check_observation(model: nn.Module, obs: Observation) -> None:
    """ConfigError unless ``obs.grad`` holds exactly the trainable parameters of ``model``, with their shapes."""
    owned = {n: p for n, p in model.named_parameters() if p.requires_grad}
    bad = [n for n, g in obs.grad.items() if n not in owned or owned[n].shape != g.shape]
    bad += [n for n in owned if n not in obs.grad]
    if bad:
        raise ConfigError(f"the observed update does not fit the model: parameters {bad[:4]} are missing or "
                          "differ in shape; attack the model the users computed the update on")
    if not math.isfinite(float(obs.grad.norm())):
        raise ConfigError("the observed update has non-finite entries")


def total_variation(x: Tensor) -> Tensor:
    """Mean absolute difference of vertically and horizontally neighbouring pixels of x [N, C, H, W],
    summed over the two directions (Rudin et al. 1992; the image prior of Geiping et al. 2020); 0 for
    inputs that are not images."""
    if x.dim() != 4:
        return x.new_zeros(())
    return (x[:, :, 1:] - x[:, :, :-1]).abs().mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()
