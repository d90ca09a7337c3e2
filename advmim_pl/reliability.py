"""Fault handling for long runs: weights-only checkpoint reads, checkpoint writes that fail without losing the previous
file, skipping non-finite steps and stopping a run that keeps producing them."""

import argparse
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

# The only non-tensor, non-primitive type any file this project reads may hold: the ``args`` of facebookresearch/mae
# training checkpoints. This project's own checkpoints hold tensors, containers and plain numbers and strings only.
SAFE_GLOBALS = [argparse.Namespace]
UNREADABLE = (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError, KeyError)
REFUSED_EXIT_CODE = 2  # what ``advmim`` exits with when it refuses a file, as for any bad command-line input


class CheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be read (truncated, corrupt, not a checkpoint), or cannot be written."""


class UnsafeCheckpointError(CheckpointError):
    """A file whose pickle names a type outside torch's weights-only allow-list and ``SAFE_GLOBALS``: loading it
    would run whatever code that type's unpickling runs."""


def refused_global(message: str) -> str | None:
    """The ``module.name`` that torch's weights-only unpickler refused, from its error message; None for another
    error (a truncated or foreign file)."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def reason(err: BaseException) -> str:
    """One line for a failed ``torch.load``: the exception's type and its informative line (torch's weights-only
    errors open with a paragraph about the changed default, which says nothing about this file)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation"))]
    return type(err).__name__ + (f": {lines[0]}" if lines else "")


