"""The three-command path of the README at micro scale: pre-train with the plug-in, probe, robustness table."""

import json
from pathlib import Path

import pytest
import torch

from advmim_pl.cli import run
from advmim_pl.eval.corruptions import CORRUPTIONS
from tests.helpers.micro import MICRO_FLAGS

MICRO_RUN = [*MICRO_FLAGS, "--data.init_args.num_workers", "0"]  # the micro encoder, data read in this process


@pytest.mark.long
def test_pretrain_probe_and_robustness_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    decoder = [
        "--model.init_args.method.init_args.decoder_dim",
        "32",
        "--model.init_args.method.init_args.decoder_heads",
        "4",
    ]
    run(
        [
            "fit",
            "-c",
            "quickstart_adv.yaml",
            *MICRO_RUN,
            *decoder,
            "--trainer.max_steps",
            "4",
            "--trainer.limit_val_batches",
            "1",
        ]
    )
    pretrained = Path("runs/advmim/version_0/checkpoints/last.ckpt")
    probe = run(["fit", "-c", "quickstart_probe.yaml", *MICRO_RUN, "--model.init_args.init_from", str(pretrained),
                 "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1"])  # fmt: skip
    assert probe.model.hparams.num_classes == 10  # linked from the data
    probed = Path(probe.trainer.checkpoint_callback.last_model_path)
    for checkpoint in (pretrained, probed):  # plain hyperparameters and callback states: torch's safe unpickler
        assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["encoder"] == "vit_base_patch16_224"
    # the readouts beside the model fit on 400 images, not the whole sample: tests/eval/test_robustness.py checks them
    table = run(["test", "-c", "eval/quickstart_robustness.yaml", "--ckpt_path", str(probed),
                 "--trainer.limit_test_batches", "1", "--trainer.callbacks.init_args.floor_images", "400",
                 "--data.init_args.num_workers", "0"])  # fmt: skip
    folder = Path(table.trainer.logger.log_dir)
    results = json.loads((folder / "robustness.json").read_text())
    assert {f"corruption/{c}/{s}" for c in CORRUPTIONS for s in range(1, 6)} <= set(results)
    assert len([k for k in results if k.startswith("pgd/")]) == 4
    assert all(0.0 <= v <= 1.0 for v in results.values())
    assert results["clean"] == table.trainer.callback_metrics["test/acc1"].item()
    assert "mean corruption accuracy" in (folder / "robustness.md").read_text()
