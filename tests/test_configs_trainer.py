"""configs/trainer/*.yaml: each composes on a job, and the strategies they name really get built."""

from pathlib import Path

import pytest
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from advmim_pl.cli import AdvMIMCLI, resolve_config_args
from advmim_pl.sharding import FSDP2Strategy
from tests.helpers.config_tools import leaves, printed_config

CONFIGS = Path(__file__).parents[1] / "configs" / "trainer"
TRAINER_CONFIGS = sorted(CONFIGS.glob("*.yaml"))
# environment variables a launcher may have left in the test process; each test starts without them
LAUNCHER_ENV = (
    "TORCHELASTIC_RUN_ID",
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_NNODES",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_NODELIST",
    "SLURM_JOB_ID",
    "SLURM_JOB_NAME",
)


@pytest.fixture(autouse=True)
def no_launcher_env(monkeypatch):
    """No launcher variables leak in, and the process-wide rank a simulated cluster sets does not leak out
    (a non-zero rank would silence every later rank_zero_warn)."""
    for name in LAUNCHER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)


def cli(*args: str) -> AdvMIMCLI:
    return AdvMIMCLI(args=resolve_config_args(["-c", "quickstart_adv.yaml", *args]), run=False)


def test_the_five_trainer_configs_exist_and_every_key_is_commented():
    assert [p.stem for p in TRAINER_CONFIGS] == ["ddp", "fsdp", "gpu", "multinode", "tpu"]
    for path in TRAINER_CONFIGS:
        for line in path.read_text().splitlines():
            body = line.split("#", 1)[0]
            if body.strip() and not body.strip().startswith("- ") and body.rstrip().endswith(":"):
                continue  # a section header ("trainer:", "init_args:") or a key whose value is a list below
            if body.strip():
                assert "#" in line, f"{path.name}: uncommented key {line.strip()!r}"


@pytest.mark.parametrize("config", TRAINER_CONFIGS, ids=lambda p: p.name)
def test_trainer_configs_compose_on_a_job(config, capsys):
    printed = printed_config(capsys, "-c", "quickstart_adv.yaml", "-c", f"trainer/{config.name}")
    composed = leaves(printed)
    for key, value in leaves(yaml.safe_load(config.read_text())).items():
        assert composed[key] == value, key
    # the job itself is untouched: same data, same plug-in
    base = leaves(printed_config(capsys, "-c", "quickstart_adv.yaml"))
    eps = ("model", "init_args", "plugin", "init_args", "attack", "init_args", "eps")
    for key in (("data", "init_args", "batch_size"), eps, ("model", "init_args", "encoder")):
        assert composed[key] == base[key]
    if config.stem == "tpu":  # the only model key a trainer file sets; the rest of the optimizer is the job's
        optimizer = printed["model"]["init_args"]["optimizer"]
        assert optimizer["class_path"] == "torch.optim.AdamW" and optimizer["init_args"]["betas"] == [0.9, 0.95]


def test_ddp_config_builds_a_ddp_trainer_on_cpu():
    built = cli("-c", "trainer/ddp.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "1")
    strategy = built.trainer.strategy
    assert isinstance(strategy, DDPStrategy)
    expected = yaml.safe_load((CONFIGS / "ddp.yaml").read_text())["trainer"]["strategy"]["init_args"]
    assert expected.keys() == {"find_unused_parameters", "gradient_as_bucket_view", "static_graph"}
    assert {k: strategy._ddp_kwargs[k] for k in expected} == expected  # reaches torch's DistributedDataParallel
    assert expected["gradient_as_bucket_view"] is True and expected["static_graph"] is False
    assert built.trainer.world_size == 1
    assert strategy.process_group_backend is None  # chosen at setup: gloo on CPU, nccl on CUDA
    # the plug-in's attack goes on the trainer under DDP too (Lightning attaches configure_callbacks at fit)
    (attack,) = built.model.configure_callbacks()
    assert type(attack).__name__ == "AdversarialTargetCallback" and attack.attacker is built.model.plugin.attack


def test_fsdp_config_builds_an_fsdp2_strategy_on_cpu():
    """FSDP2 through Lightning's ModelParallelStrategy runs on a CPU too (gloo); the mesh and the sharding are checked
    in tests/test_fsdp.py."""
    built = cli("-c", "trainer/fsdp.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "1")
    strategy = built.trainer.strategy
    assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
    expected = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["trainer"]
    assert expected["precision"] == built.trainer.precision == "32-true"  # the policy, not autocast, makes bf16
    init_args = expected["strategy"]["init_args"]
    assert init_args["data_parallel_size"] == "auto" and init_args["tensor_parallel_size"] == 1
    assert strategy.param_dtype == init_args["param_dtype"] == "bf16"
    assert strategy.sharded_checkpoints is init_args["save_distributed_checkpoint"] is True


def test_multinode_config_under_slurm_takes_the_ranks_from_srun(monkeypatch):
    # what srun sets for task 3 of `--nodes=2 --ntasks-per-node=2` (CPU stand-in for 2 x 8 GPUs)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODEID", "1")
    monkeypatch.setenv("SLURM_NODELIST", "node[07-08]")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_JOB_NAME", "advmim")
    base = ("-c", "trainer/multinode.yaml", "--trainer.accelerator", "cpu")
    trainer = cli(*base, "--trainer.devices", "2").trainer
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (4, 3, 1, 1)
    assert trainer.strategy.cluster_environment.main_address == "node07"
    assert isinstance(trainer.strategy, DDPStrategy)
    # devices that disagree with --ntasks-per-node are refused when the launcher starts, before any training
    trainer = cli(*base, "--trainer.devices", "1").trainer
    with pytest.raises(ValueError, match="ntasks-per-node=2"):
        trainer.strategy.cluster_environment.validate_settings(trainer.num_devices, trainer.num_nodes)


@pytest.mark.parametrize("inside_slurm", [False, True])
def test_multinode_config_under_torchrun_takes_the_ranks_from_torchrun(inside_slurm, monkeypatch):
    # what torchrun sets for local process 0 on node 1 of `--nnodes 2 --nproc_per_node 1`
    for name, value in dict(
        TORCHELASTIC_RUN_ID="advmim",
        RANK="1",
        LOCAL_RANK="0",
        GROUP_RANK="1",
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29500",
    ).items():
        monkeypatch.setenv(name, value)
    if inside_slurm:  # torchrun started by one srun task per node: scripts/torchrun_multinode.sh hides SLURM
        monkeypatch.setenv("SLURM_NTASKS", "2")
        monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")
        monkeypatch.setenv("SLURM_JOB_NAME", "interactive")
    args = ("-c", "trainer/multinode.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "1")
    trainer = cli(*args).trainer
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.node_rank) == (2, 1, 1)
    # devices x num_nodes that disagree with torchrun's world size are refused when the launcher starts
    with pytest.raises(ValueError, match="does not match the world size"):
        trainer.strategy.cluster_environment.validate_settings(num_devices=2, num_nodes=2)
