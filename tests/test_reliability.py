"""Faults: non-finite steps, out-of-memory in the attack, unreadable checkpoints, atomic saves, resuming."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from advmim_pl import adversarial
from advmim_pl.adversarial import AEMIM, Attacker
from advmim_pl.cli import run
from advmim_pl.reliability import CheckpointError, NonFiniteGuard, NonFiniteStop, SafeCheckpointIO, read_checkpoint
from tests.helpers.micro import loader, micro_module, trainer


class PoisonSteps(L.Callback):
    """Turns the gradients of the given optimizer steps into NaN, and snapshots the weights per step."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.snapshots = steps, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.snapshots.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("nan"))


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_steps_are_skipped_and_counted(fused):
    module = micro_module(optimizer=lambda params: torch.optim.AdamW(params, fused=fused))
    poison, guard = PoisonSteps({1, 2}), NonFiniteGuard(max_consecutive=5)
    trainer(4, [poison, guard]).fit(module, loader(n=32))  # guard runs after poison: callbacks keep order
    snapshots = [*poison.snapshots, module.state_dict()]
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(snapshots, snapshots[1:], strict=False)]
    assert changed == [True, False, False, True]  # steps 1 and 2 left every weight and buffer as it was
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert guard.state_dict() == {"consecutive": 0, "skipped": 2}


def test_consecutive_nonfinite_steps_stop_in_one_line_naming_the_checkpoint_before_them(tmp_path):
    module = micro_module()
    saved = ModelCheckpoint(tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    fit = trainer(
        9, [PoisonSteps({1, 3, 4, 5, 6}), NonFiniteGuard(max_consecutive=4), saved],
        enable_checkpointing=True, log_every_n_steps=50,  # checked at every step, not only at logging steps
    )  # fmt: skip
    with pytest.raises(NonFiniteStop) as err:
        fit.fit(module, loader(n=80))
    kept = tmp_path / "before-nonfinite-step3.ckpt"
    message = str(err.value)
    assert "\n" not in message and "4 optimizer steps in a row (from step 3)" in message, message
    assert "fp16" in message and "learning rate" in message and f"resume from {kept}" in message
    assert fit.global_step == 6  # stopped at the 4th bad step in a row, steps 3-6
    assert read_checkpoint(kept)["global_step"] == 3  # saved after step 2, the last finite one
    assert not (tmp_path / "before-nonfinite-step1.ckpt").exists()  # the one-step streak's copy is released
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 6  # the rotation went on without the kept file


def test_out_of_memory_in_the_attack_says_what_to_change(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(adversarial.attacker, "perturb", oom)  # the engine call inside Attacker.generate
    with pytest.raises(torch.OutOfMemoryError, match="lower data.init_args.batch_size.*fewer attack steps"):
        trainer(1).fit(micro_module(plugin=AEMIM(attack=Attacker(steps=3))), loader())


def test_truncated_checkpoint_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="bad.ckpt' is truncated or not a checkpoint"):
        read_checkpoint(bad)
    with pytest.raises(SystemExit, match="truncated or not a checkpoint"):
        run(["fit", "-c", "quickstart.yaml", "--trainer.max_steps", "1", "--ckpt_path", str(bad)])


SAVER = """
import sys, torch, lightning as L
from advmim_pl.reliability import SafeCheckpointIO
io, step = SafeCheckpointIO(), 0
while True:  # rewrite the same file until killed; each version is 48 MB of one value
    step += 1
    io.save_checkpoint({"step": step, "w": torch.full((12_000_000,), float(step))}, sys.argv[1])
"""


def test_a_kill_during_a_save_never_leaves_a_half_written_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    for delay in (0.05, 0.21, 0.37, 0.6):  # kill points spread over a save (~0.2-0.5 s each here)
        process = subprocess.Popen([sys.executable, "-c", SAVER, str(target)])
        while not target.exists():
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        checkpoint = read_checkpoint(target)  # intact: one whole version
        assert torch.equal(checkpoint["w"], torch.full((12_000_000,), float(checkpoint["step"])))


def test_a_write_that_fails_keeps_the_previous_checkpoint_and_stops_in_one_line(tmp_path, monkeypatch):
    module = micro_module()
    saved = ModelCheckpoint(tmp_path, save_last=True, every_n_train_steps=1, save_top_k=0)
    fit = trainer(3, [saved], enable_checkpointing=True, plugins=[SafeCheckpointIO()])
    real_save, saves = torch.save, []

    def disk_fills_up(obj, file, *args, **kwargs):  # the third save: half the bytes, then ENOSPC
        saves.append(1)
        if len(saves) < 3:
            return real_save(obj, file, *args, **kwargs)
        file.write(b"PK\x03\x04" + bytes(4096))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_fills_up)
    with pytest.raises(CheckpointError) as err:
        fit.fit(module, loader(n=32))
    monkeypatch.undo()
    assert "\n" not in str(err.value)
    assert f"could not write checkpoint {str(tmp_path / 'last.ckpt')!r}: No space left on device" in str(err.value)
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 2  # the previous save, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file for a resume to pick up


def test_ckpt_path_last_resumes_the_newest_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", "quickstart.yaml", "--data.init_args.num_workers", "0", "--trainer.limit_val_batches", "1"]
    run([*args, "--trainer.max_steps", "2"])
    run([*args, "--trainer.max_steps", "2"])  # a second, newer run
    cli = run([*args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert Path(cli.trainer.logger.log_dir).name == "version_1"  # logs continue in the resumed run
    assert cli.trainer.global_step == 4
    assert not (tmp_path / "runs" / "advmim" / "version_2").exists()
