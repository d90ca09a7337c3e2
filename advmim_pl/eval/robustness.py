"""Robustness evaluation of a classifier during ``advmim test``: corruptions, PGD and out-of-distribution sets.

``RobustnessEvaluator`` is a callback: on every test batch it scores the module's ``logits`` on the clean
images, on each corruption x severity, and on PGD examples crafted by the plug-in's ``Attacker`` with the
module's ``cross_entropy_objective``; at the end of the test epoch it scores the out-of-distribution
ImageFolders, prints a table, logs every accuracy and writes ``robustness.md`` / ``robustness.json`` next to
the logs. With ``floors`` the same table has two more columns: logistic regressions on the frozen features of a
randomly initialised encoder of the same architecture and on the raw pixels, scored on the same clean,
corrupted and PGD images: what the representation adds over none.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from advmim_pl.adversarial.attack import check_eps
from advmim_pl.adversarial.attacker import Attacker
from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from advmim_pl.eval.features import (
    EvaluationInputError,
    LinearReadout,
    Pixels,
    Pooled,
    ProbeSettings,
    evaluation_batches,
    extract,
    random_encoder,
)
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
        floors: also score the floors: logistic regressions (``advmim_pl.eval.features``, C chosen on a held-out
            10%) on the frozen features of a random encoder of the module's architecture and pooling, and on the
            raw pixels, fit on the data module's training images (evaluation transform). Not on the OOD sets.
        floor_images: at most this many training images (a seeded random subset) fit the floors.
        floor_pixel_size: side the raw-pixel floor is area-averaged down to (at most the image side).
        seed: seed of the corruption noise (per batch), the PGD random start, the random encoder and the subset.
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
        floors: bool = False,
        floor_images: PositiveInt = 10_000,
        floor_pixel_size: PositiveInt = 32,
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
        for eps in pgd_eps:  # in pixel units of [0, 1] images: 8 instead of 8/255 is refused, above 32/255 warned
            warning = check_eps(eps, "RobustnessEvaluator", "pgd_eps")
            if warning:
                rank_zero_warn(warning)
        self.corruptions, self.severities = corruptions, tuple(severities)
        self.pgd = dict(steps=pgd_steps, step_size=pgd_step_size, random_start=pgd_random_start, seed=seed)
        self.pgd_eps = tuple(pgd_eps)
        self.ood_sets = ood_sets or {}
        self.ood_batch_size, self.seed = ood_batch_size, seed
        self.floors, self.floor_images, self.floor_pixel_size = floors, floor_images, floor_pixel_size
        self.classifiers: dict[str, LinearReadout] = {}  # results-key prefix -> floor classifier
        self.attacks: dict[str, dict[float, Attacker]] = {}  # prefix -> eps -> attack
        self.correct: dict[str, Tensor] = {}
        self.total = torch.zeros(())
        self.results: dict[str, float] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.correct, self.total = {}, torch.zeros((), device=pl_module.device)
        if self.floors and not self.classifiers:
            self.classifiers = self._fit_floors(trainer, pl_module)
        # each classifier has its own attacks, so that the floors never shift the model's random starts
        self.attacks = {
            prefix: {eps: Attacker(eps=eps, **self.pgd) for eps in self.pgd_eps} for prefix in ("", *self.classifiers)
        }

    def _fit_floors(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, LinearReadout]:
        """Logistic regressions on a random encoder's features (the module's architecture and pooling) and on the
        raw pixels, fit on up to ``floor_images`` training images."""
        data = trainer.datamodule
        if not isinstance(getattr(data, "train_set", None), Dataset):
            raise EvaluationInputError(
                f"RobustnessEvaluator(floors=true) fits the floors on the data module's training images; "
                f"{type(data).__name__} has none"
            )
        hp = pl_module.hparams
        subset = torch.randperm(len(data.train_set), generator=torch.Generator().manual_seed(self.seed))
        subset = subset[: self.floor_images].sort().values
        features = {
            "floor/random/": Pooled(random_encoder(hp, self.seed), hp.global_pool).to(pl_module.device),
            "floor/pixels/": Pixels(pl_module.encoder.normalize, self.floor_pixel_size).to(pl_module.device),
        }
        train = extract(  # both floors' features in one pass over the images
            lambda x: {prefix: features_of(x) for prefix, features_of in features.items()},
            evaluation_batches(data.train_set, data.eval_transform(), data.batch_size, indices=subset),
            pl_module.device,
            trainer.precision_plugin.forward_context,
        )
        settings = ProbeSettings(seed=self.seed)
        return {
            prefix: LinearReadout(features_of, settings.logistic(train.features[prefix], train.labels, hp.num_classes))
            for prefix, features_of in features.items()
        }

    def _add(self, key: str, count: Tensor) -> None:
        self.correct[key] = self.correct.get(key, 0) + count

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        x, y = batch[0], batch[1]
        self.total = self.total + len(y)
        classifiers = (("", pl_module), *self.classifiers.items())
        with torch.no_grad():  # each corrupted batch is made once and scored by every classifier
            for prefix, classifier in classifiers:
                self._add(f"{prefix}clean", accuracy_counts(classifier.logits(x), y))
            generator = generator_for(x.device).manual_seed(self.seed * 1_000_003 + batch_idx)
            for name in self.corruptions:
                for severity in self.severities:
                    xc = corrupt(x, name, severity, generator)
                    for prefix, classifier in classifiers:
                        self._add(f"{prefix}corruption/{name}/{severity}", accuracy_counts(classifier.logits(xc), y))
        for prefix, classifier in classifiers:
            for eps, attack in self.attacks[prefix].items():
                x_adv = attack.generate(pl_module, x, classifier.cross_entropy_objective(y)).x_adv
                with torch.no_grad():
                    self._add(f"{prefix}{pgd_key(eps)}", accuracy_counts(classifier.logits(x_adv), y))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.strategy.reduce(self.total.float(), reduce_op="sum")
        results = {
            key: float(trainer.strategy.reduce(count.float(), reduce_op="sum") / total.clamp_min(1))
            for key, count in self.correct.items()
        }
        for prefix in ("", *self.classifiers):
            corruption = [v for k, v in results.items() if k.startswith(f"{prefix}corruption/")]
            if corruption:
                results[f"{prefix}corruption/mean"] = sum(corruption) / len(corruption)
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
        """Print a table (the floors in two more columns) and write Markdown and JSON copies to the log folder."""
        rows = [("clean", "", "clean")]
        for name in self.corruptions:
            for severity in self.severities:
                rows.append((name, str(severity), f"corruption/{name}/{severity}"))
        rows.append(("mean corruption accuracy", "", "corruption/mean"))
        rows += [("PGD L-inf", f"eps {pgd_eps(k) * 255:.2g}/255", k) for k in results if k.startswith("pgd/")]
        rows += [("OOD", k[4:], k) for k in results if k.startswith("ood/")]
        header = ["test", "setting", "top-1 %"]
        if self.classifiers:
            header += ["random encoder (floor)", "raw pixels (floor)"]

        def cells(key: str) -> list[str]:
            keys = [key] + [f"{prefix}{key}" for prefix in self.classifiers]
            return [f"{100 * results[k]:.2f}" if k in results else "" for k in keys]

        table = Table(title="robustness (top-1 accuracy)")
        for column in header:
            table.add_column(column)
        for test, setting, key in rows:
            table.add_row(test, setting, *cells(key))
        Console().print(table)
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join([test, setting, *cells(key)]) + " |" for test, setting, key in rows]
        (folder / "robustness.md").write_text("\n".join(lines) + "\n")
        (folder / "robustness.json").write_text(json.dumps(results, indent=2))
