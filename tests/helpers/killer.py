"""Callbacks that kill or signal their own process, for the resume and fault tests (imported by the `advmim`
subprocesses)."""

import os
import signal
from pathlib import Path

import lightning as L


class KillAtStep(L.Callback):
    """Kills the process when optimizer step ``step`` is about to start (the checkpoint of step - 1 is on disk)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillRankOnFirstAttempt(L.Callback):
    """SIGKILLs global rank ``rank`` when optimizer step ``step`` is about to start, on the first attempt only: in a
    torchrun worker that has not been restarted (``TORCHELASTIC_RESTART_COUNT`` 0) and in a run that started from
    step 0. Both, because the restarted group must not die at the same step again, and torchrun counts restarts per
    node: a node whose workers were only stopped for the others' restart keeps the count 0, and the new rendezvous
    may give its worker the rank that died. Before dying it writes ``out_dir/killed.txt``: "rank step"."""

    def __init__(self, rank: int, step: int, out_dir: str) -> None:
        self.rank, self.step, self.out_dir = rank, step, out_dir
        self.fresh = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.fresh = trainer.global_step == 0 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.fresh and trainer.global_rank == self.rank and trainer.global_step == self.step:
            Path(self.out_dir, "killed.txt").write_text(f"{self.rank} {self.step}\n")
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtBatch(L.Callback):
    """Sends ``signum`` (a name: SIGTERM, SIGUSR1) to its own process when training batch ``batch`` (counted from
    the start of training) is about to start, on global rank ``rank`` only (None: every rank), in a run that started
    from step 0 only: the same command line, run again with ``--ckpt_path last``, resumes and is not signalled
    again."""

    def __init__(self, batch: int, signum: str = "SIGTERM", rank: int | None = None) -> None:
        self.batch, self.signum, self.rank = batch, signum, rank
        self.fresh = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.fresh = trainer.global_step == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.fresh and self.rank in (None, trainer.global_rank) and trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), getattr(signal, self.signum))
