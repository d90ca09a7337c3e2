"""RobustnessEvaluator: agreement with an independent PGD, OOD scoring, the report, bad settings."""

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from advmim_pl.data import BundledSampleDataModule
from advmim_pl.data.fashion_mnist import SAMPLE_PATH
from advmim_pl.eval.robustness import OODSet, RobustnessEvaluator
from advmim_pl.modules import LinearProbeModule
from tests.helpers.micro import MICRO_VIT
from tests.helpers.micro import trainer as quiet_trainer

EPS = (2 / 255, 8 / 255)
STEPS, STEP_SIZE = 5, 1 / 255


def fashion(n: int, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """n bundled Fashion-MNIST images resized to 32 px (B, 1, 32, 32) in [0, 1], labels (B,)."""
    with np.load(SAMPLE_PATH) as sample:
        index = np.random.default_rng(0).permutation(len(sample[f"{split}_labels"]))[:n]
        images = torch.tensor(sample[f"{split}_images"][index]).float().div(255).unsqueeze(1)
        labels = torch.tensor(sample[f"{split}_labels"][index]).long()
    return F.interpolate(images, size=32, mode="bilinear", antialias=True).clamp(0, 1), labels


@pytest.fixture(scope="module")
def probe() -> LinearProbeModule:
    """A linear probe on a random micro encoder, trained briefly so that it is right on most test images."""
    torch.manual_seed(0)
    module = LinearProbeModule(
        num_classes=10, encoder="vit_base_patch16_224", img_size=32, patch_size=4, in_chans=1, mean=(0.286,),
        std=(0.353,), encoder_kwargs=dict(MICRO_VIT), batch_size=64, warmup_epochs=0,
        base_lr=4e-2, global_pool="avg", optimizer=torch.optim.Adam,  # Adam: quick to fit, unlike LARS
    )  # fmt: skip
    x, y = fashion(1024, "train")
    quiet_trainer(max_epochs=6).fit(module, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    return module.eval()


def reference_pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Textbook L-inf PGD (Madry et al.) from the clean image, written independently of advmim_pl."""
    x_adv = x.clone()
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + STEP_SIZE * grad.sign()
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    return x_adv


def evaluate(module, evaluator, x, y, folder) -> dict[str, float]:
    quiet_trainer(inference_mode=False, callbacks=[evaluator], default_root_dir=folder).test(
        module, DataLoader(TensorDataset(x, y), batch_size=32)
    )
    return evaluator.results


def test_pgd_robust_accuracy_matches_an_independent_pgd(probe, tmp_path):
    x, y = fashion(96)
    evaluator = RobustnessEvaluator(corruptions=["contrast"], severities=[1], pgd_eps=EPS, pgd_steps=STEPS,
                                    pgd_step_size=STEP_SIZE, pgd_random_start=False)  # fmt: skip
    results = evaluate(probe, evaluator, x, y, tmp_path)
    with torch.no_grad():
        clean = (probe(x).argmax(1) == y).sum().item()
    assert results["clean"] * len(y) == pytest.approx(clean)
    assert clean > 0.4 * len(y)  # a model worth attacking (chance: 0.1)
    for eps in EPS:
        reference = sum(
            (probe(reference_pgd(probe, xb, yb, eps)).argmax(1) == yb).sum().item()
            for xb, yb in zip(x.split(32), y.split(32), strict=True)
        )
        ours = results[f"pgd/{eps:.5f}"] * len(y)
        assert abs(ours - reference) <= 1, (eps, ours, reference)
    assert results[f"pgd/{EPS[1]:.5f}"] < results["clean"]  # the attack does lower accuracy


def test_corruptions_ood_and_report(probe, tmp_path):
    x, y = fashion(64)
    ood_root = tmp_path / "ood"
    names = {3: "dress", 7: "sneaker"}
    for label, name in names.items():
        (ood_root / name).mkdir(parents=True)
        for i, image in enumerate(x[y == label]):
            Image.fromarray((image[0] * 255).round().byte().numpy()).save(ood_root / name / f"{i}.png")
    class_map = {name: label for label, name in names.items()}
    evaluator = RobustnessEvaluator(corruptions=["gaussian_noise", "contrast"], severities=[1, 5], pgd_eps=[EPS[0]],
                                    pgd_steps=2, ood_sets={"subset": OODSet(str(ood_root), class_map)})  # fmt: skip
    trainer = quiet_trainer(logger=True, default_root_dir=tmp_path, inference_mode=False, callbacks=[evaluator])
    trainer.test(probe, DataLoader(TensorDataset(x, y), batch_size=32))
    results = evaluator.results
    keep = (y == 3) | (y == 7)
    with torch.no_grad():
        logits = probe(x[keep])[:, [3, 7]]
    expected = (torch.tensor([3, 7])[logits.argmax(1)] == y[keep]).float().mean().item()
    assert results["ood/subset"] == pytest.approx(expected, abs=1.5 / keep.sum().item())  # PNG rounding
    corruption = [results[f"corruption/{c}/{s}"] for c in ("gaussian_noise", "contrast") for s in (1, 5)]
    assert results["corruption/mean"] == pytest.approx(sum(corruption) / 4)
    assert results["corruption/contrast/5"] <= results["corruption/contrast/1"] + 1 / len(y)
    logged = json.loads((tmp_path / "lightning_logs" / "version_0" / "robustness.json").read_text())
    assert logged == pytest.approx(results)
    table = (tmp_path / "lightning_logs" / "version_0" / "robustness.md").read_text()
    assert "mean corruption accuracy" in table and "| OOD | subset |" in table
    assert trainer.callback_metrics["robust/clean"] == pytest.approx(results["clean"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pgd_eps=[]), "pgd_eps"),
        (dict(pgd_eps=[4 / 255, 8]), r"pgd_eps=8.*did you mean 8/255 = 0.0314"),
        (dict(severities=[0, 6]), "severities"),
        (dict(corruptions=["fog_of_war"]), "fog_of_war"),
    ],
)
def test_bad_settings_are_errors_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RobustnessEvaluator(**kwargs)


def test_a_large_pgd_budget_warns_with_the_usual_ones():
    with pytest.warns(UserWarning, match=r"pgd_eps=0.2.*8/255 = 0.0314"):
        RobustnessEvaluator(pgd_eps=[0.2])


@pytest.mark.long
def test_floors_are_scored_like_the_model_without_changing_its_numbers(probe, tmp_path):
    data = BundledSampleDataModule(img_size=32, channels=1, batch_size=64, num_workers=0)  # the probe's batch_size
    settings = dict(
        corruptions=["contrast"], severities=[5], pgd_eps=[EPS[1]], pgd_steps=STEPS, pgd_step_size=STEP_SIZE
    )
    runs = {}
    for floors in (False, True):
        evaluator = RobustnessEvaluator(**settings, floors=floors, floor_images=2000)
        trainer = quiet_trainer(
            logger=True,
            default_root_dir=tmp_path / str(floors),
            inference_mode=False,
            callbacks=[evaluator],
            limit_test_batches=2,
        )
        trainer.test(probe, datamodule=data)
        runs[floors] = evaluator
    plain, floored = runs[False].results, runs[True].results
    assert {k: v for k, v in floored.items() if not k.startswith("logreg/")} == plain  # the model's numbers unchanged
    batches = list(itertools.islice(iter(data.test_dataloader()), 2))
    n = sum(len(yb) for _, yb in batches)
    readouts = runs[True].readouts
    assert list(readouts) == ["logreg/encoder/", "logreg/random/", "logreg/pixels/"]
    for prefix, readout in readouts.items():
        with torch.no_grad():
            clean = sum((readout.logits(xb).argmax(1) == yb).sum().item() for xb, yb in batches)
        adversarial = [(reference_pgd(readout.logits, xb, yb, EPS[1]), yb) for xb, yb in batches]
        with torch.no_grad():
            reference = sum((readout.logits(xa).argmax(1) == yb).sum().item() for xa, yb in adversarial)
        assert floored[f"{prefix}clean"] * n == pytest.approx(clean)
        assert abs(floored[f"{prefix}pgd/{EPS[1]:.5f}"] * n - reference) <= 1, (prefix, reference)
        assert clean > 0.5 * n and reference < clean  # fit on 2,000 training images; PGD attacks the floor too
    # the encoder's readout reads the probe's own features: the same frozen encoder and pooling
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(readouts["logreg/encoder/"].features_of(x), probe.features(x))
    table = (tmp_path / "True" / "lightning_logs" / "version_0" / "robustness.md").read_text()
    header = "| test | setting | model, its head | encoder, logistic regression | random encoder (floor), logistic"
    assert header in table
