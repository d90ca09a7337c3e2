"""Export the pre-trained clean encoder as a plain timm ViT state dict (safetensors), and read one back
(``read_encoder_weights``, ``load_encoder_weights``: what the probe, fine-tune and feature evaluations load).

The clean encoder is psi_e and phi_c in the notation of docs/method.md: the weights both branches share and the
clean branch's own normalisation layers. The auxiliary branch's copies (phi_a) and the decoders are dropped.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

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
        "method": method_name(hparams),  # MAE / SimMIM, for the pooling
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


@dataclass
class EncoderWeights:
    """A timm encoder state dict read from ``init_from``, with what is known about the model that made it."""

    state: dict[str, Tensor]
    made_by: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    method: str | None = None  # the pre-training method's class name ("MAE", "SimMIM"), when the file says

    def check_statistics(self, source: str, mean: Sequence[float], std: Sequence[float]) -> None:
        """Warn when the pixel mean/std the encoder was pre-trained with differ from ``mean`` / ``std``."""
        for name, saved, now in (("mean", self.mean, mean), ("std", self.std, std)):
            if saved is not None and not torch.allclose(torch.tensor(saved), torch.tensor(tuple(now))):
                rank_zero_warn(
                    f"init_from {source!r} was pre-trained with pixel {name} {saved}, this model "
                    f"normalises with {tuple(now)}: the encoder sees differently scaled inputs"
                )


def read_encoder_weights(path: str | Path) -> EncoderWeights:
    """The timm encoder state dict stored in ``path``.

    Accepts a ``PretrainModule`` Lightning checkpoint (clean branch only: aux norms and decoders dropped),
    a file written by ``advmim export`` (``.safetensors``), or a plain ``torch.save``-d timm / reference-MAE
    state dict (``{"model": {...}}`` or the dict itself; ``decoder*`` and ``mask_token`` entries dropped).
    A missing file is FileNotFoundError, an unreadable one CheckpointError or ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from {str(path)!r} does not exist (expected a .ckpt or .safetensors file)")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"init_from {str(path)!r} is not a readable safetensors file: {err}") from None
        stats = [tuple(json.loads(meta[k])) if k in meta else None for k in ("mean", "std")]
        return EncoderWeights(
            state, f"timm_kwargs={meta.get('timm_kwargs', 'unknown')}", *stats, meta.get("method") or None
        )
    checkpoint = read_checkpoint(path)
    if "state_dict" in checkpoint:  # Lightning checkpoint
        hp = checkpoint.get("hyper_parameters", {})
        made_by = ", ".join(
            f"{k}={hp[k]!r}" for k in ("encoder", "patch_size", "img_size", "encoder_kwargs") if k in hp
        )
        stats = [tuple(hp[k]) if hp.get(k) is not None else None for k in ("mean", "std")]
        return EncoderWeights(
            encoder_state_dict(checkpoint["state_dict"]),
            made_by or "a Lightning checkpoint",
            *stats,
            method_name(hp) or None,
        )
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"init_from {str(path)!r} holds neither a Lightning checkpoint nor a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("decoder") and k != "mask_token"}
    return EncoderWeights(state, "a plain state dict")


def method_name(hparams: dict) -> str:
    """The MIM method's class name ("MAE", "SimMIM") in a PretrainModule's hyperparameters; "" when absent."""
    return hparams.get("method", {}).get("class_path", "").rpartition(".")[2]


def _listing(items: list[str], limit: int = 12) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


def load_encoder_weights(vit: nn.Module, state: dict[str, Tensor], source: str, made_by: str = "") -> None:
    """Load ``state`` into the timm ViT ``vit``, refusing any mismatch except the MAE pooling swap.

    Allowed difference: with average pooling the model has a fresh ``fc_norm`` and no final ``norm``, so the
    checkpoint's ``norm.*`` is dropped and ``fc_norm.*`` keeps its initialisation (as MAE fine-tuning does).
    Anything else (missing or unexpected keys, different shapes) raises ValueError listing the keys, with
    the shapes of both sides.
    """
    target = vit.state_dict()
    fresh = {k for k in target if k.startswith("fc_norm.") and k not in state}
    dropped = {k for k in state if k.startswith("norm.") and k not in target and fresh}
    missing = [k for k in target if k not in state and k not in fresh]  # in model order: embeddings first
    unexpected = [k for k in state if k not in target and k not in dropped]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in target
        if k in state and state[k].shape != target[k].shape
    ]
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            problems.append(f"shape mismatches (checkpoint vs model): {_listing(shapes)}")
        if missing:
            problems.append(
                f"missing from the checkpoint: {_listing([f'{k} {tuple(target[k].shape)}' for k in missing])}"
            )
        if unexpected:
            problems.append(f"not in the model: {_listing([f'{k} {tuple(state[k].shape)}' for k in unexpected])}")
        made = f" The checkpoint was made with {made_by}." if made_by else ""
        raise ValueError(
            f"init_from {source!r} does not fit this encoder: {' | '.join(problems)}.{made} Set model.init_args."
            "encoder / patch_size / encoder_kwargs (and the data's img_size / channels) to match it."
        )
    vit.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=False)
    if fresh:
        rank_zero_info(
            f"init_from {source!r}: average pooling, so the checkpoint's final norm is replaced by a freshly "
            f"initialised {sorted(fresh)} (MAE fine-tuning protocol)"
        )
