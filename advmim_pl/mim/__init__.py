"""Host masked-image-modeling methods: masking, targets and losses."""

from advmim_pl.mim.maskfeat import MaskFeat
from advmim_pl.mim.methods import MAE, Mask, MIMMethod, SimMIM

__all__ = ["MAE", "MIMMethod", "MaskFeat", "Mask", "SimMIM"]
