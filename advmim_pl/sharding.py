"""Fully sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) through Lightning's
``ModelParallelStrategy``, and sharded checkpoints (distributed-checkpoint folders) in and out.

- ``FSDP2Strategy``: ``ModelParallelStrategy`` with a one-dimensional data-parallel mesh over every rank, bf16
  parameters with fp32 gradient reduction on CUDA, sharded checkpoints written to a new folder and renamed into
  place, and the trust rule below on reads.
- ``shard_parts``: what ``PretrainModule.configure_model`` applies: one ``fully_shard`` unit per transformer block,
  then each part (encoder, decoders) as a root of its own.
- ``read_sharded`` / ``consolidate``: a sharded folder as one plain checkpoint dict (what ``advmim export`` and
  ``init_from`` read), or written as one weights-only file, in one process without a process group.

Trust rule. torch reads a distributed checkpoint's ``.metadata`` with plain ``pickle.load`` (and the optimizer's
non-tensor entries with ``torch.load(weights_only=False)``), so loading a sharded folder can run code. A sharded
folder is read only when it lies under a trusted folder: the running fit's own folders (``default_root_dir``, its
checkpoint callbacks' folders, its loggers' folders), or a folder named in the environment variable
``ADVMIM_TRUSTED_CHECKPOINTS`` (folders separated by ``os.pathsep``): the user's statement that they trust what
lies there. Everything else is refused with one line (``UntrustedCheckpointError``). ``advmim export`` and
``init_from`` have no run folders of their own: they read a sharded folder only under ``ADVMIM_TRUSTED_CHECKPOINTS``.
(``--weights_only false`` does not reach a resume under this strategy: Lightning 2.6 drops it for strategies that
restore after setup.)
"""

import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed.checkpoint as dcp
from jsonargparse.typing import PositiveInt
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from advmim_pl.reliability import (
    SAFE_GLOBALS,
    UNREADABLE,
    CheckpointError,
    SafeCheckpointIO,
    UnsafeCheckpointError,
    load_error,
    read_checkpoint,
    reason,
)

TRUST_VARIABLE = "ADVMIM_TRUSTED_CHECKPOINTS"
LIGHTNING_METADATA = "meta.pt"  # Lightning's non-tensor part of a sharded folder (torch's own is ".metadata")
DCP_METADATA = ".metadata"
# MaskedViT's entry points besides forward
FORWARD_METHODS = ("forward_tokens", "forward_visible", "forward_masked", "forward_blocks")
KEPT_KEYS = ("hyper_parameters", "datamodule_hyper_parameters", "epoch", "global_step", "init_from")


# timm's PatchEmbed returns a view (flatten + transpose); FSDP2 warns that an in-place op on it would skip the
# all-gather. MaskedViT only adds to it out of place (positions, mask tokens), so the warning says nothing here.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPPatchEmbed\) returned a view tensor")


class UntrustedCheckpointError(UnsafeCheckpointError):
    """A sharded checkpoint folder outside the trusted folders: reading it would unpickle its ``.metadata``."""


