"""The ``advmim`` command: LightningCLI for fit/validate/test/predict, plus ``export``."""

import argparse
import inspect
import os
import re
import sys
from importlib.resources import files
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from advmim_pl.checks import plain
from advmim_pl.errors import EvaluationInputError
from advmim_pl.preemption import Preemption, resolve_last
from advmim_pl.reliability import (
    REFUSED_EXIT_CODE,
    CheckpointError,
    NonFiniteGuard,
    NonFiniteStop,
    SafeCheckpointIO,
    UnsafeCheckpointError,
    read_checkpoint,
)

CONFIG_FLAGS = ("--config", "-c")
DESCRIPTION = "Masked image modeling (MAE, SimMIM) with the AEMIM adversarial plug-in."
EXPORT_HELP = (
    "Write the clean encoder of a pre-training checkpoint as a timm safetensors file or folder, optionally pushed "
    "to the Hub."
)


def shipped_configs() -> list[str]:
    """Relative paths of the YAML configs shipped inside the package."""
    root = Path(str(files("advmim_pl.configs")))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))


def resolve_config(name: str) -> str:
    """An existing path is used as is; otherwise ``name`` (with or without .yaml, with or without a
    leading ``configs/``) is looked up among the shipped configs."""
    if Path(name).exists():
        return name
    root = Path(str(files("advmim_pl.configs")))
    stem = name.removeprefix("configs/")
    for candidate in (stem, f"{stem}.yaml"):
        if (root / candidate).is_file():
            return str(root / candidate)
    listing = "\n  ".join(shipped_configs())
    raise SystemExit(f"advmim: config {name!r} is neither a file nor a shipped config. Shipped configs:\n  {listing}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite every ``--config NAME`` / ``-c NAME`` / ``--config=NAME`` with ``resolve_config``."""
    out, expect_value = [], False
    for arg in argv:
        if expect_value:
            out.append(resolve_config(arg))
            expect_value = False
        elif arg in CONFIG_FLAGS:
            out.append(arg)
            expect_value = True
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def innermost_error(message: str) -> str:
    """jsonargparse's nested parse error -> one line: the full key (``model.init_args.aux_weight``) and the innermost
    reason, which names the value and the bound or type; other errors with their lines joined."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    keys = [i for i, line in enumerate(lines) if re.match(r'Parser key "[^"]+"', line)]
    if not keys:
        return " ".join(lines)
    path = ".init_args.".join(re.match(r'Parser key "([^"]+)"', lines[i]).group(1) for i in keys)
    inner = lines[keys[-1] + 1 :]
    given = next((line.removeprefix("Given value: ") for line in inner if line.startswith("Given value: ")), None)
    skipped = ("Does not validate", "Subtypes:", "Given value", "- Expected a <class 'NoneType'>")
    reasons = [line.removeprefix("- ") for line in inner if not line.endswith(":") and not line.startswith(skipped)]
    classes = [
        m.group(1) for line in inner if (m := re.match(r"(?:- )?Problem with given class_path '([^']+)':", line))
    ]
    if reasons and not reasons[0].startswith("Expected a"):
        reason = f"{classes[-1]}: {reasons[0]}" if classes else reasons[0]
    elif given is not None:
        expected = [m.group(1) for line in inner if (m := re.match(r"- Expected a <class '([^']+)'>", line))]
        reason = f"{given!r} is not a valid value" + (f": expected {' or '.join(expected)}" if expected else "")
    else:
        reason = lines[keys[-1]]
    return f"{path}: {reason}"


PLUGIN_OPTIONS = ("aux_weight", "aux_input", "aux_target", "branch_params", "aux_decoder", "aux_target_norm")
MOVED = (
    (
        r"--attack\b|'attack[.']|\battack\.init_args",
        "the attack: section is now part of the plug-in's one block, model.init_args.plugin (class_path: "
        "advmim_pl.adversarial.AEMIM, with eps, steps, ... among its init_args); --attack null is now "
        "--model.init_args.plugin null; fine-tuning takes model.init_args.attack (advmim_pl.adversarial.Attacker)",
    ),
    (
        rf"'((?:{'|'.join(PLUGIN_OPTIONS)}|aux_norm_floor))' is not accepted",
        "model.init_args.{0} moved into the plug-in's block: model.init_args.plugin.init_args.{0}",
    ),
    (
        r"'adversarial' is not accepted",
        "model.init_args.adversarial is gone: give model.init_args.plugin (pre-training, an "
        "advmim_pl.adversarial.AEMIM) or model.init_args.attack (fine-tuning, an advmim_pl.adversarial.Attacker)",
    ),
)


def moved_key_hint(message: str) -> str | None:
    """For a parse error caused by a key of the configs before the plug-in became one block, where it went."""
    for pattern, hint in MOVED:
        if match := re.search(pattern, message):
            return hint.format(*match.groups())
    return None


class OneLineErrorParser(LightningArgumentParser):
    """Lightning's parser, whose parse errors are one line naming the key, the value and the bound (the usage text
    belongs to ``--help``); exit code 2, as argparse's."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:  # jsonargparse trying the alternatives of a Union: it catches the exception
            return super().error(message, ex)
        subcommand = self.prog.replace(" [options]", "").split()[1:]  # the program's own name depends on how it ran
        prog = " ".join(["advmim", *subcommand[-1:]])
        hint = moved_key_hint(str(message))
        reason = innermost_error(str(message)) + (f"; {hint}" if hint else "")
        sys.stderr.write(f"{prog}: error: {reason} (every option: {prog} --help)\n")
        raise SystemExit(2)


