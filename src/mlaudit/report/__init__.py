"""Self-contained HTML reports of experiments (see :mod:`mlaudit.report.html`)."""

from .html import MAX_TRIAL_ROWS, ReportTable, fig_to_data_uri, format_cell, render_report, write_report

__all__ = ["MAX_TRIAL_ROWS", "ReportTable", "fig_to_data_uri", "format_cell", "render_report", "write_report"]
