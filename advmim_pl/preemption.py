"""Preemption and restarts: a run that is told to stop (SIGTERM from a spot instance, Kubernetes or a launcher)
writes a checkpoint at the next optimizer-step boundary and exits with status 143; ``--ckpt_path last`` then
resumes it, and starts a new run when there is nothing to resume yet.

What Lightning 2.6 does by itself, and what this module adds:

- **SIGTERM.** Lightning's handler broadcasts from rank 0 inside the signal handler, then raises
  ``SIGTERMException`` (a ``SystemExit`` with status 0) at the next batch, with no checkpoint. A collective inside
  a signal handler blocks when the signal reaches one rank only, or when a peer is dead (a torchrun agent SIGTERMs
  the survivors of a failed rank); status 0 tells torchrun and restart loops that the run finished; and a stop
  between the batches of a gradient accumulation cannot resume exactly. ``Preemption`` replaces that handler while
  a stage runs: the handler only records the signal; the ranks agree at each optimizer-step boundary (one
  all-reduce of the signal number, in the training loop, where every rank is), write the checkpoint there and exit
  with 143.
- **SIGUSR1.** Under SLURM with auto-requeue, Lightning's handler writes ``hpc_ckpt_N.ckpt`` in
  ``default_root_dir``, runs ``scontrol requeue`` and keeps training; ``Preemption`` leaves it alone
  (``resume_point`` finds that checkpoint). Elsewhere SIGUSR1 would kill the process with nothing saved, and
  ``Preemption`` treats it as SIGTERM.
- **Exit.** Lightning destroys an NCCL process group at exit, but not a gloo one. Its worker threads then go at
  the interpreter's finalization, and now and then one of them holds a tensor whose release needs the interpreter:
  the process aborts ("terminate called without an active exception", status -6) after a finished run. torchrun
  counts that as a failure, and the other nodes' agents wait 300 s for it at their exit barrier.
  ``Preemption.setup`` registers ``destroy_process_group_at_exit``.
"""

import atexit
import os
import re
import signal
import threading
from pathlib import Path
from types import FrameType

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what a shell reports for a process that SIGTERM ended
HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")  # Lightning's SLURM requeue checkpoints


class Preempted(SIGTERMException):
    """The run stopped on a preemption signal (after writing its checkpoint, when training); a ``SystemExit`` whose
    status is the exit code, so that launchers and restart loops see an unfinished run."""


