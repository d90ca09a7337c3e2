"""PretrainModule: masked-image-modeling pre-training with any host method, with the AEMIM plug-in as an option."""

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from jsonargparse import lazy_instance
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveInt
from lightning.pytorch.cli import OptimizerCallable, instantiate_class
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchvision.utils import make_grid

from advmim_pl.adversarial.aemim import AEMIM, PluginOutput, StepContext
from advmim_pl.adversarial.callback import AdversarialTargetCallback
from advmim_pl.checks import require_non_negative, require_positive
from advmim_pl.mim.losses import upsample_mask
from advmim_pl.mim.methods import MAE, Host, HostStep, Mask, MIMMethod, Progress
from advmim_pl.models.branch_norm import aux_parameters
from advmim_pl.models.vit import MaskedViT
from advmim_pl.modules.base import BaseModule
from advmim_pl.pixel_stats import IMAGENET_MEAN, IMAGENET_STD
from advmim_pl.rng import SeededStream, generator_for, rank_states
from advmim_pl.schedule import weight_decay_groups
from advmim_pl.sharding import data_parallel_mesh, is_sharded_module, mixed_precision, shard_parts
from advmim_pl.weights import load_decoder, load_encoder, read_weights


def mae_adamw(params: Iterable) -> torch.optim.Optimizer:
    """Fused AdamW with the MAE recipe's betas (0.9, 0.95); lr and weight decay are set per group."""
    return torch.optim.AdamW(params, betas=(0.9, 0.95), fused=True)


