"""Robustness evaluation: corruption suite."""

from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt"]
