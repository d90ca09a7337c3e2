"""Pre-trained weights in, for every stage: read them from any of the formats researchers hold (``read_weights``) and
load them into this project's encoder and decoder (``load_encoder``, ``load_decoder``).

Formats (``init_from``):

- this project's pre-training checkpoints (``.ckpt``): the clean encoder, the clean decoder and SimMIM's mask token;
  the auxiliary branch's norms and decoder are dropped (a module with the plug-in rebuilds them from the clean ones);
- ``advmim export`` files (``.safetensors``, metadata in the header) and folders;
- facebookresearch/mae checkpoints, ``{"model": state_dict}``: ``mae_pretrain_vit_*.pth`` (encoder only),
  ``mae_visualize_vit_*.pth`` and ``*_full.pth`` (encoder and decoder: ``decoder_embed``, ``mask_token``,
  ``decoder_pos_embed``, ``decoder_blocks.N.*``, ``decoder_norm``, ``decoder_pred``);
- plain timm ViT state dicts (``.pth``, ``.bin``, ``.safetensors``), also saved from a DDP-wrapped model (the
  ``module.`` prefix of every key is stripped);
- timm ``local-dir:`` folders (``config.json`` beside the weights) and Hub repos, ``hf-hub:org/repo[@revision]`` (what
  ``advmim export --push-to-hub`` writes), both read by ``timm.create_model(name, pretrained=True)``;
- ``timm:<name.tag>`` (e.g. ``timm:vit_base_patch16_224.mae``; ``timm:hf-hub:org/repo`` works too), fetched through
  timm's own hub code. The Hub is asked once whether it answers; when it does not, or ``HF_HUB_OFFLINE`` is set, only
  the local cache is read (``advmim_pl.hub``), so a missing network is one line within seconds.

Pickled files are read with ``torch.load(weights_only=True)``, never with full unpickling; the one object type
allowed besides tensors is ``argparse.Namespace`` (the ``args`` that reference-MAE training checkpoints carry).

Loading adapts what has a standard adaptation, and says so in one log line each: position embeddings of another
grid are regenerated when they are a fixed 2-D sin-cos table and resampled with timm's ``resample_abs_pos_embed``
otherwise; a patch embedding made for another number of channels (RGB weights, grey data) is adapted with timm's
``adapt_input_conv``; a classifier head is dropped; a decoder whose output layer (``pred.*``) is made for another
number of channels or patch size keeps every other layer and starts that one fresh. Any other mismatch of the encoder
is a one-line ``ValueError`` listing the keys and shapes; a decoder that does not fit otherwise starts fresh.
"""

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError, safe_open
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from torch import Tensor, nn

from advmim_pl.hub import hub_reads
from advmim_pl.models.branch_norm import clean_state_dict
from advmim_pl.models.pos_embed import sincos_2d
from advmim_pl.reliability import load_error, read_checkpoint, refused_global
from advmim_pl.sharding import is_sharded, read_sharded

ENCODER_PREFIX = "encoder.vit."
FORMATS = (
    "a .ckpt of this project, an `advmim export` .safetensors file or folder, a facebookresearch/mae .pth, a timm "
    "state dict (.pth, .bin, .safetensors), a timm local-dir: folder, hf-hub:org/repo or timm:<model.tag>"
)
DDP_PREFIX = "module."  # what DistributedDataParallel's own state_dict puts before every key
OUTPUT_LAYER = "pred."  # the MAE decoder's pixel head: its shape follows the channels and the patch size
# facebookresearch/mae's decoder names -> this project's MAEDecoder names
REFERENCE_DECODER = {
    "decoder_embed.": "embed.",
    "decoder_pos_embed": "pos_embed",
    "decoder_blocks.": "blocks.",
    "decoder_norm.": "norm.",
    "decoder_pred.": "pred.",
    "mask_token": "mask_token",
}


