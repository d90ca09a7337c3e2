"""Robustness evaluation of a classifier during ``advmim test``: corruptions, PGD and out-of-distribution sets.

``RobustnessEvaluator`` is a callback: on every test batch it scores the module's ``logits`` on the clean
images, on each corruption x severity, and on PGD examples crafted by ``Attacker`` with the module's
``cross_entropy_objective`` (``advmim_pl.eval.robust.robust_accuracies``); at the end of the test epoch it scores
the out-of-distribution ImageFolders, prints a table, logs every accuracy and writes ``robustness.md`` /
``robustness.json`` next to the logs. With ``floors`` the same table has three more columns, all read out by
one converged logistic regression fit on the frozen features of the training images: the module's own encoder
(its pooling), a randomly initialised encoder of the same architecture, and the raw pixels, scored on the same
clean, corrupted and PGD images. The model's column uses its own head; the encoder's logistic-regression column
beside it says how much of a gap to the floors is the readout rather than the representation.
"""

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from advmim_pl.adversarial.attack import check_eps
from advmim_pl.adversarial.attacker import Attacker
from advmim_pl.errors import EvaluationInputError
from advmim_pl.eval.corruptions import CORRUPTIONS, SEVERITIES
from advmim_pl.eval.extract import evaluation_batches
from advmim_pl.eval.floors import LinearReadout, Pixels, Pooled, fit_readouts, random_encoder
from advmim_pl.eval.probes import ProbeSettings
from advmim_pl.eval.robust import Classifier, accuracy_counts, pgd_eps, robust_accuracies, with_corruption_mean
from advmim_pl.report import ReportTable, write_report

READOUTS = {  # results-key prefix -> table column of the logistic-regression readouts that floors: true adds
    "logreg/encoder/": "encoder, logistic regression",
    "logreg/random/": "random encoder (floor), logistic regression",
    "logreg/pixels/": "raw pixels (floor), logistic regression",
}


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
        floors: also score converged logistic regressions (``advmim_pl.eval.probes.logistic_probe``, C chosen on
            a held-out 10%) on the frozen features of the module's own encoder (its pooling), of a random encoder
            of the module's architecture and pooling (a floor), and of the raw pixels (a floor), fit on the data
            module's training images (evaluation transform): the model and its floors read out the same way.
            Not on the OOD sets.
        floor_images: at most this many training images (a seeded random subset) fit the readouts.
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
        self.readouts: dict[str, LinearReadout] = {}  # results-key prefix (READOUTS) -> readout
        self.attacks: dict[str, list[Attacker]] = {}  # prefix -> one attack per eps
        self.correct: dict[str, Tensor] = {}
        self.total = 0
        self.results: dict[str, float] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.correct, self.total = {}, 0
        if self.floors and not self.readouts:
            self.readouts = self._fit_readouts(trainer, pl_module)
        # each classifier has its own attacks, so that the readouts never shift the model's random starts
        self.attacks = {
            prefix: [Attacker(eps=eps, **self.pgd) for eps in self.pgd_eps] for prefix in ("", *self.readouts)
        }

    def _fit_readouts(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, LinearReadout]:
        """Logistic regressions on the module's own encoder features, a random encoder's (the module's
        architecture and pooling) and the raw pixels, fit on up to ``floor_images`` training images."""
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
            "logreg/encoder/": pl_module.features,
            "logreg/random/": Pooled(random_encoder(hp, self.seed), hp.global_pool).to(pl_module.device),
            "logreg/pixels/": Pixels(pl_module.encoder.normalize, self.floor_pixel_size).to(pl_module.device),
        }
        return fit_readouts(
            features,
            evaluation_batches(data.train_set, data.eval_transform(), data.batch_size, indices=subset),
            hp.num_classes,
            ProbeSettings(seed=self.seed),
            pl_module.device,
            trainer.precision_plugin.forward_context,
        )

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        x, y = batch[0], batch[1]
        self.total += len(y)
        classifiers = {"": Classifier(pl_module.logits, self.attacks[""], pl_module.cross_entropy_objective)}
        classifiers |= {prefix: Classifier(r.logits, self.attacks[prefix]) for prefix, r in self.readouts.items()}
        scored = robust_accuracies(
            classifiers, [(x, y)], pl_module, self.corruptions, self.severities, self.seed, first_batch=batch_idx
        )
        for prefix, counts in scored.items():
            for key, count in counts.correct.items():
                self.correct[f"{prefix}{key}"] = self.correct.get(f"{prefix}{key}", 0) + count

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.strategy.reduce(torch.tensor(float(self.total), device=pl_module.device), reduce_op="sum")
        results = {
            key: float(trainer.strategy.reduce(count.float(), reduce_op="sum") / total.clamp_min(1))
            for key, count in self.correct.items()
        }
        for prefix in ("", *self.readouts):
            results = with_corruption_mean(results, prefix)
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
        """Print a table (the readouts in three more columns) and write Markdown and JSON copies to the log
        folder."""
        rows = [("clean", "", "clean")]
        for name in self.corruptions:
            for severity in self.severities:
                rows.append((name, str(severity), f"corruption/{name}/{severity}"))
        rows.append(("mean corruption accuracy", "", "corruption/mean"))
        rows += [("PGD L-inf", f"eps {pgd_eps(k) * 255:.2g}/255", k) for k in results if k.startswith("pgd/")]
        rows += [("OOD", k[4:], k) for k in results if k.startswith("ood/")]

        def cells(key: str) -> list[str]:
            keys = [key] + [f"{prefix}{key}" for prefix in self.readouts]
            return [f"{100 * results[k]:.2f}" if k in results else "" for k in keys]

        table = ReportTable(
            ["test", "setting", "model, its head", *(READOUTS[prefix] for prefix in self.readouts)],
            [[test, setting, *cells(key)] for test, setting, key in rows],
            title="robustness (top-1 accuracy %)",
        )
        write_report(Path(trainer.log_dir or trainer.default_root_dir), "robustness", [table], results)
