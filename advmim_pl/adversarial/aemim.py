"""AEMIM: the plug-in as one object. It owns what is specific to masked image modeling: the attack's view of the
image, its objective on the encoder's features, the auxiliary branch (its normalisation layers and decoder) and the
auxiliary loss with its weight. The attack itself is the generic ``Attacker`` it is given. It sees the host only through
a ``StepContext`` (the host bound to the module's networks, the step's images, mask and latent) and returns what the
step produced (``PluginOutput``: its loss, its metrics, its images), which the module logs."""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat
from lightning.pytorch.utilities import rank_zero_warn
from timm.layers import DropPath
from torch import Tensor, nn

from advmim_pl.adversarial.attack import frozen_eval, random_sign
from advmim_pl.adversarial.attacker import Attacker, AttackResult, attacker_from
from advmim_pl.checks import constructor_config, require, require_between, require_choice, require_non_negative
from advmim_pl.mim.losses import feature_distance
from advmim_pl.mim.methods import Host, Mask, MIMMethod, Perturbed
from advmim_pl.models.branch_norm import add_branch_norms, branch
from advmim_pl.rng import preserved

Distance = Literal["mse", "cosine", "kl"]
AttackMask = Literal["none", "complement", "same", "independent"]
AuxImages = Literal["adversarial", "clean"]
BranchParams = Literal["norm", "none"]
AuxDecoder = Literal["separate", "shared"]


def has_drop_path(module: nn.Module) -> bool:
    """Whether ``module`` has stochastic depth (a timm ``DropPath`` with a positive rate)."""
    return any(isinstance(m, DropPath) and m.drop_prob > 0 for m in module.modules())


@dataclass
class StepContext:
    """One step as the plug-in sees it: the host bound to the plug-in's decoder (``Host.with_decoder``), the step's
    images x (B, C, H, W) in [0, 1], its mask and clean latent (B, T, D); the fractional training epoch (the warm-up;
    None without one), the process's global rank (the attack's seed offset), whether it is a training step, and whether
    the module wants the attack's diagnostics (three no-grad passes) and the plug-in's images in this step."""

    host: Host
    images: Tensor
    mask: Mask
    latent: Tensor
    epoch: float | None = None
    rank: int = 0
    training: bool = True
    diagnostics: bool = False
    visuals: bool = False


@dataclass
class PluginOutput:
    """What one plug-in step produced: ``loss`` () the weighted auxiliary loss, to add to the host's; ``logs`` per-step
    metrics by their logged names; ``sums`` counts summed over the epoch; ``images`` (k, C, H, W) grids by name."""

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)
    sums: dict[str, Tensor] = field(default_factory=dict)
    images: dict[str, Tensor] = field(default_factory=dict)


