"""Checks shared by the Decepticons tests that compare a run through Flower with the simulated one."""

from __future__ import annotations

from typing import Any

import pytest

COUNTS = ("users", "occurrences", "in_sequence", "whole", "merged", "bag_of_tokens_recall", "nonempty_bins", "rejected")


def same_counts(sim: dict[str, Any], fl: dict[str, Any]) -> None:
    """Every per-users row of the two runs' metrics holds the same counts and the same recovered pairs and tokens."""
    for s, f in zip(sim["decepticons"]["per_users"], fl["decepticons"]["per_users"], strict=True):
        assert {k: f[k] for k in COUNTS} == {k: s[k] for k in COUNTS}
        assert (f["pairs"]["k"], f["tokens"]["k"]) == (s["pairs"]["k"], s["tokens"]["k"])


def same_defence(sim: dict[str, Any], fl: dict[str, Any]) -> None:
    """The client defence's metrics agree between the runs, and the defence cost the attack something."""
    ds, df = sim["defence"], fl["defence"]
    assert (df["with"]["k"], df["without"]["k"]) == (ds["with"]["k"], ds["without"]["k"])
    assert df["without"]["k"] > df["with"]["k"]
    assert df["update_distortion"]["mean"] == pytest.approx(ds["update_distortion"]["mean"], rel=1e-3)
