"""Bad input to evasion attacks: ConfigError naming the field, the value and what is allowed; a
stochastic model draws a warning that EOT is needed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlaudit.attacks.evasion import EVASION_ATTACKS, StochasticModelWarning, apgd, fgsm, pgd
from mlaudit.errors import ConfigError


def setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    return model, torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("change, match", [
    ({"eps": -0.1}, r"eps: -0.1 .*allowed 0 <= eps <= 1"),
    ({"eps": 1.5}, r"eps: 1.5 .*pixel range"),
    ({"eps": 5.0, "norm": "l2"}, r"allowed 0 <= eps <= 4 for norm l2"),
    ({"norm": "l3"}, r"norm: unknown norm 'l3'; allowed: linf, l2"),
    ({"x": 2.0}, r"x: values in .* outside the declared pixel range \[0, 1\]"),
    ({"y": torch.tensor([0, 1, 3, 0])}, r"y: labels in \[0, 3\] are out of range; allowed 0 <= y < 3"),
    ({"y": torch.tensor([0.0, 1.0, 2.0, 0.0])}, r"y: must be integer labels"),
    ({"y": torch.tensor([0, 1])}, r"y: must be integer labels \[N=4\]"),
    ({"steps": 0}, r"pgd: steps=0; allowed: steps > 0"),
    ({"loss": "hinge"}, r"unknown evasion loss 'hinge'"),
    ({"target": torch.tensor([0, 2, 1, 1])}, r"target: equals the true label for 1 examples"),
])
def test_bad_input_is_a_config_error(change: dict, match: str) -> None:
    model, x, y = setup()
    opts = {"eps": 0.1, **change}
    x = x * opts.pop("x") if "x" in opts else x
    y = opts.pop("y") if "y" in opts else y
    with pytest.raises(ConfigError, match=match):
        pgd(model, x, y, **opts)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd"])
@pytest.mark.parametrize("eps", [0.1, 0.0])
@pytest.mark.parametrize("bad", ["x", "y"])
def test_deferred_range_checks_refuse_after_at_most_one_forward_pass(name: str, eps: float, bad: str) -> None:
    """fgsm, pgd and apgd queue the reads of x's and y's ranges behind their first forward pass and read them at
    the second (check_inputs' ``later``, RangeCheck): the error is the same, the model answers at most one attack
    query, and the out-of-range labels never reach the loss (clamped until the read: in a CUDA cross-entropy they
    would be a device-side assert, and on the CPU an IndexError instead of this ConfigError)."""
    model, x, y = setup()
    EVASION_ATTACKS.get(name)(model, x, y, eps=0.1)  # the model's probe is cached: later calls query only to attack
    seen: list[int] = []
    model.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    x, y = (x * 2, y) if bad == "x" else (x, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ConfigError, match="outside the declared pixel range" if bad == "x" else "out of range"):
        EVASION_ATTACKS.get(name)(model, x, y, eps=eps)
    assert len(seen) <= (1 if eps or name == "fgsm" else 0)  # eps 0: pgd and apgd check at once (no attack)


def test_a_model_that_fails_on_out_of_range_inputs_gets_the_range_error() -> None:
    """The deferred range check runs when the first forward pass raises: the user sees the ConfigError naming the
    inputs, not the model's own exception."""
    model, x, y = setup()
    fgsm(model, x, y, eps=0.1)

    def refuse(m: nn.Module, i: tuple[torch.Tensor, ...]) -> None:
        if float(i[0].max()) > 1:
            raise ValueError("the model's own input check")

    model.register_forward_pre_hook(refuse)
    with pytest.raises(ConfigError, match="outside the declared pixel range"):
        fgsm(model, x * 2, y, eps=0.1)


def test_declared_box_is_honoured() -> None:
    model, x, y = setup()
    x = x * 255
    with pytest.raises(ConfigError, match="pass box"):
        pgd(model, x, y, eps=8.0)
    x_adv = pgd(model, x, y, eps=8.0, box=(0.0, 255.0), steps=2)
    assert (x_adv - x).abs().max() <= 8.0 + 1e-4 and x_adv.max() <= 255


def test_training_mode_is_refused_and_names_eot() -> None:
    model, x, y = setup()
    model.train()
    with pytest.raises(ConfigError, match="model: is in training mode.*model.eval\\(\\).*EOT"):
        EVASION_ATTACKS.get("fgsm")(model, x, y)
    assert model.training  # untouched


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1) + 0.1 * torch.randn_like(x.flatten(1)))


def test_stochastic_model_warns_that_eot_is_needed() -> None:
    _, x, y = setup()
    with pytest.warns(StochasticModelWarning, match="EOT"):
        pgd(_Noisy().eval(), x, y, eps=0.1, steps=2)


def test_the_stochastic_probe_runs_once_per_deterministic_model_and_every_call_on_a_stochastic_one() -> None:
    model, x, y = setup()
    probes: list[int] = []
    model.register_forward_hook(lambda m, i, o: probes.append(len(i[0])))  # the probe passes x[:2]
    EVASION_ATTACKS.get("fgsm")(model, x, y, eps=0.1)
    EVASION_ATTACKS.get("fgsm")(model, x, y, eps=0.1)
    assert probes.count(2) == 2  # two probe passes on the first call, none on the second
    EVASION_ATTACKS.get("fgsm")(model, x.reshape(len(x), 16), y, eps=0.1)  # another input shape: probed again
    assert probes.count(2) == 4
    noisy = _Noisy().eval()
    for _ in range(2):
        with pytest.warns(StochasticModelWarning, match="EOT"):
            pgd(noisy, x, y, eps=0.1, steps=1)


def test_dlr_needs_enough_classes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 1, 0])
    with pytest.raises(ConfigError, match="'dlr' needs at least 3 classes; the model has 2"):
        apgd(model, x, y, loss="dlr")
    with pytest.raises(ConfigError, match="targeted 'dlr' needs at least 4 classes"):
        EVASION_ATTACKS.get("apgd-t")(model, x, y)


def test_unknown_attack_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match="valid evasion attacks: apgd, apgd-t, autoattack, cw, fab, fab-t, fgsm, pgd, square"):
        EVASION_ATTACKS.get("deepfool")
