"""FSDP2 (``advmim_pl.sharding.FSDP2Strategy``) on 2 CPU processes (gloo), against DDP: MAE, SimMIM and data2vec 2.0
(its EMA teacher sharded like the student), each with the AEMIM plug-in (its branch norms and its PGD input gradient
through sharded blocks), and MAE with the bf16
policy of GPU runs forced onto the CPU.

All Trainer runs happen in one launch of 2 processes, started as torchrun would (``fsdp_runs``); each rank saves
what it saw, and the tests check it: the parameters are sharded (each rank holds half of a block's weight, a
different half), a few steps give DDP's losses and final weights to fp32 tolerance (with activation checkpointing
too), a sharded checkpoint resumes exactly, a failed save keeps the previous checkpoint, and ``init_from`` loads a
sharded folder and public timm weights into a sharded run. ``advmim export``, ``init_from``'s reader and
``consolidate`` read the run's sharded folder in this process afterwards, and the trust rule refuses a folder from
elsewhere.
"""

import os
import shutil
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import load_file
from torch import multiprocessing
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

from advmim_pl.adversarial import AEMIM
from advmim_pl.cli import run
from advmim_pl.data import SyntheticDataModule
from advmim_pl.modules import pretrain
from advmim_pl.reliability import CheckpointError
from advmim_pl.sharding import (
    TRUST_VARIABLE,
    FSDP2Strategy,
    UntrustedCheckpointError,
    check_trusted,
    consolidate,
    data_parallel_mesh,
    is_sharded,
    mixed_precision,
    read_sharded,
    replace_folder,
)
from advmim_pl.weights import encoder_state_dict, read_weights
from tests.helpers.micro import MICRO_VIT, micro_module, trainer
from tests.helpers.ranks import deadline

pytestmark = pytest.mark.long

WORLD = 2
STEPS, SAVED_AT = 4, 2  # 64 images, 8 per rank and step: 4 steps in one epoch; the resumed run starts at step 2
BLOCK_WEIGHT = "encoder.vit.blocks.0.attn.qkv.weight"
AUX_NORM = "encoder.vit.blocks.0.norm1.aux.weight"  # a BranchNorm's auxiliary copy, inside a sharded block
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32: DDP all-reduces, FSDP2 reduce-scatters; summation orders may differ
HOSTS = ("mae", "simmim", "data2vec2")  # data2vec 2.0: its EMA teacher sharded like the student
LAUNCH_DEADLINE = 300  # the launch takes ~35 s alone on 2 cores; slower beside the other -n 2 worker


def data() -> SyntheticDataModule:
    return SyntheticDataModule(
        num_samples=64, num_val_samples=8, batch_size=8, img_size=32, channels=1, num_workers=0, pin_memory=False,
        device_resident=False,
    )  # fmt: skip


def full_state(module: L.LightningModule) -> dict[str, torch.Tensor]:
    """The module's weights, sharded ones gathered (all ranks must call it), on the CPU."""
    return {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu().clone()
        for name, value in module.state_dict().items()
    }


