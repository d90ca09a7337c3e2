"""Attacker: the plug-in's attack settings, its random stream and its bookkeeping, as a plain class."""

from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from advmim_pl.adversarial.attack import PERTURBATIONS, Objective, Perturbation, check_eps, frozen_eval, perturb
from advmim_pl.checks import plain
from advmim_pl.rng import SeededStream
from advmim_pl.schedule import steps_per_epoch

Distance = Literal["mse", "cosine", "kl"]
AttackMask = Literal["none", "complement", "same", "independent"]
ATTACK_MASKS: tuple[str, ...] = ("none", "complement", "same", "independent")


@dataclass
class AttackResult:
    """What one attack produced: x_adv (B, C, H, W), finite () bool, delta_linf () float."""

    x_adv: Tensor
    finite: Tensor
    delta_linf: Tensor


class Attacker:
    """The plug-in's attack, with no Lightning hooks: its settings, its own generator, the warm-up ramp and the
    count of batches whose attack gradient was not finite.

    A module asks for x_a mid-step through ``generate(module, x, objective)``, handing over the objective it owns
    (feature distance to its own clean encoding for pre-training; cross-entropy for classification), so the
    clean encoder pass is shared with the attack target. The robustness evaluator uses it directly; training
    jobs get it through ``AdversarialTargetCallback`` (the CLI's ``attack:`` section).

    Args:
        eps: L-infinity budget in pixel units ([0, 1] images), e.g. 4/255.
        steps: PGD steps K (ignored by the generic corruptions).
        step_size: PGD step; None = 1.25*eps for one step, else 2.5*eps/steps.
        random_start: start PGD from uniform noise in [-eps, eps].
        perturbation: ``pgd``, or a control of equal size: ``sign`` (random +-eps per pixel, the
            energy-matched one), ``gaussian``, ``uniform``, ``none``.
        distance: feature distance the MIM objective uses: ``mse``, ``cosine`` or ``kl``.
        attack_mask: what the attacked encoder sees. ``none``: the whole image, so the perturbation covers
            the patches the auxiliary loss scores. ``complement``: only the step's masked patches, exactly the
            scored ones, with fewer tokens than ``none`` (MAE). ``same``: the step's visible patches; the
            cheapest, but masked patches get zero input gradient, so the scored patches carry only the random
            start. ``independent``: a fresh random mask per PGD step.
        warmup_epochs: linear ramp of eps and of the auxiliary weight from 0 over this many epochs.
        seed: seed of the attack's own generator (offset by the global rank).
    """

    def __init__(
        self,
        eps: NonNegativeFloat = 4 / 255,
        steps: NonNegativeInt = 1,
        step_size: PositiveFloat | None = None,
        random_start: bool = True,
        perturbation: Perturbation = "pgd",
        distance: Distance = "mse",
        attack_mask: AttackMask = "none",
        warmup_epochs: NonNegativeFloat = 0.0,
        seed: int = 0,
    ) -> None:
        warning = check_eps(eps, type(self).__name__)
        if warning:
            rank_zero_warn(warning)
        require(
            perturbation != "pgd" or eps > 0,
            "eps",
            eps,
            "positive with perturbation: pgd (an attack with no budget leaves x_a = x; "
            "use perturbation: none for the clean-target control)",
        )
        require(steps >= 0, "steps", steps, "a non-negative number of PGD steps")
        require(perturbation != "pgd" or steps >= 1, "steps", steps, "at least 1 with perturbation: pgd")
        require(step_size is None or step_size > 0, "step_size", step_size, "positive, or null for the default")
        require(warmup_epochs >= 0, "warmup_epochs", warmup_epochs, "non-negative")
        for name, value, allowed in (
            ("perturbation", perturbation, PERTURBATIONS),
            ("distance", distance, ("mse", "cosine", "kl")),
            ("attack_mask", attack_mask, ATTACK_MASKS),
        ):
            require(value in allowed, name, value, f"one of {allowed}")
        self.eps, self.steps, self.step_size, self.random_start = eps, steps, step_size, random_start
        self.perturbation, self.distance, self.attack_mask = perturbation, distance, attack_mask
        self.warmup_epochs, self.seed = warmup_epochs, seed
        self.stream = SeededStream()
        self._nonfinite = torch.zeros((), dtype=torch.long)
        self._warned = 0

    def ramp(self, trainer: L.Trainer | None) -> float:
        """Warm-up factor in [0, 1] from the fractional epoch (host arithmetic, no sync)."""
        if not self.warmup_epochs or trainer is None:
            return 1.0
        progress = trainer.global_step / steps_per_epoch(trainer)
        return min(1.0, progress / self.warmup_epochs)

    # ---- generation ---------------------------------------------------------------------------------
    @property
    def generator(self) -> torch.Generator | None:
        """The attack's own generator (None before the first draw)."""
        return self.stream.generator

    @generator.setter
    def generator(self, generator: torch.Generator | None) -> None:
        self.stream.generator = generator

    def ensure_generator(self, device: torch.device, rank: int = 0) -> torch.Generator:
        """The attack's generator on ``device``, made at the first draw: seeded with ``seed + rank``, or restored
        from a checkpoint."""
        return self.stream.get(device, self.seed + rank, rank)

    def current_eps(self, trainer: L.Trainer | None) -> float:
        """The budget of this step: eps times the warm-up ramp."""
        return self.eps * self.ramp(trainer)

    def generate(self, pl_module: L.LightningModule, x: Tensor, objective: Objective) -> AttackResult:
        """x (B, C, H, W) in [0, 1] -> x_a maximising ``objective`` within the (ramped) eps-ball.

        The module is in eval mode during the attack (no dropout, no running-statistic updates) and
        gets its own modes back; parameters receive no gradient.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} needs autograd, but this loop runs under torch.inference_mode: "
                "set trainer.inference_mode: false (the advmim CLI's default)"
            )
        rank = pl_module.global_rank
        generator = self.ensure_generator(x.device, rank)
        eps = self.current_eps(pl_module._trainer)
        try:
            with frozen_eval(pl_module):
                x_adv, finite = perturb(
                    self.perturbation, objective, x, eps, self.steps, self.step_size, self.random_start, generator
                )
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"out of memory while crafting adversarial targets for a batch of {x.shape[0]} with "
                f"{self.steps} PGD step(s): lower data.init_args.batch_size (and raise "
                "trainer.accumulate_grad_batches to keep the total batch) or use fewer attack steps"
            ) from err
        delta = (x_adv.float() - x.float()).abs().flatten(1).amax(dim=1).mean()
        return AttackResult(x_adv.detach(), finite, delta)

    def record_finite(self, finite: Tensor, trainer: L.Trainer | None) -> None:
        """Count batches that fell back to the clean target, on the device; the host reads the count
        (and warns when it grew) only at the trainer's logging steps."""
        self._nonfinite = self._nonfinite.to(finite.device) + (~finite).long()
        if trainer is None or (trainer.global_step + 1) % trainer.log_every_n_steps:
            return
        count = int(self._nonfinite)
        if count > self._warned:
            self._warned = count
            rank_zero_warn(
                f"{type(self).__name__}: {count} batch(es) so far had a non-finite attack gradient and "
                "fell back to clean targets. Lower the learning rate or use bf16-mixed."
            )

    @property
    def nonfinite_batches(self) -> int:
        """Batches whose attack gradient was non-finite (this run, including restored counts)."""
        return int(self._nonfinite)

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": plain(
                {
                    "eps": self.eps,
                    "steps": self.steps,
                    "step_size": self.step_size,
                    "random_start": self.random_start,
                    "perturbation": self.perturbation,
                    "distance": self.distance,
                    "attack_mask": self.attack_mask,
                    "warmup_epochs": self.warmup_epochs,
                    "seed": self.seed,
                }
            ),  # plain numbers: checkpoints load with torch.load(weights_only=True)
            "rng": self.stream.state(),
            "nonfinite_batches": self.nonfinite_batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["settings"]
        current = self.state_dict()["settings"]
        changed = {k: (v, current[k]) for k, v in saved.items() if current.get(k) != v}
        if changed:
            rank_zero_warn(f"{type(self).__name__} settings differ from the checkpoint (saved, now): {changed}")
        self._nonfinite = torch.tensor(state_dict["nonfinite_batches"])
        self._warned = self.nonfinite_batches
        self.stream.restore(state_dict["rng"])  # applied at the next draw, on the batch's device


def require(ok: bool, name: str, value: Any, expected: str, owner: str = "AdversarialTargetCallback") -> None:
    """ValueError naming the option, its value and what it should be."""
    if not ok:
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected {expected}")
