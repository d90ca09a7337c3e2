"""PretrainModule: MAE or SimMIM pre-training, with the AEMIM auxiliary task as an option."""

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from jsonargparse import lazy_instance
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, PositiveInt
from lightning.pytorch.cli import OptimizerCallable, instantiate_class
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from advmim_pl.adversarial.attack import Objective, frozen_eval, random_sign
from advmim_pl.adversarial.attacker import Attacker, AttackResult
from advmim_pl.checks import require_non_negative, require_positive
from advmim_pl.mim.losses import feature_distance, upsample_mask
from advmim_pl.mim.methods import MAE, Mask, MIMMethod
from advmim_pl.models.branch_norm import add_branch_norms, branch
from advmim_pl.models.vit import MaskedViT
from advmim_pl.modules.base import BaseModule
from advmim_pl.pixel_stats import IMAGENET_MEAN, IMAGENET_STD
from advmim_pl.rng import SeededStream, generator_for, preserved, rank_states
from advmim_pl.schedule import weight_decay_groups
from advmim_pl.weights import load_decoder, load_encoder, read_weights


def mae_adamw(params: Iterable) -> torch.optim.Optimizer:
    """Fused AdamW with the MAE recipe's betas (0.9, 0.95); lr and weight decay are set per group."""
    return torch.optim.AdamW(params, betas=(0.9, 0.95), fused=True)


