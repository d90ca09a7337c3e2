"""Preemption: SIGTERM ends ``advmim fit`` at the next optimizer-step boundary (after a whole gradient accumulation)
with a checkpoint and exit status 143, and the same command line, ``--ckpt_path last`` included, resumes it to the
uninterrupted run's weights, bit for bit. Under SLURM (simulated: SLURM_* variables and a stub ``scontrol``),
Lightning's SIGUSR1 handler writes ``hpc_ckpt_1.ckpt`` and requeues the job, whose SIGTERM then stops it at a step
boundary, and the requeued job resumes the newest checkpoint. Outside SLURM, SIGUSR1 is taken as SIGTERM. And
``--ckpt_path last`` with nothing to resume starts a new run.

The signals come from a callback of the run itself (``tests.helpers.killer.SignalAtBatch``), at a batch that starts
an accumulation, so that a stop at the batch rather than at the optimizer step would be seen.
"""

import os
import signal
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from torch import multiprocessing

from advmim_pl.cli import run
from advmim_pl.preemption import PREEMPTED_EXIT_CODE, Preemption, destroy_process_group_at_exit, resume_point
from advmim_pl.reliability import read_checkpoint
from tests.helpers.killer import SignalAtBatch
from tests.helpers.micro import MICRO_MAE_FLAGS, loader, micro_module, trainer
from tests.helpers.ranks import computed_once, deadline, run_processes

REPO = Path(__file__).resolve().parents[1]
STEPS, ACCUMULATE, EVERY = 6, 2, 3  # 12 batches; periodic checkpoints at steps 3 and 6
SIGNAL_BATCH = 2  # the first batch of step 2's accumulation: the stop comes after batch 3, at step 2
STOP_STEP = SIGNAL_BATCH // ACCUMULATE + 1
DEADLINE = 180  # s for one `advmim fit` (about 15 s alone)
JOB_ARGS = [  # the plug-in quickstart with the micro ViT, 2 batches per optimizer step
    "fit", "-c", "quickstart_adv.yaml",
    *MICRO_MAE_FLAGS,
    "--model.init_args.warmup_epochs", "0.01",            # the lr schedule moves every step
    "--model.init_args.plugin.init_args.attack.init_args.warmup_epochs", "0.01",  # so does the eps ramp
    "--data.init_args.batch_size", "16",
    "--data.init_args.num_workers", "1",                  # augmentation in a worker process
    "--trainer.precision", "32-true",
    "--trainer.max_steps", str(STEPS),
    "--trainer.accumulate_grad_batches", str(ACCUMULATE),
    "--trainer.limit_val_batches", "0",
    "--trainer.enable_progress_bar", "false",
    "--checkpoint.monitor", "null",
    "--checkpoint.every_n_train_steps", str(EVERY),
    "--ckpt_path", "last",                                # from the first attempt on: the command never changes
]  # fmt: skip
LAST = Path("runs/advmim/version_0/checkpoints/last.ckpt")
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "advmim", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip


def advmim(cwd: Path, *args: str, env: dict | None = None) -> tuple[int, str]:
    """``advmim fit`` with the job's arguments and ``args`` in ``cwd``: (exit status, output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    log = cwd / f"advmim{len(list(cwd.glob('advmim*.log')))}.log"
    (code,) = run_processes([[sys.executable, "-m", "advmim_pl.cli", *JOB_ARGS, *args]], [log], DEADLINE, cwd=cwd,
                            env=env)  # fmt: skip
    return code, log.read_text()


def signal_config(folder: Path, signum: str) -> Path:
    """A config adding ``SignalAtBatch(SIGNAL_BATCH, signum)``: the same file on every attempt."""
    config = folder / "signal.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: tests.helpers.killer.SignalAtBatch\n"
        f"      init_args: {{batch: {SIGNAL_BATCH}, signum: {signum}}}\n"
    )
    return config


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> dict:
    """The uninterrupted run's final checkpoint (made once per test run)."""

    def make(folder: Path) -> None:
        code, output = advmim(folder)
        assert code == 0, output[-3000:]

    return read_checkpoint(computed_once(tmp_path_factory, "faults_uninterrupted", make) / LAST)


