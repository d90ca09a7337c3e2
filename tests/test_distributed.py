"""The plug-in under DDP: 2 CPU processes (gloo) through a real Lightning Trainer with ``ddp_spawn``; and runs
resumed under DDP, in 2 processes started once (as torchrun would) for many Trainer runs.

Spawned processes unpickle the module and callbacks, so everything they use is defined at module level.
"""

import os
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import multiprocessing
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from advmim_pl.adversarial import AEMIM
from advmim_pl.data import SyntheticDataModule
from advmim_pl.data.resolution import StepResolution
from advmim_pl.data.resumable import TrainingOrder
from tests.helpers.micro import loader, micro_module, trainer
from tests.helpers.ranks import deadline
from tests.helpers.recording import recording_plugin

WORLD = 2
N, BATCH = 32, 4  # 32 images, 4 per rank and step: 4 steps per rank in one epoch
EPS = 8 / 255
MARK = 64  # image i carries i / MARK in its top-left pixel, so a batch names its images by itself
DDP_CONFIG = Path(__file__).parents[1] / "configs" / "trainer" / "ddp.yaml"
# past these, the spawned ranks are killed and the test fails instead of hanging (alone on 2 cores: 6 s and 10 s)
DDP_DEADLINE, RESUME_DEADLINE = 120, 300


def ddp_from_config(start_method: str = "spawn") -> DDPStrategy:
    """configs/trainer/ddp.yaml's DDP settings, with processes spawned (works inside pytest); ``popen`` where the
    processes exist already (started as torchrun would)."""
    init_args = yaml.safe_load(DDP_CONFIG.read_text())["trainer"]["strategy"]["init_args"]
    return DDPStrategy(start_method=start_method, **init_args)