# ---- sharding the model ----------------------------------------------------------------------------------------------
def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ``data_parallel`` dimension of a ``ModelParallelStrategy`` mesh, checked to span every rank: these modules
    apply no tensor parallelism, and ``fully_shard`` over a data-parallel size of 1 shards nothing and never
    synchronises the ranks. ValueError (one line) otherwise."""
    names = mesh.mesh_dim_names or ()
    if "data_parallel" not in names:
        raise ValueError(f"the device mesh has dimensions {names}, not 'data_parallel': use FSDP2Strategy")
    dp = mesh["data_parallel"]
    if dp.size() != mesh.size():
        raise ValueError(
            f"the device mesh is data_parallel={dp.size()} x tensor_parallel={mesh.size() // dp.size()}, but these "
            "modules apply no tensor parallelism: set data_parallel_size to the world size "
            f"({mesh.size()}) and tensor_parallel_size: 1 (advmim_pl.sharding.FSDP2Strategy does, as "
            "configs/trainer/fsdp.yaml)"
        )
    return dp


def mixed_precision(
    device: torch.device, precision: str, param_dtype: Literal["bf16", "fp32"] = "bf16"
) -> MixedPrecisionPolicy | None:
    """FSDP2's policy: bf16 parameters and compute with fp32 gradient reduction on CUDA with ``param_dtype="bf16"``
    (the trainer at ``precision: 32-true``), None (fp32) otherwise, as on CPU. ValueError for a CUDA run under
    another trainer precision: ``bf16-mixed`` would put autocast on top of the policy."""
    if device.type != "cuda" or param_dtype == "fp32":
        return None
    if precision not in ("32-true", "32"):
        raise ValueError(
            f"trainer precision {precision!r} with FSDP2's bf16 parameters: autocast would run on top of the sharded "
            "bf16 policy; set --trainer.precision 32-true (the policy computes in bf16 and reduces in fp32), or "
            "param_dtype: fp32 on the strategy for fp32 parameters under autocast"
        )
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_parts(parts: Iterable[nn.Module | None], mesh: DeviceMesh, policy: MixedPrecisionPolicy | None) -> int:
    """FSDP2 on each part in place (``None`` parts skipped): one ``fully_shard`` unit per transformer block (a
    ``blocks`` sequence, the encoder's under ``vit``), one for an encoder's patch embedding (whose input is cast to
    the policy's dtype) and one for its final norm (which read-outs call after the encoder pass), then the part
    itself, which holds the rest (embeddings, tokens, heads) and is a root of its own: the LightningModule runs no
    forward. A ``MaskedViT``'s ``forward_tokens``, ``forward_visible``, ``forward_masked`` and ``forward_blocks``
    gather its parameters like ``forward``. Returns the number of units. ``mesh``: a one-dimensional data-parallel
    mesh."""
    options: dict[str, Any] = {"mesh": mesh} | ({"mp_policy": policy} if policy is not None else {})
    units = 0
    for part in parts:
        if part is None:
            continue
        body = getattr(part, "vit", part)
        children = [*getattr(body, "blocks", ())]
        if body is not part:
            children += [body.patch_embed, body.norm]
        for child in children:
            if any(True for _ in child.parameters()):
                fully_shard(child, **options)
                units += 1
        # a part without a backward (a frozen teacher) reshards after each forward, as its blocks do; a root would
        # otherwise keep its gathered parameters until a backward that never comes
        frozen = not any(p.requires_grad for p in part.parameters())
        fully_shard(part, **options, **({"reshard_after_forward": True} if frozen else {}))
        units += 1
        for name in FORWARD_METHODS:
            if hasattr(part, name):
                register_fsdp_forward_method(part, name)
    return units


def is_sharded_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``module`` or one of its submodules."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


# ---- the trust rule --------------------------------------------------------------------------------------------------
def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint: a folder holding Lightning's ``meta.pt`` and torch's
    ``.metadata``."""
    path = Path(path)
    return path.is_dir() and (path / LIGHTNING_METADATA).is_file() and (path / DCP_METADATA).is_file()


def trusted_folders() -> list[Path]:
    """The folders named in ``ADVMIM_TRUSTED_CHECKPOINTS`` (separated by ``os.pathsep``)."""
    return [Path(p) for p in os.environ.get(TRUST_VARIABLE, "").split(os.pathsep) if p.strip()]


def check_trusted(path: str | Path, own: Sequence[str | Path] = (), trusted: bool = False, what: str = "checkpoint"):
    """Refuse (``UntrustedCheckpointError``, one line) the sharded folder ``path`` unless ``trusted`` or it lies, with
    symbolic links resolved, under one of the run's ``own`` folders or of ``trusted_folders()``."""
    if trusted:
        return
    where = Path(path).resolve()
    roots = [Path(root).resolve() for root in [*own, *trusted_folders()]]
    if any(where == root or where.is_relative_to(root) for root in roots):
        return
    shown = ", ".join(str(root) for root in roots) or "none"
    link = f" (a link to {where})" if where != Path(path).absolute() else ""
    raise UntrustedCheckpointError(
        f"{what} {str(path)!r}{link} is a sharded checkpoint folder outside the trusted folders ({shown}); reading one "
        "unpickles its .metadata, which can run code: refused. If you trust where it came from, add its folder to "
        f"{TRUST_VARIABLE} (folders separated by '{os.pathsep}')"
    )


def own_folders(trainer: Any) -> list[Path]:
    """The folders a fit writes into, whose sharded checkpoints are its own: ``default_root_dir``, its checkpoint
    callbacks' folders and its loggers' experiment folders (every version of the experiment)."""
    folders = [trainer.default_root_dir, *(cb.dirpath for cb in trainer.checkpoint_callbacks)]
    for logger in trainer.loggers:
        folders += [getattr(logger, "root_dir", None), getattr(logger, "log_dir", None)]
    return [Path(folder) for folder in folders if folder]


# ---- reading a sharded folder in one process -------------------------------------------------------------------------
def read_sharded(path: str | Path, what: str = "checkpoint", own: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The sharded checkpoint folder ``path`` as one plain checkpoint dict: Lightning's ``meta.pt`` read
    weights-only, plus ``state_dict``, the model's full tensors on the CPU (the optimizer's state is not read).
    Runs in one process without a process group. Refused unless trusted (``check_trusted`` with ``own``); a broken
    folder is a one-line CheckpointError. ``what`` names the path's role in messages."""
    path = Path(path)
    check_trusted(path, own, what=what)
    checkpoint = read_checkpoint(path / LIGHTNING_METADATA, what=what)
    try:
        reader = dcp.FileSystemReader(str(path))
        entries = reader.read_metadata().state_dict_metadata
        prefix = "state_dict."
        state = {
            key[len(prefix) :]: torch.empty(entry.size, dtype=entry.properties.dtype)
            for key, entry in entries.items()
            if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
        }
        with warnings.catch_warnings():  # one process on purpose: torch's note that it assumes so says nothing
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"state_dict": state}, storage_reader=reader, no_dist=True)
    except (*UNREADABLE, CheckpointException) as err:
        raise CheckpointError(f"{what} {str(path)!r}: a broken sharded checkpoint folder ({reason(err)})") from None
    checkpoint["state_dict"] = state
    return checkpoint


