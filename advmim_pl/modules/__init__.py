"""LightningModules: pre-training, and the linear probe and fine-tuning of a pre-trained encoder."""

from advmim_pl.modules.base import BaseModule
from advmim_pl.modules.classifier import ClassifierModule
from advmim_pl.modules.finetune import FinetuneModule
from advmim_pl.modules.pretrain import PretrainModule
from advmim_pl.modules.probe import LinearProbeModule

__all__ = ["BaseModule", "ClassifierModule", "FinetuneModule", "LinearProbeModule", "PretrainModule"]
