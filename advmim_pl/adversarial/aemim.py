"""AEMIM: the plug-in as one object. It owns what is specific to masked image modeling: the attack's view of the
image, its objective on the encoder's features, the auxiliary branch (its normalisation layers and decoder), the
auxiliary target and its normalisation, and the auxiliary loss with its weight. The attack itself is the generic
``Attacker`` it builds from its settings."""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat
from lightning.pytorch.utilities import rank_zero_warn
from timm.layers import DropPath
from torch import Tensor, nn

from advmim_pl.adversarial.attack import frozen_eval, random_sign
from advmim_pl.adversarial.attacker import Attacker, AttackResult, require
from advmim_pl.checks import constructor_config
from advmim_pl.mim.losses import TargetNorm, feature_distance
from advmim_pl.mim.methods import Mask, MIMMethod
from advmim_pl.models.branch_norm import add_branch_norms, branch
from advmim_pl.models.vit import MaskedViT
from advmim_pl.rng import preserved

Distance = Literal["mse", "cosine", "kl"]
AttackMask = Literal["none", "complement", "same", "independent"]
ATTACK_MASKS: tuple[str, ...] = ("none", "complement", "same", "independent")


def has_drop_path(module: nn.Module) -> bool:
    """Whether ``module`` has stochastic depth (a timm ``DropPath`` with a positive rate)."""
    return any(isinstance(m, DropPath) and m.drop_prob > 0 for m in module.modules())


@dataclass
class AuxStep:
    """One auxiliary step: its loss () fp32, the attack's result, the objective the attack maximised, and the images
    it attacked, x (k, C, H, W): the whole batch, or the plug-in's ``batch_fraction`` of it."""

    loss: Tensor
    attack: AttackResult
    objective: Callable[[Tensor], Tensor]
    x: Tensor


