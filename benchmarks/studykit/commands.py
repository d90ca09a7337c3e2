"""Each arm's pre-training: its epochs, its ``advmim fit`` command, and what the run leaves to record."""

import math
from pathlib import Path

from advmim_pl.cli import run
from advmim_pl.reliability import read_checkpoint

from .design import ARMS, QUIET, Preset


def arm_epochs(preset: Preset, arm: str, ratio: float | None = None) -> float:
    """Pre-training epochs of ``arm``: E, 0 for the random encoder, E x ``ratio`` (fractional) when compute-matched."""
    factor = ARMS[arm].epoch_factor
    if factor == "time_ratio":
        return preset.epochs * ratio
    return preset.epochs if factor is None else factor


def steps_per_epoch(preset: Preset) -> int:
    """Training steps of one epoch: the training images over the batch size (full batches only), capped by a
    ``--trainer.limit_train_batches`` among the preset's extra arguments."""
    extra = dict(a.removeprefix("--").split("=", 1) for a in preset.extra if "=" in a)
    steps = (preset.limit_train or 60_000) // int(extra.get("data.init_args.batch_size", preset.batch_size))
    limit = extra.get("trainer.limit_train_batches")
    return min(steps, int(limit)) if limit else steps


def length_arguments(preset: Preset, epochs: float) -> list[str]:
    """``--trainer.max_epochs`` for whole epochs; for a fraction also ``--trainer.max_steps`` (its epochs in steps,
    rounded), so the cosine schedule ends exactly there."""
    if float(epochs).is_integer():
        return [f"--trainer.max_epochs={int(epochs)}"]
    return [
        f"--trainer.max_epochs={math.ceil(epochs)}",
        f"--trainer.max_steps={round(epochs * steps_per_epoch(preset))}",
    ]


def time_ratio(preset: Preset, records: list[dict], seed: int) -> float:
    """The compute-matched arm's time ratio: a number fixed in the preset, or else MAE+AEMIM's pre-training minutes
    over MAE's for ``seed`` (both measured alike: one process, the same thread count)."""
    if isinstance(preset.time_ratio, float):
        return preset.time_ratio
    minutes = {r["arm"]: r["minutes"]["pretrain"] for r in records if r["seed"] == seed and r["arm"] in ARMS}
    if not {"MAE", "MAE+AEMIM"} <= minutes.keys():
        raise RuntimeError(f"seed {seed}: the compute-matched arm needs the MAE and MAE+AEMIM records of seed {seed}")
    return minutes["MAE+AEMIM"] / minutes["MAE"]


def limit_arguments(preset: Preset) -> list[str]:
    """``--data.init_args.limit_train`` of a preset that trains on fewer than all training images."""
    return [f"--data.init_args.limit_train={preset.limit_train}"] if preset.limit_train else []


def pretrain_command(preset: Preset, arm: str, seed: int, folder: Path, epochs: float, data: list[str]) -> list[str]:
    """The ``advmim fit`` argument list of one arm's pre-training, logging under ``folder``."""
    spec = ARMS[arm]
    configs = ["-c", f"study/{preset.configs}/{spec.pretrain}"]
    for overlay in spec.overlays:
        configs += ["-c", overlay]
    attack_seed = (
        ["--model.init_args.plugin.init_args.attack.init_args.seed", str(seed)] if spec.overlays else []
    )  # its RNG follows the seed
    logger = f"--trainer.logger={{class_path: TensorBoardLogger, init_args: {{save_dir: {folder}, name: pretrain}}}}"
    limit = limit_arguments(preset)
    return [
        "fit",
        *configs,
        *attack_seed,
        "--seed_everything",
        str(seed),
        *length_arguments(preset, epochs),
        logger,
        *QUIET,
        *preset.extra,
        *limit,
        *data,
    ]


def pretrain(preset: Preset, arm: str, seed: int, folder: Path, epochs: float, data: list[str], callbacks: list = ()):
    """Run one pre-training (``callbacks``: class paths added to the trainer's); returns the CLI."""
    argv = pretrain_command(preset, arm, seed, folder, epochs, data)
    return run(argv + [f"--trainer.callbacks+={c}" for c in callbacks])


def attack_log(trainer) -> dict[str, float]:
    """The attack's objectives at the last logging step, ``attack/objective_*`` (none for arms without the
    plug-in): the feature distance to the clean target at x, at the attack's x_a and at an energy-matched random
    sign. Their ratio adv / random says whether the attack was adversarial at all."""
    return {k: float(v) for k, v in trainer.logged_metrics.items() if k.startswith("attack/objective")}


def kept_checkpoint(folder: Path, record: dict, preset: Preset) -> Path:
    """The last checkpoint of the newest pre-training logged under ``folder`` (``pretrain/version_N``), checked to
    hold the training steps of ``record``'s epochs. FileNotFoundError when none is kept, ValueError when it trained
    another length (a run the record does not describe)."""
    kept = sorted(folder.glob("pretrain/version_*/checkpoints/last.ckpt"), key=lambda p: int(p.parts[-3][8:]))
    if not kept:
        raise FileNotFoundError(f"{folder}: no pre-training checkpoint is kept; run the job again with --rerun")
    steps = read_checkpoint(kept[-1])["global_step"]
    expected = round(record["epochs"] * steps_per_epoch(preset))
    if steps != expected:
        raise ValueError(
            f"{kept[-1]} trained {steps} steps; the record of {record['arm']} seed {record['seed']} says "
            f"{record['epochs']:g} epochs, {expected} steps"
        )
    return kept[-1]