def encoder_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A PretrainModule state dict -> the clean timm encoder's state dict (aux norms and decoders dropped)."""
    encoder = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not encoder:
        raise ValueError(f"no '{ENCODER_PREFIX}*' tensors found: not a PretrainModule checkpoint")
    return clean_state_dict(encoder)


def method_name(hparams: dict) -> str:
    """The MIM method's class name ("MAE", "SimMIM") in a PretrainModule's hyperparameters; "" when absent."""
    return hparams.get("method", {}).get("class_path", "").rpartition(".")[2]


@dataclass
class PretrainedWeights:
    """Weights read from ``init_from``, in this project's layouts, with what is known about the model that made them.

    ``encoder`` is a timm ViT state dict; ``decoder`` (or None) a state dict of this project's decoder of the method;
    ``mask_token`` SimMIM's encoder mask token (or None). ``consumed`` maps every key of the source file to where it
    went (``encoder.<key>`` or, from this project's checkpoints, ``encoder``; ``decoder.<key>``;
    ``encoder.mask_token``) or why it was dropped, so nothing is ignored silently."""

    encoder: dict[str, Tensor]
    made_by: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    method: str | None = None  # the pre-training method's class name ("MAE", "SimMIM"), when the source says
    decoder: dict[str, Tensor] | None = None
    mask_token: Tensor | None = None
    consumed: dict[str, str] = field(default_factory=dict)

    def check_statistics(self, source: str, mean: Sequence[float], std: Sequence[float]) -> None:
        """Warn when the pixel mean/std the encoder was pre-trained with differ from ``mean`` / ``std``."""
        for name, saved, now in (("mean", self.mean, mean), ("std", self.std, std)):
            if saved is not None and (
                len(saved) != len(now) or not torch.allclose(torch.tensor(saved), torch.tensor(tuple(now)))
            ):
                rank_zero_warn(
                    f"init_from {source!r} was pre-trained with pixel {name} {saved}, this model "
                    f"normalises with {tuple(now)}: the encoder sees differently scaled inputs"
                )


# ---- reading --------------------------------------------------------------------------------------------------------
def safe_load(path: Path) -> dict:
    """``read_checkpoint(path)``: weights-only, ``argparse.Namespace`` allowed; a file whose unpickling would run code
    is a one-line UnsafeCheckpointError, an unreadable one CheckpointError."""
    return read_checkpoint(path, what="init_from")


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file; one-line ValueError when it is unreadable."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"init_from {str(path)!r} is not a readable safetensors file: {err}") from None


def split_reference(state: dict[str, Tensor], made_by: str, source: str, **known) -> PretrainedWeights:
    """A timm or facebookresearch/mae state dict -> encoder, and the decoder in this project's names when present.
    A ``module.`` prefix on every key (a DDP-wrapped model's own state dict) is stripped, and logged."""
    encoder, decoder, consumed = {}, {}, {}
    wrapped = bool(state) and all(key.startswith(DDP_PREFIX) for key in state)
    if wrapped:
        rank_zero_info(f"init_from {source!r}: every key starts with {DDP_PREFIX!r} (saved from a DDP model): stripped")
    for original, value in state.items():
        key = original.removeprefix(DDP_PREFIX) if wrapped else original
        prefix = next((p for p in REFERENCE_DECODER if key == p or (p.endswith(".") and key.startswith(p))), None)
        if prefix is None:
            encoder[key] = value
            consumed[original] = f"encoder.{key}"
        else:
            name = REFERENCE_DECODER[prefix] + key[len(prefix) :]
            decoder[name] = value
            consumed[original] = f"decoder.{name}"
    return PretrainedWeights(encoder, made_by, decoder=decoder or None, consumed=consumed, **known)