class AdvMIMCLI(LightningCLI):
    """LightningCLI with the project's defaults.

    - The AEMIM plug-in is one block of the model, ``model.init_args.plugin`` (null: the plain MIM baseline);
      configs written for the earlier ``attack:`` section fail in one line that names the new keys.
    - ``checkpoint:`` (last + best on ``val/loss``), ``nonfinite:`` (skip non-finite steps), ``lr_monitor:`` and
      ``progress_bar:`` are always on; checkpoints are read through ``SafeCheckpointIO``.
    - ``--ckpt_path last`` resumes the newest run in ``runs/`` and keeps logging into it.
    - Image size, channels, normalisation and batch size flow from the DataModule to the model, and so does
      ``num_classes`` for the classification modules.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("parser_class", OneLineErrorParser)
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

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        """Lightning's subcommands plus ``export``, so that ``advmim --help`` lists it with its one-line description.
        ``run`` dispatches ``export`` itself, before LightningCLI parses anything."""
        super()._add_subcommands(parser, **kwargs)
        export = add_export_arguments(ArgumentParser(prog="advmim export", description=EXPORT_HELP))
        parser._subcommands_action.add_subcommand("export", export, help=EXPORT_HELP)

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
        # breaks --ckpt_path on its checkpoints): instantiate_classes drops it again (_drop_unaccepted_num_classes).
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", plain, apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads ``--ckpt_path``'s hyperparameters with ``torch.load``; read the file first, weights-only
        as every read here, so that a truncated checkpoint or one whose unpickling would run code is a one-line error.
        Pre-training refuses ``--ckpt_path`` together with ``init_from``: one resumes a run, the other starts a new
        one from weights only."""
        config = self.config.get(str(self.config.get("subcommand")), self.config)
        ckpt_path = config.get("ckpt_path") if isinstance(config, Namespace) else None
        model = config.get("model") if isinstance(config, Namespace) else None
        init_from = model.init_args.get("init_from") if isinstance(model, Namespace) and model.init_args else None
        if ckpt_path and init_from and str(model.class_path).endswith("PretrainModule"):
            raise SystemExit(
                f"advmim: --ckpt_path {ckpt_path} resumes a run (weights, optimizer, step, schedule) and "
                f"model.init_args.init_from {init_from} starts a new one from weights only: give one of them (to "
                "resume a run that started from init_from, add --model.init_args.init_from null)"
            )
        if ckpt_path and Path(ckpt_path).is_file():
            read_checkpoint(ckpt_path)  # weights-only, as every read: a file whose unpickling runs code is refused
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path last``: the newest checkpoint, or a new run when ``fit`` has none yet (``resolve_last``)."""
        resolve_last(self.config.get(str(self.subcommand), self.config), str(self.subcommand))

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
        self._drop_unaccepted_num_classes()

    def _drop_unaccepted_num_classes(self) -> None:
        """Remove the ``num_classes`` the data -> model link leaves in the hparams of a model that does not take
        it (public ``save_hyperparameters``, so checkpoints and hparams.yaml stay loadable)."""
        model = getattr(self, "model", None)
        if model is None or "num_classes" not in model.hparams:
            return
        if "num_classes" not in inspect.signature(type(model).__init__).parameters:
            model.save_hyperparameters(ignore=["num_classes"])  # drops it from hparams and hparams_initial

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        plugins = trainer_config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, SafeCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _instantiate_trainer(self, config: dict, callbacks: list):
        """``trainer.enable_progress_bar: false`` also drops the always-on progress bar."""
        if config.get("enable_progress_bar") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        return super()._instantiate_trainer(config, callbacks)


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``advmim export``, added to ``parser`` (argparse or jsonargparse); returns it."""
    parser.add_argument("ckpt_path", help="pre-training checkpoint (.ckpt)")
    parser.add_argument(
        "output",
        help="a path ending in .safetensors: one file, the timm state dict with this project's metadata. A folder "
        "(an existing directory, a path ending in '/' or without a suffix, or any path with --folder): "
        "model.safetensors, config.json and README.md, loaded by timm.create_model('local-dir:OUTPUT', "
        "pretrained=True). Other suffixes are refused",
    )
    parser.add_argument("--folder", action="store_true", help="write a folder whatever OUTPUT's name")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty folder: replaces model.safetensors, config.json and README.md, keeps the rest",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="also upload the encoder as a folder (model.safetensors, config.json, README.md) to this Hugging Face "
        "Hub repo (needs the network and a token: hf auth login). A new repo is private unless --public; an existing "
        "one keeps its visibility",
    )
    parser.add_argument("--public", action="store_true", help="with --push-to-hub: create the repo public")
    parser.add_argument(
        "--revision",
        metavar="BRANCH",
        help="with --push-to-hub: push to this branch, created from the default branch when missing",
    )
    return parser


