"""PretrainModule: MAE or SimMIM pre-training, with the AEMIM auxiliary task as an option."""

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from jsonargparse import lazy_instance
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveInt
from lightning.pytorch.cli import OptimizerCallable, instantiate_class
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from advmim_pl.adversarial.aemim import AEMIM, AuxStep
from advmim_pl.adversarial.callback import AdversarialTargetCallback
from advmim_pl.checks import require_non_negative, require_positive
from advmim_pl.mim.losses import upsample_mask
from advmim_pl.mim.methods import MAE, Mask, MIMMethod
from advmim_pl.models.vit import MaskedViT
from advmim_pl.modules.base import BaseModule
from advmim_pl.pixel_stats import IMAGENET_MEAN, IMAGENET_STD
from advmim_pl.rng import SeededStream, generator_for, preserved, rank_states
from advmim_pl.schedule import weight_decay_groups
from advmim_pl.sharding import data_parallel_mesh, is_sharded_module, mixed_precision, shard_parts
from advmim_pl.weights import load_decoder, load_encoder, read_weights


def mae_adamw(params: Iterable) -> torch.optim.Optimizer:
    """Fused AdamW with the MAE recipe's betas (0.9, 0.95); lr and weight decay are set per group."""
    return torch.optim.AdamW(params, betas=(0.9, 0.95), fused=True)