class Preemption(L.Callback):
    """SIGTERM, and SIGUSR1 where no other handler takes it: a checkpoint at the next optimizer-step boundary (with
    ``accumulate_grad_batches > 1``, after the accumulation's last batch), then exit with ``exit_code``.

    The checkpoint is the checkpoint callback's ``last.ckpt`` (``trainer.default_root_dir/last.ckpt`` without
    one), where ``--ckpt_path last`` finds it; a resume from it ends as the uninterrupted run. The handler only
    records the signal, so it never waits on another rank; under DDP the ranks agree on the stop with one
    all-reduce per optimizer step (a signal to one rank stops them all). In ``validate``, ``test`` and ``predict``
    the stop comes after the current batch, with nothing saved.

    Args:
        exit_code: the process's exit status after a preemption (1-255; default 143, 128 + SIGTERM).
    """

    def __init__(self, exit_code: int = PREEMPTED_EXIT_CODE) -> None:
        if not 1 <= exit_code <= 255:
            raise ValueError(f"exit_code {exit_code} is not an exit status a launcher can read: give 1 to 255")
        self.exit_code = exit_code
        self.received: int | None = None  # the first preemption signal this process received
        self._step_at_batch_start = -1

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Records the signal: no collective, no I/O (it may interrupt either)."""
        if self.received is None:
            self.received = signum

    def _install(self) -> None:
        """Take SIGTERM, and SIGUSR1 if nothing else handles it (Lightning's SLURM requeue does, when active).
        Lightning installs its handlers when a stage starts and restores the previous ones when it ends."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            return
        signals = [signal.SIGTERM]
        usr1 = getattr(signal, "SIGUSR1", None)  # none on Windows
        if usr1 is not None and signal.getsignal(usr1) in (signal.SIG_DFL, None, self._on_signal):
            signals.append(usr1)
        for signum in signals:
            if signal.getsignal(signum) != self._on_signal:
                signal.signal(signum, self._on_signal)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        destroy_process_group_at_exit()

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient accumulation: the optimizer has not stepped
        if signum := self._agreed_signal(trainer):
            path = last_checkpoint_path(trainer)
            if isinstance(trainer.checkpoint_callback, ModelCheckpoint):  # saved with the checkpoint: the resumed
                trainer.checkpoint_callback.last_model_path = path  # run replaces the file instead of adding last-v1
            trainer.save_checkpoint(path, weights_only=False)  # the whole training state
            self._stop(signum, f"saved {path} at step {trainer.global_step}")

    def _on_eval_batch_end(self, trainer: L.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            return  # validation inside fit: the stop waits for the next optimizer step
        if signum := self._agreed_signal(trainer):
            self._stop(signum, f"{trainer.state.fn.value} stopped, nothing saved")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._on_eval_batch_end(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._on_eval_batch_end(trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._on_eval_batch_end(trainer)

    def _agreed_signal(self, trainer: L.Trainer) -> int:
        """The signal any rank received (the highest number if several), 0 if none: every rank learns it from one
        all-reduce, in the loop, where all of them are."""
        received = torch.tensor(self.received or 0, device=trainer.strategy.root_device)
        return int(trainer.strategy.reduce(received, reduce_op="max"))

    def _stop(self, signum: int, what: str) -> None:
        rank_zero_info(
            f"advmim: {signal.Signals(signum).name} received: {what}; exiting with status {self.exit_code} (the "
            "same command with --ckpt_path last resumes)"
        )
        raise Preempted(self.exit_code)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Lightning's own stop on SIGTERM (a signal that came before this callback's handler was installed) exits
        with status 0; give it the exit code, so that it does not read as a finished run."""
        if isinstance(exception, SIGTERMException) and exception.code in (None, 0):
            exception.code = self.exit_code


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group, if one exists then, when the interpreter exits, while it can still
    release what the backend's threads hold (see the module docstring); registered once per process."""
    global _exit_registered
    if not _exit_registered and torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.register(_destroy_process_group)
        _exit_registered = True


_exit_registered = False


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def last_checkpoint_path(trainer: L.Trainer) -> str:
    """Where a preempted run writes its checkpoint: the checkpoint callback's ``last.ckpt``, which ``--ckpt_path
    last`` resumes; ``default_root_dir/last.ckpt`` without a checkpoint callback."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath:
        step = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        return callback.format_checkpoint_name(step, callback.CHECKPOINT_NAME_LAST)
    return os.path.join(trainer.default_root_dir, "last.ckpt")


def version_of(path: Path) -> int:
    """The run number of a ``.../version_N/...`` path."""
    return int(next(part for part in reversed(path.parts) if part.startswith("version_")).split("_")[1])


def resume_point(runs: Path, root: Path) -> tuple[Path, int | None] | None:
    """What ``--ckpt_path last`` resumes: the newest (by modification time) of the runs' ``last.ckpt``
    (``runs/version_*/checkpoints/last.ckpt``) and of the ``hpc_ckpt_N.ckpt`` that Lightning's SLURM requeue writes
    in ``root`` (``trainer.default_root_dir``), with the run to keep logging into: the version holding that
    ``last.ckpt``, or for an hpc checkpoint the newest run that has a ``last.ckpt`` (None: a new one). None when
    there is no checkpoint."""
    lasts = [p for p in runs.glob("version_*/checkpoints/last.ckpt") if p.parts[-3][len("version_") :].isdigit()]
    hpcs = [p for p in root.glob("hpc_ckpt_*.ckpt") if HPC_CHECKPOINT.fullmatch(p.name)] if root.is_dir() else []
    if not lasts and not hpcs:
        return None
    # newest first; at equal times, a last.ckpt (written at a step boundary) before an hpc checkpoint
    newest = max([*lasts, *hpcs], key=lambda p: (p.stat().st_mtime_ns, p in lasts))
    if newest in lasts:
        return newest, version_of(newest)
    return newest, (max(version_of(p) for p in lasts) if lasts else None)


def resolve_last(config: Namespace, subcommand: str) -> None:
    """``--ckpt_path last`` in a subcommand's parsed ``config`` (with the CLI's TensorBoard logger; other loggers
    keep Lightning's own lookup): ``resume_point``'s checkpoint, logging into its run. With no checkpoint yet,
    ``fit`` starts a new run (one line says so), so that a job restarted by torchrun, SLURM or a loop keeps one
    command line from its first attempt on; other subcommands stop with a one-line error."""
    logger = config.trainer.logger if config.get("ckpt_path") == "last" else None
    if not (isinstance(logger, Namespace) and str(logger.class_path).endswith("TensorBoardLogger")):
        return
    runs = Path(logger.init_args.save_dir) / logger.init_args.name
    root = Path(config.trainer.get("default_root_dir") or os.getcwd())  # where Lightning's SLURM requeue saves
    found = resume_point(runs, root)
    if found is not None:
        config.ckpt_path = str(found[0])
        if found[1] is not None:
            logger.init_args.version = found[1]
        return
    where = f"no {runs}/version_*/checkpoints/last.ckpt and no {root}/hpc_ckpt_*.ckpt"
    if subcommand != "fit":
        raise SystemExit(f"advmim: --ckpt_path last: {where} to read")
    rank_zero_info(f"advmim: --ckpt_path last: {where} yet; a new run starts")
    config.ckpt_path = None
