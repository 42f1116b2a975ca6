"""What bounds the book-keeping DP step (issue 15 goal 1)? Its arithmetic against the non-private step's.

No timing: for ResNet-18-GN and the fast CNN (CIFAR-10 shapes), every Conv2d / Linear layer's T (output
positions), d_in (C_in k_h k_w / in_features) and d_out, and the cost rule of fast clipping
(:func:`mlaudit.privacy.fastclip_rules.use_ghost`, the unfolded view, gradients kept) per layer. Counted (FLOPs as
2 x multiply-adds, B examples):

* non-private forward + backward: forward 2 B T d_in d_out per layer, the input gradient the same (not for the
  first layer), the weight gradient the same;
* book-keeping: the forward and the input gradients as above (``fastclip._forward``), then per layer either
  the materialised per-example gradients (B T d_in d_out multiply-adds: **the weight gradient's own arithmetic**, in
  B small matmuls) plus their memory traffic (written once, read for the norm and for ``sum_i f_i grad_i``), or the
  ghost norm's Grams (2 B T^2 (d_in + d_out)) plus the weighted weight gradient (the weight gradient's arithmetic).

So the extra arithmetic of book-keeping is the ghost Grams alone; the rest of its extra cost is the per-example
gradients' memory traffic and the precision and shape its matmuls run in. The script also reads the times measured
by ``dp_compile_probe.py`` (``--measured``, its JSON) and sets them beside these counts.

    python benchmarks/probes/dp_step_arithmetic.py [--batch 288] [--measured benchmarks/results/dp_compile_probe_h100.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import RESULTS, write_results  # noqa: E402

from mlaudit.models.registry import build_model  # noqa: E402
from mlaudit.privacy.fastclip_rules import use_ghost  # noqa: E402

MODELS = {"resnet18": {"name": "resnet18", "norm": "group"}, "fastcnn": {"name": "fastcnn"}}


def layer_shapes(spec: dict[str, str]) -> list[tuple[str, int, int, int]]:
    """(name, T, d_in, d_out) of every Conv2d / Linear in forward order, for one 3x32x32 input."""
    model = build_model(spec, input_shape=(3, 32, 32), num_classes=10)
    rows: list[tuple[str, int, int, int]] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            mod.register_forward_hook(lambda m, _a, out, n=name: rows.append(
                (n, out.shape[2] * out.shape[3], m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1],
                 m.out_channels)))
        elif isinstance(mod, nn.Linear):
            mod.register_forward_hook(lambda m, _a, _o, n=name: rows.append((n, 1, m.in_features, m.out_features)))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return rows


def count(rows: list[tuple[str, int, int, int]], b: int) -> dict[str, float]:
    """GFLOP and GB of one step of ``b`` examples (see the module docstring)."""
    fwd = sum(2 * b * t * i * o for _, t, i, o in rows)
    first = 2 * b * rows[0][1] * rows[0][2] * rows[0][3]
    ghost = [r for r in rows if use_ghost(r[1], r[2], r[3], "auto")]
    mat = [r for r in rows if r not in ghost]
    return {
        "layers": len(rows), "ghost_layers": len(ghost),
        "forward_gflop": fwd / 1e9,
        "input_grad_gflop": (fwd - first) / 1e9,
        "weight_grad_gflop": fwd / 1e9,
        "per_example_grad_gflop": sum(2 * b * t * i * o for _, t, i, o in mat) / 1e9,
        "ghost_gram_gflop": sum(2 * b * t * t * (i + o) for _, t, i, o in ghost) / 1e9,
        "ghost_weighted_grad_gflop": sum(2 * b * t * i * o for _, t, i, o in ghost) / 1e9,
        "per_example_grad_gb": sum(b * i * o for _, _, i, o in mat) * 4 / 1e9,  # float32
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=288, help="examples (slots) of the step")
    ap.add_argument("--measured", default=str(RESULTS / "dp_compile_probe_h100.json"))
    ap.add_argument("--name", default="dp_step_arithmetic")
    args = ap.parse_args()
    measured = json.loads(Path(args.measured).read_text()) if Path(args.measured).exists() else None
    out: dict[str, object] = {"batch": args.batch, "rule": "use_ghost (unfolded view, gradients kept)",
                              "measured_from": Path(args.measured).name if measured else None, "models": {}}
    md = (f"# The book-keeping DP step's arithmetic (issue 15 goal 1)\n\n`python benchmarks/probes/dp_step_arithmetic.py "
          f"--batch {args.batch}`: counts, not timings (FLOPs = 2 x multiply-adds, float32 bytes); the cost rule "
          f"per layer as fast clipping applies it (unfolded view, gradients kept).\n\n"
          "| model | layers (ghost) | fwd | input grads | weight grads | BK: per-example grads | BK: ghost Grams | "
          "BK: ghost weighted grads | per-example gradients kept (size) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    for key, spec in MODELS.items():
        c = count(layer_shapes(spec), args.batch)
        out["models"][key] = c  # type: ignore[index]
        md += (f"| {key} | {c['layers']} ({c['ghost_layers']}) | {c['forward_gflop']:.0f} GFLOP | "
               f"{c['input_grad_gflop']:.0f} | {c['weight_grad_gflop']:.0f} | {c['per_example_grad_gflop']:.0f} | "
               f"{c['ghost_gram_gflop']:.1f} | {c['ghost_weighted_grad_gflop']:.0f} | {c['per_example_grad_gb']:.2f} GB |\n")
    if measured:
        md += (f"\nMeasured beside (from `{Path(args.measured).name}`: {measured['gpu']}, torch {measured['torch']}, "
               f"{measured['date']}, {args.batch} slots, fp32; rates are these counts over those times):\n\n"
               f"| model | non-private fwd+bwd ({measured['batch']} examples) | BK forward + input grads | BK sums "
               "compiled (per-example, Grams, weighted) | sums if at the non-private rate |\n|---|---:|---:|---:|---:|\n")
        for key, c in out["models"].items():  # type: ignore[union-attr]
            m = measured["models"].get(key, {}).get(f"slots_{args.batch}")
            if not m:
                continue
            ref = count(layer_shapes(MODELS[key]), measured["batch"])
            sgd_gf = ref["forward_gflop"] + ref["input_grad_gflop"] + ref["weight_grad_gflop"]
            fb_gf = c["forward_gflop"] + c["input_grad_gflop"]
            gf = c["per_example_grad_gflop"] + c["ghost_gram_gflop"] + c["ghost_weighted_grad_gflop"]
            sgd_rate = sgd_gf / measured["models"][key]["sgd_ms"]
            c.update(measured_sgd_tflops=sgd_rate, measured_bk_forward_tflops=fb_gf / m["forward_backward_ms"],
                     measured_sums_tflops=gf / m["sums_compiled_ms"], sums_ms_at_sgd_rate=gf / sgd_rate)
            md += (f"| {key} | {measured['models'][key]['sgd_ms']:.2f} ms, {sgd_rate:.0f} TFLOP/s | "
                   f"{m['forward_backward_ms']:.2f} ms, {fb_gf / m['forward_backward_ms']:.0f} TFLOP/s | "
                   f"{m['sums_compiled_ms']:.2f} ms, {gf / m['sums_compiled_ms']:.0f} TFLOP/s | {gf / sgd_rate:.2f} ms |\n")
    write_results(args.name, out, md)


if __name__ == "__main__":
    main()
