"""Decepticons (seed 002, chapter 4) on a small GPT-2-style model: the fraction of the users' (token,
position) occurrences a malicious server reads off one FedSGD aggregate, vs users and sequence length,
next to the honest-but-curious bag of tokens and, with ``--inversion``, the honest-but-curious text inversion
(TAG / LAMP style, :func:`mlaudit.attacks.federated.text_inversion`) on the unmodified model's aggregate of
the same users.

    python benchmarks/decepticons.py                 # CPU, about a minute
    python benchmarks/decepticons.py --inversion --widths 64 --lengths 16,32 --users 1,2,4,8   # CPU, minutes

Text: CPython's help topics (``pydoc_data``, lower-cased, whitespace collapsed), character tokens (76);
the server's public text is 2000 sequences of it, the users' sequences are drawn from the rest (one per
user). Model: TinyGPT (ReLU MLPs, untied head), at initialisation. Writes
benchmarks/results/decepticons_pydoc_cpu.{json,md} (``--activation gelu``: decepticons_pydoc_gelu_cpu).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import cpu_name, environment, write_results  # noqa: E402

from mlaudit.attacks.federated import Observation, decepticons, plant_decepticon  # noqa: E402
from mlaudit.attacks.federated.decepticons import pair_recovery, sequences, token_recovery  # noqa: E402
from mlaudit.attacks.federated.text_inversion import text_inversion, text_recovery  # noqa: E402
from mlaudit.audit.exposure import pydoc_text  # noqa: E402
from mlaudit.federated import secure_aggregate, user_gradients  # noqa: E402
from mlaudit.models.gpt import TinyGPT  # noqa: E402
from mlaudit.query import ParamVector  # noqa: E402
from mlaudit.stats import MeanSE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--users", default="1,2,4,8,16,32")
    ap.add_argument("--lengths", default="16,32,64")
    ap.add_argument("--widths", default="64,128", help="d_model values (bins = 4 d_model, the first MLP's width)")
    ap.add_argument("--activation", choices=["relu", "gelu"], default="relu", help="TinyGPT's MLP activation")
    ap.add_argument("--tag-tokens", default="1", help="sequence tag lengths (first k tokens), comma-separated")
    ap.add_argument("--inversion", action="store_true", help="also the honest-but-curious text inversion")
    ap.add_argument("--inversion-steps", type=int, default=300, help="its crafting-engine steps")
    ap.add_argument("--inversion-refine", type=int, default=200, help="its discrete moves")
    ap.add_argument("--prior-epochs", type=int, default=0, help="LAMP's language-model prior for the inversion: a "
                    "next-character model (CharMLP, context 8) trained this many epochs on the server's public "
                    "sequences by the one training loop (0: no prior)")
    ap.add_argument("--prior-weight", type=float, default=0.2, help="its weight in the discrete score (LAMP's alpha_lm)")
    ap.add_argument("--rounds", type=int, default=1, help="alternations of the inversion's continuous and discrete phases")
    ap.add_argument("--embedding-reg", type=float, default=0.0, help="LAMP's embedding-length regulariser (alpha_reg)")
    ap.add_argument("--match-embedding", action="store_true",
                    help="match the token embedding's gradient too (soft token weights; text_inversion match_embedding)")
    ap.add_argument("--name", default=None, help="results file name (default: decepticons_pydoc[_gelu]_cpu)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    text = pydoc_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text[:400_000]])
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for d in map(int, args.widths.split(",")):
        for length in map(int, args.lengths.split(",")):
            seqs = ids[: len(ids) // (length + 1) * (length + 1)].view(-1, length + 1)
            order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0))
            public, private = seqs[order[:2000], :length], seqs[order[2000:]]
            prior = train_prior(public, len(chars), args.prior_epochs) if args.inversion and args.prior_epochs else None
            torch.manual_seed(0)
            model = TinyGPT(len(chars), length, d_model=d, heads=4, layers=2, activation=args.activation)
            for k, users in ((k, u) for k in map(int, args.tag_tokens.split(",")) for u in map(int, args.users.split(","))):
                mal = plant_decepticon(model, public, bins=4 * d, tag_tokens=k, generator=torch.Generator().manual_seed(1))
                rec_f, bag, secs, seq, toks, inv, inv_secs = [], [], [], [], [], [], []
                for t in range(args.trials):
                    pick = torch.randperm(len(private), generator=torch.Generator().manual_seed(100 + t))[:users]
                    s = private[pick].view(users, 1, length + 1)
                    t0 = time.perf_counter()
                    agg = secure_aggregate(user_gradients(mal, s[..., :length], s[..., 1:]))
                    rec = decepticons(mal, Observation(grad=ParamVector(agg), users=users, batch=1,
                                                       input_shape=(length,)))
                    secs.append(time.perf_counter() - t0)
                    true = s[..., :length].reshape(-1, length)
                    rec_f.append(pair_recovery(true, rec.x))
                    toks.append(token_recovery(true, rec.x[:, 0]))
                    if args.inversion:  # the honest server: the unmodified model, the same users
                        t0 = time.perf_counter()
                        plain = secure_aggregate(user_gradients(model, s[..., :length], s[..., 1:]))
                        got = text_inversion(model, Observation(grad=ParamVector(plain), users=users, batch=1,
                                                                input_shape=(length,)), steps=args.inversion_steps,
                                             refine=args.inversion_refine, generator=torch.Generator().manual_seed(t),
                                             prior=prior, prior_weight=args.prior_weight if prior else 0.0,
                                             rounds=args.rounds, embedding_reg=args.embedding_reg,
                                             match_embedding=args.match_embedding)
                        inv_secs.append(time.perf_counter() - t0)
                        inv.append(text_recovery(true, got.x))
                    seq.append(sequences(true, rec.x))
                    present = set(true.flatten().tolist())
                    bag.append(len(present & set(rec.info["token_set"])) / len(present))
                rows.append({"d_model": d, "bins": 4 * d, "length": length, "users": users, "tokens": users * length,
                             "tag_tokens": k,
                             "pairs_recovered": MeanSE.of(rec_f).to_dict(), "bag_of_tokens_recall": MeanSE.of(bag).to_dict(),
                             "in_sequence": MeanSE.of([q["tokens_in_sequence"] for q in seq]).to_dict(),
                             "whole": MeanSE.of([q["whole"] for q in seq]).to_dict(),
                             "merged": MeanSE.of([q["merged"] for q in seq]).to_dict(),
                             "tokens_recovered": MeanSE.of(toks).to_dict(), "seconds": sum(secs) / len(secs)})
                if inv:
                    rows[-1]["inversion"] = {k: MeanSE.of([r[k] for r in inv]).to_dict() for k in inv[0]}
                    rows[-1]["inversion_seconds"] = sum(inv_secs) / len(inv_secs)
                print(rows[-1], flush=True)
    res = {"environment": environment(), "cpu": cpu_name(), "vocab": len(chars), "rows": rows, "settings": vars(args),
           "seconds": time.perf_counter() - t_all}
    name = args.name or ("decepticons_pydoc" + ("_inversion" if args.inversion else "")
                         + ("" if args.activation == "relu" else f"_{args.activation}") + "_cpu")
    write_results(name, res, table(res) + (inversion_table(res) if args.inversion else ""))
    print(table(res) + (inversion_table(res) if args.inversion else ""))


PRIOR_CONTEXT = 8


def train_prior(public: torch.Tensor, vocab: int, epochs: int):  # noqa: ANN201
    """LAMP's prior stand-in: a next-character CharMLP (context 8) trained on the server's public sequences
    [P, L] (flattened to one stream) by the one training loop; returns :func:`next_token_prior` of it."""
    from mlaudit.attacks.federated import next_token_prior
    from mlaudit.audit.exposure import windows
    from mlaudit.models.mlp import CharMLP
    from mlaudit.train.api import train
    from mlaudit.train.loop import init_models

    data = windows(public.flatten(), PRIOR_CONTEXT, [str(i) for i in range(vocab)])
    net = init_models(lambda: CharMLP(context=PRIOR_CONTEXT, vocab=vocab, embed=32, hidden=256), [0])[0]
    net = train(net, data, {"name": "custom", "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "epochs": epochs,
                            "batch_size": 256, "schedule": "cosine", "augment": "none", "label_smoothing": 0.0},
                seed=0, device="cpu")
    return next_token_prior(net, PRIOR_CONTEXT)


def table(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = ["# Decepticons on TinyGPT: (token, position) pairs read off one FedSGD aggregate", "",
             f"{env['date']}, CPU ({res['cpu']}), torch {env['torch']}; CPython's help topics as character tokens "
             f"({res['vocab']}), one sequence per user, TinyGPT (2 layers, 4 heads, {res['settings']['activation']}) at "
             "initialisation; the server "
             f"sees the sum of the users' gradients; {res['settings']['trials']} user draws per row (mean ± SE). "
             "Pairs recovered: the fraction of the users' (token, position) occurrences among the decoded pairs. "
             "In its sequence: the mean fraction of a sequence's positions recovered with the right token in the "
             "group of its tag (its first k tokens, written by the first attention layer; k = tag tokens); sequences "
             "sharing their first k tokens are merged and count 0. Whole: sequences recovered entirely. Bag of "
             "tokens: the honest-but-curious baseline "
             "(which tokens occur, from the embedding gradient's non-zero rows; no positions, no counts).", "",
             "| d_model (bins) | tag tokens | length | users | tokens | pairs recovered | in its sequence | whole sequences | "
             "merged by the tag | bag-of-tokens recall | s per attack |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        p, b = r["pairs_recovered"], r["bag_of_tokens_recall"]
        lines.append(f"| {r['d_model']} ({r['bins']}) | {r.get('tag_tokens', 1)} | {r['length']} | {r['users']} | "
                     f"{r['tokens']} | "
                     f"{100 * p['mean']:.1f}% ± {100 * p['se']:.1f} | {100 * r['in_sequence']['mean']:.1f}% | "
                     f"{100 * r['whole']['mean']:.0f}% | {100 * r['merged']['mean']:.0f}% | {100 * b['mean']:.0f}% | "
                     f"{r['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def inversion_table(res: dict[str, Any]) -> str:
    """Decepticons (malicious) vs the honest-but-curious text inversion and bag of tokens, row by row."""
    st = res["settings"]
    lines = ["", "## Honest-but-curious text inversion vs Decepticons on the same users", "",
             f"The inversion (TAG / LAMP style: continuous embeddings through the crafting engine, cosine gradient "
             f"matching, {st['inversion_steps']} steps, projection onto the bag of tokens, {st['inversion_refine']} "
             "swap / move / substitute moves scored by the gradient distance"
             + (f" plus {st['prior_weight']} x the mean NLL under a next-character model trained "
                f"{st['prior_epochs']} epochs on the server's public sequences (LAMP's prior)"
                if st.get("prior_epochs") else "")
             + (f", {st['rounds']} alternations of the continuous and discrete phases" if st.get("rounds", 1) > 1 else "")
             + (f", LAMP's embedding-length regulariser alpha_reg = {st['embedding_reg']}" if st.get("embedding_reg")
                else "")
             + (", the token embedding's gradient matched too (soft token weights)" if st.get("match_embedding") else "")
             + ") attacks the unmodified model's sum of "
             "the same users' gradients. Tokens: occurrences recovered ignoring position (multiset; pooled ROUGE-1 "
             "F1 for the inversion, which returns as many tokens as were typed). Pairs: (token, position) "
             "occurrences. Bigrams: adjacent pairs recovered (pooled ROUGE-2 recall). Whole: sequences recovered "
             "exactly. Mean ± SE over the user draws.", "",
             "| d_model | length | users | Decepticons pairs | Decepticons tokens | inversion pairs | inversion tokens | "
             "inversion bigrams | inversion whole | bag-of-tokens recall | s per inversion |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def pm(v: dict[str, float]) -> str:
        return f"{100 * v['mean']:.1f}% ± {100 * v['se']:.1f}"

    for r in res["rows"]:
        if "inversion" not in r:
            continue
        i = r["inversion"]
        lines.append(f"| {r['d_model']} | {r['length']} | {r['users']} | {pm(r['pairs_recovered'])} | "
                     f"{pm(r['tokens_recovered'])} | {pm(i['pairs'])} | {pm(i['tokens'])} | {pm(i['bigrams'])} | "
                     f"{100 * i['whole']['mean']:.0f}% | {100 * r['bag_of_tokens_recall']['mean']:.0f}% | "
                     f"{r['inversion_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
