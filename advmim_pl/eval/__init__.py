"""Robustness evaluation: corruption suite, PGD robust accuracy, out-of-distribution sets."""

from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from advmim_pl.eval.robustness import OODSet, RobustnessEvaluator

__all__ = ["CORRUPTIONS", "OODSet", "RobustnessEvaluator", "SEVERITIES", "corrupt"]
