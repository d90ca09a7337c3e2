"""A callback that SIGKILLs its own process, for the resume test (imported by the `advmim` subprocess)."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """Kills the process when optimizer step ``step`` is about to start (the checkpoint of step - 1 is on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