class AEMIM:
    """The AEMIM plug-in (Xiang et al. 2024, arXiv:2407.11537) for any host ``MIMMethod``: per step it crafts x_a
    against the encoder's own features and adds ``aux_weight * L_aux``, the host method's loss of an auxiliary
    branch that reconstructs x_a's targets (in the host's target space: pixels, normalised patches, HOG, ...) from
    its masked version. It owns no parameters: ``PretrainModule(plugin=AEMIM(...))`` asks it for the auxiliary
    decoder and normalisation layers, and puts an ``AdversarialTargetCallback`` for the attack's state on the trainer.

    Args:
        aux_weight: lambda, weight of the auxiliary reconstruction loss (ramped with the attack's warm-up).
        aux_input: what the auxiliary branch encodes: ``adversarial`` (x_a) or ``clean`` (x).
        aux_target: what it reconstructs: ``adversarial`` (x_a) or ``clean`` (x).
        branch_params: ``norm`` gives the aux branch its own normalisation layers; ``none`` shares all.
        aux_decoder: ``separate`` auxiliary decoder or the ``shared`` clean one.
        aux_target_norm: per-patch normalisation of the auxiliary target, for a host whose target is normalised per
            patch (MAE with ``norm_pix_loss``; other hosts ignore it). ``floor``: the target patch's own statistics
            with a variance floor of ``(aux_norm_floor * eps)^2``, so an eps-sized perturbation of a flat patch
            stays about ``1 / aux_norm_floor`` in size instead of becoming unit-variance noise. ``clean``: the clean
            patch's statistics with the same floor. ``patch``: MAE's plain per-patch normalisation.
        aux_norm_floor: the floor's standard deviation in units of the attack's (ramped) eps.
        distance: feature distance the attack maximises: ``mse``, ``cosine`` or ``kl``.
        attack_mask: what the attacked encoder sees. ``none``: the whole image, so the perturbation covers the
            patches the auxiliary loss scores. ``complement``: only the step's masked patches, exactly the scored
            ones, with fewer tokens than ``none`` (MAE). ``same``: the step's visible patches; the cheapest, but
            masked patches get zero input gradient, so the scored patches carry only the random start.
            ``independent``: a fresh random mask per PGD step.
        on_validation: also craft targets for validation batches (``val/loss_aux``).
        epochs: the training epochs in which the plug-in runs, as ``[start, end)`` windows of 0-based epochs (e.g.
            ``[[640, 800]]``: the last 20% of an 800-epoch run); None: every epoch. Outside them a step is the host
            method's step alone: no attack, no auxiliary pass.
        batch_fraction: the share of each batch the plug-in attacks and reconstructs: ``round(batch_fraction x
            batch)`` images (at least one), drawn afresh each step from the attack's own seeded generator (saved in
            checkpoints). The auxiliary loss is their mean, so its scale does not depend on the fraction.
        log_images_every_n_steps: TensorBoard image-grid period in optimizer steps (0 = never).
        attack: the attack's settings (eps, steps, step_size, random_start, perturbation, warmup_epochs, seed),
            passed to ``Attacker``, which documents and checks them; LightningCLI reads their types from there.
    """

    def __init__(
        self,
        aux_weight: NonNegativeFloat = 1.0,
        aux_input: Literal["adversarial", "clean"] = "adversarial",
        aux_target: Literal["adversarial", "clean"] = "adversarial",
        branch_params: Literal["norm", "none"] = "norm",
        aux_decoder: Literal["separate", "shared"] = "separate",
        aux_target_norm: Literal["floor", "clean", "patch"] = "floor",
        aux_norm_floor: NonNegativeFloat = 2.0,
        distance: Distance = "mse",
        attack_mask: AttackMask = "none",
        on_validation: bool = False,
        log_images_every_n_steps: NonNegativeInt = 500,
        epochs: list[tuple[NonNegativeInt, NonNegativeInt]] | None = None,
        batch_fraction: PositiveFloat = 1.0,
        **attack,
    ) -> None:
        owner = type(self).__name__
        require(0 < batch_fraction <= 1, "batch_fraction", batch_fraction, "in (0, 1]", owner)
        for window in epochs or ():
            require(
                len(window) == 2 and 0 <= window[0] < window[1],
                "epochs",
                epochs,
                "[start, end) windows of 0-based epochs with start < end, e.g. [[640, 800]]",
                owner,
            )
        for name, value in (("aux_weight", aux_weight), ("aux_norm_floor", aux_norm_floor)):
            require(value >= 0, name, value, "non-negative", owner)
        require(log_images_every_n_steps >= 0, "log_images_every_n_steps", log_images_every_n_steps, ">= 0", owner)
        for name, value, allowed in (
            ("aux_input", aux_input, ("adversarial", "clean")),
            ("aux_target", aux_target, ("adversarial", "clean")),
            ("branch_params", branch_params, ("norm", "none")),
            ("aux_decoder", aux_decoder, ("separate", "shared")),
            ("aux_target_norm", aux_target_norm, ("floor", "clean", "patch")),
            ("distance", distance, ("mse", "cosine", "kl")),
            ("attack_mask", attack_mask, ATTACK_MASKS),
        ):
            require(value in allowed, name, value, f"one of {allowed}", owner)
        self.attacker = Attacker(**attack)
        if self.attacker.perturbation == "pgd" and not self.attacker.random_start:
            if branch_params == "none":
                raise ValueError(
                    f"{owner}: random_start=False with branch_params='none' cannot attack: both branches are one "
                    "encoder, so at x the attack objective is at its minimum with zero gradient and every x_a equals "
                    "x. Set random_start: true or branch_params: norm."
                )
            rank_zero_warn(
                f"{owner}: random_start=False: the two branches' normalisation layers start as identical copies, so "
                "the first attack gradients are zero and x_a = x until the branches diverge in training. Set "
                "random_start: true for adversarial targets from the first step."
            )
        self.aux_weight, self.aux_input, self.aux_target = aux_weight, aux_input, aux_target
        self.branch_params, self.aux_decoder, self.aux_target_norm = branch_params, aux_decoder, aux_target_norm
        self.aux_norm_floor, self.distance, self.attack_mask = aux_norm_floor, distance, attack_mask
        self.on_validation, self.log_images_every_n_steps = on_validation, log_images_every_n_steps
        self.epochs = None if epochs is None else [tuple(window) for window in epochs]
        self.batch_fraction = batch_fraction

    def config(self) -> dict:
        """``{"class_path", "init_args"}`` that rebuilds this plug-in, its attack's settings included."""
        config = constructor_config(self)
        config["init_args"].update(self.attacker.settings())
        return config

    def active(self, epoch: int) -> bool:
        """Whether the plug-in runs in the 0-based training epoch ``epoch`` (inside one of ``epochs``' windows)."""
        return self.epochs is None or any(start <= epoch < end for start, end in self.epochs)

    def subset(self, batch: int, generator: torch.Generator) -> Tensor | None:
        """The sorted indices (k,) of the images the plug-in attacks, k = round(batch_fraction x batch) >= 1, drawn
        from ``generator``; None for the whole batch (no draw)."""
        k = max(1, round(self.batch_fraction * batch))
        if k >= batch:
            return None
        return torch.randperm(batch, generator=generator, device=generator.device)[:k].sort().values

    def weight(self, epoch: float | None) -> float:
        """The auxiliary loss's weight at the fractional epoch ``epoch``: ``aux_weight`` times the warm-up ramp."""
        return self.aux_weight * self.attacker.ramp(epoch)

    # ---- the auxiliary branch -----------------------------------------------------------------------
    def build(self, method: MIMMethod, encoder: MaskedViT, decoder: nn.Module, copy_decoder: bool) -> nn.Module | None:
        """Give ``encoder`` the auxiliary normalisation layers (copies of its current, possibly loaded, ones) and
        return the auxiliary decoder: None when shared, else a copy of ``decoder`` when ``copy_decoder`` (weights
        loaded from elsewhere) or a fresh one."""
        if self.branch_params == "norm":
            add_branch_norms(encoder)
        if self.aux_decoder == "shared":
            return None
        return copy.deepcopy(decoder) if copy_decoder else method.make_decoder(encoder)

    # ---- the attack -------------------------------------------------------------------------------------
    def attack_view(
        self, model: nn.Module, method: MIMMethod, encoder: MaskedViT, x: Tensor, mask: Mask, clean_latent: Tensor
    ) -> tuple[Mask, Tensor]:
        """The mask the attacked encoder sees and the stop-gradient clean features it is pushed away from.

        x (B, C, H, W); ``mask`` is the step's; clean_latent (B, T, D) its clean encoding. ``none`` sees the whole
        image, ``complement`` the step's masked patches (the ones the auxiliary loss scores), ``same`` the step's
        visible patches. The target is a no-grad eval-mode pass of ``model`` (no stochastic depth), except for
        ``same`` on an encoder without drop-path, where the step's own clean encoding is that pass already.
        ``independent`` draws its masks per PGD step (in the objective), so its view here is the step's mask.
        """
        if self.attack_mask == "none":
            view = method.full_view(encoder, x.shape[0], x.device)
        elif self.attack_mask == "complement":
            view = method.complement(encoder, mask)
        else:
            view = mask
        if self.attack_mask == "independent" or (self.attack_mask == "same" and not has_drop_path(encoder)):
            return view, clean_latent.detach()
        with torch.no_grad(), frozen_eval(model):
            return view, method.encode(encoder, x, view)

    def objective(
        self,
        model: nn.Module,
        method: MIMMethod,
        encoder: MaskedViT,
        x: Tensor,
        mask: Mask,
        clean_latent: Tensor,
        generator: torch.Generator | None = None,
    ) -> Callable[[Tensor], Tensor]:
        """The attack objective: distance of the aux branch's features of x_adv to the clean features.

        x (B, C, H, W); clean_latent (B, T, D) is this step's clean encoding under ``mask``; ``generator`` draws the
        per-step masks of ``attack_mask: independent`` (default: the attacker's). Returns objective(x_adv) -> (B,).
        """
        view, target = self.attack_view(model, method, encoder, x, mask, clean_latent)

        def objective(x_adv: Tensor) -> Tensor:
            step_view, step_target = view, target
            if self.attack_mask == "independent":  # the attacker's generator exists once the attack runs
                source = self.attacker.generator if generator is None else generator
                step_view = method.sample_mask(encoder, x.shape[0], x.device, source)
                with torch.no_grad(), frozen_eval(model):
                    step_target = method.encode(encoder, x, step_view)
            with branch(encoder, "aux"):
                features = method.encode(encoder, x_adv, step_view)
            return feature_distance(features, step_target, self.distance)

        return objective

    # ---- the auxiliary task -----------------------------------------------------------------------------
    def step(
        self,
        model: nn.Module,
        method: MIMMethod,
        encoder: MaskedViT,
        decoder: nn.Module,
        x: Tensor,
        mask: Mask,
        clean_latent: Tensor,
        epoch: float | None = None,
        rank: int = 0,
    ) -> AuxStep:
        """The auxiliary reconstruction under the step's ``mask``, attacking from its clean encoding.

        ``model`` holds ``encoder`` and the auxiliary ``decoder`` (its modes are frozen during the attack); x
        (B, C, H, W) in [0, 1]; clean_latent (B, T, D); ``epoch`` the fractional training epoch (warm-up), ``rank``
        the process's global rank (the attack's seed offset). With a ``batch_fraction`` below 1 the step runs on the
        drawn share of the images only. Returns the unweighted L_aux and the attack.
        """
        index = self.subset(x.shape[0], self.attacker.ensure_generator(x.device, rank))
        if index is not None:
            index = index.to(x.device)
            x, mask, clean_latent = x[index], mask.select(index), clean_latent[index]
        objective = self.objective(model, method, encoder, x, mask, clean_latent)
        result = self.attacker.generate(model, x, objective, epoch, rank)
        x_in = result.x_adv if self.aux_input == "adversarial" else x
        x_tgt = result.x_adv if self.aux_target == "adversarial" else x
        with branch(encoder, "aux"):
            latent = method.encode(encoder, x_in, mask)
        pred = method.decode(decoder, latent, mask)
        floor = 0.0 if self.aux_target_norm == "patch" else self.aux_norm_floor * self.attacker.current_eps(epoch)
        norm = TargetNorm(floor**2, x if self.aux_target_norm == "clean" else None)
        return AuxStep(method.loss(pred, x_tgt, mask, encoder, norm), result, objective, x)

    def objectives(self, model: nn.Module, aux: AuxStep, epoch: float | None) -> dict[str, Tensor]:
        """The attack's objective at the attacked images x (``aux.x``), at x_a and at an energy-matched random sign
        pattern of the same eps (three no-grad passes), and the gap that shows what the attack gains over chance.
        The random draws leave the attacker's generator as it was, so the training stream does not depend on how
        often this runs."""
        generator, x = self.attacker.generator, aux.x
        with torch.no_grad(), frozen_eval(model), preserved(generator):
            adv = aux.objective(aux.attack.x_adv).mean()
            random = aux.objective(random_sign(x, self.attacker.current_eps(epoch), generator)).mean()
            clean = aux.objective(x).mean()
        return {
            "attack/objective_clean": clean,
            "attack/objective_adv": adv,
            "attack/objective_random": random,
            "attack/gain_over_random": adv - random,
        }
