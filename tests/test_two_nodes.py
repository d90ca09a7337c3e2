"""Two nodes on one machine: configs/trainer/multinode.yaml run by torchrun as 2 nodes x 1 process through
``advmim fit`` (gloo, on 127.0.0.1), on the ImageFolder path and on the streaming path.

- **Uninterrupted** (``--nnodes 2 --node_rank 0|1``, static rendezvous): each process reports num_nodes 2 and world
  size 2, the ranks train on disjoint samples, and both end with the same weights.
- **A rank killed**: the same job under ``torchrun --max-restarts 1`` with the c10d rendezvous of
  scripts/torchrun_multinode.sh, ``--ckpt_path last`` (a new run on the first attempt) and a checkpoint every 2
  steps. On the first attempt one rank SIGKILLs itself before step 3 of 4; the agents restart the group, which
  resumes from step 2, trains the batches the uninterrupted run trained after it, and ends with its weights, bit
  for bit.

The uninterrupted runs are made once per test run (``computed_once``): they are the killed runs' reference. Every
launch has a deadline; past it the processes are killed and the test fails with their last log lines.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from PIL import Image

from advmim_pl.data.prepare import prepare
from tests.helpers.ranks import computed_once, run_processes

REPO = Path(__file__).resolve().parents[1]
IMAGES, BATCH = 32, 4  # 16 images per rank: 4 steps of 4
KILL_STEP, EVERY = 3, 2  # the rank dies before step 3; checkpoints at steps 2 and 4
TERM_BATCH = 1  # rank 1 alone is sent SIGTERM before batch 1: both ranks stop after it, at step 2
KILLED_RANK = {"ImageFolderDataModule": 1, "StreamingImageDataModule": 0}
DEADLINE = 240  # s for one launch of both nodes (about 15 s alone, 60 s with restarts on a busy 2-core machine)
DATA_MODULES = ["ImageFolderDataModule", "StreamingImageDataModule"]
MICRO_MAE = {
    "method": {
        "class_path": "advmim_pl.mim.MAE",
        "init_args": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4},
    },
    "encoder": "vit_base_patch16_224",
    "encoder_kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 4},
    "patch_size": 4,
    "base_lr": 1.0e-3,
    "warmup_epochs": 0,
}
CLI = ["-m", "advmim_pl.cli", "fit", "-c", "JOB", "-c", "configs/trainer/multinode.yaml",
       "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]  # fmt: skip


def write_data(folder: Path) -> None:
    """An ImageFolder of flat-colour JPEGs (red level 8 + 6 x index) and its prepared shards."""
    for index in range(IMAGES):
        pixels = np.empty((36 + index % 5, 40, 3), dtype=np.uint8)
        pixels[...] = (8 + 6 * index, 90 * (index % 2), 128)
        (folder / "images" / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / "images" / f"class{index % 2}" / f"{index:02d}.jpg", quality=95)
    prepare(str(folder / "images"), str(folder / "shards" / "train"), num_workers=1)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, dict]:
    """Each data module's data options, over the same 32 images."""
    folder = computed_once(tmp_path_factory, "two_nodes_data", write_data)
    return {
        "ImageFolderDataModule": {"train_root": str(folder / "images")},
        "StreamingImageDataModule": {"train_dir": str(folder / "shards" / "train")},
    }


def write_job(out: Path, data_options: dict, data_module: str, callbacks: list[dict]) -> Path:
    """The job config: the micro MAE for one epoch, logs and checkpoints under ``out``, RecordRank writing
    ``out/rank{r}.pt``."""
    job = out / "job.yaml"
    job.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(out),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(out / "runs"), "name": "advmim"}},
            "callbacks": [{"class_path": "tests.helpers.ranks.RecordRank", "init_args": {"out_dir": str(out)}},
                          *callbacks],
        },
        "model": {"class_path": "advmim_pl.modules.PretrainModule", "init_args": MICRO_MAE},
        "data": {
            "class_path": f"advmim_pl.data.{data_module}",
            "init_args": {**data_options, "img_size": 32, "batch_size": BATCH, "num_workers": 0,
                          "pin_memory": False},
        },
    }))  # fmt: skip
    return job


def launch(out: Path, job: Path, rendezvous: list[list[str]], *args: str, ok: bool = True, **env: str) -> str:
    """torchrun once per node (``rendezvous``: each node's torchrun options), both on this machine, the nodes'
    output in ``out/node{i}.log`` (returned, joined); fails with their last lines unless both exit with 0 (with
    ``ok``) or both fail (without)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO), **env}
    cli = [str(job) if arg == "JOB" else arg for arg in CLI]
    commands = [[sys.executable, "-m", "torch.distributed.run", *options, *cli, *args] for options in rendezvous]
    logs = [out / f"node{i}.log" for i in range(len(commands))]
    codes = run_processes(commands, logs, DEADLINE, cwd=REPO, env=env)
    for log, code in zip(logs, codes, strict=True):
        assert (code == 0) == ok, f"{log.name} exited with {code}:\n{log.read_text()[-3000:]}"
    return "".join(log.read_text() for log in logs)


def static_nodes(port: int) -> list[list[str]]:
    """torchrun options of node 0 and node 1: static rendezvous on 127.0.0.1."""
    return [["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
             "--master_port", str(port)] for rank in (0, 1)]  # fmt: skip


def elastic_nodes(port: int, run_id: str) -> list[list[str]]:
    """torchrun options of two nodes of an elastic job (c10d rendezvous, as scripts/torchrun_multinode.sh) that
    restarts its workers once."""
    return [["--nnodes", "2", "--nproc_per_node", "1", "--max-restarts", "1", "--monitor-interval", "0.5",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id]] * 2  # fmt: skip


def load_ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@pytest.fixture(scope="session")
def uninterrupted(data, tmp_path_factory):
    """``uninterrupted(data_module)``: both ranks' records of the uninterrupted two-node run, made once per run."""

    def run(data_module: str) -> list[dict]:
        def make(out: Path) -> None:
            job = write_job(out, data[data_module], data_module, [])
            launch(out, job, static_nodes(find_free_network_port()))

        return load_ranks(computed_once(tmp_path_factory, f"two_nodes_{data_module}", make))

    return run


