"""The ``advmim`` command: LightningCLI for fit/validate/test/predict, plus ``export`` and ``prepare``.

The command's parts live in ``cli_configs`` (``-c NAME`` lookup), ``cli_errors`` (one-line errors),
``cli_resume`` (``--ckpt_path`` and ``init_from``) and ``cli_commands`` (``export``, ``prepare``); this module is
LightningCLI's subclass, built on its public hooks only, and the entry point."""

import inspect
import sys

from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.core import LightningModule
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from advmim_pl.checks import plain
from advmim_pl.cli_commands import EXPORT_HELP, HELP, dispatch
from advmim_pl.cli_configs import resolve_config, resolve_config_args, shipped_configs
from advmim_pl.cli_errors import OneLineErrorParser, refuse
from advmim_pl.cli_resume import check_ckpt_path, resolve_resume
from advmim_pl.errors import EvaluationInputError
from advmim_pl.preemption import Preemption
from advmim_pl.reliability import (
    CheckpointError,
    NonFiniteGuard,
    NonFiniteStop,
    SafeCheckpointIO,
    UnsafeCheckpointError,
)

__all__ = ["EXPORT_HELP", "AdvMIMCLI", "main", "resolve_config", "resolve_config_args", "run", "shipped_configs"]

DESCRIPTION = (
    "Masked image modeling (MAE, SimMIM, MaskFeat) for timm Vision Transformers, with the AEMIM adversarial "
    "plug-in. fit, validate, test and predict run a config (-c NAME: a file or a shipped config); export writes "
    "a trained encoder for timm; prepare writes an ImageFolder as streaming shards."
)


class AdvMIMParser(OneLineErrorParser):
    """The parser of ``advmim``: one-line errors, and the subcommands action kept (``subcommands_action``) so that
    the CLI can list ``export`` and ``prepare`` beside Lightning's subcommands."""

    def add_subcommands(self, required: bool = True, dest: str = "subcommand", **kwargs):
        self.subcommands_action = super().add_subcommands(required=required, dest=dest, **kwargs)
        return self.subcommands_action


def subcommand_config(config: Namespace) -> Namespace:
    """The part of a parsed or instantiated config that belongs to its subcommand (all of it when it has none)."""
    return config.get(str(config.get("subcommand")), config)


def drop_unaccepted_num_classes(model: LightningModule | None) -> None:
    """Remove the ``num_classes`` the data -> model link leaves in the hparams of a model that does not take it
    (public ``save_hyperparameters``, so checkpoints and hparams.yaml stay loadable)."""
    if model is None or "num_classes" not in model.hparams:
        return
    if "num_classes" not in inspect.signature(type(model).__init__).parameters:
        model.save_hyperparameters(ignore=["num_classes"])  # drops it from hparams and hparams_initial


class AdvMIMCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    - The AEMIM plug-in is one block of the model, ``model.init_args.plugin`` (null: the plain MIM baseline).
    - ``checkpoint:`` (last + best on ``val/loss``), ``nonfinite:`` (skip non-finite steps), ``preemption:``,
      ``lr_monitor:`` and ``progress_bar:`` are always on (``trainer.enable_progress_bar: false`` drops the bar);
      checkpoints are read through ``SafeCheckpointIO``.
    - ``--ckpt_path`` is read weights-only before anything else reads it; ``--ckpt_path last`` resumes the newest run
      in ``runs/`` and keeps logging into it (``cli_resume`` has the rule for ``init_from``).
    - Image size, channels, normalisation and batch size flow from the DataModule to the model, and so does
      ``num_classes`` for the classification modules.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("parser_class", AdvMIMParser)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        trainer_defaults = {
            "precision": "bf16-mixed",
            "inference_mode": False,  # attacks in validation/test need autograd
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "advmim"},
            },
        }
        kwargs["trainer_defaults"] = {**trainer_defaults, **kwargs.get("trainer_defaults", {})}
        kwargs["parser_kwargs"] = {"description": DESCRIPTION, **(kwargs.get("parser_kwargs") or {})}
        super().__init__(**kwargs)

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        """Lightning's subcommands plus ``export`` and ``prepare``, so that ``advmim --help`` lists them with their
        one-line descriptions; ``run`` dispatches them itself, before LightningCLI parses anything."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:  # run=False: the classes only
            return
        for name, description in HELP.items():
            parser = ArgumentParser(prog=f"advmim {name}", description=description)
            self.parser.subcommands_action.add_subcommand(name, parser, help=description)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-{epoch:03d}-{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(Preemption, "preemption")  # SIGTERM: checkpoint at a step boundary, exit 143
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(RichProgressBar, "progress_bar")
        for source, target in (
            ("img_size", "img_size"),
            ("channels", "in_chans"),
            ("mean", "mean"),
            ("std", "std"),
            ("batch_size", "batch_size"),
        ):
            # plain numbers: the data modules keep jsonargparse's PositiveInt, their hparams plain int, and Lightning
            # refuses to log a model and data pair whose shared hparams differ in type
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", plain, apply_on="instantiate")
        # Classification modules take num_classes from the data. jsonargparse skips an instantiation link whose
        # target the chosen model class lacks (PretrainModule) or whose source object lacks the attribute, but it
        # still reports the link as applied, and Lightning then writes num_classes into the model's hparams (which
        # breaks --ckpt_path on its checkpoints): instantiate_classes drops it again (drop_unaccepted_num_classes).
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", plain, apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, then check an explicit ``--ckpt_path`` (``cli_resume.check_ckpt_path``): the last public hook
        before LightningCLI reads the hyperparameters in the file, so a refused or unreadable file is one line."""
        super().parse_arguments(parser, args)
        check_ckpt_path(subcommand_config(self.config))

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path last``: the newest checkpoint, or a new run when ``fit`` has none yet
        (``cli_resume.resolve_resume``)."""
        resolve_resume(subcommand_config(self.config), str(self.subcommand))

    def instantiate_classes(self) -> None:
        """Constructor checks (sizes, paths, options, devices the machine lacks) become one-line configuration
        errors, not tracebacks."""
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError, TypeError, ModuleNotFoundError, MisconfigurationException) as err:
            cause = err
            while cause.__cause__ is not None:  # the constructor's own error, below one union error per nesting level
                cause = cause.__cause__
            if isinstance(cause, UnsafeCheckpointError):
                refuse("advmim", cause)
            raise SystemExit(f"advmim: invalid configuration: {type(cause).__name__}: {cause}") from None
        drop_unaccepted_num_classes(getattr(self, "model", None))

    def instantiate_trainer(self, **kwargs):
        """Checkpoints are read through ``SafeCheckpointIO`` unless ``trainer.plugins`` brings a ``CheckpointIO``;
        ``trainer.enable_progress_bar: false`` also drops the always-on ``progress_bar`` (a no-op callback takes its
        place: Lightning refuses a progress bar callback beside that flag)."""
        config = subcommand_config(self.config_init)
        trainer_config = config.get("trainer") or {}
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, SafeCheckpointIO()]
        if trainer_config.get("enable_progress_bar") is False and "progress_bar" in config:
            config["progress_bar"] = Callback()
        return super().instantiate_trainer(**kwargs)


def run(argv: list[str] | None = None) -> AdvMIMCLI | None:
    """Run an ``advmim`` command; ``argv`` defaults to the command line. Returns the CLI (None for ``export`` and
    ``prepare``), so that tests and notebooks can look at the trainer and the model afterwards."""
    args = sys.argv[1:] if argv is None else argv
    if dispatch(args):
        return None
    try:
        if argv is None:
            sys.argv[1:] = resolve_config_args(args)
            return AdvMIMCLI()
        return AdvMIMCLI(args=resolve_config_args(args))
    except UnsafeCheckpointError as err:
        refuse("advmim", err)
    except (CheckpointError, EvaluationInputError, NonFiniteStop) as err:
        raise SystemExit(f"advmim: {err}") from None


def main() -> None:
    """The ``advmim`` console script: runs the command line and exits with status 0 on success."""
    run()


if __name__ == "__main__":
    main()
