"""AdversarialTargetCallback: the Lightning side of an ``Attacker`` (checkpoint state, warnings, image grids). A module
with an attack returns it from ``configure_callbacks``, so nobody configures it by hand."""

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchvision.utils import make_grid

from advmim_pl.adversarial.attacker import Attacker
from advmim_pl.rng import rank_states

__all__ = ["AdversarialTargetCallback"]


class AdversarialTargetCallback(L.Callback):
    """Puts a module's ``Attacker`` on the trainer: Lightning saves its state (settings, every rank's generator,
    non-finite count) in checkpoints and restores it on resume; at the trainer's logging steps it warns when the
    count of non-finite attack gradients grew; it writes the image grids a training step returns under
    ``outputs["visuals"]`` to TensorBoard. The attack itself runs inside the module's step, on the device and under
    the trainer's precision.

    Args:
        attacker: the module's attack engine.
        log_images_every_n_steps: image-grid period in optimizer steps (0 = never).
    """

    def __init__(self, attacker: Attacker, log_images_every_n_steps: int = 0) -> None:
        self.attacker = attacker
        self.log_images_every_n_steps = log_images_every_n_steps
        self._warned = 0

    def state_dict(self) -> dict:
        return self.attacker.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.attacker.load_state_dict(state_dict)
        self._warned = self.attacker.nonfinite_batches

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
        if trainer.global_step % trainer.log_every_n_steps == 0:  # the host reads the device count only here
            count = self.attacker.nonfinite_batches
            if count > self._warned:
                self._warned = count
                rank_zero_warn(
                    f"{type(self.attacker).__name__}: {count} batch(es) so far had a non-finite attack gradient and "
                    "fell back to clean inputs. Lower the learning rate or use bf16-mixed."
                )

    @staticmethod
    def _log_grids(trainer: L.Trainer, visuals: dict[str, Tensor], step: int) -> None:
        """TensorBoard grids: clean, masked, reconstruction, adversarial, perturbation (amplified)."""
        writer = trainer.logger.experiment
        for name, images in visuals.items():
            grid = make_grid(images[:16].float().cpu().clamp(0, 1), nrow=8)
            writer.add_image(f"aemim/{name}", grid, step)
