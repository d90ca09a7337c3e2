"""Evaluation: probe maths (``probes``: kNN, logistic regression, Wilson intervals, cross-validation), feature
extraction (``extract``), floors and readouts (``floors``), the frozen-feature command (``features``), the online
kNN monitor; robust accuracy (``robust``) with corruptions, PGD and out-of-distribution sets (``robustness``)."""

from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from advmim_pl.eval.features import FeatureEvalModule
from advmim_pl.eval.knn_monitor import KNNMonitor
from advmim_pl.eval.robustness import OODSet, RobustnessEvaluator

__all__ = ["CORRUPTIONS", "FeatureEvalModule", "KNNMonitor", "OODSet", "RobustnessEvaluator", "SEVERITIES", "corrupt"]
