"""Export the pre-trained clean encoder as a plain timm ViT state dict (safetensors).

The clean encoder is psi_e and phi_c in the notation of docs/method.md: the weights both branches share and the
clean branch's own normalisation layers. The auxiliary branch's copies (phi_a) and the decoders are dropped.
"""

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from advmim_pl.models.branch_norm import clean_state_dict
from advmim_pl.reliability import read_checkpoint

ENCODER_PREFIX = "encoder.vit."


def encoder_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A PretrainModule state dict -> the clean timm encoder's state dict (aux norms and decoders dropped)."""
    encoder = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise ValueError(f"no '{ENCODER_PREFIX}*' tensors found: not a PretrainModule checkpoint")
    return clean_state_dict(encoder)


def timm_kwargs(hparams: dict[str, Any]) -> dict[str, Any]:
    """``timm.create_model`` arguments that rebuild the encoder of a module with these hyperparameters."""
    return {
        "model_name": hparams["encoder"],
        "num_classes": 0,
        "img_size": hparams["img_size"],
        "patch_size": hparams["patch_size"],
        "in_chans": hparams["in_chans"],
        **(hparams.get("encoder_kwargs") or {}),
    }


def export_encoder(ckpt_path: str | Path, output: str | Path) -> Path:
    """Write the clean encoder of a pre-training checkpoint to ``output`` (safetensors).

    The file loads with ``timm.create_model(**kwargs).load_state_dict(load_file(output))``, strict; the
    create-model arguments, the pixel normalisation (mean, std) and the pre-training method's class name are stored in
    the file's metadata.
    """
    checkpoint = read_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters", {})
    state = encoder_state_dict(checkpoint["state_dict"])
    kwargs = timm_kwargs(hparams)
    timm.create_model(**kwargs).load_state_dict(state, strict=True)
    metadata = {
        "timm_kwargs": json.dumps(kwargs),
        "mean": json.dumps(list(hparams["mean"])),
        "std": json.dumps(list(hparams["std"])),
        "method": hparams.get("method", {}).get("class_path", "").rpartition(".")[2],  # MAE / SimMIM, for the pooling
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(output), metadata=metadata)
    return output


def load_exported(path: str | Path) -> torch.nn.Module:
    """Rebuild the timm ViT from an exported file (expects [0, 1] images normalised with its mean/std)."""
    with safe_open(str(path), "pt") as f:
        kwargs = json.loads(f.metadata()["timm_kwargs"])
    model = timm.create_model(**kwargs)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model