class AEMIM:
    """The AEMIM plug-in (Xiang et al. 2024, arXiv:2407.11537) for any host ``MIMMethod``: per step it crafts x_a
    against the encoder's own features and adds ``aux_weight * L_aux``, the host's loss of an auxiliary branch that
    reconstructs the host's targets of x_a (pixels, normalised patches, HOG, features, ...) from its masked version.
    It owns no parameters: ``PretrainModule(plugin=AEMIM(...))`` asks it for the auxiliary decoder and normalisation
    layers (``build``), and puts an ``AdversarialTargetCallback`` for the attack's state on the trainer.

    Args:
        attack: the attack (``advmim_pl.adversarial.Attacker``: eps, steps, step_size, random_start, perturbation,
            warmup_epochs, seed), one nested block; None: ``Attacker()`` with its defaults.
        aux_weight: lambda, weight of the auxiliary reconstruction loss (ramped with the attack's warm-up).
        aux_input: what the auxiliary branch encodes: ``adversarial`` (x_a) or ``clean`` (x).
        aux_target: what it reconstructs: ``adversarial`` (x_a) or ``clean`` (x).
        branch_params: ``norm`` gives the aux branch its own normalisation layers; ``none`` shares all.
        aux_decoder: ``separate`` auxiliary decoder or the ``shared`` clean one.
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
    """

    def __init__(
        self,
        attack: Attacker | None = None,
        aux_weight: NonNegativeFloat = 1.0,
        aux_input: AuxImages = "adversarial",
        aux_target: AuxImages = "adversarial",
        branch_params: BranchParams = "norm",
        aux_decoder: AuxDecoder = "separate",
        distance: Distance = "mse",
        attack_mask: AttackMask = "none",
        on_validation: bool = False,
        epochs: list[tuple[NonNegativeInt, NonNegativeInt]] | None = None,
        batch_fraction: PositiveFloat = 1.0,
    ) -> None:
        require_between(0, 1, "(]", batch_fraction=batch_fraction)
        for window in epochs or ():
            ok = len(window) == 2 and 0 <= window[0] < window[1]
            require(ok, "epochs", epochs, "[start, end) windows of 0-based epochs with start < end, e.g. [[640, 800]]")
        require_non_negative(aux_weight=aux_weight)
        require_choice(AuxImages, aux_input=aux_input, aux_target=aux_target)
        require_choice(BranchParams, branch_params=branch_params)
        require_choice(AuxDecoder, aux_decoder=aux_decoder)
        require_choice(Distance, distance=distance)
        require_choice(AttackMask, attack_mask=attack_mask)
        self.attack = attacker_from(attack) if attack is not None else Attacker()
        if self.attack.perturbation == "pgd" and not self.attack.random_start:
            require(
                branch_params != "none",
                "branch_params",
                branch_params,
                "norm with random_start: false (with one shared encoder the attack objective is at its minimum at x, "
                "its gradient is zero and every x_a equals x; or set random_start: true)",
            )
            rank_zero_warn(
                "AEMIM: random_start=False: the two branches' normalisation layers start as identical copies, so the "
                "first attack gradients are zero and x_a = x until the branches diverge in training. Set "
                "random_start: true for adversarial targets from the first step."
            )
        self.aux_weight, self.aux_input, self.aux_target = aux_weight, aux_input, aux_target
        self.branch_params, self.aux_decoder = branch_params, aux_decoder
        self.distance, self.attack_mask, self.on_validation = distance, attack_mask, on_validation
        self.epochs = None if epochs is None else [tuple(window) for window in epochs]
        self.batch_fraction = batch_fraction

    def config(self) -> dict:
        """``{"class_path", "init_args"}`` that rebuilds this plug-in, its attack's block included."""
        return constructor_config(self)

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
        return self.aux_weight * self.attack.ramp(epoch)

    # ---- the auxiliary branch -----------------------------------------------------------------------
    def build(self, host: Host, copy_decoder: bool) -> nn.Module | None:
        """Give the host's encoder the auxiliary normalisation layers (copies of its current, possibly loaded, ones;
        ``branch_norm.clean_named_parameters`` still names the encoder's parameters as before) and return the
        auxiliary decoder: None when shared, else a copy of the host's decoder when ``copy_decoder`` (weights loaded
        from elsewhere) or a fresh one."""
        if self.branch_params == "norm":
            add_branch_norms(host.encoder)
        if self.aux_decoder == "shared":
            return None
        return copy.deepcopy(host.decoder) if copy_decoder else host.method.make_decoder(host.encoder)

    # ---- the attack -------------------------------------------------------------------------------------
    def attack_view(self, host: Host, x: Tensor, mask: Mask, clean_latent: Tensor) -> tuple[Mask, Tensor]:
        """The mask the attacked encoder sees and the stop-gradient clean features it is pushed away from.

        x (B, C, H, W); ``mask`` is the step's; clean_latent (B, T, D) its clean encoding. ``none`` sees the whole
        image, ``complement`` the step's masked patches (the ones the auxiliary loss scores), ``same`` the step's
        visible patches. The target is a no-grad eval-mode pass (no stochastic depth), except for ``same`` on an
        encoder without drop-path whose host compares its encodings, where the step's clean encoding is that pass.
        ``independent`` draws its masks per PGD step (in the objective), so its view here is the step's mask.
        """
        if self.attack_mask == "none":
            view = host.full_view(x.shape[0], x.device)
        elif self.attack_mask == "complement":
            view = host.complement(mask)
        else:
            view = mask
        encodings = type(host.method).attack_features is MIMMethod.attack_features  # the latent is the feature
        reuse = self.attack_mask == "same" and encodings and not has_drop_path(host.encoder)
        if self.attack_mask == "independent" or reuse:
            return view, clean_latent.detach()
        with torch.no_grad(), frozen_eval(host.networks()):
            return view, host.attack_features(x, view)

    def objective(
        self, host: Host, x: Tensor, mask: Mask, clean_latent: Tensor, generator: torch.Generator | None = None
    ) -> Callable[[Tensor], Tensor]:
        """The attack objective: distance of the aux branch's features of x_adv to the clean features.

        x (B, C, H, W); clean_latent (B, T, D) is this step's clean encoding under ``mask``; ``generator`` draws the
        per-step masks of ``attack_mask: independent`` (default: the attack's). Returns objective(x_adv) -> (B,).
        """
        view, target = self.attack_view(host, x, mask, clean_latent)

        def objective(x_adv: Tensor) -> Tensor:
            step_view, step_target = view, target
            if self.attack_mask == "independent":  # the attack's generator exists once the attack runs
                source = self.attack.generator if generator is None else generator
                step_view = host.sample_mask(x.shape[0], x.device, source)
                with torch.no_grad(), frozen_eval(host.networks()):
                    step_target = host.attack_features(x, step_view)
            with branch(host.encoder, "aux"):
                features = host.attack_features(x_adv, step_view)
            return feature_distance(features, step_target, self.distance)

        return objective

    # ---- the auxiliary task -----------------------------------------------------------------------------
    def step(self, ctx: StepContext) -> PluginOutput:
        """The auxiliary step under the step's mask, attacking from its clean encoding: the attack, the auxiliary
        reconstruction of the host's targets of x_a and its weighted loss, with the step's metrics (``train/`` and
        ``attack/`` names in training, ``val/`` in validation) and, when asked, the attack's diagnostics and images.
        With a ``batch_fraction`` below 1 it runs on the drawn share of the images only. A validation step leaves
        the attack's generator as it was, so it never shifts the training stream."""
        generator = self.attack.ensure_generator(ctx.images.device, ctx.rank)
        if ctx.training:
            return self._step(ctx, generator)
        with preserved(generator):
            return self._step(ctx, generator)

    def _step(self, ctx: StepContext, generator: torch.Generator) -> PluginOutput:
        x, mask, latent, host = ctx.images, ctx.mask, ctx.latent, ctx.host
        index = self.subset(x.shape[0], generator)
        if index is not None:
            index = index.to(x.device)
            x, mask, latent = x[index], mask.select(index), latent[index]
        objective = self.objective(host, x, mask, latent)
        result = self.attack.generate(host.networks(), x, objective, ctx.epoch, ctx.rank)
        x_in = result.x_adv if self.aux_input == "adversarial" else x
        x_tgt = result.x_adv if self.aux_target == "adversarial" else x
        with branch(host.encoder, "aux"):
            aux_latent = host.encode(x_in, mask)
        pred = host.decode(aux_latent, mask)
        targets = host.targets(x_tgt, Perturbed(x, self.attack.current_eps(ctx.epoch)))
        loss_aux = host.loss(pred, targets, mask)
        out = PluginOutput(self.weight(ctx.epoch) * loss_aux)
        if not ctx.training:
            out.logs = {"val/loss_aux": loss_aux, "val/delta_linf": result.delta_linf}
            return out
        self.attack.record_finite(result.finite)
        out.logs = {"train/loss_aux": loss_aux, "attack/delta_linf": result.delta_linf}
        out.sums = {"attack/nonfinite_batches": (~result.finite).float()}
        if ctx.diagnostics:
            out.logs.update(self.diagnostics(host, x, result, objective, ctx.epoch))
        if ctx.visuals:
            delta = result.x_adv.float() - x.float()
            scale = delta.abs().amax().clamp_min(1e-12)
            out.images = {"adversarial": result.x_adv, "perturbation": 0.5 + 0.5 * delta / scale}
        return out

    def diagnostics(
        self, host: Host, x: Tensor, result: AttackResult, objective: Callable[[Tensor], Tensor], epoch: float | None
    ) -> dict[str, Tensor]:
        """The attack's objective at the attacked images x, at x_a and at an energy-matched random sign pattern of
        the same eps (three no-grad passes), and the gap that shows what the attack gains over chance. The random
        draws leave the attack's generator as it was, so the training stream does not depend on how often this runs."""
        generator = self.attack.generator
        with torch.no_grad(), frozen_eval(host.networks()), preserved(generator):
            adv = objective(result.x_adv).mean()
            random = objective(random_sign(x, self.attack.current_eps(epoch), generator)).mean()
            clean = objective(x).mean()
        return {
            "attack/objective_clean": clean,
            "attack/objective_adv": adv,
            "attack/objective_random": random,
            "attack/gain_over_random": adv - random,
        }
