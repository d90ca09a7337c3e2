"""Attacker: a generic L-infinity PGD engine with its own random stream and bookkeeping, as a plain class."""

from dataclasses import dataclass
from typing import Any

import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from advmim_pl.adversarial.attack import Objective, Perturbation, check_eps, frozen_eval, perturb
from advmim_pl.checks import constructor_config, plain, require, require_choice, require_non_negative
from advmim_pl.rng import SeededStream


@dataclass
class AttackResult:
    """What one attack produced: x_adv (B, C, H, W), finite () bool, delta_linf () float."""

    x_adv: Tensor
    finite: Tensor
    delta_linf: Tensor


class Attacker:
    """An L-infinity attack on images, with no Lightning hooks and no knowledge of what it attacks: its settings,
    its own generator, the warm-up ramp of its budget and the count of batches whose gradient was not finite.

    The caller owns the objective: ``generate(model, x, objective)`` maximises ``objective(x_adv) -> (B,)`` within
    the eps-ball, so a caller can share its clean forward pass with the objective's target. The AEMIM plug-in
    (``advmim_pl.adversarial.AEMIM``) hands it a feature distance on the encoder; adversarial fine-tuning and the
    robustness evaluator hand it a cross-entropy.

    Args:
        eps: L-infinity budget in pixel units ([0, 1] images), e.g. 4/255.
        steps: PGD steps K (ignored by the generic corruptions).
        step_size: PGD step; None = 1.25*eps for one step, else 2.5*eps/steps.
        random_start: start PGD from uniform noise in [-eps, eps].
        perturbation: ``pgd``, or a control of equal size: ``sign`` (random +-eps per pixel, the
            energy-matched one), ``gaussian``, ``uniform``, ``none``.
        warmup_epochs: linear ramp of eps (and of the caller's loss weight, through ``ramp``) from 0 over this many
            epochs.
        seed: seed of the attack's own generator (offset by the global rank).
    """

    def __init__(
        self,
        eps: NonNegativeFloat = 4 / 255,
        steps: NonNegativeInt = 1,
        step_size: PositiveFloat | None = None,
        random_start: bool = True,
        perturbation: Perturbation = "pgd",
        warmup_epochs: NonNegativeFloat = 0.0,
        seed: int = 0,
    ) -> None:
        warning = check_eps(eps, type(self).__name__)
        if warning:
            rank_zero_warn(warning)
        require_choice(Perturbation, perturbation=perturbation)
        require(
            perturbation != "pgd" or eps > 0,
            "eps",
            eps,
            "positive with perturbation: pgd (an attack with no budget leaves x_a = x; use perturbation: none for the "
            "clean-target control)",
        )
        require_non_negative(steps=steps, warmup_epochs=warmup_epochs)
        require(perturbation != "pgd" or steps >= 1, "steps", steps, "at least 1 with perturbation: pgd")
        require(step_size is None or step_size > 0, "step_size", step_size, "positive, or null for the default")
        self.eps, self.steps, self.step_size, self.random_start = eps, steps, step_size, random_start
        self.perturbation, self.warmup_epochs, self.seed = perturbation, warmup_epochs, seed
        self.stream = SeededStream()
        self._nonfinite = torch.zeros((), dtype=torch.long)

    def config(self) -> dict:
        """``{"class_path", "init_args"}`` that rebuilds this attacker (for a module's hyperparameters)."""
        return constructor_config(self)

    def settings(self) -> dict[str, Any]:
        """The constructor arguments, as plain numbers."""
        return plain(self.config()["init_args"])

    def ramp(self, epoch: float | None) -> float:
        """Warm-up factor in [0, 1] at the fractional training epoch ``epoch`` (None: outside training, 1)."""
        if not self.warmup_epochs or epoch is None:
            return 1.0
        return min(1.0, epoch / self.warmup_epochs)

    def current_eps(self, epoch: float | None) -> float:
        """The budget at ``epoch``: eps times the warm-up ramp."""
        return self.eps * self.ramp(epoch)

    # ---- generation ---------------------------------------------------------------------------------
    @property
    def generator(self) -> torch.Generator | None:
        """The attack's own generator (None before the first draw)."""
        return self.stream.generator

    def ensure_generator(self, device: torch.device, rank: int = 0) -> torch.Generator:
        """The attack's generator on ``device``, made at the first draw: seeded with ``seed + rank``, or restored
        from a checkpoint."""
        return self.stream.get(device, self.seed + rank, rank)

    def generate(
        self, model: nn.Module, x: Tensor, objective: Objective, epoch: float | None = None, rank: int = 0
    ) -> AttackResult:
        """x (B, C, H, W) in [0, 1] -> x_a maximising ``objective`` within the eps-ball, ramped at ``epoch``.

        ``model`` (whatever ``objective`` runs) is in eval mode during the attack (no dropout, no running-statistic
        updates) and gets its own modes back; parameters receive no gradient. ``rank`` offsets the seed.
        """
        owner = type(self).__name__
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{owner} needs autograd, but this loop runs under torch.inference_mode: "
                "set trainer.inference_mode: false (the advmim CLI's default)"
            )
        generator = self.ensure_generator(x.device, rank)
        eps = self.current_eps(epoch)
        try:
            with frozen_eval(model):
                x_adv, finite = perturb(
                    self.perturbation, objective, x, eps, self.steps, self.step_size, self.random_start, generator
                )
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"{owner}: out of memory while crafting adversarial examples for a batch of {x.shape[0]} with "
                f"{self.steps} PGD step(s): lower data.init_args.batch_size (and raise "
                "trainer.accumulate_grad_batches to keep the total batch) or use fewer attack steps"
            ) from err
        delta = (x_adv.float() - x.float()).abs().flatten(1).amax(dim=1).mean()
        return AttackResult(x_adv.detach(), finite, delta)

    def record_finite(self, finite: Tensor) -> None:
        """Count, on the device, batches that fell back to the clean x (``finite`` False); no host sync."""
        self._nonfinite = self._nonfinite.to(finite.device) + (~finite).long()

    @property
    def nonfinite_batches(self) -> int:
        """Batches whose attack gradient was non-finite (this run, including restored counts)."""
        return int(self._nonfinite)

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings(),  # plain numbers: checkpoints load with torch.load(weights_only=True)
            "rng": self.stream.state(),
            "nonfinite_batches": self.nonfinite_batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, current = state_dict["settings"], self.settings()
        changed = {k: (v, current[k]) for k, v in saved.items() if k in current and current[k] != v}
        if changed:
            rank_zero_warn(f"{type(self).__name__} settings differ from the checkpoint (saved, now): {changed}")
        self._nonfinite = torch.tensor(state_dict["nonfinite_batches"])
        self.stream.restore(state_dict["rng"])  # applied at the next draw, on the batch's device


def attacker_from(attack: "Attacker | dict | None") -> Attacker | None:
    """The attack an ``attack`` argument (of the AEMIM plug-in, or of FinetuneModule) gives: the ``Attacker`` itself,
    or the one its ``{"class_path", "init_args"}`` config rebuilds (a checkpoint's hyperparameters); None stays None.
    Its owner stores ``attack.config()`` in its own config and puts ``AdversarialTargetCallback(attack)`` on the
    trainer (a module's ``attack_callback``)."""
    return instantiate_class((), attack) if isinstance(attack, dict) else attack
