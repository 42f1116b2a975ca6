"""The shared crafting engine: one optimiser for every perturbation attack (see :mod:`.engine`)."""

from .constraints import CONSTRAINTS, Box, L2Ball, LinfBall
from .engine import CraftResult, Objective, craft

__all__ = ["CONSTRAINTS", "Box", "CraftResult", "L2Ball", "LinfBall", "Objective", "craft"]