class Record(L.Callback):
    """Per rank: the loss of every step, the gathered weights at the start and the end of training, and this rank's
    own piece of a block weight and of an auxiliary norm (its local shard under FSDP2) at the end."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.record: dict = {}

    def setup(self, trainer, pl_module, stage) -> None:
        torch.set_num_threads(1)

    def on_train_start(self, trainer, pl_module) -> None:
        self.record["start"] = full_state(pl_module)
        self.record["start_step"] = trainer.global_step
        block = pl_module.encoder.vit.blocks[0]
        block.register_forward_hook(lambda module, args, output: self.record.update(block_dtype=output.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["end"] = full_state(pl_module)
        params = dict(pl_module.named_parameters())
        for key, name in (("local", BLOCK_WEIGHT), ("local_aux", AUX_NORM)):
            value = params[name]
            self.record[key] = (value.to_local() if isinstance(value, DTensor) else value).detach().clone()
        mesh = pl_module.device_mesh
        self.record["mesh"] = None if mesh is None else (tuple(mesh.shape), mesh.mesh_dim_names)
        self.record["losses"] = self.losses


class Poison(L.Callback):
    """Once armed, puts an object into the checkpoint that cannot be pickled: rank 0's write of Lightning's
    ``meta.pt`` fails after every rank has written its shard."""

    armed = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.armed:
            checkpoint["poison"] = lambda: None


def fit(root: Path, strategy, method: str, ckpt_dir: str | None = None, ckpt_path: Path | None = None,
        steps: int = STEPS, **options) -> tuple[dict, L.Trainer]:  # fmt: skip
    """``steps`` steps of ``method`` + AEMIM on 2 ranks under ``strategy``, logging into ``root``; a checkpoint
    every ``SAVED_AT`` steps into ``root / ckpt_dir`` when given. Returns this rank's record and the trainer."""
    L.seed_everything(0, verbose=False)
    module = micro_module(method, plugin=AEMIM(), **options)
    record, poison = Record(), Poison()
    callbacks = [record, poison]
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(root / ckpt_dir, "{step}", every_n_train_steps=SAVED_AT, save_top_k=-1))
    run_trainer = trainer(
        steps, callbacks, devices=WORLD, strategy=strategy, limit_val_batches=0, default_root_dir=root,
        enable_checkpointing=bool(ckpt_dir),
    )  # fmt: skip
    run_trainer.fit(module, datamodule=data(), ckpt_path=ckpt_path)
    return record.record, run_trainer


def ddp() -> DDPStrategy:
    return DDPStrategy(start_method="popen")


def listing(folder: Path) -> list[tuple[str, int, int]]:
    """Every file under ``folder``: (relative path, size, modification time in ns)."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*"))


def worker(rank: int, root: Path, port: int, public: Path) -> None:
    """One of the WORLD processes: every phase, in order; saves ``root / f"rank{rank}.pt"``."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", WORLD_SIZE=str(WORLD),
        NODE_RANK="0", LOCAL_RANK=str(rank), RANK=str(rank),
    )  # fmt: skip
    out: dict = {}
    for method in HOSTS:
        runs = root / method
        out[method, "ddp"] = fit(runs / "ddp", ddp(), method)[0]
        out[method, "fsdp"], fsdp_trainer = fit(runs, FSDP2Strategy(), method, ckpt_dir="straight")
        saved = runs / "straight" / f"step={SAVED_AT}.ckpt"
        if method == "mae":  # resumed from the run's own folder
            out[method, "resumed"] = fit(runs, FSDP2Strategy(), method, "resumed", ckpt_path=saved)[0]
            # a sharded folder from elsewhere is refused ...
            elsewhere = root / "elsewhere" / saved.name
            if rank == 0:
                shutil.copytree(saved, elsewhere)
            fsdp_trainer.strategy.barrier()
            try:
                fit(runs, FSDP2Strategy(), method, ckpt_path=elsewhere)
            except UntrustedCheckpointError as err:
                out["refused"] = str(err)
            # a save that fails keeps the previous checkpoint at that path
            before = listing(saved) if rank == 0 else None
            next(cb for cb in fsdp_trainer.callbacks if isinstance(cb, Poison)).armed = True
            try:
                fsdp_trainer.save_checkpoint(saved)
            except CheckpointError as err:
                out["failed_save"] = str(err)
            if rank == 0:
                out["kept"] = (before, listing(saved), sorted(p.name for p in saved.parent.iterdir()))
            out["mae", "checkpointed"] = fit(runs / "ac", FSDP2Strategy(), method, activation_checkpointing=True)[0]
            # the GPU's policy (bf16 parameters and compute, fp32 reduction), forced onto the CPU
            pretrain.mixed_precision = lambda *args: MixedPrecisionPolicy(torch.bfloat16, torch.float32)
            out["mae", "bf16"] = fit(runs / "bf16", FSDP2Strategy(), method)[0]
            pretrain.mixed_precision = mixed_precision
            # init_from a sharded folder (trusted by the variable: a module reads it before any run exists) ...
            final = runs / "straight" / f"step={STEPS}.ckpt"
            os.environ[TRUST_VARIABLE] = str(runs / "straight")
            out["init_sharded"] = fit(runs / "init", FSDP2Strategy(), method, steps=1, init_from=str(final))[0]
            del os.environ[TRUST_VARIABLE]
            # ... and public timm weights
            out["init_public"] = fit(runs / "init", FSDP2Strategy(), method, steps=1, init_from=str(public))[0]
        else:  # SimMIM, data2vec 2.0: resumed from a copy elsewhere, in a folder the user trusts
            elsewhere = root / f"elsewhere_{method}" / saved.name
            if rank == 0:
                shutil.copytree(saved, elsewhere)
            fsdp_trainer.strategy.barrier()
            os.environ[TRUST_VARIABLE] = str(elsewhere.parent)
            out[method, "resumed"] = fit(runs, FSDP2Strategy(), method, ckpt_path=elsewhere)[0]
            del os.environ[TRUST_VARIABLE]
    # a mesh of data_parallel=1 x tensor_parallel=2 (ModelParallelStrategy's defaults on one node) is refused
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1, WORLD), mesh_dim_names=MESH_NAMES)
    try:
        data_parallel_mesh(mesh)
    except ValueError as err:
        out["tp_mesh"] = str(err)
    torch.save(out, root / f"rank{rank}.pt")