def writes_folder(output: str, folder: bool) -> bool:
    """Whether ``advmim export`` writes a folder at ``output`` (the rule its help states); ValueError for a suffix
    that is neither."""
    path = Path(output)
    if folder or path.is_dir() or output.endswith(("/", os.sep)) or not path.suffix:
        return True
    if path.suffix == ".safetensors":
        return False
    raise ValueError(
        f"output {output!r} ends in {path.suffix!r}: name a .safetensors file, or a folder (an existing directory, "
        "a path ending in '/' or without a suffix, or pass --folder)"
    )


def export_main(argv: list[str]) -> None:
    """``advmim export CKPT OUTPUT [--folder] [--overwrite] [--push-to-hub REPO_ID [--public] [--revision BRANCH]]``:
    the clean encoder as a timm safetensors file or folder, then optionally on the Hugging Face Hub (a private repo
    unless --public). Every error is one line."""
    from advmim_pl.export import export_encoder, export_folder, push_encoder

    parser = add_export_arguments(argparse.ArgumentParser(prog="advmim export", description=EXPORT_HELP))
    args = parser.parse_args(argv)
    if not args.push_to_hub and (args.public or args.revision):
        parser.error(f"{'--public' if args.public else '--revision'} applies to a push: add --push-to-hub REPO_ID")
    try:
        if writes_folder(args.output, args.folder):
            path = export_folder(args.ckpt_path, args.output, overwrite=args.overwrite)
            print(f"wrote {path}: timm.create_model('local-dir:{path}', pretrained=True)")
        else:
            path = export_encoder(args.ckpt_path, args.output)
            print(f"wrote {path}")
    except FileExistsError as err:
        raise SystemExit(f"advmim export: {err}; pass --overwrite to write into it, or name an empty folder") from None
    except UnsafeCheckpointError as err:
        refuse("advmim export", err)
    except (OSError, CheckpointError, ValueError, KeyError) as err:
        raise SystemExit(f"advmim export: {err}") from None
    if args.push_to_hub:
        try:
            pushed = push_encoder(args.ckpt_path, args.push_to_hub, public=args.public, revision=args.revision)
        except Exception as err:  # the Hub client's errors differ across its releases (requests, httpx, its own)
            lines = str(err).strip().splitlines()
            reason = type(err).__name__ + (f": {lines[0]}" if lines else "")
            raise SystemExit(
                f"advmim export: wrote {path}, but the push to the Hugging Face Hub repo {args.push_to_hub!r} "
                f"failed ({reason}); check the network and the token (hf auth login)"
            ) from None
        if pushed.private == args.public:  # only an existing repo can differ from what was asked
            kept = "private" if pushed.private else "public"
            print(
                f"the Hub repo {args.push_to_hub!r} already exists and is {kept}: it stays {kept} (a push never "
                "changes a repo's visibility; change it in the repo's settings)"
            )
        where = f"branch {pushed.revision!r} of " if pushed.revision else ""
        print(f"pushed to {where}the {'private' if pushed.private else 'public'} repo: {pushed.url}")


def run(argv: list[str] | None = None) -> AdvMIMCLI | None:
    """Run an ``advmim`` command; ``argv`` defaults to the command line. Returns the CLI (None for ``export``),
    so that tests and notebooks can look at the trainer and the model afterwards."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["export"]:
        export_main(args[1:])
        return None
    if args[:1] == ["prepare"]:
        from advmim_pl.data.prepare import main as prepare_main

        prepare_main(args[1:])
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


def refuse(prog: str, err: UnsafeCheckpointError) -> None:
    """Print a refused file's one line and exit with ``REFUSED_EXIT_CODE``."""
    sys.stderr.write(f"{prog}: {err}\n")
    raise SystemExit(REFUSED_EXIT_CODE) from None


def main() -> None:
    """The ``advmim`` console script: runs the command line and exits with status 0 on success."""
    run()


if __name__ == "__main__":
    main()
