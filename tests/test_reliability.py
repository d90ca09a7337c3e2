"""Faults: non-finite steps, out-of-memory in the attack, unreadable checkpoints, atomic saves, resuming."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from advmim_pl import adversarial
from advmim_pl.adversarial import AEMIM
from advmim_pl.cli import run
from advmim_pl.reliability import CheckpointError, NonFiniteGuard, read_checkpoint
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


def test_consecutive_nonfinite_steps_stop_the_run():
    module = micro_module()
    with pytest.raises(RuntimeError, match="last 3 optimizer steps all had non-finite gradients"):
        trainer(6, [PoisonSteps({0, 1, 2, 3, 4, 5}), NonFiniteGuard(max_consecutive=3)]).fit(module, loader(n=48))


def test_out_of_memory_in_the_attack_says_what_to_change(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(adversarial.attacker, "perturb", oom)  # the engine call inside Attacker.generate
    with pytest.raises(torch.OutOfMemoryError, match="lower data.init_args.batch_size.*fewer attack steps"):
        trainer(1).fit(micro_module(plugin=AEMIM(steps=3)), loader())


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


def test_ckpt_path_last_resumes_the_newest_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "-c", "quickstart.yaml", "--data.init_args.num_workers", "0", "--trainer.limit_val_batches", "1"]
    run([*args, "--trainer.max_steps", "2"])
    run([*args, "--trainer.max_steps", "2"])  # a second, newer run
    cli = run([*args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert Path(cli.trainer.logger.log_dir).name == "version_1"  # logs continue in the resumed run
    assert cli.trainer.global_step == 4
    assert not (tmp_path / "runs" / "advmim" / "version_2").exists()
