"""Witches' Brew (gradient matching) against YOUR training pipeline (CPU, about a minute).

mlaudit crafts poisons on a model trained by your loop, then retrains victims from scratch with
your loop on the poisoned data and reports poison success (mean +- SE over scenarios).
    python examples/byo/witches_brew.py runs/byo-brew
"""
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

import mlaudit.poison


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.body(x)


class Digits(torch.utils.data.Dataset):  # any map-style dataset of (input, label) works
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def train(model, train_set, *, seed, device):
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(20):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
    return model


if __name__ == "__main__":
    d = load_digits()
    x, y = torch.tensor(d.images / 16, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target)
    result = mlaudit.poison.targeted(
        model=Net, data=(Digits(x[:1400], y[:1400]), Digits(x[1400:], y[1400:])), trainer=train,
        attack={"method": "gradient-matching", "eps": 16, "budget": 0.01, "restarts": 2, "steps": 50},
        scenarios=2, victims=2, out=sys.argv[1] if len(sys.argv) > 1 else "runs/byo-brew", device="cpu")
    print("poison success:", result.metrics["poison_success"])
    print("report:", result.report)
