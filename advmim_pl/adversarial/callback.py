"""AdversarialTargetCallback: the Lightning side of the attack (the CLI's ``attack:`` section, checkpoint state,
image grids). The attack itself is the plain ``Attacker``."""

import lightning as L
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torchvision.utils import make_grid

from advmim_pl.adversarial.attacker import Attacker, require
from advmim_pl.rng import rank_states

__all__ = ["AdversarialTargetCallback"]


class AdversarialTargetCallback(Attacker, L.Callback):
    """An ``Attacker`` on the trainer: modules find it in ``trainer.callbacks`` and call ``generate`` mid-step;
    Lightning saves its state (settings, generator, non-finite count) in checkpoints; it writes the image grids
    a training step returns under ``outputs["visuals"]`` to TensorBoard.

    Args:
        on_validation: also craft targets for validation batches.
        log_images_every_n_steps: image-grid period in optimizer steps (0 = never).
        attack: the attack's settings (eps, steps, step_size, random_start, perturbation, distance, attack_mask,
            warmup_epochs, seed), passed to ``Attacker``, which documents and checks them; LightningCLI reads
            their types and defaults from there.
    """

    def __init__(
        self, *, on_validation: bool = False, log_images_every_n_steps: NonNegativeInt = 500, **attack
    ) -> None:
        super().__init__(**attack)
        require(log_images_every_n_steps >= 0, "log_images_every_n_steps", log_images_every_n_steps, ">= 0")
        self.on_validation = on_validation
        self.log_images_every_n_steps = log_images_every_n_steps

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Every rank's generator state goes into the checkpoint (rank 0 writes it), so each resumes its own."""
        state = checkpoint["callbacks"][self.state_key]
        if state["rng"] is not None and state["rng"].dim() == 1:  # 2-d: a per-rank state not yet drawn from
            state["rng"] = rank_states(trainer.strategy, state["rng"])

    def should_log_images(self, trainer: L.Trainer) -> bool:
        """Whether this step's image grids are wanted (a TensorBoard logger and the grid period)."""
        n = self.log_images_every_n_steps
        return bool(n) and trainer.global_step % n == 0 and isinstance(trainer.logger, TensorBoardLogger)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        visuals = outputs.get("visuals") if isinstance(outputs, dict) else None
        if visuals:
            self._log_grids(trainer, visuals, trainer.global_step)

    @staticmethod
    def _log_grids(trainer: L.Trainer, visuals: dict[str, Tensor], step: int) -> None:
        """TensorBoard grids: clean, masked, reconstruction, adversarial, perturbation (amplified)."""
        writer = trainer.logger.experiment
        for name, images in visuals.items():
            grid = make_grid(images[:16].float().cpu().clamp(0, 1), nrow=8)
            writer.add_image(f"aemim/{name}", grid, step)