class PretrainModule(BaseModule):
    """Masked-image-modeling pre-training of a timm ViT, optionally with the AEMIM plug-in.

    The optimiser and its learning-rate schedule come from ``BaseModule``.

    A step is the host method's step (``MIMMethod.step``: by default one masked clean pass of encoder and decoder),
    plus, with a ``plugin``, the plug-in's step: the attack's target pass (no-grad clean encoding of the attack's
    view; none for ``attack_mask: same`` without drop-path, which reuses the step's clean encoding), K attack passes
    (aux-branch encoder forward + input backward) and one auxiliary pass through the aux branch and decoder. After
    every optimizer step the host's ``after_optimizer_step`` hook runs; the modules the host owns
    (``MIMMethod.make_modules``) live in ``host_modules`` and its other state goes into checkpoints as ``"host"``.

    Args:
        method: host method (``advmim_pl.mim.MAE``, ``SimMIM``, ``MaskFeat``, or any ``MIMMethod`` of
            ``advmim_pl.mim``) with its options, or the ``{"class_path", "init_args"}`` dict of
            ``MIMMethod.config()`` that checkpoints store.
        encoder: timm ViT name, e.g. ``vit_base_patch16_224``.
        img_size: input side in pixels (linked from the DataModule).
        patch_size: patch side in pixels; must divide ``img_size``.
        in_chans: image channels (linked from the DataModule).
        mean: per-channel mean of the pixel-space Normalize inside the model (linked from the data).
        std: per-channel std of that Normalize (linked from the data).
        drop_path_rate: stochastic depth of the encoder.
        sincos_pos_embed: fixed 2-D sin-cos position embeddings instead of learned ones.
        encoder_kwargs: extra timm ``create_model`` arguments, e.g. ``{depth: 6, embed_dim: 192}``.
        batch_size: per-device batch size (linked from the data), for the lr scaling rule.
        optimizer: optimizer factory; lr and weight decay are set per parameter group.
        base_lr: lr per ``lr_reference_batch`` images; absolute lr = base_lr * total batch / reference.
        lr_reference_batch: 256 for MAE, 512 for SimMIM.
        weight_decay: on weights only; none on biases, norms, positions and tokens.
        warmup_epochs: linear lr warm-up length; then half-cycle cosine per step.
        min_lr: final lr of the cosine.
        plugin: the AEMIM plug-in (``advmim_pl.adversarial.AEMIM``) with all its options, or its
            ``{"class_path", "init_args"}`` dict that checkpoints store; None for the plain host method.
        log_images_every_n_steps: TensorBoard grids (clean, masked, reconstruction, and with the plug-in adversarial
            and amplified perturbation) every this many optimizer steps; 0 = never.
        compile: ``torch.compile`` the encoder blocks and the decoders (in place; checkpoint keys unchanged).
        activation_checkpointing: keep only each transformer block's input for the backward and recompute its
            internals there, in the encoder and the MAE decoders (timm's ``set_grad_checkpointing``): activation memory
            falls to about one tensor per block for about one extra forward of compute. Covers every pass with a
            backward (clean, auxiliary, the attack's input gradient); the recompute keeps the pass's branch norms.
        init_from: start from these weights (weights only: the optimiser, step and schedule start fresh, unlike
            ``--ckpt_path``, which resumes a run): a ``.ckpt`` of this project, an ``advmim export`` file or folder,
            a facebookresearch/mae ``.pth``, a timm state dict or ``local-dir:`` folder, or ``timm:<model.tag>``
            (``advmim_pl.weights``). The encoder is loaded, and the decoder when the file has one that fits (else
            it starts fresh, logged). With the plug-in, the auxiliary norms and decoder start as copies of the loaded
            clean ones. Checkpoints of the run keep the source as ``checkpoint["init_from"]`` and hold ``init_from:
            null`` in their hyperparameters, so that loading them never reads the source again.
    """

    def __init__(
        self,
        method: MIMMethod = lazy_instance(MAE),
        encoder: str = "vit_base_patch16_224",
        img_size: PositiveInt = 224,
        patch_size: PositiveInt = 16,
        in_chans: PositiveInt = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        drop_path_rate: ClosedUnitInterval = 0.0,
        sincos_pos_embed: bool = True,
        encoder_kwargs: dict[str, Any] | None = None,
        batch_size: PositiveInt = 64,
        optimizer: OptimizerCallable = mae_adamw,
        base_lr: NonNegativeFloat = 1.5e-4,
        lr_reference_batch: PositiveInt = 256,
        weight_decay: NonNegativeFloat = 0.05,
        warmup_epochs: NonNegativeFloat = 40.0,
        min_lr: NonNegativeFloat = 0.0,
        plugin: AEMIM | None = None,
        log_images_every_n_steps: NonNegativeInt = 500,
        compile: bool = False,
        activation_checkpointing: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__(optimizer)
        require_positive(batch_size=batch_size, lr_reference_batch=lr_reference_batch)
        require_non_negative(
            base_lr=base_lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
            log_images_every_n_steps=log_images_every_n_steps,
        )
        # {"class_path", "init_args"} dicts come from a checkpoint's hyperparameters
        method = instantiate_class((), method) if isinstance(method, dict) else method
        plugin = instantiate_class((), plugin) if isinstance(plugin, dict) else plugin
        # load_from_checkpoint rebuilds the method and the plug-in from their configs
        self.store_hparams(ignore=("method", "plugin"), method=method.config(), plugin=plugin and plugin.config())
        self.method, self.plugin = method, plugin
        self.encoder = MaskedViT.from_settings(self.hparams, drop_path_rate, mask_token=method.uses_mask_token)
        self.decoder = method.make_decoder(self.encoder)
        if init_from is not None:
            self.load_weights(init_from)
        # the host's own modules (a teacher, ...) start from the loaded encoder, before the plug-in's branch norms
        self.host_modules = nn.ModuleDict(method.make_modules(self.encoder))
        self.aux_decoder = None  # the plug-in's aux norms and decoder start as the (loaded) clean ones
        if plugin is not None:
            self.aux_decoder = plugin.build(self.host(), copy_decoder=init_from is not None)
            self.attack_callback = AdversarialTargetCallback(plugin.attack)
        for part in (self.encoder.vit, self.decoder, self.aux_decoder):
            if hasattr(part, "set_grad_checkpointing"):  # SimMIM's and MaskFeat's linear decoders have no blocks
                part.set_grad_checkpointing(activation_checkpointing)
        self.mask_stream = SeededStream()

    def load_weights(self, source: str) -> None:
        """Load the encoder, the decoder when it fits and SimMIM's mask token from ``source`` (see ``init_from``)."""
        weights = read_weights(source)
        load_encoder(self.encoder.vit, weights, source)
        weights.check_statistics(source, self.hparams.mean, self.hparams.std)
        decoder = load_decoder(self.decoder, weights, source, self.encoder.num_prefix_tokens)
        mask_token = self.encoder.mask_token is not None and weights.mask_token is not None
        if mask_token:
            self.encoder.mask_token.data.copy_(weights.mask_token.reshape(self.encoder.mask_token.shape))
        loaded = ["the encoder", *(["the decoder"] if decoder else []), *(["the mask token"] if mask_token else [])]
        rank_zero_info(f"init_from {source!r} ({weights.made_by}): loaded {', '.join(loaded)}; a new run starts")

    # ---- fit-time wiring ----------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Under a strategy with a device mesh (``advmim_pl.sharding.FSDP2Strategy``): FSDP2 units per transformer
        block, then each part as a root (``shard_parts``), once; the branch norms exist since the constructor, so
        they are sharded with their blocks. Then ``compile``."""
        if self.device_mesh is not None and not is_sharded_module(self):
            strategy = self.trainer.strategy
            dtype = getattr(strategy, "param_dtype", "bf16")
            policy = mixed_precision(strategy.root_device, self.trainer.precision, dtype)
            parts = (self.encoder, self.decoder, self.aux_decoder, *self.host_modules.values())
            shard_parts(parts, data_parallel_mesh(self.device_mesh), policy)
        if self.hparams.compile:
            for part in (self.encoder.vit.blocks, self.decoder, self.aux_decoder):
                if part is not None:
                    part.compile()

    def _mask_rng(self) -> torch.Generator:
        """The generator of training masks, on the module's device (made at the first draw): seeded from the global
        seed and the rank, saved in checkpoints, so a resumed run draws the masks the uninterrupted run would
        have drawn."""
        rank = self.global_rank
        return self.mask_stream.get(self.device, torch.initial_seed() + rank, rank)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["init_from"] = checkpoint["hyper_parameters"]["init_from"]  # where the weights started
        checkpoint["hyper_parameters"]["init_from"] = None  # the checkpoint holds its own weights
        checkpoint["mask_rng"] = rank_states(self.trainer.strategy, self._mask_rng().get_state())  # (ranks, n)
        checkpoint["host"] = self.method.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.mask_stream.restore(checkpoint.get("mask_rng"))  # applied at the next draw, on the model's device
        if "host" in checkpoint:
            self.method.load_state_dict(checkpoint["host"])

    # ---- the step ------------------------------------------------------------------------------------
    def _aux_decoder(self) -> torch.nn.Module:
        return self.decoder if self.aux_decoder is None else self.aux_decoder

    def host(self, aux: bool = False) -> Host:
        """The host method bound to this module's networks, with the clean decoder or (``aux``) the plug-in's."""
        return Host(self.method, self.encoder, self._aux_decoder() if aux else self.decoder, self.host_modules)

    def host_step(self, x: Tensor, generator: torch.Generator) -> HostStep:
        """The host method's step on x (B, C, H, W) under a mask drawn from ``generator``."""
        self.follow_input_size(x.shape[-1])
        return self.method.step(self.host(), x, generator)

    def on_fit_start(self) -> None:
        """A progressive-resolution schedule of the data (``advmim_pl.data.resolution``) is checked against the patch
        size (and SimMIM's mask squares) before the first step, not at the switch."""
        schedule = getattr(self.trainer.datamodule, "resolution", None)
        if schedule is None:
            return
        unit = getattr(self.method, "mask_patch_size", None) or self.encoder.patch_size
        bad = sorted({size for size in schedule.sizes(schedule.horizon + 1) if size % unit})
        if bad:
            raise ValueError(
                f"progressive resolution: img_size {bad} not divisible by {unit} (the patch size, or SimMIM's "
                "mask_patch_size): make every size of the schedule a multiple of it"
            )

    def follow_input_size(self, img_size: int) -> None:
        """Progressive resolution: the encoder, its masks and positions, and the decoders follow a batch whose side
        ``img_size`` differs from the encoder's (training epochs at a lower resolution, validation at the final one)."""
        if img_size != self.encoder.img_size:
            self.encoder.set_img_size(img_size)
            for decoder in (self.decoder, self.aux_decoder):
                if hasattr(decoder, "set_grid"):  # MaskFeat's head reads tokens only
                    decoder.set_grid(self.encoder.grid_size)
            for owned in self.host_modules.values():
                if isinstance(owned, MaskedViT):  # a teacher or target encoder
                    owned.set_img_size(img_size)

    def plugin_context(self, step: HostStep, training: bool = True, diagnostics: bool = False) -> StepContext:
        """What the plug-in sees of ``step``: the host with the plug-in's decoder, the step's images, mask and latent,
        the attack's epoch (``attack_epoch``, read once per step) and this process's rank."""
        epoch = self.attack_epoch(self.plugin.attack)
        host, visuals = self.host(aux=True), training and self.grid_step()
        return StepContext(
            host, step.images, step.mask, step.latent, epoch, self.global_rank, training, diagnostics, visuals
        )

    def feature_objective(
        self, x: Tensor, mask: Mask, latent: Tensor, generator: torch.Generator | None = None
    ) -> Callable[[Tensor], Tensor]:
        """The plug-in's attack objective (``AEMIM.objective``): x (B, C, H, W) under ``mask`` with clean latent
        (B, T, D) -> objective(x_adv) (B,)."""
        return self.plugin.objective(self.host(aux=True), x, mask, latent, generator)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        """The host's step plus the plug-in's; returns ``{"loss"}``, plus the image grids under ``"visuals"`` on the
        grid steps (``log_images_every_n_steps``)."""
        step = self.host_step(batch[0], self._mask_rng())
        self.log("train/loss_clean", step.loss)
        loss, images = step.loss, {}
        if self.plugin_active():
            diagnostics = (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0
            out = self.plugin.step(self.plugin_context(step, diagnostics=diagnostics))
            loss, images = step.loss + out.loss, out.images
            self.log_plugin(out)
        elif self.plugin is not None and isinstance(self.trainer.strategy, DDPStrategy):
            # DDP without find_unused_parameters needs a gradient for every parameter: zeros for the plug-in's own,
            # which on_before_optimizer_step then drops, so that the optimizer leaves them as they are
            loss = loss + 0.0 * sum(p.sum() for p in self.plugin_parameters())
        self.log("train/loss", loss, prog_bar=True)
        if self.grid_step():
            return {"loss": loss, "visuals": self.visuals(step, images)}
        return {"loss": loss}

    def plugin_active(self) -> bool:
        """Whether the plug-in runs in this training epoch (``AEMIM.epochs``)."""
        return self.plugin is not None and self.plugin.active(self.current_epoch)

    def plugin_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters only the plug-in trains: the auxiliary norms and the auxiliary decoder."""
        aux_decoder = [] if self.aux_decoder is None else list(self.aux_decoder.parameters())
        return aux_parameters(self.encoder) + aux_decoder

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Outside the plug-in's epochs its parameters have no gradient (or DDP's zeros): the optimizer skips them,
        so neither weight decay nor momentum moves them."""
        if self.plugin is not None and not self.plugin_active():
            for p in self.plugin_parameters():
                p.grad = None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then the host's ``after_optimizer_step`` hook (an EMA update) with the steps done."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        total = self.trainer.estimated_stepping_batches
        # Lightning counts the step once this hook has returned: this one is global_step + 1
        progress = Progress(self.trainer.global_step + 1, int(total) if math.isfinite(total) else 0)
        self.method.after_optimizer_step(self.host(), progress)

    def log_plugin(self, out: PluginOutput) -> None:
        """The plug-in's training metrics, as it named them; its counts summed over the epoch."""
        self.log_dict(out.logs)
        for name, value in out.sums.items():
            self.log(name, value, reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True)

    def grid_step(self) -> bool:
        """Whether this training step's image grids are wanted (a TensorBoard logger and the grid period)."""
        n = self.hparams.log_images_every_n_steps  # the logger is None without a trainer
        return bool(n) and isinstance(self.logger, TensorBoardLogger) and self.trainer.global_step % n == 0

    def visuals(self, step: HostStep, plugin_images: dict[str, Tensor]) -> dict[str, Tensor]:
        """Image grids: clean, masked, reconstruction, and the plug-in's (adversarial, amplified perturbation). A host
        with several masks per image (patches (B, M, N)) shows its images under the first."""
        x, mask, encoder = step.images, step.mask, self.encoder
        first = mask.patches.reshape(x.shape[0], -1, encoder.num_patches)[:, 0]
        pixel_mask = upsample_mask(first, encoder.grid_size, encoder.patch_size)
        reconstruction = self.method.to_image(step.pred.detach(), x, mask, encoder)
        visuals = {"clean": x, "masked": x * (1 - pixel_mask), "reconstruction": reconstruction, **plugin_images}
        return {k: v.detach() for k, v in visuals.items()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Writes the grids a training step returned to TensorBoard (``images/<name>``, 16 images each)."""
        visuals = outputs.get("visuals") if isinstance(outputs, dict) else None
        for name, images in (visuals or {}).items():
            grid = make_grid(images[:16].float().cpu().clamp(0, 1), nrow=8)
            self.logger.experiment.add_image(f"images/{name}", grid, self.trainer.global_step)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Clean reconstruction loss under a mask fixed per batch index (comparable across epochs); with the
        plug-in's ``on_validation``, also the auxiliary loss on freshly crafted targets."""
        x = batch[0]
        step = self.host_step(x, generator_for(x.device).manual_seed(batch_idx))
        self.log("val/loss", step.loss, prog_bar=True, sync_dist=True)
        if self.plugin is not None and self.plugin.on_validation:
            for name, value in self.plugin.step(self.plugin_context(step, training=False)).logs.items():
                self.log(name, value, sync_dist=True)

    # ---- optimisation -------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Weights with ``weight_decay``; biases, norms, positions and tokens without."""
        return weight_decay_groups(self, self.hparams.weight_decay)
