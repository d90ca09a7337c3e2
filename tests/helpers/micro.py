"""Micro pre-training setups shared by tests: a 2-block, 64-wide ViT on 32-px grey images, batch 8."""

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from advmim_pl.data import BundledSampleDataModule
from advmim_pl.mim import MAE, Data2Vec2, SimMIM
from advmim_pl.modules import PretrainModule

MICRO_VIT = dict(depth=2, embed_dim=64, num_heads=4)  # timm kwargs of the micro ViT body
MICRO_VIT_FLAG = "{depth: 2, embed_dim: 64, num_heads: 4}"  # the same, as an --model.init_args.encoder_kwargs value
MICRO_FLAGS = ["--model.init_args.encoder", "vit_base_patch16_224", "--model.init_args.encoder_kwargs", MICRO_VIT_FLAG]
MICRO_MAE_FLAGS = [  # the micro ViT with the micro MAE decoder, as --model.init_args flags of a pre-training job
    *MICRO_FLAGS,
    "--model.init_args.method.init_args.decoder_dim", "32",
    "--model.init_args.method.init_args.decoder_depth", "1",
    "--model.init_args.method.init_args.decoder_heads", "4",
]  # fmt: skip
MICRO_ENCODER = dict(
    name="vit_base_patch16_224", img_size=32, patch_size=4, in_chans=1, mean=(0.5,), std=(0.25,), mask_token=True
)
MICRO = dict(
    encoder="vit_base_patch16_224",
    img_size=32,
    patch_size=4,
    in_chans=1,
    mean=(0.5,),
    std=(0.25,),
    encoder_kwargs=dict(MICRO_VIT),
    batch_size=8,
    base_lr=1e-2,
    warmup_epochs=0,
)
ENCODER = {k: MICRO[k] for k in ("encoder", "img_size", "patch_size", "in_chans", "mean", "std", "encoder_kwargs")}
SAMPLE = {**ENCODER, "mean": (0.2860,), "std": (0.3530,)}  # the micro encoder with the bundled sample's statistics


def micro_module(method: str = "mae", seed: int = 0, **overrides) -> PretrainModule:
    torch.manual_seed(seed)
    hosts = {
        "mae": lambda: MAE(decoder_dim=32, decoder_depth=1, decoder_heads=4),
        "simmim": lambda: SimMIM(mask_patch_size=8),
        "data2vec2": lambda: Data2Vec2(num_masks=2, top_k=2, decoder_dim=32, decoder_depth=1),
    }
    return PretrainModule(method=hosts[method](), **{**MICRO, **overrides})


def save(module: L.LightningModule, path) -> str:
    """A checkpoint with the keys ``read_weights`` reads, without running a trainer."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return str(path)


def bundled_sample(batch_size: int = 64) -> BundledSampleDataModule:
    """The bundled Fashion-MNIST sample at 32 px, grey, on the device, with light random crops."""
    return BundledSampleDataModule(
        img_size=32, channels=1, batch_size=batch_size, num_workers=0, crop_scale=(0.5, 1.0), device_resident=True
    )


def loader(n: int = 24, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 32, 32, generator=g)
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=8, shuffle=False)


QUIET = dict(
    accelerator="cpu",
    precision="32-true",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    log_every_n_steps=1,
)


def trainer(max_steps: int = -1, callbacks=(), **options) -> L.Trainer:
    """The tests' one Trainer builder: a quiet CPU trainer (``QUIET``: fp32, no logger, checkpointing, progress bar or
    model summary, metrics at every step) for ``max_steps`` optimizer steps (-1: ``max_epochs`` decides). ``options``
    are further Trainer arguments and override the defaults (``enable_checkpointing=True`` with ``ModelCheckpoint``
    callbacks)."""
    return L.Trainer(**{**QUIET, "max_steps": max_steps, "callbacks": list(callbacks), **options})


def smooth_images(batch: int, seed: int, channels: int = 1, size: int = 32) -> torch.Tensor:
    """(batch, channels, size, size) smooth random images in [0, 1]: bilinear upsampling of a size/4 grid."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, channels, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
