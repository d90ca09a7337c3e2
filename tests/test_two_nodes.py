"""Two nodes on one machine: configs/trainer/multinode.yaml run as 2 nodes x 1 process by torchrun (``--nnodes 2
--node_rank 0|1``, gloo, rendezvous on 127.0.0.1), once on the ImageFolder path and once on the streaming path.
Each process reports num_nodes 2 and world size 2, the ranks train on disjoint samples, and both end with the same
weights. About a minute per data path on 2 cores (four interpreter starts).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from PIL import Image

from advmim_pl.data.prepare import prepare

REPO = Path(__file__).resolve().parents[1]
IMAGES, BATCH = 32, 4  # 16 images per rank: 4 steps of 4
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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """An ImageFolder of flat-colour JPEGs (red level 8 + 6 x index) and its prepared shards."""
    root = tmp_path_factory.mktemp("two_nodes_images")
    for index in range(IMAGES):
        pixels = np.empty((36 + index % 5, 40, 3), dtype=np.uint8)
        pixels[...] = (8 + 6 * index, 90 * (index % 2), 128)
        (root / f"class{index % 2}").mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / f"class{index % 2}" / f"{index:02d}.jpg", quality=95)
    shards = tmp_path_factory.mktemp("two_nodes_shards") / "train"
    prepare(str(root), str(shards), num_workers=1)
    return {
        "ImageFolderDataModule": {"train_root": str(root)},
        "StreamingImageDataModule": {"train_dir": str(shards)},
    }


def launch(job: Path, out: Path) -> None:
    """torchrun on node 0 and node 1 of a 2-node run, both on this machine; fails with their output."""
    port = find_free_network_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                "-m",
                "advmim_pl.cli",
                "fit",
                "-c",
                str(job),
                "-c",
                "configs/trainer/multinode.yaml",
                "--trainer.accelerator",
                "cpu",
                "--trainer.devices",
                "1",
                "--trainer.precision",
                "32-true",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank} failed:\n{output[-3000:]}"


@pytest.mark.parametrize("data_module", ["ImageFolderDataModule", "StreamingImageDataModule"])
def test_two_nodes_on_localhost_shard_the_data_and_agree_on_the_weights(data, data_module, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "tests.helpers.ranks.RecordRank", "init_args": {"out_dir": str(tmp_path)}}],
        },
        "model": {"class_path": "advmim_pl.modules.PretrainModule", "init_args": MICRO_MAE},
        "data": {
            "class_path": f"advmim_pl.data.{data_module}",
            "init_args": {**data[data_module], "img_size": 32, "batch_size": BATCH, "num_workers": 0,
                          "pin_memory": False},
        },
    }))  # fmt: skip
    launch(job, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
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
