"""LightningModules."""

from advmim_pl.modules.classify import ClassifierModule, FinetuneModule, LinearProbeModule
from advmim_pl.modules.pretrain import PretrainModule

__all__ = ["ClassifierModule", "FinetuneModule", "LinearProbeModule", "PretrainModule"]
