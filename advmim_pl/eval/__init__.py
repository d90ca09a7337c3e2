"""Evaluation: frozen-feature probes (kNN, logistic regression) with their floors, the online kNN monitor;
corruption suite, PGD robust accuracy and out-of-distribution sets."""

from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from advmim_pl.eval.features import FeatureEvalModule
from advmim_pl.eval.knn_monitor import KNNMonitor
from advmim_pl.eval.robustness import OODSet, RobustnessEvaluator

__all__ = ["CORRUPTIONS", "FeatureEvalModule", "KNNMonitor", "OODSet", "RobustnessEvaluator", "SEVERITIES", "corrupt"]
