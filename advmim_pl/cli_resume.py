"""``--ckpt_path`` before anything is built: the file is read weights-only first, ``last`` is resolved, and
pre-training's ``init_from`` is weighed against the resumed checkpoint.

The rule for ``init_from`` (pre-training): a resumed checkpoint holds the run's weights, so ``init_from`` does not
decide them. ``--ckpt_path last`` resolves first: with no checkpoint yet, ``fit`` starts a new run, from
``init_from`` when given; with one, the run resumes and one log line says that the checkpoint's weights replace
``init_from``'s (the model is still built from ``init_from``, as on the first attempt, and keeps it as the run's
source). So one command line, ``init_from`` and ``--ckpt_path last`` included, serves every attempt of a preempted
job. An explicit ``--ckpt_path FILE`` together with ``init_from`` is refused in one line: one resumes a run, the other
starts a new one, and a command that names both has mistaken one for the other.
"""

from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.utilities import rank_zero_info

from advmim_pl.preemption import resolve_last
from advmim_pl.reliability import read_checkpoint


def pretraining_init_from(config: Namespace) -> str | None:
    """``model.init_args.init_from`` of a subcommand's config when its model is a ``PretrainModule``, else None."""
    model = config.get("model")
    if not (isinstance(model, Namespace) and str(model.get("class_path")).endswith("PretrainModule")):
        return None
    init_args = model.get("init_args")
    return init_args.get("init_from") if isinstance(init_args, Namespace) else None


def check_ckpt_path(config: Namespace) -> None:
    """Before LightningCLI reads the hyperparameters in a subcommand's ``--ckpt_path`` file: refuse an explicit
    checkpoint beside pre-training's ``init_from`` (the module's rule), then read the file weights-only, as every
    read here, so that a truncated checkpoint or one whose unpickling would run code is a one-line error
    (``CheckpointError``, ``UnsafeCheckpointError``). ``last`` is left to ``resolve_resume``."""
    ckpt_path, init_from = config.get("ckpt_path"), pretraining_init_from(config)
    if not ckpt_path or ckpt_path == "last":
        return
    if init_from:
        raise SystemExit(
            f"advmim: --ckpt_path {ckpt_path} resumes a run (weights, optimizer, step, schedule) and "
            f"model.init_args.init_from {init_from} starts a new one from weights only: give one of them (to "
            "resume a run that started from init_from, use --ckpt_path last or add --model.init_args.init_from null)"
        )
    if Path(ckpt_path).is_file():
        read_checkpoint(ckpt_path)


def resolve_resume(config: Namespace, subcommand: str) -> None:
    """Resolve ``--ckpt_path last`` in a subcommand's ``config`` (``resolve_last``); when it resumes a checkpoint of
    a pre-training run with ``init_from``, one log line says that the checkpoint's weights replace init_from's."""
    if config.get("ckpt_path") != "last":
        return
    resolve_last(config, subcommand)
    ckpt_path, init_from = config.get("ckpt_path"), pretraining_init_from(config)
    if ckpt_path and ckpt_path != "last" and init_from:  # "last" stays for Lightning's own lookup (other loggers)
        rank_zero_info(
            f"advmim: --ckpt_path last resumes {ckpt_path}: its weights replace those of model.init_args.init_from "
            f"{init_from}, which only started the run"
        )
