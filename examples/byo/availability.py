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


def train(model, train_set, *, seed, device):
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
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