def split_lightning(checkpoint: dict) -> PretrainedWeights:
    """A Lightning checkpoint of this project: the clean encoder, decoder and mask token; the auxiliary branch
    (norms, decoder) and any classifier head dropped."""
    hp, state = checkpoint.get("hyper_parameters", {}), checkpoint["state_dict"]
    made_by = ", ".join(f"{k}={hp[k]!r}" for k in ("encoder", "patch_size", "img_size", "encoder_kwargs") if k in hp)
    stats = [tuple(hp[k]) if hp.get(k) is not None else None for k in ("mean", "std")]
    weights = PretrainedWeights(
        encoder_state_dict(state), made_by or "a Lightning checkpoint", *stats, method_name(hp) or None
    )
    decoder = {k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")}
    weights.decoder = decoder or None
    weights.mask_token = state.get("encoder.mask_token")
    for key in state:
        if key.startswith(ENCODER_PREFIX):
            parts = key.split(".")
            weights.consumed[key] = "dropped: the auxiliary branch's norm" if "aux" in parts else "encoder"
        elif key.startswith("decoder.") or key == "encoder.mask_token":
            weights.consumed[key] = key
        elif key.startswith("aux_decoder."):
            weights.consumed[key] = "dropped: the auxiliary decoder (rebuilt as a copy of the clean one)"
        else:
            weights.consumed[key] = "dropped: not part of the encoder or its decoder"
    return weights


def from_timm(name: str, source: str) -> PretrainedWeights:
    """The weights of ``timm.create_model(name, pretrained=True, num_classes=0)`` (a classifier head dropped) for
    ``name`` = ``local-dir:FOLDER``, ``hf-hub:org/repo[@revision]`` or a timm ``model.tag``; the pixel mean/std from
    the model's ``pretrained_cfg``, the pre-training method from the ``advmim`` block of an exported config.json.
    Hub names go through ``hub_reads``: one check, then the cache only when the Hub does not answer."""
    import timm

    with nullcontext() if name.startswith("local-dir:") else hub_reads() as unreachable:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=0)
            config = timm_config(name)
        except Exception as err:  # timm's, huggingface_hub's, the network's and torch's errors
            cause = err  # timm re-raises torch's refusal of a pickled global as a RuntimeError of its own
            while cause.__cause__ is not None and not refused_global(str(cause)):
                cause = cause.__cause__
            if refused_global(str(cause)):
                raise load_error(source, cause, "init_from") from None
            lines = str(err).strip().splitlines()
            why = type(err).__name__ + (f": {lines[0]}" if lines else "")
            if name.startswith("local-dir:"):
                raise ValueError(f"init_from {source!r}: timm could not load the folder ({why})") from None
            if unreachable and isinstance(err, LocalEntryNotFoundError):  # the one check failed, the cache lacks it
                why = f"{unreachable}, and the local cache {constants.HF_HUB_CACHE} does not hold it"
            raise ValueError(
                f"init_from {source!r} could not be fetched through timm's hub ({why}); without network access, "
                "download the weights where there is and pass the local file or local-dir: folder"
            ) from None
    cfg = model.pretrained_cfg
    made_by = f"timm {name}"
    if config:
        made_by = f"architecture={config.get('architecture')!r}, model_args={config.get('model_args', {})}"
    method = config.get("advmim", {}).get("method")
    return split_reference(
        model.state_dict(), made_by, source, method=method, mean=tuple(cfg["mean"]), std=tuple(cfg["std"])
    )


def timm_config(name: str) -> dict:
    """The config.json of a ``local-dir:`` folder or an ``hf-hub:`` repo (from the cache timm just filled), {} for a
    timm tag."""
    kind, _, ident = name.partition(":")
    if kind == "local-dir":
        return json.loads(Path(ident, "config.json").read_text())
    if kind == "hf-hub":
        from huggingface_hub import hf_hub_download

        repo, _, revision = ident.partition("@")
        return json.loads(Path(hf_hub_download(repo, "config.json", revision=revision or None)).read_text())
    return {}


