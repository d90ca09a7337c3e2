"""LightningModules."""

from advmim_pl.modules.pretrain import PretrainModule

__all__ = ["PretrainModule"]