MESH_NAMES = ("data_parallel", "tensor_parallel")


def public_weights(path: Path) -> Path:
    """A timm ViT state dict of the micro architecture, random with seed 1: public weights as timm saves them."""
    torch.manual_seed(1)
    vit = timm.create_model("vit_base_patch16_224", num_classes=0, img_size=32, patch_size=4, in_chans=1, **MICRO_VIT)
    torch.save(vit.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The launch: (its folder, per rank what ``worker`` saved)."""
    root = tmp_path_factory.mktemp("fsdp")
    public = public_weights(root / "public.pth")
    os.environ.pop(TRUST_VARIABLE, None)
    with deadline(LAUNCH_DEADLINE, "2 ranks of FSDP2 and DDP runs"):
        multiprocessing.spawn(worker, args=(root, find_free_network_port(), public), nprocs=WORLD)
    return root, [torch.load(root / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def assert_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, name=name: f"{what}: {name}: {m}")


# ---- sharding and agreement with DDP ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", HOSTS)
def test_fsdp2_shards_each_block_across_the_ranks(fsdp_runs, method):
    ranks = fsdp_runs[1]
    records = [r[method, "fsdp"] for r in ranks]
    assert records[0]["mesh"] == ((WORLD, 1), MESH_NAMES)  # data_parallel = world size, tensor_parallel = 1
    full = records[0]["end"][BLOCK_WEIGHT]
    locals_ = [r["local"] for r in records]
    assert all(piece.shape == (full.shape[0] // WORLD, *full.shape[1:]) for piece in locals_)  # 1/world per rank
    assert not torch.equal(locals_[0], locals_[1])  # different halves ...
    assert torch.equal(torch.cat(locals_), full)  # ... that make up the whole weight
    aux = [r["local_aux"] for r in records]
    assert torch.equal(torch.cat(aux), records[0]["end"][AUX_NORM])  # the branch norms are sharded with their block
    for rank in ranks:  # DDP replicates instead
        assert rank[method, "ddp"]["local"].shape == full.shape


@pytest.mark.parametrize("method", HOSTS)
def test_fsdp2_steps_give_the_losses_and_weights_of_ddp(fsdp_runs, method):
    ranks = fsdp_runs[1]
    ddp_run = ranks[0][method, "ddp"]
    assert_close(ranks[1][method, "ddp"]["end"], ddp_run["end"], "DDP ranks")
    assert_close(ranks[0][method, "fsdp"]["start"], ddp_run["start"], "initial weights")
    changed = [name for name in ddp_run["start"] if not torch.equal(ddp_run["start"][name], ddp_run["end"][name])]
    assert BLOCK_WEIGHT in changed and AUX_NORM in changed  # trained, the auxiliary branch too
    for rank in ranks:
        fsdp = rank[method, "fsdp"]
        assert len(fsdp["losses"]) == STEPS
        torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(rank[method, "ddp"]["losses"]), **TOL)
        assert_close(fsdp["end"], ddp_run["end"], f"{method}, rank {rank}")  # the ranks agree, with DDP


def test_fsdp2_with_activation_checkpointing_gives_the_weights_of_ddp(fsdp_runs):
    for rank in fsdp_runs[1]:
        checkpointed, ddp_run = rank["mae", "checkpointed"], rank["mae", "ddp"]
        torch.testing.assert_close(torch.tensor(checkpointed["losses"]), torch.tensor(ddp_run["losses"]), **TOL)
        assert_close(checkpointed["end"], ddp_run["end"], "activation checkpointing")


def test_the_bf16_policy_computes_in_bf16_and_tracks_fp32(fsdp_runs):
    """FSDP2's mixed-precision policy of GPU runs, on the CPU: every dtype meets its kind (the pixel normalisation's
    fp32 output and the bf16 patch embedding, the attack's fp32 input gradient), and the losses follow fp32's."""
    for rank in fsdp_runs[1]:
        bf16, fp32 = rank["mae", "bf16"], rank["mae", "fsdp"]
        assert bf16["block_dtype"] == torch.bfloat16 and fp32["block_dtype"] == torch.float32
        torch.testing.assert_close(torch.tensor(bf16["losses"]), torch.tensor(fp32["losses"]), rtol=3e-2, atol=0)
        assert bf16["end"][BLOCK_WEIGHT].dtype == torch.float32  # the sharded parameters themselves stay fp32
        assert not torch.equal(bf16["end"][BLOCK_WEIGHT], fp32["end"][BLOCK_WEIGHT])  # bf16 arithmetic did run


def test_a_mesh_without_data_parallel_ranks_is_refused_in_one_line(fsdp_runs):
    message = fsdp_runs[1][0]["tp_mesh"]
    assert "data_parallel=1 x tensor_parallel=2" in message and "tensor_parallel_size: 1" in message
    assert "\n" not in message


# ---- sharded checkpoints ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", HOSTS)
def test_a_sharded_checkpoint_resumes_exactly(fsdp_runs, method):
    root, ranks = fsdp_runs
    saved = root / method / "straight" / f"step={SAVED_AT}.ckpt"
    assert is_sharded(saved) and len(list(saved.glob("*.distcp"))) == WORLD  # one shard file per rank
    for rank in ranks:
        straight, resumed = rank[method, "fsdp"], rank[method, "resumed"]
        assert resumed["start_step"] == SAVED_AT
        assert resumed["losses"] == straight["losses"][SAVED_AT:]
        for name, value in straight["end"].items():
            assert torch.equal(resumed["end"][name], value), name


def test_a_sharded_folder_from_elsewhere_is_refused_unless_trusted(fsdp_runs):
    """MAE's resume from a copy of its checkpoint outside the run's folders is refused on every rank (none waits for
    the others); SimMIM's resume from such a copy in a folder named in the trust variable is exact (above)."""
    message = fsdp_runs[1][0]["refused"]
    assert "elsewhere" in message and "refused" in message and TRUST_VARIABLE in message and "\n" not in message
    assert fsdp_runs[1][1]["refused"] == message


def test_a_failed_sharded_save_keeps_the_previous_checkpoint(fsdp_runs):
    root, ranks = fsdp_runs
    for rank in ranks:
        assert "could not write sharded checkpoint" in rank["failed_save"] and "unchanged" in rank["failed_save"]
    before, after, names = ranks[0]["kept"]
    assert after == before  # every file as it was, to the nanosecond
    assert names == [f"step={SAVED_AT}.ckpt", f"step={STEPS}.ckpt"]  # no .partial or .old left


def test_replace_folder_swaps_in_the_new_folder(tmp_path):
    path, new = tmp_path / "last.ckpt", tmp_path / "last.ckpt.partial"
    for content in ("first", "second"):
        new.mkdir()
        (new / "shard").write_text(content)
        replace_folder(new, path)
        assert (path / "shard").read_text() == content and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ---- reading sharded folders: export, init_from, consolidate ---------------------------------------------------------
def test_init_from_loads_a_sharded_folder_and_public_weights_into_a_sharded_run(fsdp_runs):
    root, ranks = fsdp_runs
    source = ranks[0]["mae", "fsdp"]["end"]  # the weights of step=4.ckpt
    public = torch.load(root / "public.pth", weights_only=True)
    for rank in ranks:
        start = rank["init_sharded"]["start"]
        for name, value in source.items():
            if name.startswith(("encoder.", "decoder.")) and ".aux." not in name:
                assert torch.equal(start[name], value), name
        # the auxiliary norms and decoder start as copies of the loaded clean ones
        assert torch.equal(start[AUX_NORM], source[AUX_NORM.replace(".aux.", ".clean.")])
        assert torch.equal(start["aux_decoder.pred.weight"], source["decoder.pred.weight"])
        start = rank["init_public"]["start"]
        for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "patch_embed.proj.weight", "cls_token"):
            assert torch.equal(start[f"encoder.vit.{name}"], public[name]), name


