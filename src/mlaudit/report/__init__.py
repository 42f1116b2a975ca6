"""Self-contained HTML reports of experiments (see :mod:`mlaudit.report.html`) and the figures in
them (:mod:`mlaudit.report.figures`)."""

from .figures import (
    accuracy_histogram,
    alignment_figure,
    canary_score_histogram,
    memorization_figure,
    perturbation_grid,
    robust_accuracy_figure,
    roc_figures,
)
from .html import MAX_TRIAL_ROWS, ReportTable, fig_to_data_uri, format_cell, render_report, write_report

__all__ = [
    "MAX_TRIAL_ROWS", "ReportTable", "accuracy_histogram", "alignment_figure", "canary_score_histogram",
    "fig_to_data_uri", "format_cell", "memorization_figure", "perturbation_grid", "render_report", "robust_accuracy_figure",
    "roc_figures",
    "write_report",
]