@pytest.mark.long
@pytest.mark.parametrize("data_module", DATA_MODULES)
def test_two_nodes_on_localhost_shard_the_data_and_agree_on_the_weights(uninterrupted, data_module):
    ranks = uninterrupted(data_module)
    assert [(r["num_nodes"], r["world_size"], r["global_rank"], r["node_rank"]) for r in ranks] == [
        (2, 2, 0, 0),
        (2, 2, 1, 1),
    ]
    shares = [r["ids"] for r in ranks]
    assert len(shares[0]) == len(shares[1]) == IMAGES // 2  # 32 images over 2 ranks: no remainder to drop
    assert sorted(shares[0] + shares[1]) == list(range(IMAGES))  # disjoint, and together every image once
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name


@pytest.mark.long
@pytest.mark.parametrize("data_module", DATA_MODULES)
def test_a_rank_killed_mid_epoch_is_restarted_and_the_run_ends_as_the_uninterrupted_one(
    uninterrupted, data, data_module, tmp_path
):
    reference = uninterrupted(data_module)
    rank = KILLED_RANK[data_module]
    kill = {"class_path": "tests.helpers.killer.KillRankOnFirstAttempt",
            "init_args": {"rank": rank, "step": KILL_STEP, "out_dir": str(tmp_path)}}  # fmt: skip
    job = write_job(tmp_path, data[data_module], data_module, [kill])
    # a store per rendezvous round, as scripts/torchrun_multinode.sh sets: with torch's shared one, the restarted
    # rank read the dead peer's address from the first attempt and failed to connect
    logs = launch(tmp_path, job, elastic_nodes(find_free_network_port(), tmp_path.name), "--ckpt_path", "last",
                  "--checkpoint.monitor", "null", "--checkpoint.every_n_train_steps", str(EVERY),
                  TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # fmt: skip

    assert (tmp_path / "killed.txt").read_text().split() == [str(rank), str(KILL_STEP)]  # the first attempt died
    assert "exitcode: -9" in logs  # its agent saw the SIGKILL
    assert "a new run starts" in logs  # the first attempt's --ckpt_path last, with no checkpoint yet
    # the survivor ended on the agents' SIGTERM (or on the dead peer) without the SIGKILL that follows 30 s later
    assert "forcefully exiting via" not in logs
    ranks = load_ranks(tmp_path)
    resumed_at = (KILL_STEP - 1) // EVERY * EVERY  # the newest checkpoint before the kill
    # the killed worker's node restarted it (count 1); the other node's worker failed on the dead peer (count 1) or
    # was stopped for the new rendezvous first (a membership change: count 0)
    assert 1 in {r["restart"] for r in ranks} <= {0, 1}
    for r, (record, straight) in enumerate(zip(ranks, reference, strict=True)):
        assert (record["start_step"], record["world_size"]) == (resumed_at, 2), f"rank {r}"
        assert record["ids"] == straight["ids"][resumed_at * BATCH :], f"rank {r}"  # the rest of its share
        assert record["weights"].keys() == straight["weights"].keys()
        for name, value in straight["weights"].items():
            assert torch.equal(record["weights"][name], value), f"rank {r}: {name}"


@pytest.mark.long
def test_a_sigterm_to_one_rank_stops_both_at_one_step_and_the_same_command_resumes_exactly(
    uninterrupted, data, tmp_path
):
    """A preemption that reaches one node only: the ranks agree on the stop at the next optimizer step (Lightning's
    own handler broadcasts from inside the signal handler, out of step with the other rank's collectives), write
    the checkpoint there and exit with 143; the same command line then resumes. On the streaming path."""
    data_module = "StreamingImageDataModule"
    reference = uninterrupted(data_module)
    term = {"class_path": "tests.helpers.killer.SignalAtBatch",
            "init_args": {"batch": TERM_BATCH, "signum": "SIGTERM", "rank": 1}}  # fmt: skip
    job = write_job(tmp_path, data[data_module], data_module, [term])
    command = (job, static_nodes(find_free_network_port()), "--ckpt_path", "last", "--checkpoint.monitor", "null")

    logs = launch(tmp_path, *command, ok=False)
    assert logs.count("failed (exitcode: 143)") == 2  # both workers, as the agents report them
    assert (
        f"SIGTERM received: saved {tmp_path}/runs/advmim/version_0/checkpoints/last.ckpt at step {TERM_BATCH + 1}"
        in logs
    )
    assert not (tmp_path / "rank0.pt").exists()  # training did not end

    command = (job, static_nodes(find_free_network_port()), *command[2:])  # the same, on a fresh port
    logs = launch(tmp_path, *command)
    assert (
        f"Restoring states from the checkpoint path at {tmp_path}/runs/advmim/version_0/checkpoints/last.ckpt" in logs
    )
    for r, (record, straight) in enumerate(zip(load_ranks(tmp_path), reference, strict=True)):
        assert record["start_step"] == TERM_BATCH + 1, f"rank {r}"
        assert record["ids"] == straight["ids"][(TERM_BATCH + 1) * BATCH :], f"rank {r}"
        for name, value in straight["weights"].items():
            assert torch.equal(record["weights"][name], value), f"rank {r}: {name}"
