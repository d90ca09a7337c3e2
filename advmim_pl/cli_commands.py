"""The ``advmim`` subcommands that are not Trainer methods: ``export`` and ``prepare``. ``dispatch`` runs them
before LightningCLI parses anything; ``HELP`` is their one-line description in ``advmim --help``."""

import argparse
import os
from pathlib import Path

from advmim_pl.cli_errors import refuse
from advmim_pl.reliability import CheckpointError, UnsafeCheckpointError

EXPORT_HELP = (
    "Write the clean encoder of a pre-training checkpoint as a timm safetensors file or folder, optionally pushed "
    "to the Hugging Face Hub."
)
PREPARE_HELP = "Write an ImageFolder as litdata chunks for StreamingImageDataModule (a local folder or s3:// URL)."
HELP = {"export": EXPORT_HELP, "prepare": PREPARE_HELP}


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


def dispatch(argv: list[str]) -> bool:
    """Run ``advmim export`` or ``advmim prepare`` when ``argv`` (the command line without the program) names one;
    returns whether it did."""
    if argv[:1] == ["export"]:
        export_main(argv[1:])
        return True
    if argv[:1] == ["prepare"]:
        from advmim_pl.data.prepare import main as prepare_main  # imports litdata: only for this subcommand

        prepare_main(argv[1:])
        return True
    return False
