"""``--ckpt_path`` and pre-training's ``init_from``: ``last`` is resolved before the two are weighed, so one command
line (``init_from`` and ``--ckpt_path last`` included) starts a preempted job from ``init_from`` and resumes it on
every later attempt; an explicit checkpoint beside ``init_from`` is refused in one line."""

import logging
from pathlib import Path

import pytest
import torch
from jsonargparse import Namespace

from advmim_pl.cli import run
from advmim_pl.cli_resume import check_ckpt_path, resolve_resume
from tests.helpers.micro import MICRO_MAE_FLAGS, micro_module, save

PRETRAIN, FINETUNE = "advmim_pl.modules.PretrainModule", "advmim_pl.modules.FinetuneModule"


def config(tmp_path: Path, ckpt_path: str | None, model: str = PRETRAIN, logger: str = "TensorBoardLogger"):
    """A subcommand's parsed config, as LightningCLI hands it to ``before_instantiate_classes``."""
    logger_args = Namespace(save_dir=str(tmp_path / "runs"), name="advmim", version=None)
    return Namespace(
        ckpt_path=ckpt_path,
        trainer=Namespace(
            default_root_dir=str(tmp_path),
            logger=Namespace(class_path=f"lightning.pytorch.loggers.{logger}", init_args=logger_args),
        ),
        model=Namespace(class_path=model, init_args=Namespace(init_from="start.pth")),
    )


def last_checkpoint(tmp_path: Path, version: int) -> Path:
    path = tmp_path / "runs" / "advmim" / f"version_{version}" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # resolve_last only looks at names and times
    return path


def test_last_without_a_checkpoint_starts_from_init_from(tmp_path):
    cfg = config(tmp_path, "last")
    resolve_resume(cfg, "fit")
    assert cfg.ckpt_path is None and cfg.model.init_args.init_from == "start.pth"


def test_last_with_a_checkpoint_resumes_it_and_says_that_init_from_does_not_decide_the_weights(tmp_path, caplog):
    path = last_checkpoint(tmp_path, 3)
    cfg = config(tmp_path, "last")
    with caplog.at_level(logging.INFO):
        resolve_resume(cfg, "fit")
    assert cfg.ckpt_path == str(path) and cfg.trainer.logger.init_args.version == 3
    assert cfg.model.init_args.init_from == "start.pth"  # still the run's source, as on its first attempt
    (line,) = [r.getMessage() for r in caplog.records if "init_from" in r.getMessage()]
    assert f"--ckpt_path last resumes {path}" in line and "replace those of model.init_args.init_from start.pth" in line


def test_an_explicit_checkpoint_beside_init_from_is_refused(tmp_path):
    path = last_checkpoint(tmp_path, 0)
    refusal = r"--ckpt_path \S+last.ckpt resumes a run .*\.init_from start.pth starts a new one"
    with pytest.raises(SystemExit, match=refusal):
        check_ckpt_path(config(tmp_path, str(path)))


def test_fine_tuning_may_name_a_checkpoint_beside_init_from(tmp_path):
    path = str(tmp_path / "no_such.ckpt")  # not a file: nothing to read
    check_ckpt_path(config(tmp_path, path, model=FINETUNE))
    with pytest.raises(SystemExit, match="give one of them"):
        check_ckpt_path(config(tmp_path, path))


def test_last_with_another_logger_is_left_to_lightnings_own_lookup(tmp_path, caplog):
    last_checkpoint(tmp_path, 0)
    cfg = config(tmp_path, "last", logger="CSVLogger")
    with caplog.at_level(logging.INFO):
        check_ckpt_path(cfg)
        resolve_resume(cfg, "fit")
    assert cfg.ckpt_path == "last" and cfg.model.init_args.init_from == "start.pth"
    assert not [r for r in caplog.records if "init_from" in r.getMessage()]


def test_a_requeued_command_with_init_from_and_last_starts_then_resumes(tmp_path, monkeypatch):
    """The same command line twice, as a preemption requeue runs it: the first attempt starts from init_from's
    weights, the second resumes the first's last.ckpt in the same run folder."""
    monkeypatch.chdir(tmp_path)
    start = save(micro_module(seed=1), tmp_path / "start.ckpt")
    command = ["fit", "-c", "quickstart.yaml", *MICRO_MAE_FLAGS, "--model.init_args.init_from", start,
               "--ckpt_path", "last", "--trainer.limit_val_batches", "0", "--trainer.precision", "32-true",
               "--data.init_args.num_workers", "0", "--trainer.max_steps"]  # fmt: skip
    first = run([*command, "2"])
    last = Path(first.trainer.checkpoint_callback.last_model_path)
    assert first.trainer.ckpt_path is None and first.trainer.global_step == 2 and last.parts[-3] == "version_0"
    assert torch.load(last, weights_only=True)["init_from"] == start  # the run started from init_from's weights

    second = run([*command, "3"])
    assert second.trainer.ckpt_path == str(last) and second.trainer.global_step == 3
    assert sorted(p.name for p in (tmp_path / "runs" / "advmim").iterdir()) == ["version_0"]  # the same run folder
    assert torch.load(last, weights_only=True)["init_from"] == start  # still the run's source after the resume
