"""Robustness evaluation of a classifier during ``advmim test``: corruptions, PGD and out-of-distribution sets.

``RobustnessEvaluator`` is a callback: on every test batch it scores the module's ``logits`` on the clean
images, on each corruption x severity, and on PGD examples crafted by ``AdversarialTargetCallback`` with the
module's ``cross_entropy_objective``; at the end of the test epoch it scores the out-of-distribution
ImageFolders, prints a table, logs every accuracy and writes ``robustness.md`` / ``robustness.json`` next to
the logs.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from advmim_pl.adversarial.callback import AdversarialTargetCallback
from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from advmim_pl.rng import generator_for


@dataclass
class OODSet:
    """An out-of-distribution ImageFolder.

    Args:
        root: folder with one sub-folder of images per class.
        class_map: sub-folder name -> the model's class index; null maps the sorted sub-folders to 0, 1, ...
        restrict_logits: score only among the mapped classes (as for ImageNet-R/A subsets of 1000 classes).
    """

    root: str
    class_map: dict[str, int] | None = None
    restrict_logits: bool = True


def pgd_key(eps: float) -> str:
    """The results key of the PGD accuracy at L-inf budget ``eps`` (pixel units), e.g. 'pgd/0.01569'."""
    return f"pgd/{eps:.5f}"


def pgd_eps(key: str) -> float:
    """The budget of a PGD results key: 'pgd/0.01569' -> 0.01569."""
    return float(key.removeprefix("pgd/"))


def accuracy_counts(logits: Tensor, labels: Tensor, classes: Tensor | None = None) -> Tensor:
    """Correct top-1 predictions as a 0-d tensor. logits (B, K), labels (B,); ``classes`` (M,) restricts the
    argmax to those class indices."""
    if classes is not None:
        return (classes[logits[:, classes].argmax(dim=1)] == labels).sum()
    return (logits.argmax(dim=1) == labels).sum()


class RobustnessEvaluator(L.Callback):
    """Clean, corruption, PGD L-inf and OOD accuracy of a classifier, computed during ``trainer.test``.

    The module must provide ``logits(x) -> (B, K)`` for [0, 1] images and ``cross_entropy_objective(labels)``
    (as ``LinearProbeModule`` / ``FinetuneModule`` do). Normalisation is inside the model, so eps is in pixel
    units; the model is in eval mode.

    Args:
        corruptions: corruption names (``advmim_pl.eval.corruptions.CORRUPTIONS``); null = all.
        severities: severities to run, each in 1..5.
        pgd_eps: L-inf budgets in pixel units (at least one), e.g. [0.00392, 0.00784, 0.0157, 0.0314].
        pgd_steps: PGD steps per attack.
        pgd_step_size: PGD step; null = 2.5 * eps / steps.
        pgd_random_start: start PGD from uniform noise.
        ood_sets: name -> OOD ImageFolder, scored at the end of the test epoch.
        ood_batch_size: batch size for the OOD sets.
        seed: seed of the corruption noise (per batch) and of the PGD random start.
    """

    def __init__(
        self,
        corruptions: list[str] | None = None,
        severities: tuple[int, ...] = SEVERITIES,
        pgd_eps: tuple[PositiveFloat, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255),
        pgd_steps: PositiveInt = 10,
        pgd_step_size: PositiveFloat | None = None,
        pgd_random_start: bool = False,
        ood_sets: dict[str, OODSet] | None = None,
        ood_batch_size: PositiveInt = 128,
        seed: NonNegativeInt = 0,
    ) -> None:
        corruptions = list(CORRUPTIONS) if corruptions is None else corruptions
        unknown = [c for c in corruptions if c not in CORRUPTIONS]
        if unknown:
            raise ValueError(f"RobustnessEvaluator: unknown corruptions {unknown}; choose from {list(CORRUPTIONS)}")
        bad = [s for s in severities if s not in SEVERITIES]
        if bad or not severities:
            raise ValueError(f"RobustnessEvaluator: severities {severities} must be a non-empty list within 1..5")
        if not pgd_eps or min(pgd_eps) <= 0:
            raise ValueError(f"RobustnessEvaluator: pgd_eps {pgd_eps} must list at least one positive epsilon")
        self.corruptions, self.severities = corruptions, tuple(severities)
        self.attacks = {
            eps: AdversarialTargetCallback(
                eps=eps, steps=pgd_steps, step_size=pgd_step_size, random_start=pgd_random_start, seed=seed
            )
            for eps in pgd_eps
        }
        self.ood_sets = ood_sets or {}
        self.ood_batch_size, self.seed = ood_batch_size, seed
        self.correct: dict[str, Tensor] = {}
        self.total = torch.zeros(())
        self.results: dict[str, float] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.correct, self.total = {}, torch.zeros((), device=pl_module.device)

    def _add(self, key: str, count: Tensor) -> None:
        self.correct[key] = self.correct.get(key, 0) + count

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        x, y = batch[0], batch[1]
        self.total = self.total + len(y)
        with torch.no_grad():
            self._add("clean", accuracy_counts(pl_module.logits(x), y))
            generator = generator_for(x.device).manual_seed(self.seed * 1_000_003 + batch_idx)
            for name in self.corruptions:
                for severity in self.severities:
                    xc = corrupt(x, name, severity, generator)
                    self._add(f"corruption/{name}/{severity}", accuracy_counts(pl_module.logits(xc), y))
        for eps, attack in self.attacks.items():
            x_adv = attack.generate(pl_module, x, pl_module.cross_entropy_objective(y)).x_adv
            with torch.no_grad():
                self._add(pgd_key(eps), accuracy_counts(pl_module.logits(x_adv), y))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.strategy.reduce(self.total.float(), reduce_op="sum")
        results = {
            key: float(trainer.strategy.reduce(count.float(), reduce_op="sum") / total.clamp_min(1))
            for key, count in self.correct.items()
        }
        corruption = [v for k, v in results.items() if k.startswith("corruption/")]
        if corruption:
            results["corruption/mean"] = sum(corruption) / len(corruption)
        for name, ood in self.ood_sets.items():
            results[f"ood/{name}"] = self._ood_accuracy(ood, pl_module)
        self.results = results
        pl_module.log_dict({f"robust/{k}": v for k, v in results.items()}, sync_dist=False)
        if trainer.is_global_zero:
            self._report(trainer, results)

    def _ood_accuracy(self, ood: OODSet, pl_module: L.LightningModule) -> float:
        """Top-1 accuracy on an OOD ImageFolder, resized and channel-matched to the model's input."""
        encoder = pl_module.encoder
        side = encoder.grid_size[0] * encoder.patch_size
        steps = [v2.ToImage(), v2.Resize(side), v2.CenterCrop(side), v2.ToDtype(torch.float32, scale=True)]
        if encoder.in_chans == 1:
            steps.insert(1, v2.Grayscale(1))
        dataset = ImageFolder(ood.root, transform=v2.Compose(steps))
        class_map = ood.class_map or dataset.class_to_idx
        missing = sorted(set(dataset.classes) - set(class_map))
        if missing:
            raise ValueError(f"OOD set {ood.root!r}: class_map has no index for the folders {missing}")
        to_model = torch.tensor([class_map[c] for c in dataset.classes], device=pl_module.device)
        classes = torch.unique(to_model) if ood.restrict_logits else None
        correct = torch.zeros((), device=pl_module.device)
        with torch.no_grad():
            for images, labels in DataLoader(dataset, batch_size=self.ood_batch_size):
                images = images.to(pl_module.device)
                correct += accuracy_counts(pl_module.logits(images), to_model[labels.to(pl_module.device)], classes)
        return float(correct) / max(len(dataset), 1)

    def _report(self, trainer: L.Trainer, results: dict[str, float]) -> None:
        """Print a table and write Markdown and JSON copies to the log folder."""
        rows = [("clean", "", results["clean"])]
        for name in self.corruptions:
            for severity in self.severities:
                rows.append((name, str(severity), results[f"corruption/{name}/{severity}"]))
        rows.append(("mean corruption accuracy", "", results["corruption/mean"]))
        rows += [
            ("PGD L-inf", f"eps {pgd_eps(k) * 255:.2g}/255", val) for k, val in results.items() if k.startswith("pgd/")
        ]
        rows += [("OOD", k[4:], val) for k, val in results.items() if k.startswith("ood/")]
        table = Table(title="robustness (top-1 accuracy)")
        for column in ("test", "setting", "accuracy"):
            table.add_column(column)
        for test, setting, value in rows:
            table.add_row(test, setting, f"{100 * value:.2f}")
        Console().print(table)
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["| test | setting | top-1 % |", "| --- | --- | --- |"]
        lines += [f"| {test} | {setting} | {100 * value:.2f} |" for test, setting, value in rows]
        (folder / "robustness.md").write_text("\n".join(lines) + "\n")
        (folder / "robustness.json").write_text(json.dumps(results, indent=2))
