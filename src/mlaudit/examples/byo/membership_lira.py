"""LiRA membership inference against ONE model of your own (CPU, about a minute).

Your architecture, your dataset class and your training loop; mlaudit trains 16 shadow models with
your loop on random halves, attacks your target model with LiRA and LOSS, and writes report.html.
    python examples/byo/membership_lira.py runs/byo-mi
"""
import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

import mlaudit.membership


class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.body(x)


def train(model, train_set, *, seed, device):
    loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
    return model


if __name__ == "__main__":
    d = load_digits()
    x, y = torch.tensor(d.images / 16, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target)
    train_set = torch.utils.data.TensorDataset(x[:1400], y[:1400])
    test_set = torch.utils.data.TensorDataset(x[1400:], y[1400:])
    torch.manual_seed(0)
    members = torch.rand(1400) < 0.5                                                # what the target saw
    target = train(Net(), torch.utils.data.Subset(train_set, members.nonzero().flatten().tolist()), seed=1, device="cpu")

    result = mlaudit.membership.audit(model=Net, data=(train_set, test_set), trainer=train, target=target,
                                      members=members, models=16, attacks=("loss", "lira-online"),
                                      out=sys.argv[1] if len(sys.argv) > 1 else "runs/byo-mi", device="cpu")
    for attack in ("loss", "lira-online"):
        m = result.metrics["target"][attack]
        print(f"{attack}: AUC {m['auc']['value']:.3f}, TPR at 1% FPR {m['tpr_at_fpr']['0.01']['value']:.3f}")
    print("report:", result.report)