def read_weights(source: str | Path) -> PretrainedWeights:
    """The weights ``source`` holds (any of the module docstring's formats). A missing path is FileNotFoundError;
    an unreadable file CheckpointError or ValueError, each in one line."""
    text = str(source)
    if text.startswith(("timm:", "hf-hub:")):
        return from_timm(text.removeprefix("timm:"), text)
    path = Path(text.removeprefix("local-dir:"))
    if is_sharded(path):  # a sharded checkpoint folder (FSDP2Strategy), read under the trust rule
        return split_lightning(read_sharded(path, what="init_from"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"init_from {text!r} is a folder without config.json: not a timm local-dir: folder (expected {FORMATS})"
            )
        return from_timm(f"local-dir:{path}", text)
    if not path.is_file():
        raise FileNotFoundError(f"init_from {text!r} does not exist (expected {FORMATS})")
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        stats = {k: tuple(json.loads(meta[k])) for k in ("mean", "std") if k in meta}
        made_by = f"timm_kwargs={meta['timm_kwargs']}" if "timm_kwargs" in meta else "a safetensors state dict"
        return split_reference(state, made_by, text, method=meta.get("method") or None, **stats)
    checkpoint = safe_load(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"init_from {text!r} holds a {type(checkpoint).__name__}, not a state dict (expected {FORMATS})"
        )
    if "state_dict" in checkpoint:
        return split_lightning(checkpoint)
    state = checkpoint.get("model", checkpoint)
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)} if isinstance(state, dict) else {}
    if not tensors or len(tensors) != len(state):
        raise ValueError(
            f"init_from {text!r} holds neither a Lightning checkpoint nor a state dict (expected {FORMATS})"
        )
    made_by = "facebookresearch/mae" if "model" in checkpoint else "a plain state dict"
    weights = split_reference(tensors, made_by, text)
    weights.consumed |= {f"{k} (outside 'model')": "dropped: training state" for k in checkpoint if k != "model"}
    return weights


# ---- loading --------------------------------------------------------------------------------------------------------
def _listing(items: list[str], limit: int = 12) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


def is_sincos(table: Tensor, prefix: int) -> bool:
    """Whether ``table`` (1, P + h*w, D) on a square grid is the fixed 2-D sin-cos embedding (zero prefix rows)."""
    side = math.isqrt(table.shape[1] - prefix)
    if side * side != table.shape[1] - prefix or table.shape[-1] % 4:
        return False
    return torch.allclose(table[0].float(), sincos_2d(table.shape[-1], (side, side), prefix), atol=1e-4)


def adapt_positions(table: Tensor, target: Tensor, prefix: int, source: str, what: str) -> Tensor:
    """A position table (1, P + n, D) for the target's grid (1, P + N, D): regenerated when it is the fixed sin-cos
    table, else resampled (bicubic) with timm's ``resample_abs_pos_embed``; logs which."""
    side, new_side = math.isqrt(table.shape[1] - prefix), math.isqrt(target.shape[1] - prefix)
    if side * side != table.shape[1] - prefix or new_side * new_side != target.shape[1] - prefix:
        raise ValueError(
            f"init_from {source!r}: {what} of {table.shape[1] - prefix} positions is not a square grid: cannot resample"
        )
    if is_sincos(table, prefix):
        rank_zero_info(
            f"init_from {source!r}: {what} is a fixed sin-cos table: regenerated for the {new_side}x{new_side} grid"
        )
        return sincos_2d(table.shape[-1], (new_side, new_side), prefix).unsqueeze(0).to(table.dtype)
    rank_zero_info(f"init_from {source!r}: {what} resampled from a {side}x{side} to a {new_side}x{new_side} grid")
    return resample_abs_pos_embed(table, [new_side, new_side], [side, side], num_prefix_tokens=prefix)


