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


class SmallCNN(nn.Module):
    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.head = nn.Linear(width * 16, num_classes)

    def forward(self, x):
        return self.head(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


class Digits(torch.utils.data.Dataset):  # any map-style dataset of (input, label) works
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def train(model, train_set, *, seed, device, epochs=20):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=epochs * (len(train_set) // 50 + 1))
    for _ in range(epochs):
        for batch in torch.randperm(len(train_set), generator=g).split(50):
            x, y = train_set[batch]                      # a TensorDataset indexes with a tensor of ids
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


if __name__ == "__main__":
    d = load_digits()
    x, y = torch.tensor(d.images / 16, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target)
    result = mlaudit.poison.targeted(
        model=SmallCNN, data=(Digits(x[:1400], y[:1400]), Digits(x[1400:], y[1400:])), trainer=train,
        attack={"method": "gradient-matching", "eps": 32, "budget": 0.04, "restarts": 2, "steps": 100},
        scenarios=2, victims=2, out=sys.argv[1] if len(sys.argv) > 1 else "runs/byo-brew", device="cpu")
    print("poison success:", result.metrics["poison_success"])
    print("report:", result.report)