def read_checkpoint(path: str | Path, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` with ``SAFE_GLOBALS`` allowed: never full unpickling.

    A missing file is FileNotFoundError; a file whose pickle would run code is UnsafeCheckpointError, one line naming
    the file and the refused type; an unreadable one CheckpointError. ``what`` names the file's role in the messages
    ("checkpoint", "init_from").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except UNREADABLE as err:
        raise load_error(path, err, what) from None


def load_error(path: str | Path, err: BaseException, what: str = "checkpoint") -> CheckpointError:
    """The one-line error for a failed weights-only ``torch.load`` of ``path``: UnsafeCheckpointError when the
    unpickler refused a type, CheckpointError otherwise."""
    if refused := refused_global(str(err)):
        return UnsafeCheckpointError(
            f"{what} {str(path)!r} holds {refused}, which only full unpickling could load, and unpickling can "
            "run any code: refused. Files are read weights-only; convert it to a plain state dict or .safetensors "
            "where you trust it"
        )
    hint = "; resume from another one (each save replaces its file atomically)" if what == "checkpoint" else ""
    return CheckpointError(f"{what} {str(path)!r} is truncated or not a checkpoint ({reason(err)}){hint}")


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URL (``s3://``, ``gs://``, ...) that Lightning's fsspec IO reads and writes."""
    return "://" in str(path)


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, reading weights-only and writing beside the target.

    - Reads: weights-only (``read_checkpoint``) unless the caller passes ``weights_only=False`` explicitly (``advmim
      fit --weights_only false``, ``Trainer.fit(weights_only=False)``): the user's own statement that the file is
      trusted. Lightning's default for a remote file is full unpickling; here it is weights-only as well.
    - Writes: the bytes go to ``<file>.tmp`` in the target's folder, are flushed to disk, and ``os.replace`` puts
      them in place: one atomic rename on the same filesystem. (Lightning writes to a temporary file in ``TMPDIR``
      and moves it, which is a plain copy across filesystems: a full disk then strikes in the copy.) A failed write
      removes the partial file, leaves the previous checkpoint untouched and raises a one-line CheckpointError that
      names the path and the cause. A process killed mid-write leaves at most a ``.tmp`` file, which no resume reads.
    """

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        map_location = map_location or (lambda storage, loc: storage)
        if weights_only is False:
            rank_zero_warn(f"reading {path} with full unpickling (weights_only=False): the file can run code")
        if weights_only is False or is_remote(path):
            try:
                with torch.serialization.safe_globals(SAFE_GLOBALS):
                    return super().load_checkpoint(path, map_location, weights_only=weights_only is not False)
            except UNREADABLE as err:
                raise load_error(path, err) from None
        return read_checkpoint(path, map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if is_remote(path) or storage_options is not None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        partial = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise CheckpointError(
                f"could not write checkpoint {str(path)!r}: {err.strerror or err} (errno {err.errno}); the previous "
                "file at that path, if any, is unchanged. Free space or fix the folder, then resume with --ckpt_path"
            ) from None


class NonFiniteStop(RuntimeError):
    """A run stopped by ``NonFiniteGuard``; the ``advmim`` command prints it as one line."""


class NonFiniteGuard(L.Callback):
    """Skips optimizer steps whose gradients are not finite, and stops a run that keeps producing them.

    The check stays on the device: with a fused optimizer (``fused: true``, the default of the shipped configs) the
    skip is the optimizer's own ``found_inf`` path, the one ``GradScaler`` uses. Other optimizers fall back to a host
    check that drops the step's gradients. The consecutive-skip count is read on the host every step (one scalar).

    When a streak of skipped steps starts, the newest checkpoint on disk, from before its first step, is kept out of
    the checkpoint rotation as a hard link ``before-nonfinite-step<N>.ckpt`` beside it (removed again when a finite
    step ends the streak). At ``max_consecutive`` skipped steps in a row the run stops with one line: the count, the
    usual causes and the kept checkpoint.

    Args:
        max_consecutive: consecutive skipped steps that stop the run.
    """

    def __init__(self, max_consecutive: PositiveInt = 20) -> None:
        self.max_consecutive = max_consecutive
        self._consecutive: Tensor = torch.zeros(())
        self._skipped: Tensor = torch.zeros(())
        self._streak_start: int | None = None
        self._kept: Path | None = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        bad = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = bad  # fused kernels skip the whole update when found_inf is set
        elif bad.item():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        self._consecutive = (self._consecutive.to(bad.device) + 1) * bad
        self._skipped = self._skipped.to(bad.device) + bad
        self._check(trainer, int(self._consecutive))
        if (trainer.global_step + 1) % trainer.log_every_n_steps == 0 and int(self._skipped):
            rank_zero_warn(f"NonFiniteGuard: {int(self._skipped)} optimizer step(s) skipped for non-finite gradients")
            pl_module.log("train/skipped_steps", float(self._skipped))

    def _check(self, trainer: L.Trainer, consecutive: int) -> None:
        """Keeps or releases the pre-streak checkpoint, and stops the run at ``max_consecutive``."""
        if consecutive == 1:
            self._streak_start = trainer.global_step
            self._release()
            self._kept = keep_newest_checkpoint(trainer, f"before-nonfinite-step{trainer.global_step}.ckpt")
        elif consecutive == 0 and self._streak_start is not None:
            self._streak_start = None
            self._release()
        if consecutive >= self.max_consecutive:
            resume = f"resume from {self._kept}" if self._kept else "no checkpoint was saved before it"
            raise NonFiniteStop(
                f"NonFiniteGuard: {consecutive} optimizer steps in a row (from step {self._streak_start}) had "
                f"non-finite gradients (max_consecutive={self.max_consecutive}); stopping. Usual causes: fp16 overflow "
                "(use bf16-mixed), a learning rate too high (lower base_lr or lengthen the warm-up), no gradient "
                f"clipping; {resume}"
            )

    def _release(self) -> None:
        """Removes the checkpoint kept for a streak that ended."""
        if self._kept is not None:
            self._kept.unlink(missing_ok=True)
            self._kept = None

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": int(self._consecutive), "skipped": int(self._skipped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._consecutive = torch.tensor(float(state_dict["consecutive"]))
        self._skipped = torch.tensor(float(state_dict["skipped"]))


def keep_newest_checkpoint(trainer: L.Trainer, name: str) -> Path | None:
    """Hard-links the newest checkpoint the trainer's ``ModelCheckpoint`` callbacks have written to ``name`` in the
    same folder, out of their rotation (a copy where links are not supported); None when there is none yet. Only
    global rank 0 writes; every rank returns the path."""
    written = [Path(p) for cb in trainer.checkpoint_callbacks for p in (cb.last_model_path, cb.best_model_path) if p]
    written = [p for p in written if p.is_file()]
    if not written:
        return None
    newest = max(written, key=lambda p: p.stat().st_mtime_ns)
    kept = newest.with_name(name)
    if trainer.is_global_zero:
        kept.unlink(missing_ok=True)
        try:
            os.link(newest, kept)
        except OSError:
            shutil.copy2(newest, kept)
    return kept
