"""benchmarks/dp_throughput.py's run wiring, checked on the CPU before GPU time is spent: each ``--runs`` option
times its rows with the settings its name says (compile, CUDA graph, precision, TF32, the compiled recording pass)
and the compiled rows get the compiled non-private references beside the others."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pytest
import torch


def test_compiled_runs_time_the_rows_their_names_say(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import dp_throughput as bench
    finally:
        sys.path.pop(0)
    from mlaudit.privacy import fastclip, fastclip_rules

    for flag in ("CONV_SHIFT", "CONV_MATERIALISE"):  # the benchmark sets them per row (set_conv): restored after
        monkeypatch.setattr(fastclip_rules, flag, getattr(fastclip_rules, flag))
    monkeypatch.setattr(fastclip_rules, "CONV_SHIFT", None)
    seen: dict[str, dict[str, Any]] = {}

    def fake_time(fn: object, train: object, recipe: Any, *, name: str, **kw: Any) -> float:
        seen[name] = {"compile": recipe.compile, "graph": recipe.cuda_graph, "precision": recipe.precision,
                      "dp": recipe.dp is not None, "record": fastclip.COMPILE_RECORD,
                      "tf32": fastclip_rules.tf32_enabled("matmul"), "shift": fastclip_rules.CONV_SHIFT}
        return {"mlaudit_sgd_fp32_compiled": 0.004, "mlaudit_dpsgd_fast_graph_compiled_all": 0.006}.get(name, 0.01)

    monkeypatch.setattr(bench, "time_mlaudit", fake_time)
    monkeypatch.setattr(bench, "time_step", lambda step, **kw: 0.01)
    monkeypatch.setattr(bench, "opacus_step", lambda *a, **kw: None)
    for f in ("empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, f, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    class Rows:  # the training split as bench_model reads it (the timing functions are stand-ins): no CUDA needed
        x = y = torch.zeros(0)

        def __len__(self) -> int:
            return 512

    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **kw: t)
    train = Rows()
    args = argparse.Namespace(batch_size=256, steps=2, warmup=1, conv_materialise="unfold,shift", graph_warmup_epochs=3,
                              runs="graph-compile,graph-compile-all,graph-compile-all-tf32,graph-compile-all-bf16")
    runs = bench.bench_model(lambda: torch.nn.Linear(2, 2), args, torch.device("cuda"), train, None)
    private = {k for k in runs if k.startswith("mlaudit_dpsgd")}
    assert private == {"mlaudit_dpsgd_fast_graph_compiled", "mlaudit_dpsgd_fast_graph_compiled_all",
                       "mlaudit_dpsgd_fast_graph_compiled_all_tf32", "mlaudit_dpsgd_fast_graph_compiled_all_bf16",
                       "mlaudit_dpsgd_fast_graph_compiled_shift", "mlaudit_dpsgd_fast_graph_compiled_all_shift"}
    for k in private:
        s, shift = seen[k], k.endswith("shift")
        assert s["compile"] is True and s["graph"] is True and s["dp"]
        assert s["record"] is ("_all" in k) and s["tf32"] is ("tf32" in k)
        assert s["precision"] == ("bf16" if "bf16" in k else "fp32")
        assert runs[k].get("compiled_record", False) is ("_all" in k)
        assert s["shift"] is shift and runs[k]["conv_materialise"] == ("shift" if shift else "unfold")
    assert seen["mlaudit_sgd_fp32_compiled"] == {"compile": True, "graph": True, "precision": "fp32", "dp": False,
                                                  "record": False, "tf32": False, "shift": None}
    assert seen["mlaudit_sgd_recipe_compiled"]["precision"] == "bf16" and "mlaudit_sgd_tf32" in runs
    assert fastclip.COMPILE_RECORD is False and not fastclip_rules.tf32_enabled("matmul")  # restored
    rat = bench.ratios(runs)
    assert rat["mlaudit_dpsgd_fast_graph_compiled_all / mlaudit_sgd_fp32_compiled"] == 1.5
    assert "mlaudit_dpsgd_fast_graph_compiled_all_bf16 / mlaudit_sgd_recipe_compiled" in rat