def assert_same_run(final: dict, reference: dict) -> None:
    assert final["global_step"] == reference["global_step"] == STEPS
    assert final["state_dict"].keys() == reference["state_dict"].keys()
    for name, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name
    assert torch.equal(final["mask_rng"], reference["mask_rng"])
    attack = final["callbacks"]["AdversarialTargetCallback"]["rng"]
    assert torch.equal(attack, reference["callbacks"]["AdversarialTargetCallback"]["rng"])


def assert_stopped_at_the_boundary(checkpoint: dict) -> None:
    """Written after the accumulation that the signal fell into, not at the signal's batch."""
    assert checkpoint["global_step"] == STOP_STEP
    assert checkpoint["BundledSampleDataModule"] == {"epoch": 0, "batches_done": STOP_STEP * ACCUMULATE}


@pytest.mark.long
def test_sigterm_saves_at_the_step_boundary_exits_143_and_the_same_command_resumes_exactly(uninterrupted, tmp_path):
    config = signal_config(tmp_path, "SIGTERM")
    code, output = advmim(tmp_path, "-c", str(config))
    assert code == PREEMPTED_EXIT_CODE, output[-3000:]
    assert "a new run starts" in output  # --ckpt_path last on the first attempt
    assert f"SIGTERM received: saved {LAST} at step {STOP_STEP}; exiting with status 143" in output
    assert_stopped_at_the_boundary(read_checkpoint(tmp_path / LAST))

    code, output = advmim(tmp_path, "-c", str(config))  # the same command line
    assert code == 0, output[-3000:]
    assert f"Restoring states from the checkpoint path at {LAST}" in output
    assert_same_run(read_checkpoint(tmp_path / LAST), uninterrupted)


