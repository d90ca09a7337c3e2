"""The plug-in's window (``epochs``) and ``batch_fraction``: outside its epochs a step is the host method's step, its
parameters rest, DDP with the shipped settings runs through the switch, and a fraction attacks exactly that share."""

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from advmim_pl.adversarial import AEMIM
from advmim_pl.adversarial.attacker import Attacker

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from throughput import GlobalOnly  # noqa: E402

from tests.helpers.micro import bundled_sample, loader, micro_module, trainer
from tests.test_distributed import DDP_CONFIG, ddp_from_config, indexed_images


class AttackSizes(L.Callback):
    """The batch size of every attack, by training epoch (``sizes[epoch]``), through a spy on ``Attacker.generate``."""

    def __init__(self, monkeypatch) -> None:
        self.sizes: dict[int, list[int]] = {}
        self.epoch = 0
        generate = Attacker.generate

        def spy(attacker, model, x, *args, **kwargs):
            self.sizes.setdefault(self.epoch, []).append(x.shape[0])
            return generate(attacker, model, x, *args, **kwargs)

        monkeypatch.setattr(Attacker, "generate", spy)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch = trainer.current_epoch


class PluginSnapshots(L.Callback):
    """The plug-in's own parameters (aux norms, aux decoder) at the end of every epoch, and at the start."""

    def __init__(self) -> None:
        self.snapshots: list[list[torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.snapshots.append([p.detach().clone() for p in pl_module.plugin_parameters()])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.snapshots.append([p.detach().clone() for p in pl_module.plugin_parameters()])


def moved(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def step_flops(module: L.LightningModule) -> int:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = GlobalOnly()  # the per-module tracker breaks the attack's torch.autograd.grad
    with counter:
        trainer(1).fit(module, loader(n=8))
    return counter.get_total_flops()


def test_outside_its_epochs_a_step_costs_what_the_host_step_costs(monkeypatch):
    host = step_flops(micro_module())
    inside = step_flops(micro_module(plugin=AEMIM(epochs=[[0, 1]])))

    def never(*args, **kwargs):
        raise AssertionError("the attack ran outside the plug-in's epochs")

    monkeypatch.setattr(Attacker, "generate", never)
    outside = step_flops(micro_module(plugin=AEMIM(epochs=[[1, 2]])))  # epoch 0 is outside
    assert outside == host
    assert inside > 2 * host  # the same count with the plug-in running: the comparison can fail


def test_the_plugin_runs_in_its_epochs_only_and_its_parameters_rest_outside(monkeypatch):
    sizes, snapshots = AttackSizes(monkeypatch), PluginSnapshots()
    module = micro_module(plugin=AEMIM(epochs=[[1, 2]]))
    trainer(-1, [sizes, snapshots], max_epochs=3).fit(module, loader(n=16))  # 2 steps per epoch
    assert sizes.sizes == {1: [8, 8]}
    start, epoch0, epoch1, epoch2 = snapshots.snapshots
    assert not moved(start, epoch0) and moved(epoch0, epoch1) and not moved(epoch1, epoch2)


@pytest.mark.parametrize("fraction, attacked", [(0.25, 2), (0.5, 4), (0.01, 1), (1.0, 8)])
def test_a_batch_fraction_attacks_and_reconstructs_exactly_that_share(monkeypatch, fraction, attacked):
    sizes = AttackSizes(monkeypatch)
    module = micro_module(plugin=AEMIM(batch_fraction=fraction))
    decoded = []
    module.aux_decoder.register_forward_hook(lambda mod, args, out: decoded.append(args[0].shape[0]))
    trainer(2, [sizes]).fit(module, loader(n=16))
    assert sizes.sizes == {0: [attacked, attacked]} and decoded == [attacked, attacked]


def test_the_attack_gain_is_logged_on_the_attacked_images(monkeypatch):
    module = micro_module(plugin=AEMIM(attack=Attacker(eps=8 / 255), batch_fraction=0.5))
    seen = []
    diagnostics = AEMIM.diagnostics

    def spy(plugin, host, x, *args):
        seen.append(x.shape[0])
        return diagnostics(plugin, host, x, *args)

    monkeypatch.setattr(AEMIM, "diagnostics", spy)
    fit = trainer(2)
    fit.fit(module, loader(n=16))
    assert seen == [4, 4]  # the three objectives ran on the 4 attacked images, not the batch of 8
    assert fit.logged_metrics["attack/gain_over_random"] > 0


def test_bad_windows_and_fractions_are_one_line_errors():
    for bad in ({"batch_fraction": 0.0}, {"batch_fraction": 1.5}, {"epochs": [[3, 3]]}, {"epochs": [[5, 2]]}):
        with pytest.raises(ValueError, match="batch_fraction|epochs") as err:
            AEMIM(**bad)
        assert "\n" not in str(err.value) and str(next(iter(bad.values()))) in str(err.value)


def test_window_and_fraction_resume_exactly(tmp_path):
    """Across the switch on (epoch 1) and mid-epoch inside the window, with a fraction drawn per step."""

    def fit(ckpt_path=None) -> L.LightningModule:
        L.seed_everything(0)
        module = micro_module(plugin=AEMIM(epochs=[[1, 2]], batch_fraction=0.5))
        every_step = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1)
        run = trainer(-1, [every_step], enable_checkpointing=True, max_epochs=2, limit_train_batches=3)
        run.fit(module, bundled_sample(8), ckpt_path=ckpt_path)
        return module

    straight = fit()
    for step in (3, 4):  # at the switch, and inside the window
        resumed = fit(tmp_path / f"step={step}.ckpt")
        for name, value in straight.state_dict().items():
            assert torch.equal(value, resumed.state_dict()[name]), (step, name)


# ---- DDP --------------------------------------------------------------------------------------------------------
class RecordPlugin(PluginSnapshots):
    """PluginSnapshots saved per rank with the final weights, for the DDP test (runs in spawned processes)."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)  # two processes on two cores

    def on_train_end(self, trainer, pl_module):
        weights = {name: value.detach().clone() for name, value in pl_module.state_dict().items()}
        record = {"snapshots": self.snapshots, "weights": weights}
        torch.save(record, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.long
def test_the_window_runs_under_ddp_with_the_shipped_settings(tmp_path, monkeypatch):
    """trainer/ddp.yaml sets find_unused_parameters: false, which fails a step that leaves a parameter without a
    gradient; off -> on -> off across three epochs runs through, and the plug-in's parameters rest outside."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # loopback only
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    assert yaml.safe_load(DDP_CONFIG.read_text())["trainer"]["strategy"]["init_args"]["find_unused_parameters"] is False
    L.seed_everything(0)
    module = micro_module(plugin=AEMIM(epochs=[[1, 2]]))
    run = trainer(
        -1, [RecordPlugin(str(tmp_path))], devices=2, strategy=ddp_from_config(), max_epochs=3,
        default_root_dir=tmp_path,
    )  # fmt: skip
    run.fit(module, DataLoader(indexed_images(), batch_size=8, shuffle=True))  # 2 steps per rank and epoch
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for record in ranks:
        start, epoch0, epoch1, epoch2 = record["snapshots"]
        assert not moved(start, epoch0) and moved(epoch0, epoch1) and not moved(epoch1, epoch2)
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name