class PretrainModule(BaseModule):
    """Masked-image-modeling pre-training of a timm ViT, optionally with the AEMIM plug-in.

    The optimiser and its learning-rate schedule come from ``BaseModule``.

    A step is the host method's step (one masked clean pass of encoder and decoder), plus, with a ``plugin``, the
    plug-in's step: the attack's target pass (no-grad clean encoding of the attack's view; none for
    ``attack_mask: same`` without drop-path, which reuses the step's clean encoding), K attack passes
    (aux-branch encoder forward + input backward) and one auxiliary pass through the aux branch and decoder.

    Args:
        method: host method (``advmim_pl.mim.MAE``, ``SimMIM`` or ``MaskFeat``) with its options, or the
            ``{"class_path", "init_args"}`` dict of ``MIMMethod.config()`` that checkpoints store.
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
        self.aux_decoder = None  # the plug-in's aux norms and decoder start as the (loaded) clean ones
        if plugin is not None:
            self.aux_decoder = plugin.build(method, self.encoder, self.decoder, copy_decoder=init_from is not None)
            self.attack_callback = AdversarialTargetCallback(plugin.attacker, plugin.log_images_every_n_steps)
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
            shard_parts((self.encoder, self.decoder, self.aux_decoder), data_parallel_mesh(self.device_mesh), policy)
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

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.mask_stream.restore(checkpoint.get("mask_rng"))  # applied at the next draw, on the model's device

    # ---- the step ------------------------------------------------------------------------------------
    def _aux_decoder(self) -> torch.nn.Module:
        return self.decoder if self.aux_decoder is None else self.aux_decoder

    def host_step(self, x: Tensor, generator: torch.Generator) -> tuple[Mask, Tensor, Tensor, Tensor]:
        """The host method's step on x (B, C, H, W) under a mask drawn from ``generator``: (mask, clean latent
        (B, T, D), prediction, loss)."""
        method, encoder = self.method, self.encoder
        self.follow_input_size(x.shape[-1])
        mask = method.sample_mask(encoder, x.shape[0], x.device, generator)
        latent = method.encode(encoder, x, mask)
        pred = method.decode(self.decoder, latent, mask)
        return mask, latent, pred, method.loss(pred, x, mask, encoder)

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

    def feature_objective(
        self, x: Tensor, mask: Mask, latent: Tensor, generator: torch.Generator | None = None
    ) -> Callable[[Tensor], Tensor]:
        """The plug-in's attack objective at this step (``AEMIM.objective``): x (B, C, H, W) under the step's
        ``mask`` with clean latent (B, T, D) -> objective(x_adv) (B,)."""
        return self.plugin.objective(self, self.method, self.encoder, x, mask, latent, generator)

    def plugin_step(self, x: Tensor, mask: Mask, latent: Tensor) -> AuxStep:
        """The plug-in's auxiliary step on the host step's mask and clean latent (``AEMIM.step``)."""
        return self.plugin.step(
            self,
            self.method,
            self.encoder,
            self._aux_decoder(),
            x,
            mask,
            latent,
            self.attack_epoch(self.plugin.attacker),
            self.global_rank,
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        """The host's step plus the plug-in's; returns ``{"loss"}``, plus the image grids under ``"visuals"`` on the
        plug-in's grid steps."""
        x = batch[0]
        mask, latent, pred, loss_clean = self.host_step(x, self._mask_rng())
        self.log("train/loss_clean", loss_clean)
        loss, aux = loss_clean, None
        if self.plugin_active():
            aux = self.plugin_step(x, mask, latent)
            loss = loss_clean + self.plugin.weight(self.attack_epoch(self.plugin.attacker)) * aux.loss
            self._log_plugin(aux)
        elif self.plugin is not None and isinstance(self.trainer.strategy, DDPStrategy):
            # DDP without find_unused_parameters needs a gradient for every parameter: zeros for the plug-in's own,
            # which on_before_optimizer_step then drops, so that the optimizer leaves them as they are
            loss = loss + 0.0 * sum(p.sum() for p in self.plugin_parameters())
        self.log("train/loss", loss, prog_bar=True)
        if self.attack_callback is not None and self.attack_callback.should_log_images(self.trainer):
            return {"loss": loss, "visuals": self._visuals(x, mask, pred, aux)}
        return {"loss": loss}

    def plugin_active(self) -> bool:
        """Whether the plug-in runs in this training epoch (``AEMIM.epochs``)."""
        return self.plugin is not None and self.plugin.active(self.current_epoch)

    def plugin_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters only the plug-in trains: the auxiliary norms and the auxiliary decoder."""
        aux_decoder = [] if self.aux_decoder is None else list(self.aux_decoder.parameters())
        return [p for name, p in self.encoder.named_parameters() if ".aux." in name] + aux_decoder

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Outside the plug-in's epochs its parameters have no gradient (or DDP's zeros): the optimizer skips them,
        so neither weight decay nor momentum moves them."""
        if self.plugin is not None and not self.plugin_active():
            for p in self.plugin_parameters():
                p.grad = None

    def _log_plugin(self, aux: AuxStep) -> None:
        """Training metrics of the plug-in; the attack's objectives (three no-grad passes) on the trainer's logging
        steps only."""
        self.plugin.attacker.record_finite(aux.attack.finite)
        self.log("train/loss_aux", aux.loss)
        self.log("attack/delta_linf", aux.attack.delta_linf)
        self.log(
            "attack/nonfinite_batches",
            (~aux.attack.finite).float(),
            reduce_fx="sum",
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )
        if (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log_dict(self.plugin.objectives(self, aux, self.attack_epoch(self.plugin.attacker)))

    def _visuals(self, x: Tensor, mask: Mask, pred: Tensor, aux: AuxStep | None) -> dict[str, Tensor]:
        """Image grids for TensorBoard: clean, masked, reconstruction, and with the plug-in its attacked images'
        adversarial examples and amplified perturbations."""
        encoder = self.encoder
        pixel_mask = upsample_mask(mask.patches, encoder.grid_size, encoder.patch_size)
        visuals = {
            "clean": x,
            "masked": x * (1 - pixel_mask),
            "reconstruction": self.method.to_image(pred.detach(), x, mask, encoder),
        }
        if aux is not None:
            x_adv = aux.attack.x_adv
            delta = x_adv.float() - aux.x.float()
            scale = delta.abs().amax().clamp_min(1e-12)
            visuals["adversarial"] = x_adv
            visuals["perturbation"] = 0.5 + 0.5 * delta / scale
        return {k: v.detach() for k, v in visuals.items()}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Clean reconstruction loss under a mask fixed per batch index (comparable across epochs); with the
        plug-in's ``on_validation``, also the auxiliary loss on freshly crafted targets."""
        x = batch[0]
        mask, latent, _, loss = self.host_step(x, generator_for(x.device).manual_seed(batch_idx))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        if self.plugin is not None and self.plugin.on_validation:
            # validation draws leave the attack's generator as it was: they never shift the training stream
            with preserved(self.plugin.attacker.ensure_generator(x.device, self.global_rank)):
                aux = self.plugin_step(x, mask, latent)
            self.log("val/loss_aux", aux.loss, sync_dist=True)
            self.log("val/delta_linf", aux.attack.delta_linf, sync_dist=True)

    # ---- optimisation -------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Weights with ``weight_decay``; biases, norms, positions and tokens without."""
        return weight_decay_groups(self, self.hparams.weight_decay)
