"""Fault handling for long runs: skipping non-finite steps, and checkpoints that fail clearly."""

import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


class CheckpointError(RuntimeError):
    """A checkpoint file that exists but cannot be read (truncated, corrupt, not a checkpoint)."""


UNREADABLE = (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError)


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool | None = False) -> dict:
    """``torch.load`` a checkpoint; a missing file is FileNotFoundError, an unreadable one CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except UNREADABLE as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or not a checkpoint ({type(err).__name__}: {err}); "
            "resume from another one (each save replaces last.ckpt atomically, so the previous one is intact)"
        ) from None


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with a one-line ``CheckpointError`` for unreadable files.

    Saving is already atomic in Lightning (the bytes go to a temporary file that is renamed into place),
    so a process killed during a save leaves the previous ``last.ckpt`` untouched.
    """

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(path, map_location or (lambda storage, loc: storage), bool(weights_only))


class NonFiniteGuard(L.Callback):
    """Skips optimizer steps whose gradients are not finite, and stops a run that keeps producing them.

    The check stays on the device: with a fused optimizer (``fused: true``, the default of the shipped
    configs) the skip is the optimizer's own ``found_inf`` path, the one ``GradScaler`` uses. Other
    optimizers fall back to a host check that drops the step's gradients. The consecutive-skip count is
    read on the host at the trainer's logging steps; at ``max_consecutive`` or more the run stops with an
    error.

    Args:
        max_consecutive: consecutive skipped steps that stop the run.
    """

    def __init__(self, max_consecutive: PositiveInt = 20) -> None:
        self.max_consecutive = max_consecutive
        self._consecutive: Tensor = torch.zeros(())
        self._skipped: Tensor = torch.zeros(())

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
        if (trainer.global_step + 1) % trainer.log_every_n_steps == 0:
            self._check(trainer)

    def _check(self, trainer: L.Trainer) -> None:
        consecutive, skipped = int(self._consecutive), int(self._skipped)
        if skipped:
            rank_zero_warn(f"NonFiniteGuard: {skipped} optimizer step(s) skipped for non-finite gradients so far")
            trainer.lightning_module.log("train/skipped_steps", float(skipped))
        if consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"NonFiniteGuard: the last {consecutive} optimizer steps all had non-finite gradients "
                f"(max_consecutive={self.max_consecutive}); stopping. Lower the learning rate, use bf16-mixed "
                "instead of 16-mixed, enable gradient clipping, or resume from an earlier checkpoint."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": int(self._consecutive), "skipped": int(self._skipped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._consecutive = torch.tensor(float(state_dict["consecutive"]))
        self._skipped = torch.tensor(float(state_dict["skipped"]))
