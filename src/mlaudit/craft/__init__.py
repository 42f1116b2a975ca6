"""The shared crafting engine: one optimiser for every perturbation attack (see :mod:`.engine`)."""

from .constraints import CONSTRAINTS, Box, Constraint, Free, L2Ball, LinfBall
from .engine import CraftResult, Objective, craft
from .steps import UPDATES, StepInfo, apgd_checkpoints

__all__ = ["CONSTRAINTS", "UPDATES", "Box", "Constraint", "CraftResult", "Free", "L2Ball", "LinfBall", "Objective",
           "StepInfo", "apgd_checkpoints", "craft"]
