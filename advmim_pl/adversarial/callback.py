"""AdversarialTargetCallback: the Lightning side of an ``Attacker`` (checkpoint state, warnings). A module with an
attack returns it from ``configure_callbacks``, so nobody configures it by hand."""

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from advmim_pl.adversarial.attacker import Attacker
from advmim_pl.rng import rank_states

__all__ = ["AdversarialTargetCallback"]


class AdversarialTargetCallback(L.Callback):
    """Puts a module's ``Attacker`` on the trainer: Lightning saves its state (settings, every rank's generator,
    non-finite count) in checkpoints and restores it on resume; at the trainer's logging steps it warns when the
    count of non-finite attack gradients grew. The attack itself runs inside the module's step, on the device and
    under the trainer's precision.

    Args:
        attacker: the module's attack engine.
    """

    def __init__(self, attacker: Attacker) -> None:
        self.attacker = attacker
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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0:  # the host reads the device count only here
            count = self.attacker.nonfinite_batches
            if count > self._warned:
                self._warned = count
                rank_zero_warn(
                    f"{type(self.attacker).__name__}: {count} batch(es) so far had a non-finite attack gradient and "
                    "fell back to clean inputs. Lower the learning rate or use bf16-mixed."
                )