class PretrainModule(BaseModule):
    """Masked-image-modeling pre-training of a timm ViT, optionally with AEMIM adversarial targets.

    The optimiser, its learning-rate schedule and the attack wiring come from ``BaseModule``.

    Without the plug-in (``adversarial: false``) a step is exactly the host method: one masked clean
    pass of encoder and decoder. With it, an ``AdversarialTargetCallback`` must be on the trainer; per
    step: clean pass, the attack's target pass (no-grad clean encoding of the attack's view; none for
    ``attack_mask: same`` without drop-path, which reuses the step's clean encoding), K attack passes
    (aux-branch encoder forward + input backward) and one auxiliary pass through the aux branch and decoder.

    Args:
        method: host method (``advmim_pl.mim.MAE`` or ``advmim_pl.mim.SimMIM``) with its options, or the
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
        adversarial: enable the AEMIM auxiliary task (needs the callback).
        aux_weight: lambda, weight of the auxiliary reconstruction loss.
        aux_input: what the auxiliary branch encodes: ``adversarial`` (x_a) or ``clean`` (x).
        aux_target: what it reconstructs: ``adversarial`` (x_a) or ``clean`` (x).
        branch_params: ``norm`` gives the aux branch its own normalisation layers; ``none`` shares all.
        aux_decoder: ``separate`` auxiliary decoder or the ``shared`` clean one.
        aux_target_norm: per-patch normalisation of the auxiliary MAE target (with ``norm_pix_loss``).
            ``floor``: the target patch's own statistics with a variance floor of ``(aux_norm_floor * eps)^2``,
            so an eps-sized perturbation of a flat patch stays about ``1 / aux_norm_floor`` in size instead of
            becoming unit-variance noise. ``clean``: the clean patch's statistics with the same floor.
            ``patch``: MAE's plain per-patch normalisation (variance + 1e-6). SimMIM's L1 target is not
            normalised, so this only acts on MAE.
        aux_norm_floor: the floor's standard deviation in units of the attack's (ramped) eps. 2 adds the least
            unpredictable noise plus distortion of the clean target (``benchmarks/aux_target_norm.py``).
        compile: ``torch.compile`` the encoder blocks and the decoders (in place; checkpoint keys unchanged).
        init_from: start from these weights (weights only: the optimiser, step and schedule start fresh, unlike
            ``--ckpt_path``, which resumes a run): a ``.ckpt`` of this project, an ``advmim export`` file or folder,
            a facebookresearch/mae ``.pth``, a timm state dict or ``local-dir:`` folder, or ``timm:<model.tag>``
            (``advmim_pl.weights``). The encoder is loaded, and the decoder when the file has one that fits (else
            it starts fresh, logged). With the plug-in, the auxiliary norms and decoder start as copies of the loaded
            clean ones. Checkpoints of the run keep the source as ``checkpoint["init_from"]`` and hold ``init_from:
            null`` in their hyperparameters, so that loading them never reads the source again.
    """

    baseline = "the plain MIM baseline"

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
        adversarial: bool = False,
        aux_weight: NonNegativeFloat = 1.0,
        aux_input: Literal["adversarial", "clean"] = "adversarial",
        aux_target: Literal["adversarial", "clean"] = "adversarial",
        branch_params: Literal["norm", "none"] = "norm",
        aux_decoder: Literal["separate", "shared"] = "separate",
        aux_target_norm: Literal["floor", "clean", "patch"] = "floor",
        aux_norm_floor: NonNegativeFloat = 2.0,
        compile: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__(optimizer)
        require_positive(batch_size=batch_size, lr_reference_batch=lr_reference_batch)
        require_non_negative(
            base_lr=base_lr,
            weight_decay=weight_decay,
            aux_weight=aux_weight,
            aux_norm_floor=aux_norm_floor,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
        )
        if isinstance(method, dict):  # {"class_path", "init_args"} from a checkpoint's hyperparameters
            method = instantiate_class((), method)
        self.store_hparams(ignore=("method",), method=method.config())  # load_from_checkpoint rebuilds the method
        self.method = method
        self.encoder = MaskedViT.from_settings(self.hparams, drop_path_rate, mask_token=method.uses_mask_token)
        self.decoder = method.make_decoder(self.encoder)
        if init_from is not None:
            self.load_weights(init_from)
        self.aux_decoder = None
        if adversarial:
            if branch_params == "norm":
                add_branch_norms(self.encoder)  # the aux copies start as the (loaded) clean norms
            if aux_decoder == "separate":
                fresh = init_from is None
                self.aux_decoder = method.make_decoder(self.encoder) if fresh else copy.deepcopy(self.decoder)
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
        if self.hparams.compile:
            for part in (self.encoder.vit.blocks, self.decoder, self.aux_decoder):
                if part is not None:
                    part.compile()

    def setup(self, stage: str) -> None:
        """Find the attack (``BaseModule.setup``); then refuse or warn about an attack that cannot move."""
        super().setup(stage)
        if stage != "fit":
            return
        self.check_attack(self.attack)
        if self.attack is not None and self.attack.perturbation == "pgd" and not self.attack.random_start:
            rank_zero_warn(
                "attack.init_args.random_start: false: the two branches' normalisation layers start as identical "
                "copies, so the first attack gradients are zero and x_a = x until the branches diverge in "
                "training. Set random_start: true for adversarial targets from the first step."
            )

    def check_attack(self, attack: Attacker | None) -> None:
        """Refuse an attack that cannot move with this module (the CLI calls it before training starts).

        PGD from x itself with one fully shared encoder: at delta = 0 the aux branch's features equal the clean
        target, so the objective sits at its minimum with zero gradient, and every x_a equals x."""
        if attack is None or attack.perturbation != "pgd" or attack.random_start:
            return
        if self.hparams.branch_params == "none":
            raise ValueError(
                "attack.init_args.random_start: false with model.init_args.branch_params: none cannot attack: "
                "both branches are one encoder, so at x the attack objective is at its minimum with zero "
                "gradient and every x_a equals x. Set random_start: true or branch_params: norm."
            )

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

    def attack_view(self, x: Tensor, mask: Mask, clean_latent: Tensor) -> tuple[Mask, Tensor]:
        """The mask the attacked encoder sees and the stop-gradient clean features it is pushed away from.

        x (B, C, H, W); ``mask`` is the step's; clean_latent (B, T, D) its clean encoding. ``none`` sees the
        whole image, ``complement`` the step's masked patches (the ones the auxiliary loss scores), ``same``
        the step's visible patches. The target is a no-grad eval-mode pass (no stochastic depth), except for
        ``same`` without drop-path, where the step's own clean encoding is that pass already. ``independent``
        draws its masks per PGD step (in the objective), so its view here is the step's mask, unused.
        """
        attack, method, encoder = self.attack, self.method, self.encoder
        if attack.attack_mask == "none":
            view = method.full_view(encoder, x.shape[0], x.device)
        elif attack.attack_mask == "complement":
            view = method.complement(encoder, mask)
        else:
            view = mask
        if attack.attack_mask == "same" and not self.hparams.drop_path_rate:
            return view, clean_latent.detach()
        if attack.attack_mask == "independent":
            return view, clean_latent.detach()
        with torch.no_grad(), frozen_eval(self):
            return view, method.encode(encoder, x, view)

    def feature_objective(
        self, x: Tensor, mask: Mask, clean_latent: Tensor, generator: torch.Generator | None = None
    ) -> Callable[[Tensor], Tensor]:
        """The attack objective: distance of the aux branch's features of x_adv to the clean features.

        x (B, C, H, W); clean_latent (B, T, D) is this step's clean encoding under ``mask``; ``generator``
        draws the per-step masks of ``attack_mask: independent`` (default: the callback's). Returns
        objective(x_adv) -> (B,).
        """
        attack, method, encoder = self.attack, self.method, self.encoder
        view, target = self.attack_view(x, mask, clean_latent)

        def objective(x_adv: Tensor) -> Tensor:
            step_view, step_target = view, target
            if attack.attack_mask == "independent":  # the callback's generator exists once the attack runs
                source = attack.generator if generator is None else generator
                step_view = method.sample_mask(encoder, x.shape[0], x.device, source)
                with torch.no_grad(), frozen_eval(self):
                    step_target = method.encode(encoder, x, step_view)
            with branch(encoder, "aux"):
                features = method.encode(encoder, x_adv, step_view)
            return feature_distance(features, step_target, attack.distance)

        return objective

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Any]:
        """One step; returns ``{"loss"}``, plus the image grids under ``"visuals"`` on the attack's grid steps."""
        x = batch[0]
        method, encoder = self.method, self.encoder
        mask = method.sample_mask(encoder, x.shape[0], x.device, self._mask_rng())
        latent = method.encode(encoder, x, mask)
        pred = method.decode(self.decoder, latent, mask)
        loss_clean = method.loss(pred, x, mask, encoder)
        self.log("train/loss_clean", loss_clean)
        loss, x_adv = loss_clean, None
        if self.hparams.adversarial:
            loss_aux, result, objective = self._aux_loss(x, mask, latent)
            x_adv = result.x_adv
            loss = loss_clean + self.hparams.aux_weight * self.attack.ramp(self.trainer) * loss_aux
            self._log_attack(x, loss_aux, result, objective)
        self.log("train/loss", loss, prog_bar=True)
        if self.attack is not None and self.attack.should_log_images(self.trainer):
            return {"loss": loss, "visuals": self._visuals(x, mask, pred, x_adv)}
        return {"loss": loss}

    def _aux_loss(self, x: Tensor, mask: Mask, latent: Tensor) -> tuple[Tensor, AttackResult, Objective]:
        """AEMIM auxiliary reconstruction under ``mask``, attacking from this step's clean ``latent``.

        Returns (L_aux, the attack result, the objective it maximised).
        """
        method, encoder, hp = self.method, self.encoder, self.hparams
        objective = self.feature_objective(x, mask, latent)
        result = self.attack.generate(self, x, objective)
        x_in = result.x_adv if hp.aux_input == "adversarial" else x
        x_tgt = result.x_adv if hp.aux_target == "adversarial" else x
        with branch(encoder, "aux"):
            latent_aux = method.encode(encoder, x_in, mask)
        pred_aux = method.decode(self._aux_decoder(), latent_aux, mask)
        floor = 0.0 if hp.aux_target_norm == "patch" else hp.aux_norm_floor * self.attack.current_eps(self._trainer)
        stats_from = x if hp.aux_target_norm == "clean" else None
        loss_aux = method.loss(pred_aux, x_tgt, mask, encoder, var_floor=floor**2, stats_from=stats_from)
        return loss_aux, result, objective

    def _log_attack(self, x: Tensor, loss_aux: Tensor, result: AttackResult, objective: Objective) -> None:
        """Training metrics of the plug-in. On the trainer's logging steps only (three no-grad encoder passes):
        the objective at x, at x_a and at an energy-matched random-sign perturbation of the same eps, whose
        gap to x_a shows what the attack gains over chance. Their random draws leave the attack's generator as it
        was, so the training stream does not depend on the logging period."""
        self.attack.record_finite(result.finite, self.trainer)
        self.log("train/loss_aux", loss_aux)
        self.log("attack/delta_linf", result.delta_linf)
        self.log(
            "attack/nonfinite_batches",
            (~result.finite).float(),
            reduce_fx="sum",
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )
        if (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0:
            generator = self.attack.generator
            with torch.no_grad(), frozen_eval(self), preserved(generator):
                adv = objective(result.x_adv).mean()
                random = objective(random_sign(x, self.attack.current_eps(self.trainer), generator)).mean()
                self.log("attack/objective_clean", objective(x).mean())
                self.log("attack/objective_adv", adv)
                self.log("attack/objective_random", random)
                self.log("attack/gain_over_random", adv - random)

    def _visuals(self, x: Tensor, mask: Mask, pred: Tensor, x_adv: Tensor | None) -> dict[str, Tensor]:
        """Image grids for TensorBoard: clean, masked, reconstruction, adversarial, amplified perturbation."""
        encoder = self.encoder
        pixel_mask = upsample_mask(mask.patches, encoder.grid_size, encoder.patch_size)
        visuals = {
            "clean": x,
            "masked": x * (1 - pixel_mask),
            "reconstruction": self.method.to_image(pred.detach(), x, mask, encoder),
        }
        if x_adv is not None:
            delta = x_adv.float() - x.float()
            scale = delta.abs().amax().clamp_min(1e-12)
            visuals["adversarial"] = x_adv
            visuals["perturbation"] = 0.5 + 0.5 * delta / scale
        return {k: v.detach() for k, v in visuals.items()}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Clean reconstruction loss under a mask fixed per batch index (comparable across epochs); with the
        callback's ``on_validation``, also the auxiliary loss on freshly crafted targets."""
        x = batch[0]
        generator = generator_for(x.device).manual_seed(batch_idx)
        mask = self.method.sample_mask(self.encoder, x.shape[0], x.device, generator)
        latent = self.method.encode(self.encoder, x, mask)
        pred = self.method.decode(self.decoder, latent, mask)
        self.log("val/loss", self.method.loss(pred, x, mask, self.encoder), prog_bar=True, sync_dist=True)
        if self.attack is not None and self.attack.on_validation:
            # validation draws leave the attack's generator as it was: they never shift the training stream
            with preserved(self.attack.ensure_generator(x.device, self.global_rank)):
                loss_aux, result, _ = self._aux_loss(x, mask, latent)
            self.log("val/loss_aux", loss_aux, sync_dist=True)
            self.log("val/delta_linf", result.delta_linf, sync_dist=True)

    # ---- optimisation -------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Weights with ``weight_decay``; biases, norms, positions and tokens without."""
        return weight_decay_groups(self, self.hparams.weight_decay)
