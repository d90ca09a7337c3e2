"""The plug-in under DDP: 2 CPU processes (gloo) through a real Lightning Trainer with ``ddp_spawn``.

Spawned processes unpickle the module and callbacks, so everything they use is defined at module level.
"""

from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy
from micro import loader, micro_module, trainer
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from advmim_pl.adversarial import AdversarialTargetCallback

WORLD = 2
N, BATCH = 32, 4  # 32 images, 4 per rank and step: 4 steps per rank in one epoch
EPS = 8 / 255
MARK = 64  # image i carries i / MARK in its top-left pixel, so a batch names its images by itself
DDP_CONFIG = Path(__file__).parents[1] / "configs" / "trainer" / "ddp.yaml"


def ddp_spawn_from_config() -> DDPStrategy:
    """configs/trainer/ddp.yaml's DDP settings, with processes spawned (works inside pytest)."""
    init_args = yaml.safe_load(DDP_CONFIG.read_text())["trainer"]["strategy"]["init_args"]
    return DDPStrategy(start_method="spawn", **init_args)


def indexed_images() -> TensorDataset:
    """N distinct random images (1, 32, 32) in [0, 1] with their index as the label and in pixel (0, 0)."""
    x = torch.rand(N, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = torch.arange(N) / MARK
    return TensorDataset(x, torch.arange(N))


class ShardRecorder(AdversarialTargetCallback):
    """Records, per rank, which images each crafted batch held and how far x_a moved; saves it with the final
    weights to ``out_dir / f"rank{rank}.pt"`` when training ends."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir
        self.labels: list[list[int]] = []  # labels of the batch the trainer handed over
        self.crafted: list[list[int]] = []  # indices read from the images the attack received
        self.linf: list[float] = []  # max over the batch of |x_a - x|_inf
        self.moved: list[float] = []  # min over the batch of |x_a - x|_inf (> 0: something was crafted)

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)  # two processes on two cores
        super().setup(trainer, pl_module, stage)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch[1].tolist())

    def generate(self, pl_module, x, objective):
        result = super().generate(pl_module, x, objective)
        self.crafted.append(torch.round(x[:, 0, 0, 0] * MARK).long().tolist())
        distance = (result.x_adv - x).abs().flatten(1).amax(dim=1)
        self.linf.append(distance.max().item())
        self.moved.append(distance.min().item())
        return result

    def on_train_end(self, trainer, pl_module):
        state = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
        record = dict(
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            labels=self.labels,
            crafted=self.crafted,
            linf=self.linf,
            moved=self.moved,
            state=state,
        )
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


def test_ddp_ranks_craft_targets_for_their_own_shards_and_stay_in_sync(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # loopback only
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    L.seed_everything(0)
    module = micro_module(adversarial=True)
    initial = {name: value.clone() for name, value in module.state_dict().items()}
    data = indexed_images()
    ddp_trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy=ddp_spawn_from_config(),
        precision="32-true",
        max_epochs=1,
        callbacks=[ShardRecorder(str(tmp_path), eps=EPS, steps=2)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
    )
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

    trainer(1, [Check(), AdversarialTargetCallback()]).fit(micro_module(adversarial=True), loader())
    assert missing == []
