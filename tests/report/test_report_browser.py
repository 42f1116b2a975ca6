"""Each kind's report renders in a real browser: headless Chromium (Debian: ``apt-get install chromium``)
opens ``report.html`` of the kind's example config (``examples/*.yaml``; dp-audit has none, so a small
config of its own), run on CPU, at a desktop and a narrow window width.

A copy of the report gets a small script (the report itself has none) that opens every ``<details>``,
measures the page and writes what it found as JSON into a ``<pre>``; ``--dump-dom`` prints the DOM
after the script ran. Checked: the verdict section comes first with its headline; every figure is an
``<img>`` that decoded (``naturalWidth > 0``) and is drawn; the page does not scroll sideways and no
element's content is wider than its box (``scrollWidth > clientWidth``) unless the element scrolls
(tables and the config sit in ``overflow-x: auto`` boxes on purpose).

Skipped when Chromium is absent (CI installs nothing for it). Run it with
``.venv/bin/python -m pytest -m slow tests/report/test_report_browser.py -p no:cacheprovider``
after ``apt-get install -y chromium`` (about 70 s on 2 CPU cores: the examples train).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mlaudit.config import load_yaml
from mlaudit.experiments import experiment_kinds, run_experiment

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install -y chromium (Debian)")]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
WIDTHS = (1280, 480)
DP_AUDIT = {"kind": "dp-audit", "dataset": "digits", "model": "logistic", "canary": "mislabeled",
            "recipe": {"name": "fast", "epochs": 1, "dp": {"noise_multiplier": 1.0, "clip": 1.0}},
            "models_per_side": 20, "claimed_epsilon": 50.0, "confidence": 0.9, "seed": 0}


def cpu_examples() -> dict[str, dict[str, Any]]:
    """One example config per kind, leaving out those on CIFAR-10 (GPU-sized)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        cfg = load_yaml(path)
        data = cfg.get("dataset")
        if (data.get("name") if isinstance(data, dict) else data) != "cifar10":
            found.setdefault(cfg["kind"], cfg)
    found.setdefault("dp-audit", DP_AUDIT)
    return found


CONFIGS = cpu_examples()

CHECK = """<script>
(function () {
  document.querySelectorAll("details").forEach(function (d) { d.open = true; });
  var root = document.documentElement, out = {viewport: root.clientWidth, page: root.scrollWidth};
  var v = document.querySelector("section.verdict");
  out.verdict_first = v !== null && document.querySelector("main > section") === v;
  out.verdict = v ? {title: (v.querySelector("h2") || {}).textContent || "",
                     headline: (v.querySelector(".headline") || {}).textContent || ""} : null;
  out.images = Array.prototype.map.call(document.images, function (i) {
    return {alt: i.alt, complete: i.complete, natural: i.naturalWidth, drawn: i.getBoundingClientRect().width,
            box: i.parentElement.clientWidth};
  });
  out.overflow = [];
  document.querySelectorAll("body, body *").forEach(function (e) {
    if (getComputedStyle(e).overflowX !== "visible" || !e.clientWidth || e.scrollWidth <= e.clientWidth + 1) return;
    if (Array.prototype.some.call(e.children, function (c) { return c.scrollWidth > c.clientWidth + 1
        && getComputedStyle(c).overflowX === "visible"; })) return;  // report the innermost element only
    out.overflow.push(e.tagName.toLowerCase() + (e.className ? "." + e.className : "") + ": " + e.scrollWidth
                      + " px of content in " + e.clientWidth + " px: " + e.textContent.trim().slice(0, 80));
  });
  var pre = document.createElement("pre");
  pre.id = "browser-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def render(report: Path, width: int, tmp: Path) -> dict[str, Any]:
    """What the injected script found in ``report`` at ``width`` px."""
    page = tmp / f"{report.parent.name}-{width}.html"
    text = report.read_text(encoding="utf-8")
    assert text.count("</body>") == 1 and "<script" not in text  # the report is script-free
    page.write_text(text.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    proc = subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                           f"--user-data-dir={tmp / 'profile'}", f"--window-size={width},900",
                           "--run-all-compositor-stages-before-draw", "--virtual-time-budget=10000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="browser-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"Chromium printed no check result (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def test_every_kind_is_checked() -> None:
    """Says (as a skip, so a kind still being built does not fail here) which kinds have no CPU example."""
    assert set(CONFIGS) <= set(experiment_kinds())
    missing = sorted(set(experiment_kinds()) - set(CONFIGS))
    if missing:
        pytest.skip(f"no CPU example config in examples/ for: {', '.join(missing)}")


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_report_renders_with_verdict_figures_and_no_overflow(kind: str, tmp_path: Path) -> None:
    out = tmp_path / kind
    run_experiment(CONFIGS[kind], out=out, device="cpu", store=tmp_path / "runs.db", quiet=True)
    for width in WIDTHS:
        seen = render(out / "report.html", width, tmp_path)
        where = f"{kind} at {width} px"
        assert seen["verdict_first"], f"{where}: the verdict is not the first section"
        assert seen["verdict"]["title"] == "Verdict" and seen["verdict"]["headline"].strip(), (where, seen["verdict"])
        assert seen["images"], f"{where}: no figure"
        for img in seen["images"]:
            assert img["complete"] and img["natural"] > 0, f"{where}: figure {img['alt']!r} did not decode"
            assert 0 < img["drawn"] <= img["box"] + 1, f"{where}: figure {img['alt']!r} drawn {img}"
        assert seen["page"] <= seen["viewport"], f"{where}: the page is {seen['page']} px wide in {seen['viewport']}"
        assert not seen["overflow"], f"{where}: content wider than its box:\n" + "\n".join(seen["overflow"])
