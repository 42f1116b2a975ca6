from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.figure import Figure

from mlaudit.errors import ConfigError
from mlaudit.report import (
    MAX_TRIAL_ROWS,
    ReportTable,
    fig_to_data_uri,
    format_cell,
    render_report,
    write_report,
)
from mlaudit.stats import MeanSE

XSS = "<script>alert(1)</script>"


def _kwargs(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "title": "Poisoning audit",
        "config": {"name": XSS, "train": {"lr": 0.1, "epochs": 2}, "paths": ["a&b.png"]},
        "metrics": {
            "clean_acc": {"mean": 0.9123, "se": 0.0041, "n": 5},
            "mia": {"auc": {"value": 0.61, "lo": 0.58, "hi": 0.64, "method": "bootstrap"},
                    "tpr_at_fpr": {"0.001": {"value": 0.02, "lo": 0.01, "hi": 0.03, "method": "bootstrap",
                                             "clopper_pearson": {"value": 0.02, "lo": 0.015, "hi": 0.026}}}},
            "asr": MeanSE(0.5, 0.25, 4),
            "n_trials": 3,
        },
        "trials": [{"trial_id": "t0", "acc": np.float32(0.875), "note": XSS},
                   {"trial_id": "t1", "acc": 0.9, "extra": {"loss": 0.25}, "ignored_list": [1, 2]}],
        "cost": {"wall_s": 12.5, "gpu_hours": 0.0},
        "versions": {"mlaudit": "0.1.0", "torch": "2.x"},
    }
    base.update(over)
    return base


def test_escapes_config_and_trial_strings() -> None:
    html = render_report(**_kwargs(title=f"T {XSS}", notes=[f"note {XSS}"],
                                   tables=[ReportTable("MIA <b>cmp</b>", ["attack", "auc"], [[XSS, 0.5]])]))
    assert "<script" not in html.lower()
    assert "<b>cmp" not in html
    # Title, note, table cell, config YAML and trial field all escaped.
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5
    assert "a&amp;b.png" in html
    assert "http://" not in html and "https://" not in html and "<link" not in html


def test_metrics_with_uncertainties() -> None:
    html = render_report(**_kwargs())
    assert "clean_acc" in html and "0.912 ± 0.004" in html
    assert "mia.auc" in html and "0.610 [0.580, 0.640]" in html and "method=bootstrap" in html
    assert "mia.tpr_at_fpr.0.001.clopper_pearson" in html and "0.020 [0.015, 0.026]" in html
    assert "0.500 ± 0.250" in html and "n=5" in html
    # Trial table: union of scalar keys (nested dicts dotted), numpy scalars formatted, lists skipped.
    assert "extra.loss" in html and "0.875" in html and "ignored_list" not in html
    assert "wall_s" in html and "12.500" in html and "torch" in html
    assert "lr: 0.1" in html  # config as YAML


def test_format_cell() -> None:
    assert format_cell({"mean": 1.0, "se": float("nan")}) == "1.000 ± nan"
    assert format_cell(np.int64(7)) == "7" and format_cell(None) == "" and format_cell(True) == "True"
    assert format_cell(1.5e-6) == "1.5e-06" and format_cell([1, 2]) == "[1,2]"


def test_embeds_png_figure_without_pyplot() -> None:
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [0, 1])
    html = render_report(**_kwargs(figures={"ROC <curve>": fig}))
    m = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="ROC &lt;curve&gt;">', html)
    assert m is not None
    assert base64.b64decode(m.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig_to_data_uri(fig).startswith("data:image/png;base64,")
    with pytest.raises(ConfigError, match="Figure"):
        fig_to_data_uri("not a figure")


def test_rendering_figures_leaves_pyplot_alone() -> None:
    code = (
        "import sys; from matplotlib.figure import Figure; from mlaudit.report import fig_to_data_uri\n"
        "f = Figure(); f.add_subplot().plot([1, 2]); fig_to_data_uri(f)\n"
        "print('pyplot' if 'matplotlib.pyplot' in sys.modules else 'clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "clean"


def test_write_report_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "report.html"
    assert write_report(out, **_kwargs()) == out
    write_report(out, **_kwargs(title="second"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
    assert "<title>second</title>" in out.read_text(encoding="utf-8")
    # A failure while rendering leaves neither a temp file nor a changed report.
    with pytest.raises(ConfigError):
        write_report(out, **_kwargs(figures={"bad": object()}))
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
    assert "<title>second</title>" in out.read_text(encoding="utf-8")


def test_truncates_trials() -> None:
    trials = [{"trial_id": f"t{i:04d}", "acc": i / 1000} for i in range(MAX_TRIAL_ROWS + 20)]
    html = render_report(**_kwargs(trials=trials))
    assert f"Showing the first {MAX_TRIAL_ROWS} of {MAX_TRIAL_ROWS + 20} trials" in html
    assert f"t{MAX_TRIAL_ROWS - 1:04d}" in html and f"t{MAX_TRIAL_ROWS:04d}" not in html
    short = render_report(**_kwargs())
    assert "Showing the first" not in short


def test_rejects_malformed_input() -> None:
    with pytest.raises(ConfigError, match="row 0 has 1 cells"):
        ReportTable("t", ["a", "b"], [["x"]])
    with pytest.raises(ConfigError, match="metrics must be a dict"):
        render_report(**_kwargs(metrics=[1, 2]))


def test_report_leads_with_the_verdict_and_collapses_the_details() -> None:
    from mlaudit.report import ReportTable

    html = render_report(**_kwargs(verdict="test accuracy: acc 91.2% <b>", warnings=["WARNING: loss diverged"],
                                   tables=[ReportTable("Paper-style table", ["a"], [[1]])]))
    order = [html.index(s) for s in ("<h2>Verdict</h2>", "test accuracy: acc 91.2% &lt;b&gt;", "loss diverged",
                                     "Paper-style table", "<summary>All metrics", "<summary>Trials",
                                     "<summary>Configuration")]
    assert order == sorted(order)  # verdict, then the kind's table, then the collapsed details
    assert "<b>" not in html.split("<h2>Verdict</h2>")[1].split("</section>")[0]


def test_success_and_accuracy_bar_figures() -> None:
    from mlaudit.report.figures import accuracy_bars, success_figure

    fig = success_figure([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], clean=[0.0, 0.5, 0.0])
    ax = fig.axes[0]
    from matplotlib.container import BarContainer

    (container,) = [c for c in ax.containers if isinstance(c, BarContainer)]  # the band is a separate patch
    bars = [p.get_height() for p in container]
    assert bars == pytest.approx([0.5, 1.0, 0.0])
    assert "mean 50.0%" in "".join(t.get_text() for t in ax.get_legend().get_texts())
    fig = accuracy_bars({"clean": {"mean": 0.9, "se": 0.01}, "poisoned": {"mean": 0.2, "se": 0.05}})
    (container,) = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert [round(p.get_height(), 3) for p in container] == [0.9, 0.2]
    assert fig_to_data_uri(fig).startswith("data:image/png;base64,")
