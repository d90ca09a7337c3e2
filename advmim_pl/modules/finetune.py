"""FinetuneModule: end-to-end fine-tuning of a pre-trained encoder (the MAE protocol), optionally adversarial."""

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat, NonNegativeInt, PositiveInt
from lightning.pytorch.cli import OptimizerCallable
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torchvision.transforms import v2

from advmim_pl.adversarial.aemim import BranchParams
from advmim_pl.adversarial.attacker import Attacker, attacker_from
from advmim_pl.adversarial.callback import AdversarialTargetCallback
from advmim_pl.checks import require_between, require_choice, require_non_negative
from advmim_pl.models.branch_norm import Branch, add_branch_norms, branch
from advmim_pl.models.pooling import GlobalPool
from advmim_pl.modules.classifier import ClassifierModule, soft_cross_entropy
from advmim_pl.pixel_stats import IMAGENET_MEAN, IMAGENET_STD
from advmim_pl.schedule import NO_DECAY_PATTERNS


def finetune_adamw(params: Iterable) -> torch.optim.Optimizer:
    """Fused AdamW with the MAE fine-tuning betas (0.9, 0.999); lr and weight decay are set per group."""
    return torch.optim.AdamW(params, betas=(0.9, 0.999), fused=True)


class FinetuneModule(ClassifierModule):
    """End-to-end fine-tuning (MAE protocol), optionally adversarial (AdvProp-style, with the generic ``Attacker``).

    Head: pooling (``avg``: mean of patch tokens + ``fc_norm`` LayerNorm, MAE's default; ``token``: cls
    token after the final norm) + ``Linear`` (init trunc-normal std 2e-5, bias 0). Layer-wise lr decay:
    parameter groups from ``timm.optim.param_groups_layer_decay`` with lr scale
    ``layer_decay^(num_layers - layer_id)``, layer id 0 for patch embedding / cls token / positions,
    ``i + 1`` for block i and ``num_layers = depth + 1`` for everything after the blocks (norms, head).
    Training-time augmentation runs on the device batch: RandAugment per image, random erasing, then Mixup/CutMix with
    soft-target cross-entropy (label smoothing folded into the targets), or label-smoothed cross-entropy
    when mixing is off.

    With an ``attack``, each step crafts x_a maximising the cross-entropy of the (aux-branch) logits against the
    step's targets, and the loss is CE(x) + adv_weight * CE(x_a). With ``branch_params: norm`` x_a goes through its
    own copy of every normalisation layer (AdvProp), initialised from the pre-trained ones; the clean copy is the model.

    Args:
        num_classes: classes (linked from the DataModule's ``num_classes`` by the ``advmim`` CLI).
        encoder: timm ViT name, e.g. ``vit_base_patch16_224`` (must match ``init_from``).
        img_size: input side in pixels (linked from the DataModule).
        patch_size: patch side in pixels.
        in_chans: image channels (linked from the DataModule).
        mean: per-channel mean of the pixel-space Normalize inside the model (linked from the data).
        std: per-channel std of that Normalize (linked from the data).
        encoder_kwargs: extra timm ``create_model`` arguments (must match ``init_from``).
        sincos_pos_embed: fixed 2-D sin-cos positions (loaded from ``init_from``); false trains them.
        global_pool: ``avg`` (mean patch token + fc_norm) or ``token`` (cls token; warns for a SimMIM encoder).
        drop_path_rate: stochastic depth of the encoder.
        init_from: ``PretrainModule`` checkpoint (.ckpt) or exported encoder (.safetensors); None trains
            from scratch.
        batch_size: per-device batch size (linked from the data), for the lr scaling rule.
        optimizer: optimizer factory (default fused AdamW, betas (0.9, 0.999)).
        base_lr: lr per ``lr_reference_batch`` images.
        lr_reference_batch: the 256 of the scaling rule.
        weight_decay: on weight matrices; none on 1-d parameters, positions and tokens.
        layer_decay: layer-wise lr decay factor (0.65 for ViT-B in MAE; 1 disables it).
        warmup_epochs: linear lr warm-up length; then half-cycle cosine per step.
        min_lr: final lr of the cosine (times each group's lr scale).
        label_smoothing: label smoothing of the training targets.
        mixup_alpha: Mixup beta parameter (0 disables Mixup).
        cutmix_alpha: CutMix beta parameter (0 disables CutMix).
        mixup_prob: probability of mixing a batch.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        randaugment: RandAugment (``torchvision.transforms.v2``) per training image, on the device.
        randaugment_ops: operations per image.
        randaugment_magnitude: magnitude of each operation, 0-30 (9 in MAE).
        random_erasing: probability of erasing one random rectangle per training image (0.25 in MAE), after
            RandAugment and before Mixup; the rectangle is filled with per-pixel N(0, 1) noise in the normalised
            space (timm ``RandomErasing``, mode ``pixel``), i.e. mean + std * N(0, 1) in pixel units.
        attack: adversarial fine-tuning with this ``advmim_pl.adversarial.Attacker`` (its ``{"class_path",
            "init_args"}`` dict in checkpoints); None trains on clean images only.
        adv_weight: weight of the cross-entropy on x_a.
        branch_params: ``norm`` gives x_a its own normalisation layers (AdvProp); ``none`` shares all.
    """

    default_pool: GlobalPool = "avg"

    def __init__(
        self,
        num_classes: PositiveInt,
        encoder: str = "vit_base_patch16_224",
        img_size: PositiveInt = 224,
        patch_size: PositiveInt = 16,
        in_chans: PositiveInt = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        encoder_kwargs: dict[str, Any] | None = None,
        sincos_pos_embed: bool = True,
        global_pool: GlobalPool = "avg",
        drop_path_rate: ClosedUnitInterval = 0.1,
        init_from: str | None = None,
        batch_size: PositiveInt = 64,
        optimizer: OptimizerCallable = finetune_adamw,
        base_lr: NonNegativeFloat = 1e-3,
        lr_reference_batch: PositiveInt = 256,
        weight_decay: NonNegativeFloat = 0.05,
        layer_decay: ClosedUnitInterval = 0.65,
        warmup_epochs: NonNegativeFloat = 5.0,
        min_lr: NonNegativeFloat = 1e-6,
        label_smoothing: ClosedUnitInterval = 0.1,
        mixup_alpha: NonNegativeFloat = 0.8,
        cutmix_alpha: NonNegativeFloat = 1.0,
        mixup_prob: ClosedUnitInterval = 1.0,
        mixup_switch_prob: ClosedUnitInterval = 0.5,
        randaugment: bool = True,
        randaugment_ops: PositiveInt = 2,
        randaugment_magnitude: NonNegativeInt = 9,
        random_erasing: ClosedUnitInterval = 0.25,
        attack: Attacker | None = None,
        adv_weight: NonNegativeFloat = 1.0,
        branch_params: BranchParams = "norm",
    ) -> None:
        require_between(0, 1, label_smoothing=label_smoothing, mixup_prob=mixup_prob, random_erasing=random_erasing)
        require_non_negative(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, adv_weight=adv_weight)
        require_between(0, 1, "(]", layer_decay=layer_decay)
        require_between(0, 30, randaugment_magnitude=randaugment_magnitude)
        require_choice(BranchParams, branch_params=branch_params)
        super().__init__(
            encoder=encoder,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            mean=mean,
            std=std,
            encoder_kwargs=encoder_kwargs,
            sincos_pos_embed=sincos_pos_embed,
            global_pool=global_pool,
            drop_path_rate=drop_path_rate,
            num_classes=num_classes,
            init_from=init_from,
            batch_size=batch_size,
            optimizer=optimizer,
            base_lr=base_lr,
            lr_reference_batch=lr_reference_batch,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
        )
        self.head = nn.Linear(self.encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        self.attack = attacker_from(attack)  # a dict: from a checkpoint's hparams
        self.hparams.attack = self.attack and self.attack.config()  # load_from_checkpoint rebuilds the attack
        if self.attack is not None:
            self.attack_callback = AdversarialTargetCallback(self.attack)
            if branch_params == "norm":
                add_branch_norms(self.encoder)  # after loading: the aux copies start from the pre-trained norms
        self.mixup: Mixup | None = None
        if (mixup_alpha > 0 or cutmix_alpha > 0) and mixup_prob > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode="batch",
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self.randaugment = (
            v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude) if randaugment else None
        )

    # ---- the step ------------------------------------------------------------------------------------
    @property
    def adv_branch(self) -> Branch:
        """The normalisation branch adversarial inputs go through."""
        return "aux" if self.hparams.branch_params == "norm" else "clean"

    def augment(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Training-time augmentation of a device batch: x (B, C, H, W) in [0, 1], y (B,) -> augmented x and
        targets: (B,) labels, or (B, num_classes) soft targets when Mixup/CutMix is on. Erased rectangles may
        leave [0, 1] (noise with the data's mean and std)."""
        if self.randaugment is not None:
            x = torch.stack([self.randaugment(image) for image in x])
        if self.hparams.random_erasing > 0:
            erase = RandomErasing(self.hparams.random_erasing, mode="pixel", device=x.device)
            normalize = self.encoder.normalize
            x = erase(normalize(x).contiguous()) * normalize.std + normalize.mean
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise ValueError(f"Mixup/CutMix needs an even batch size, got {x.shape[0]}")
            x, y = self.mixup(x.clone(), y)
        return x, y

    def criterion(self, logits: Tensor, target: Tensor) -> Tensor:
        """Mean training loss: soft-target CE for mixed (B, K) targets, else label-smoothed CE."""
        if target.ndim == 2:
            return soft_cross_entropy(logits, target).mean()
        return F.cross_entropy(logits.float(), target, label_smoothing=self.hparams.label_smoothing)

    def losses(self, x: Tensor, target: Tensor) -> dict[str, Tensor]:
        """Clean loss and, when adversarial, the loss on x_a crafted against the aux branch.

        x (B, C, H, W) already augmented; target (B,) or (B, K). Returns {"clean", "loss"} and, when
        adversarial, also "adv", "x_adv", "finite" and "delta_linf".
        """
        out = {"clean": self.criterion(self.logits(x), target)}
        out["loss"] = out["clean"]
        if self.attack is not None:
            epoch = self.attack_epoch(self.attack)
            objective = self.cross_entropy_objective(target, self.adv_branch)
            result = self.attack.generate(self, x, objective, epoch, self.global_rank)
            with branch(self.encoder, self.adv_branch):
                out["adv"] = self.criterion(self.logits(result.x_adv), target)
            out["loss"] = out["clean"] + self.hparams.adv_weight * self.attack.ramp(epoch) * out["adv"]
            out.update(x_adv=result.x_adv, finite=result.finite, delta_linf=result.delta_linf)
        return out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, target = self.augment(batch[0], batch[1])
        out = self.losses(x, target)
        if self.attack is not None:
            self.attack.record_finite(out["finite"])
            self.log("train/loss_clean", out["clean"])
            self.log("train/loss_adv", out["adv"])
            self.log("attack/delta_linf", out["delta_linf"])
        self.log("train/loss", out["loss"], prog_bar=True)
        return out["loss"]

    # ---- optimisation -------------------------------------------------------------------------------
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm layer grouping (the interface ``param_groups_layer_decay`` reads) with MAE's layer ids:
        embeddings 0, block i -> i + 1; everything else (final norm, fc_norm, head) comes last."""
        return {
            "stem": r"^encoder\.vit\.(?:cls_token|reg_token|pos_embed|patch_embed|norm_pre)",
            "blocks": r"^encoder\.vit\.blocks\.(\d+)",
        }

    def param_groups(self) -> list[dict]:
        """Layer-wise lr decay groups (each with ``lr_scale``); no weight decay on 1-d parameters, positions
        and tokens."""
        return param_groups_layer_decay(
            self,
            weight_decay=self.hparams.weight_decay,
            no_weight_decay_list=NO_DECAY_PATTERNS,
            layer_decay=self.hparams.layer_decay,
        )
