"""An availability attack (adversarial poisoning, Fowl et al. 2021) on YOUR pipeline (CPU, ~30 s).

Every training image is perturbed within eps; victims retrained by your loop on clean and on
poisoned data (paired seeds) show the accuracy the attack takes away.
    python examples/byo/availability.py runs/byo-avail
"""
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

import mlaudit.poison


def make_model(num_classes=10):  # a factory function works as well as a class
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, num_classes))


def train(model, train_set):  # full-batch L-BFGS: any training procedure works
    x, y = train_set.tensors
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=200, history_size=20)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) + 1e-4 * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


if __name__ == "__main__":
    d = load_digits()
    x, y = torch.tensor(d.images / 16, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target)
    result = mlaudit.poison.availability(
        model=make_model, data=((x[:1400], y[:1400]), (x[1400:], y[1400:])), trainer=train,
        attack={"method": "adversarial-untargeted", "eps": 96, "steps": 50}, victims=2,
        out=sys.argv[1] if len(sys.argv) > 1 else "runs/byo-avail", device="cpu")
    print({k: result.metrics[k] for k in ("clean_accuracy", "poisoned_accuracy") if k in result.metrics})
    print("report:", result.report)
