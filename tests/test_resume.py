"""Exact resume: N steps straight equal N/2 steps, a SIGKILL, and `--ckpt_path last` (weights and logged losses)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from advmim_pl.reliability import read_checkpoint

STEPS = 8
MICRO = [
    "-c", "quickstart_adv.yaml",
    "--model.init_args.encoder", "vit_base_patch16_224",
    "--model.init_args.encoder_kwargs", "{depth: 2, embed_dim: 64, num_heads: 4}",
    "--model.init_args.method.init_args.decoder_dim", "32",
    "--model.init_args.method.init_args.decoder_depth", "1",
    "--model.init_args.method.init_args.decoder_heads", "4",
    "--model.init_args.warmup_epochs", "0.01",            # the lr schedule moves every step
    "--attack.init_args.warmup_epochs", "0.01",           # so does the eps ramp
    "--data.init_args.batch_size", "16",                  # 250 batches per epoch: the kill is mid-epoch
    "--data.init_args.num_workers", "1",                  # augmentation in a worker process
    "--trainer.precision", "32-true",
    "--trainer.log_every_n_steps", "1",
    "--trainer.limit_val_batches", "0",
    "--checkpoint.monitor", "null",
    "--checkpoint.every_n_train_steps", "1",              # last.ckpt after every step
]  # fmt: skip


def advmim(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, "-m", "advmim_pl.cli", "fit", *MICRO, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def losses(run: Path) -> dict[int, float]:
    events = EventAccumulator(str(run))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def test_a_killed_and_resumed_run_ends_where_the_uninterrupted_one_does(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    assert advmim(straight, "--trainer.max_steps", str(STEPS)).returncode == 0

    kill = killed / "kill.yaml"
    kill.write_text(
        f"trainer:\n  callbacks:\n    - class_path: killer.KillAtStep\n      init_args: {{step: {STEPS // 2}}}\n"
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
