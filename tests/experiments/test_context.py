"""results.json's ``cost.training_paths`` (experiments/context.py): models counted per factory path and reason."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mlaudit.experiments.context import MAX_TRAINING_PATHS, Cost


@given(st.lists(st.tuples(st.sampled_from(["loop", "vmap"]), st.sampled_from(["eager", "cuda-graph"]),
                          st.integers(0, 40)), max_size=200))
def test_training_paths_count_every_factory_model_under_at_most_the_cap(models: list[tuple[str, str, int]]) -> None:
    """Every model with a stack layout is counted once; distinct (layout, step, reason) keys stay under the cap, the
    rest go to ``other paths``; a user trainer's model (no stack_layout) is not counted."""
    c = Cost()
    for layout, step, reason in models:
        c.add_path({"stack_layout": layout, "step_path": step, "stack_layout_reason": f"reason {reason}"})
    c.add_path({"train_loss": 0.1})
    assert sum(c.training_paths.values()) == len(models)
    assert len(c.training_paths) <= MAX_TRAINING_PATHS + 1
    distinct = {(a, b, r) for a, b, r in models}
    if len(distinct) <= MAX_TRAINING_PATHS:
        assert "other paths" not in c.training_paths and len(c.training_paths) == len(distinct)
