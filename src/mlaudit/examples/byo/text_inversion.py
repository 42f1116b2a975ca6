"""Honest-but-curious text inversion against YOUR language model in federated learning (CPU, about 10 s).

Your causal language model (here a small one with nn.MultiheadAttention; any nn.Module that maps token ids
[B, L] to next-token logits [B, V, L] through an nn.Embedding works), sent unmodified by an honest-but-curious
server to 4 users, each with 2 sequences of 16 characters of CPython's help text. The server sees the secure sum of
the first n users' FedSGD gradients and optimises token embeddings until their gradient matches it (TAG / LAMP
style), then prints how much of the users' text it recovered; report.html and artifacts/text_inversion.md hold
the table and true vs closest recovered sequences.
    python examples/byo/text_inversion.py runs/byo-text-inversion
"""
import sys

import torch
from torch import nn

from mlaudit.api import model_field
from mlaudit.experiments import run_experiment


class OwnLM(nn.Module):
    def __init__(self, num_classes, input_shape, d=32):
        super().__init__()
        self.words, self.where = nn.Embedding(num_classes, d), nn.Embedding(input_shape[0], d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.out = nn.Linear(d, num_classes)

    def get_input_embeddings(self):  # how the attack finds the token embedding (Hugging Face's convention)
        return self.words

    def forward(self, tokens):
        n = tokens.shape[1]
        h = self.words(tokens.long()) + self.where(torch.arange(n, device=tokens.device))
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=tokens.device), 1)
        h = h + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return self.out(h + self.mlp(h)).transpose(1, 2)


if __name__ == "__main__":
    config = {"kind": "federated", "attack": "text-inversion", "recipe": "fast", "seed": 0,
              "dataset": {"name": "pydoc-text", "options": {"length": 16, "chars": 100_000}},
              "model": model_field(OwnLM), "users": 4, "batch": 2,
              "text_inversion": {"steps": 200, "refine": 100, "user_counts": [1, 2, 4]}}
    result = run_experiment(config, out=sys.argv[1], device="cpu", quiet=True).results
    for row in result["metrics"]["text_inversion"]["per_users"]:
        print(f"{row['users']} user(s): {100 * row['pairs']['value']:.1f}% of (token, position) pairs, "
              f"{100 * row['tokens']['value']:.1f}% of tokens, {100 * row['bigrams']:.1f}% of bigrams recovered")