def test_export_reads_a_trusted_sharded_folder(fsdp_runs, tmp_path, monkeypatch, capsys):
    root, ranks = fsdp_runs
    folder = root / "mae" / "straight" / f"step={STEPS}.ckpt"
    encoder = encoder_state_dict(ranks[0]["mae", "fsdp"]["end"])
    output = tmp_path / "encoder.safetensors"
    monkeypatch.delenv(TRUST_VARIABLE, raising=False)
    with pytest.raises(SystemExit) as refused:
        run(["export", str(folder), str(output)])
    assert refused.value.code == 2 and not output.exists()
    assert "sharded checkpoint folder outside the trusted folders" in capsys.readouterr().err
    monkeypatch.setenv(TRUST_VARIABLE, str(root / "mae"))
    run(["export", str(folder), str(output)])
    exported = load_file(output)
    assert exported.keys() == encoder.keys()
    for name, value in encoder.items():
        assert torch.equal(exported[name], value), name


def test_init_from_reader_and_consolidate_read_a_trusted_sharded_folder(fsdp_runs, tmp_path, monkeypatch):
    root, ranks = fsdp_runs
    folder = root / "mae" / "straight" / f"step={STEPS}.ckpt"
    final = ranks[0]["mae", "fsdp"]["end"]
    monkeypatch.delenv(TRUST_VARIABLE, raising=False)
    with pytest.raises(UntrustedCheckpointError, match="init_from"):
        read_weights(str(folder))
    with pytest.raises(UntrustedCheckpointError):
        consolidate(folder, tmp_path / "model.ckpt")
    monkeypatch.setenv(TRUST_VARIABLE, os.pathsep.join(["/nonexistent", str(root)]))
    weights = read_weights(str(folder))
    assert weights.encoder.keys() == encoder_state_dict(final).keys()
    assert all(torch.equal(weights.encoder[k], v) for k, v in encoder_state_dict(final).items())
    assert torch.equal(weights.decoder["pred.weight"], final["decoder.pred.weight"])
    single = consolidate(folder, tmp_path / "model.ckpt")
    checkpoint = torch.load(single, weights_only=True)  # one weights-only file
    assert checkpoint["global_step"] == STEPS and checkpoint["hyper_parameters"]["encoder"] == "vit_base_patch16_224"
    assert checkpoint["state_dict"].keys() == final.keys()
    assert all(torch.equal(checkpoint["state_dict"][k], v) for k, v in final.items())
    assert read_sharded(folder)["global_step"] == STEPS


def test_check_trusted_resolves_links_out_of_the_trusted_folders(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_VARIABLE, raising=False)
    own, outside = tmp_path / "run", tmp_path / "downloads" / "x.ckpt"
    own.mkdir()
    outside.mkdir(parents=True)
    (own / "link.ckpt").symlink_to(outside)
    check_trusted(own / "checkpoints" / "last.ckpt", own=[own])
    with pytest.raises(UntrustedCheckpointError, match="downloads"):
        check_trusted(own / "link.ckpt", own=[own])  # a link inside the run to a folder outside it
    check_trusted(outside, own=[own], trusted=True)


def test_mixed_precision_is_bf16_with_fp32_reduction_on_cuda_at_32_true():
    assert mixed_precision(torch.device("cpu"), "32-true") is None  # CPUs: fp32
    policy = mixed_precision(torch.device("cuda", 0), "32-true")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision(torch.device("cuda", 0), "32-true", "fp32") is None
    with pytest.raises(ValueError, match="'bf16-mixed'.*32-true"):
        mixed_precision(torch.device("cuda", 0), "bf16-mixed")