@pytest.mark.long
def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_resumes_the_newest_checkpoint(
    uninterrupted, tmp_path
):
    """SLURM answers ``scontrol requeue`` by ending the job with SIGTERM; the stub does the same."""
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\nkill -TERM $PPID\n')
    stub.chmod(0o755)
    env = {**SLURM, "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    config = signal_config(tmp_path, "SIGUSR1")
    code, output = advmim(tmp_path, "-c", str(config), env=env)
    assert code == PREEMPTED_EXIT_CODE, output[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    hpc = read_checkpoint(tmp_path / "hpc_ckpt_1.ckpt")  # Lightning's, in default_root_dir (here the cwd)
    assert hpc["global_step"] == SIGNAL_BATCH // ACCUMULATE  # written when the signal came, mid-accumulation
    assert_stopped_at_the_boundary(read_checkpoint(tmp_path / LAST))
    assert (tmp_path / LAST).stat().st_mtime_ns > (tmp_path / "hpc_ckpt_1.ckpt").stat().st_mtime_ns

    code, output = advmim(tmp_path, "-c", str(config), env=env)  # the requeued job
    assert code == 0, output[-3000:]
    assert f"Restoring states from the checkpoint path at {LAST}" in output  # the newer of the two
    assert_same_run(read_checkpoint(tmp_path / LAST), uninterrupted)


def touch(path: Path, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    os.utime(path, ns=(int(seconds * 1e9), int(seconds * 1e9)))
    return path


def test_ckpt_path_last_resumes_the_newest_of_the_runs_last_and_the_slurm_requeue_checkpoints(tmp_path):
    runs, root = tmp_path / "runs" / "advmim", tmp_path
    assert resume_point(runs, root) is None
    hpc1 = touch(root / "hpc_ckpt_1.ckpt", 1000)
    assert resume_point(runs, root) == (hpc1, None)  # no run has a last.ckpt: a new version
    last0 = touch(runs / "version_0/checkpoints/last.ckpt", 2000)
    last2 = touch(runs / "version_2/checkpoints/last.ckpt", 1500)  # a higher version, written earlier
    touch(runs / "version_x/checkpoints/last.ckpt", 9000)  # not a run folder
    touch(root / "hpc_ckpt_old.ckpt", 9000)  # not one of Lightning's names
    assert resume_point(runs, root) == (last0, 0)
    hpc2 = touch(root / "hpc_ckpt_2.ckpt", 3000)
    assert resume_point(runs, root) == (hpc2, 2)  # logged into the newest run
    touch(last2, 3000)
    assert resume_point(runs, root) == (last2, 2)  # a tie: the step-boundary checkpoint


def test_ckpt_path_last_without_a_checkpoint_is_an_error_outside_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["advmim"])
    with pytest.raises(SystemExit, match=r"--ckpt_path last: no runs/advmim/version_\*/checkpoints/last.ckpt"):
        run(["validate", "-c", "quickstart.yaml", "--ckpt_path", "last"])


class Handlers(SignalAtBatch):
    """SignalAtBatch that also records the SIGTERM and SIGUSR1 handlers in place when each batch ends."""

    def __init__(self, batch: int, signum: str) -> None:
        super().__init__(batch, signum)
        self.seen: set = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.add((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)))


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_sigusr1_outside_slurm_stops_at_the_step_boundary_as_sigterm_does(tmp_path):
    preemption = Preemption()
    handlers = Handlers(SIGNAL_BATCH, "SIGUSR1")
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1))
    run_ = trainer(STEPS, [preemption, handlers], accumulate_grad_batches=ACCUMULATE, default_root_dir=tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_.fit(micro_module(), loader(n=48))
    assert stop.value.code == PREEMPTED_EXIT_CODE
    assert preemption.received == signal.SIGUSR1
    assert handlers.seen == {(preemption._on_signal, preemption._on_signal)}  # in place of Lightning's, while training
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before  # given back afterwards
    assert read_checkpoint(tmp_path / "last.ckpt")["global_step"] == STOP_STEP  # no checkpoint callback: the root


class TermAtValidationBatch(L.Callback):
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_in_validate_stops_after_the_batch_with_the_exit_code(tmp_path):
    seen = []

    class Count(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            seen.append(batch_idx)

    run_ = trainer(callbacks=[TermAtValidationBatch(), Preemption(), Count()], default_root_dir=tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_.validate(micro_module(), loader(n=48))  # 6 batches
    assert stop.value.code == PREEMPTED_EXIT_CODE
    assert seen == [0]  # the signalled batch 1 ended in the stop, before the later callbacks saw it
    assert not list(tmp_path.rglob("*.ckpt"))


def test_an_exit_code_a_launcher_cannot_read_is_refused_in_one_line():
    with pytest.raises(ValueError, match="exit_code 256 is not an exit status a launcher can read: give 1 to 255"):
        Preemption(exit_code=256)


def gloo_rank_exits(rank: int, world: int, port: int) -> None:
    """A rank that leaves gloo work in flight when it returns, as a finished training run may, after registering
    the process group's destruction at exit."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    destroy_process_group_at_exit()
    for parameter in torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(16)]).parameters():
        dist.all_reduce(parameter.data, async_op=True)


@pytest.mark.long
def test_ranks_that_end_with_gloo_work_in_flight_exit_with_status_0():
    """Without the destruction at exit, 5 of 6 such runs of 3 ranks had a rank abort at the interpreter's
    finalization ("terminate called without an active exception", -6), the cause of the two-node test's occasional
    hang; with it, none of 6. Three runs here: a regression passes unseen about once in 200 times."""
    spawn = multiprocessing.get_context("spawn")
    for _ in range(3):
        port = find_free_network_port()
        ranks = [spawn.Process(target=gloo_rank_exits, args=(rank, 3, port)) for rank in range(3)]
        with deadline(120, "3 gloo ranks"):
            for process in ranks:
                process.start()
            for process in ranks:
                process.join()
        assert [process.exitcode for process in ranks] == [0] * 3
