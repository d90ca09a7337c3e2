"""Exact resume: N steps straight equal N/2 steps, a SIGKILL, and `--ckpt_path last` (weights and logged losses);
and a run resumed from any of its checkpoints, mid-epoch or at an epoch's end, on either data path, ends where the
uninterrupted run does."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from advmim_pl.data import SyntheticDataModule
from advmim_pl.reliability import read_checkpoint
from tests.helpers.micro import MICRO_MAE_FLAGS, micro_module, trainer

STEPS = 8
JOB_ARGS = [  # the plug-in quickstart with the micro ViT, a checkpoint after every step
    "-c", "quickstart_adv.yaml",
    *MICRO_MAE_FLAGS,
    "--model.init_args.warmup_epochs", "0.01",            # the lr schedule moves every step
    "--model.init_args.plugin.init_args.attack.init_args.warmup_epochs", "0.01",  # so does the eps ramp
    "--data.init_args.batch_size", "16",                  # 250 batches per epoch: the kill is mid-epoch
    "--data.init_args.num_workers", "1",                  # augmentation in a worker process
    "--trainer.precision", "32-true",
    "--trainer.log_every_n_steps", "1",
    "--trainer.limit_val_batches", "0",
    "--checkpoint.monitor", "null",
    "--checkpoint.every_n_train_steps", "1",              # last.ckpt after every step
]  # fmt: skip


def advmim(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}  # tests.helpers.killer
    return subprocess.run([sys.executable, "-m", "advmim_pl.cli", "fit", *JOB_ARGS, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def losses(run: Path) -> dict[int, float]:
    events = EventAccumulator(str(run))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


@pytest.mark.long
def test_a_killed_and_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert advmim(straight, "--trainer.max_steps", str(STEPS)).returncode == 0

    kill = killed / "kill.yaml"
    kill.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.helpers.killer.KillAtStep\n"
        f"      init_args: {{step: {STEPS // 2}}}\n"
    )
    first = advmim(killed, "--trainer.max_steps", str(STEPS), "-c", str(kill))
    assert first.returncode == -9  # SIGKILL
    resumed = advmim(killed, "--trainer.max_steps", str(STEPS), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a = read_checkpoint(straight / "runs/advmim/version_0/checkpoints/last.ckpt")
    b = read_checkpoint(killed / "runs/advmim/version_0/checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == STEPS
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(b["mask_rng"], a["mask_rng"])
    assert b["callbacks"]["AdversarialTargetCallback"]["rng"].equal(a["callbacks"]["AdversarialTargetCallback"]["rng"])
    before, after = losses(straight / "runs/advmim/version_0"), losses(killed / "runs/advmim/version_0")
    assert sorted(before) == sorted(after) and len(before) == STEPS
    assert [after[s] for s in sorted(after)] == [before[s] for s in sorted(before)]


class BatchSums(L.Callback):
    """Records every training batch by the sum of its pixels, in the order they are trained."""

    def __init__(self) -> None:
        self.sums: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sums.append(batch[0].sum().item())


def fit_micro(root: Path, device_resident: bool, stop: dict, ckpt_path: Path | None = None):
    """The micro MAE on 24 synthetic images, 3 batches of 8 per epoch, writing a checkpoint at the end of every
    batch (``step/``), at every validation (``val/``) and at every training epoch's end (``epoch/``).

    Returns (global step, final weights, the trained batches' pixel sums)."""
    L.seed_everything(0, verbose=False)
    data = SyntheticDataModule(
        num_samples=24, num_val_samples=8, batch_size=8, img_size=32, channels=1, num_workers=0,
        pin_memory=False, device_resident=device_resident,
    )  # fmt: skip
    batches = BatchSums()
    checkpoints = [
        ModelCheckpoint(root / "step", "{step}", every_n_train_steps=1, save_top_k=-1),
        ModelCheckpoint(root / "val", "{step}", monitor="val/loss", save_top_k=-1),
        ModelCheckpoint(root / "epoch", "{step}", save_on_train_epoch_end=True, save_top_k=-1),
    ]
    run = trainer(callbacks=[batches, *checkpoints], enable_checkpointing=True, log_every_n_steps=50,
                  limit_val_batches=1, default_root_dir=root, **stop)  # fmt: skip
    module = micro_module()
    run.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return run.global_step, module.state_dict(), batches.sums


@pytest.mark.filterwarnings(
    "ignore:.*does not have many workers",
    "ignore:The dirpath has changed",  # the resumed runs write their checkpoints into folders of their own
    "ignore:.*could not find the monitored key",
    "ignore:You're resuming from a checkpoint that ended before the epoch ended",  # the data module resumes
)
@pytest.mark.parametrize("stop", [dict(max_epochs=3), dict(max_steps=7)], ids=["max_epochs", "max_steps"])
@pytest.mark.parametrize("device_resident", [False, True], ids=["dataloader", "device_resident"])
def test_resumed_from_any_checkpoint_the_run_ends_as_the_uninterrupted_one(tmp_path, device_resident, stop):
    straight = tmp_path / "straight"
    step, weights, batches = fit_micro(straight, device_resident, stop)
    assert step == stop.get("max_steps", 9) and len(batches) == step
    checkpoints = sorted(straight.rglob("*.ckpt"))
    # mid-epoch (steps 1, 2, 4, 5, ...) and after an epoch's last batch (3, 6, ...), saved at three different hooks
    assert {c.relative_to(straight).as_posix() for c in checkpoints} >= {
        "step/step=1.ckpt",
        "step/step=3.ckpt",
        "val/step=3.ckpt",
        "epoch/step=3.ckpt",
    }
    for checkpoint in checkpoints:
        where = f"resumed from {checkpoint.relative_to(straight)}"
        resumed = tmp_path / "resumed" / checkpoint.relative_to(straight).with_suffix("")
        resumed_step, resumed_weights, resumed_batches = fit_micro(resumed, device_resident, stop, checkpoint)
        assert resumed_step == step, where
        assert resumed_batches == batches[read_checkpoint(checkpoint)["global_step"] :], where
        for name, value in weights.items():
            assert torch.equal(resumed_weights[name], value), f"{where}: {name}"
        # and the resumed run's own checkpoints hold the positions the uninterrupted run's do
        for again in resumed.rglob("*.ckpt"):
            position = read_checkpoint(again)["SyntheticDataModule"]
            assert position == read_checkpoint(straight / again.relative_to(resumed))["SyntheticDataModule"], where