def indexed_images() -> TensorDataset:
    """N distinct random images (1, 32, 32) in [0, 1] with their index as the label and in pixel (0, 0)."""
    x = torch.rand(N, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = torch.arange(N) / MARK
    return TensorDataset(x, torch.arange(N))


class ShardRecorder(L.Callback):
    """Records, per rank, the labels of each batch the trainer handed over and, from the module's recording attacker,
    which images each crafted batch held and how far x_a moved; saves it with the final weights to
    ``out_dir / f"rank{rank}.pt"`` when training ends."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.labels: list[list[int]] = []

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)  # two processes on two cores

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch[1].tolist())

    def on_train_end(self, trainer, pl_module):
        state = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
        calls = pl_module.plugin.attack.calls  # (x, x_a, objective(x), objective(x_a)) per crafted batch
        distances = [(x_adv - x).abs().flatten(1).amax(dim=1) for x, x_adv, *_ in calls]
        record = dict(
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            labels=self.labels,  # labels of the batch the trainer handed over
            crafted=[torch.round(x[:, 0, 0, 0] * MARK).long().tolist() for x, *_ in calls],  # what the attack got
            linf=[d.max().item() for d in distances],  # max over the batch of |x_a - x|_inf
            moved=[d.min().item() for d in distances],  # min over the batch (> 0: something was crafted)
            state=state,
        )
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def test_ddp_ranks_craft_targets_for_their_own_shards_and_stay_in_sync(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # loopback only
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    L.seed_everything(0)
    module = micro_module(plugin=recording_plugin(dict(eps=EPS, steps=2)))
    initial = {name: value.clone() for name, value in module.state_dict().items()}
    data = indexed_images()
    ddp_trainer = trainer(
        -1, [ShardRecorder(str(tmp_path))], devices=WORLD, strategy=ddp_from_config(), max_epochs=1,
        default_root_dir=tmp_path,
    )  # fmt: skip
    with deadline(DDP_DEADLINE, "2 ranks with ddp_spawn"):
        ddp_trainer.fit(module, DataLoader(data, batch_size=BATCH, shuffle=True))

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == WORLD for r in ranks)

    # each rank crafted targets for exactly the batches the DistributedSampler assigned to it, in order
    # (Lightning's sampler: shuffle as the loader asked, seed = the global seed, epoch 0)
    for rank, record in enumerate(ranks):
        sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(0)
        order = list(sampler)
        assigned = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
        assert record["labels"] == assigned
        assert record["crafted"] == assigned  # the attack saw this step's own images, not another rank's
    shards = [{i for batch in r["crafted"] for i in batch} for r in ranks]
    assert shards[0].isdisjoint(shards[1])
    assert shards[0] | shards[1] == set(range(N))

    # every x_a is inside the eps-ball and actually moved
    for record in ranks:
        assert len(record["linf"]) == N // (WORLD * BATCH)
        assert max(record["linf"]) <= EPS + 1e-6
        assert min(record["moved"]) > 0

    # gradients were all-reduced: both ranks end with identical weights, and training changed them
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys() == initial.keys()
    for name in initial:
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
    changed = [name for name in initial if not torch.equal(initial[name], ranks[0]["state"][name])]
    assert "encoder.vit.blocks.0.attn.qkv.weight" in changed
    assert any(".aux." in name for name in changed)  # the auxiliary branch trained too
    assert any(name.startswith("aux_decoder.") for name in changed)


def test_mae_gives_every_trainable_parameter_a_gradient():
    """What ``find_unused_parameters: false`` needs: every trainable parameter gets a gradient each step."""
    missing = []

    class Check(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            missing.extend(n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None)

    trainer(1, [Check()]).fit(micro_module(plugin=AEMIM()), loader())
    assert missing == []


# ---- resuming under DDP ---------------------------------------------------------------------------------------
RESUME_N, RESUME_BATCH = 16, 4  # 2 batches per rank and epoch; 2 epochs: 4 steps


class IndexedSynthetic(SyntheticDataModule):
    """Synthetic images labelled with their own index, so that a batch names the samples it holds."""

    def load_splits(self):
        train_images, _, eval_images, eval_labels = super().load_splits()
        return train_images, torch.arange(len(train_images)), eval_images, eval_labels


class Regression(L.LightningModule):
    """A linear map of the pixels fitted to 1 by SGD with momentum: its weights depend on every batch, in order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(32 * 32, 1)

    def loss(self, batch) -> torch.Tensor:
        return (self.linear(batch[0].flatten(1)) - 1).pow(2).mean()

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(batch), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class BatchLabels(L.Callback):
    """Records the labels and the side of every training batch, in the order they are trained."""

    def __init__(self) -> None:
        self.labels: list[list[int]] = []
        self.sides: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.labels.append(batch[1].tolist())
        self.sides.append(batch[0].shape[-1])


def fit_ddp(
    root: Path, module: L.LightningModule, device_resident: bool, ckpt_path: Path | None = None, **data_options
):
    """2 epochs on IndexedSynthetic (with ``data_options``) in this DDP process, with a checkpoint at every batch's end
    (``step/``) and at every validation (``val/``). Returns (global step, final weights, this rank's trained labels,
    the sides of its batches)."""
    L.seed_everything(0, verbose=False)
    data = IndexedSynthetic(
        num_samples=RESUME_N, num_val_samples=8, batch_size=RESUME_BATCH, img_size=32, channels=1, num_workers=0,
        pin_memory=False, device_resident=device_resident, **data_options,
    )  # fmt: skip
    batches = BatchLabels()
    checkpoints = [
        ModelCheckpoint(root / "step", "{step}", every_n_train_steps=1, save_top_k=-1),
        ModelCheckpoint(root / "val", "{step}", monitor="val/loss", save_top_k=-1),
    ]
    ddp_trainer = trainer(
        -1, [batches, *checkpoints], devices=WORLD, strategy=ddp_from_config("popen"), max_epochs=2,
        limit_val_batches=1, enable_checkpointing=True, log_every_n_steps=50, default_root_dir=root,
    )  # fmt: skip
    ddp_trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    ddp_trainer.strategy.barrier()  # every checkpoint is on disk before any rank lists them
    weights = {name: value.detach().clone() for name, value in module.state_dict().items()}
    return ddp_trainer.global_step, weights, batches.labels, batches.sides


def adversarial_micro_module() -> L.LightningModule:
    return micro_module(plugin=AEMIM())


PROGRESSIVE = StepResolution([[0, 24], [1, 32]])  # epoch 0 at 24 px, the switch to 32 px at step 2 (epoch 1's start)
ARMS = {  # name: (module, data options)
    "regression": (Regression, {}),
    "mae": (micro_module, {}),
    "mae_adv": (adversarial_micro_module, {}),
    "mae_adv_progressive": (adversarial_micro_module, {"resolution": PROGRESSIVE}),
}


def resume_worker(rank: int, root: Path, port: int) -> None:
    """One of WORLD processes started as torchrun would: for each module and data path, an uninterrupted run and
    one run resumed from each of its checkpoints; saves what each ended with to ``root / f"rank{rank}.pt"``."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", WORLD_SIZE=str(WORLD),
        NODE_RANK="0", LOCAL_RANK=str(rank), RANK=str(rank),
    )  # fmt: skip
    runs = {}
    for name, (make, options) in ARMS.items():
        for device_resident in (False, True):
            straight = root / name / str(device_resident) / "straight"
            runs[name, device_resident, "straight"] = fit_ddp(straight, make(), device_resident, **options)
            for checkpoint in sorted(straight.rglob("*.ckpt")):
                where = checkpoint.relative_to(straight).as_posix()
                resumed = straight.parent / "resumed" / where
                runs[name, device_resident, where] = fit_ddp(resumed, make(), device_resident, checkpoint, **options)
    torch.save(runs, root / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ddp_resumes(tmp_path_factory) -> list[dict]:
    """Per rank: {(module, device_resident, "straight" or the checkpoint resumed from): fit_ddp's result}."""
    root = tmp_path_factory.mktemp("ddp_resume")
    with deadline(RESUME_DEADLINE, "2 ranks resuming runs"):
        multiprocessing.spawn(resume_worker, args=(root, find_free_network_port()), nprocs=WORLD)
    return [torch.load(root / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def check_resumes(ranks: list[dict], name: str, device_resident: bool, sides: tuple[int, ...] = (32,) * 4) -> None:
    """Every rank's run resumed from each checkpoint ends as the uninterrupted one, having trained the batches it had
    left, at the ``sides`` of the uninterrupted run's 4 steps."""
    checkpoints = {"step/step=1.ckpt", "step/step=2.ckpt", "step/step=3.ckpt", "step/step=4.ckpt",
                   "val/step=2.ckpt", "val/step=4.ckpt"}  # fmt: skip
    for rank, runs in enumerate(ranks):
        step, weights, labels, trained_sides = runs[name, device_resident, "straight"]
        assert trained_sides == list(sides), f"rank {rank}"
        # each rank trained its own share of TrainingOrder, not a share of a share
        order = TrainingOrder(RESUME_N, RESUME_BATCH, seed=0, rank=rank, world_size=WORLD, position=lambda: (0, 0))
        assert step == 4 and labels == order.batches(0).tolist() + order.batches(1).tolist()
        resumed = {where for (n, d, where) in runs if (n, d) == (name, device_resident) and where != "straight"}
        assert resumed == checkpoints
        for where in sorted(checkpoints):
            resumed_step, resumed_weights, resumed_labels, resumed_sides = runs[name, device_resident, where]
            done = int(where.split("=")[1].removesuffix(".ckpt"))
            assert resumed_step == step, f"rank {rank}, resumed from {where}"
            assert resumed_labels == labels[done:], f"rank {rank}, resumed from {where}"
            assert resumed_sides == list(sides[done:]), f"rank {rank}, resumed from {where}"
            for key, value in weights.items():
                assert torch.equal(resumed_weights[key], value), f"rank {rank}, resumed from {where}: {key}"


@pytest.mark.parametrize("device_resident", [False, True], ids=["dataloader", "device_resident"])
def test_ddp_runs_resumed_from_any_checkpoint_end_as_the_uninterrupted_one(ddp_resumes, device_resident):
    check_resumes(ddp_resumes, "regression", device_resident)


@pytest.mark.parametrize("device_resident", [False, True], ids=["dataloader", "device_resident"])
def test_ddp_pretraining_resumed_from_any_checkpoint_ends_as_the_uninterrupted_one(ddp_resumes, device_resident):
    """Each rank's mask and attack generators are saved (rank 0 writes the checkpoint), so each resumes its own."""
    check_resumes(ddp_resumes, "mae", device_resident)
    check_resumes(ddp_resumes, "mae_adv", device_resident)


@pytest.mark.parametrize("device_resident", [False, True], ids=["dataloader", "device_resident"])
def test_ddp_progressive_resolution_resumes_exactly_across_the_switch(ddp_resumes, device_resident):
    """Checkpoints mid-epoch at 24 px (step 1), at the switch (step 2 and its validation) and after it at 32 px."""
    check_resumes(ddp_resumes, "mae_adv_progressive", device_resident, sides=(24, 24, 32, 32))
