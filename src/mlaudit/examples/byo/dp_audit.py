"""Audit YOUR DP-SGD implementation: is its epsilon claim refuted? (CPU, about a minute)

`train` below is a hand-written DP-SGD for logistic regression (full batch, per-example clipping,
Gaussian noise) that claims the epsilon its settings give. Run it with "broken" and the noise is
divided by the dataset size, a real bug; the audit then puts a lower bound on epsilon above the claim.
    python examples/byo/dp_audit.py runs/byo-dpa [broken]
"""
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

import mlaudit.privacy

CLIP, LR, STEPS, SIGMA, DELTA = 1.0, 2.0, 20, 20.0, 1e-5
BROKEN = len(sys.argv) > 2 and sys.argv[2] == "broken"


def make_model(num_classes=10):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


def train(model, train_set, *, seed):
    x, y = train_set.tensors
    params = {k: torch.zeros_like(v) for k, v in model.named_parameters()}  # convex model: start at zero

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))  # {name: [N, *shape]}
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        grads = per_example(params, x, y)
        norms = torch.cat([v.flatten(1) for v in grads.values()], 1).norm(dim=1)
        scale = CLIP / norms.clamp_min(CLIP)                                     # clip each example to CLIP
        for k, p in params.items():
            noise = torch.randn(p.shape, generator=g) * SIGMA * CLIP / (len(x) if BROKEN else 1)
            params[k] = p - LR * ((grads[k] * scale.view(-1, *[1] * p.dim())).sum(0) + noise) / len(x)
    model.load_state_dict(params)
    return model


if __name__ == "__main__":
    d = load_digits()
    x, y = torch.tensor(d.images / 16, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target)
    claim = mlaudit.privacy.epsilon(noise_multiplier=SIGMA, sample_rate=1.0, steps=STEPS, delta=DELTA)
    result = mlaudit.privacy.audit(model=make_model, data=((x[:300], y[:300]), (x[1400:], y[1400:])), trainer=train,
                                   claimed_epsilon=claim, claimed_delta=DELTA, models_per_side=50, canary="mislabeled",
                                   out=sys.argv[1] if len(sys.argv) > 1 else "runs/byo-dpa", device="cpu")
    m = result.metrics
    print(f"epsilon lower bound {m['epsilon_lower_bound']:.3f} (claim {m['claimed_epsilon']}), refuted: {m['claim_refuted']}")
    print("report:", result.report)