def read_any(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """``read_sharded`` for a sharded folder, ``read_checkpoint`` (weights-only) for a file."""
    return read_sharded(path, what) if is_sharded(path) else read_checkpoint(path, what=what)


def consolidate(path: str | Path, output: str | Path) -> Path:
    """Write the sharded checkpoint folder ``path`` as one weights-only file ``output``: the model's full
    ``state_dict`` and the hyperparameters, epoch and step (no optimizer state), which ``torch.load(weights_only=
    True)``, ``advmim export`` and ``init_from`` read. Written beside the target and renamed into place."""
    checkpoint = read_sharded(path)
    kept = {key: checkpoint[key] for key in ("state_dict", *KEPT_KEYS) if key in checkpoint}
    SafeCheckpointIO().save_checkpoint(kept, output)
    return Path(output)


# ---- the strategy ----------------------------------------------------------------------------------------------------
class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` for FSDP2 data parallelism over every rank.

    - The mesh is ``data_parallel`` = the world size (nodes x devices) by ``tensor_parallel`` = 1. (The parent's
      defaults, data_parallel = nodes by tensor_parallel = devices, leave ``fully_shard`` over the data-parallel
      dimension with nothing to shard on one node.) The module shards itself in ``configure_model``.
    - ``param_dtype="bf16"``: on CUDA, bf16 parameters and compute with fp32 gradient reduction (FSDP2's
      ``MixedPrecisionPolicy``; the trainer at ``precision: 32-true``); CPU runs stay fp32.
    - Sharded checkpoints (``save_distributed_checkpoint``, the default) are written to ``<name>.partial`` and
      renamed into place once every rank has written its shard, so a failed save (one line, CheckpointError) keeps
      the previous checkpoint. Without it, rank 0 writes one full file through the trainer's checkpoint IO.
    - Reads: a sharded folder only under the trust rule (module docstring); Lightning's ``meta.pt`` weights-only.

    Args:
        data_parallel_size: ranks that shard the model among themselves; ``auto``: the world size divided by
            ``tensor_parallel_size``.
        tensor_parallel_size: 1; these modules apply no tensor parallelism (``configure_model`` refuses a mesh
            whose data-parallel dimension does not span every rank).
        param_dtype: ``bf16`` (on CUDA) or ``fp32`` parameters.
        save_distributed_checkpoint: one shard per rank in a folder; false: one full file written by rank 0.
        process_group_backend: ``gloo`` or ``nccl``; None picks it from the device.
    """

    def __init__(
        self,
        data_parallel_size: PositiveInt | Literal["auto"] = "auto",
        tensor_parallel_size: PositiveInt = 1,
        param_dtype: Literal["bf16", "fp32"] = "bf16",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend)
        if param_dtype not in ("bf16", "fp32"):
            raise ValueError(f"FSDP2Strategy: param_dtype {param_dtype!r}; expected 'bf16' or 'fp32'")
        self.param_dtype = param_dtype
        self.sharded_checkpoints = save_distributed_checkpoint
        self.auto_data_parallel = data_parallel_size == "auto"

    def setup_environment(self) -> None:
        if self.auto_data_parallel:  # the parent's "auto" is the number of nodes; here every rank's share
            world = self.num_nodes * self.num_processes
            self._data_parallel_size = max(world // self._tensor_parallel_size, 1)
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self.sharded_checkpoints:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + ".partial")
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier()
        error = None
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            if self.is_global_zero:
                sync(partial / LIGHTNING_METADATA)
        except Exception as err:  # DCP raises on every rank; meta.pt (rank 0 only) may fail alone
            error = err
        failed = self.reduce(torch.tensor(float(error is not None), device=self.root_device), reduce_op="sum")
        renamed = None  # rank 0's error in the rename, which every rank learns from the broadcast
        if self.is_global_zero:
            try:
                if failed.item() == 0:
                    replace_folder(partial, path)
            except OSError as err:
                renamed = reason(err)
            shutil.rmtree(partial, ignore_errors=True)
        renamed = self.broadcast(renamed)
        if failed.item() or renamed:
            cause = renamed or (reason(error) if error is not None else "another rank failed")
            raise CheckpointError(
                f"could not write sharded checkpoint {str(path)!r} ({cause}); the previous checkpoint at that path, "
                "if any, is unchanged. Free space or fix the folder, then resume with --ckpt_path"
            )

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if is_sharded(path):
            check_trusted(path, own_folders(self.lightning_module.trainer), what="--ckpt_path")
            rank_zero_info(f"FSDP2Strategy: resuming from the sharded checkpoint {path}")
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return super().load_checkpoint(path, weights_only=weights_only)
        except UNREADABLE as err:
            raise load_error(path, err) from None


def sync(path: Path) -> None:
    """Flush ``path``'s bytes to disk."""
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def replace_folder(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path``: the previous folder or file there moves to ``<name>.old`` first and is
    deleted after, so that at every moment one complete checkpoint exists (at ``path``, or at ``<name>.old`` in the
    instant between the two renames)."""
    old = path.with_name(path.name + ".old")
    if old.is_dir():
        shutil.rmtree(old)
    old.unlink(missing_ok=True)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    if old.is_dir():
        shutil.rmtree(old)
    old.unlink(missing_ok=True)