def adapt_encoder(state: dict[str, Tensor], vit: nn.Module, source: str) -> dict[str, Tensor]:
    """``state`` with the standard adaptations to the timm ViT ``vit``: another position grid, another number of input
    channels, a classifier head dropped. Each one is logged."""
    target, state = vit.state_dict(), dict(state)
    head = [k for k in state if k.startswith("head.") and k not in target]
    if head:
        rank_zero_info(f"init_from {source!r}: classifier head {head} dropped (an encoder is loaded)")
        state = {k: v for k, v in state.items() if k not in head}
    pos = state.get("pos_embed")
    if pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape:
        prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        state["pos_embed"] = adapt_positions(pos, target["pos_embed"], prefix, source, "pos_embed")
    proj, want = state.get("patch_embed.proj.weight"), target["patch_embed.proj.weight"]
    if proj is not None and proj.shape[1] != want.shape[1] and proj.shape[2:] == want.shape[2:]:
        rank_zero_info(
            f"init_from {source!r}: patch embedding made for {proj.shape[1]} channels adapted to {want.shape[1]} "
            "with timm's adapt_input_conv"
        )
        state["patch_embed.proj.weight"] = adapt_input_conv(want.shape[1], proj, base_chans=proj.shape[1])
    return state


def load_encoder(vit: nn.Module, weights: PretrainedWeights, source: str) -> None:
    """Load ``weights.encoder`` into the timm ViT ``vit`` after ``adapt_encoder``, refusing any other mismatch except
    the MAE pooling swap.

    Allowed difference: with average pooling the model has a fresh ``fc_norm`` and no final ``norm``, so the
    checkpoint's ``norm.*`` is dropped and ``fc_norm.*`` keeps its initialisation (as MAE fine-tuning does).
    Anything else (missing or unexpected keys, different shapes) raises ValueError listing the keys, with
    the shapes of both sides.
    """
    state, target = adapt_encoder(weights.encoder, vit, source), vit.state_dict()
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
        raise ValueError(
            f"init_from {source!r} does not fit this encoder: {' | '.join(problems)}. The checkpoint was made with "
            f"{weights.made_by}. Set model.init_args.encoder / patch_size / encoder_kwargs (and the data's img_size / "
            "channels) to match it."
        )
    vit.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=False)
    if fresh:
        rank_zero_info(
            f"init_from {source!r}: average pooling, so the checkpoint's final norm is replaced by a freshly "
            f"initialised {sorted(fresh)} (MAE fine-tuning protocol)"
        )


def load_decoder(decoder: nn.Module, weights: PretrainedWeights, source: str, prefix_tokens: int) -> bool:
    """Load ``weights.decoder`` into ``decoder`` when every key and shape fits (a fixed sin-cos position table of
    another grid is regenerated). When only the output layer ``pred.*`` misfits (another number of channels or patch
    size: RGB weights on grey data), every other layer is loaded and that one starts fresh; otherwise the whole decoder
    stays fresh. Either way one line names the keys that start fresh. Returns whether any layer was loaded."""
    target = decoder.state_dict()
    if not weights.decoder:
        rank_zero_info(f"init_from {source!r} has no decoder: the decoder starts fresh")
        return False
    state = dict(weights.decoder)
    pos = state.get("pos_embed")
    if (
        pos is not None
        and "pos_embed" in target
        and pos.shape != target["pos_embed"].shape
        and pos.shape[-1] == target["pos_embed"].shape[-1]
    ):
        state["pos_embed"] = adapt_positions(pos, target["pos_embed"], prefix_tokens, source, "the decoder's pos_embed")
    misfit = [
        f"{k} {tuple(state[k].shape) if k in state else 'missing'} vs {tuple(v.shape)}"
        for k, v in target.items()
        if k not in state or state[k].shape != v.shape
    ]
    misfit += [f"{k} {tuple(state[k].shape)} (not in this decoder)" for k in state if k not in target]
    fits = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    if misfit and fits and all(line.startswith(OUTPUT_LAYER) for line in misfit):
        decoder.load_state_dict(fits, strict=False)
        rank_zero_info(
            f"init_from {source!r}: its decoder's output layer does not fit this one (another number of channels or "
            f"patch size), so it starts fresh: {_listing(misfit)}; the other {len(fits)} tensors are loaded"
        )
        return True
    if misfit:
        rank_zero_info(
            f"init_from {source!r}: its decoder does not fit this one, so the decoder starts fresh: {_listing(misfit)}"
        )
        return False
    decoder.load_state_dict(state)
    return True
