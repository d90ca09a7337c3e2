"""Frozen-feature evaluation of an encoder beside its floors, as ``advmim test -c eval/features.yaml``.

An encoder's frozen features of the training and test images are extracted once, in one pass for both
poolings (``advmim_pl.eval.extract``), and kept on the device; the kNN and logistic-regression probes of
``advmim_pl.eval.probes`` are then fit on them. The floors go through the same code: a randomly initialised
encoder of the same architecture (``advmim_pl.eval.floors``) and the raw pixels. ``FeatureEvalModule`` writes
``features.json`` / ``features.md`` next to the run.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveFloat, PositiveInt
from torch import Tensor, nn

from advmim_pl.checks import plain, require_positive
from advmim_pl.data.base import ImageDataModule
from advmim_pl.errors import EvaluationInputError
from advmim_pl.eval.extract import evaluation_batches, extract, labelled, pixel_features, pooled_features
from advmim_pl.eval.floors import random_encoder
from advmim_pl.eval.probes import C_GRID, FeatureSet, ProbeSettings, cross_validate, probe_counts, with_intervals
from advmim_pl.models.pooling import POOLINGS, GlobalPool
from advmim_pl.pixel_stats import IMAGENET_MEAN, IMAGENET_STD
from advmim_pl.report import ReportTable, write_report
from advmim_pl.weights import load_encoder, read_weights

POOLING_NAMES = {"token": "cls token", "avg": "patch average"}


class FeatureEvalModule(L.LightningModule):
    """kNN and logistic-regression probes of an encoder's frozen features, beside the random-encoder and raw-pixel
    floors, run by ``advmim test`` (see the module docstring).

    ``on_test_epoch_start`` extracts the training split's features (the data module's evaluation transform, no
    augmentation), ``test_step`` those of the test batches, and ``on_test_epoch_end`` fits and scores both probes
    on every feature: the encoder's for each pooling, a randomly initialised encoder of the same architecture
    (seeded; absent when the encoder itself is ``random``) and the raw pixels. With ``folds`` >= 2 the training
    and test images are pooled and scored by stratified k-fold cross-validation instead (for small test splits
    such as the MNIST subset's 1,000 images). It prints a table, logs ``features/<source>/<pooling>/<probe>``
    top-1 and writes ``features.md`` / ``features.json`` (``results``: every accuracy with its Wilson interval and
    counts; ``self.results`` holds the same) to the logger's folder. Features and fits stay on the module's
    device; extraction runs under the trainer's precision (bf16-mixed: bf16 autocast). One device only.

    Args:
        init_from: ``PretrainModule`` checkpoint (.ckpt, clean branch), exported encoder (.safetensors), or
            ``random`` for a randomly initialised encoder (the floor itself).
        num_classes: classes (linked from the DataModule).
        encoder: timm ViT name (must match ``init_from``).
        img_size: input side in pixels (linked from the DataModule).
        patch_size: patch side in pixels.
        in_chans: image channels (linked from the DataModule).
        mean: per-channel pixel mean of the Normalize inside the encoder (linked from the data).
        std: per-channel pixel std (linked from the data).
        encoder_kwargs: extra timm ``create_model`` arguments (must match ``init_from``).
        sincos_pos_embed: fixed sin-cos positions for a random encoder (loaded from ``init_from`` otherwise).
        poolings: which poolings to report: ``token`` (cls token after the final norm), ``avg`` (patch average).
        floors: also report the random-encoder and raw-pixel floors.
        pixel_size: side the raw-pixel floor is area-averaged down to (at most the image side).
        knn_k: neighbours that vote.
        knn_temperature: T of the vote weights exp(cosine / T).
        logreg_c: the inverse L2 strengths (scikit-learn's C) to choose from.
        holdout: fraction of the training features held out to choose C.
        select_limit: at most this many features fit each candidate C (all of them fit the chosen one).
        max_iter: L-BFGS iteration limit per fit.
        tolerance: L-BFGS stops when the largest gradient entry of the mean objective is below it.
        folds: 0 scores the test split; k >= 2 runs stratified k-fold cross-validation over train + test.
        seed: seed of the random encoder, the held-out split and the folds.
    """

    def __init__(
        self,
        init_from: str,
        num_classes: PositiveInt,
        encoder: str = "vit_base_patch16_224",
        img_size: PositiveInt = 224,
        patch_size: PositiveInt = 16,
        in_chans: PositiveInt = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        encoder_kwargs: dict[str, Any] | None = None,
        sincos_pos_embed: bool = True,
        poolings: tuple[GlobalPool, ...] = POOLINGS,
        floors: bool = True,
        pixel_size: PositiveInt = 32,
        knn_k: PositiveInt = 20,
        knn_temperature: PositiveFloat = 0.07,
        logreg_c: tuple[PositiveFloat, ...] = C_GRID,
        holdout: OpenUnitInterval = 0.1,
        select_limit: PositiveInt | None = 10_000,
        max_iter: PositiveInt = 1000,
        tolerance: PositiveFloat = 1e-5,
        folds: NonNegativeInt = 0,
        seed: NonNegativeInt = 0,
    ) -> None:
        super().__init__()
        unknown = [p for p in poolings if p not in POOLINGS]
        if unknown or not poolings:
            raise ValueError(f"unknown pooling {unknown or poolings!r}: choose one or more of {list(POOLINGS)}")
        if folds == 1:
            raise ValueError("folds must be 0 (score the test split) or at least 2 (k-fold cross-validation), got 1")
        if encoder_kwargs and "global_pool" in encoder_kwargs:
            raise ValueError("FeatureEvalModule reports every pooling itself: drop global_pool from encoder_kwargs")
        require_positive(knn_k=knn_k, knn_temperature=knn_temperature, pixel_size=pixel_size, max_iter=max_iter)
        self.save_hyperparameters()
        self.hparams.update(plain(dict(self.hparams)))  # jsonargparse's PositiveInt etc. as plain numbers
        if init_from == "random":
            sources = {"encoder": random_encoder(self.hparams, seed)}
        else:
            sources = {"encoder": random_encoder(self.hparams, seed + 1)}  # its weights come from init_from
            weights = read_weights(init_from)
            load_encoder(sources["encoder"].vit, weights, init_from)
            weights.check_statistics(init_from, mean, std)
            if floors:  # the random-encoder floor
                sources["random"] = random_encoder(self.hparams, seed)
        self.encoders = nn.ModuleDict(sources).requires_grad_(False).eval()
        self.settings = ProbeSettings(
            knn_k, knn_temperature, logreg_c, holdout, select_limit, max_iter, tolerance, seed
        )
        self.train_features: FeatureSet | None = None
        self.test_parts: list[FeatureSet] = []
        self.results: dict[str, dict] = {}

    def train(self, mode: bool = True) -> "FeatureEvalModule":
        """The encoders are frozen: always in eval mode."""
        return super().train(False)

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Every feature of images x (B, C, H, W) in [0, 1]: {"<source>/<pooling>": (B, D), "pixels": (B, P)}."""
        out = {}
        for source, encoder in self.encoders.items():
            pooled = pooled_features(encoder, x)
            out.update({f"{source}/{pooling}": pooled[pooling] for pooling in self.hparams.poolings})
        if self.hparams.floors:
            out["pixels"] = pixel_features(x, self.encoders["encoder"].normalize, self.hparams.pixel_size)
        return out

    def on_test_epoch_start(self) -> None:
        trainer = self.trainer
        if trainer.world_size > 1:
            raise RuntimeError("FeatureEvalModule runs on one device: set trainer.devices: 1")
        data = trainer.datamodule
        if not isinstance(data, ImageDataModule):
            raise EvaluationInputError(
                f"FeatureEvalModule needs one of the project's data modules (advmim_pl.data), got {type(data).__name__}"
            )
        batches = evaluation_batches(data.train_set, data.eval_transform(), data.batch_size, data.num_workers)
        self.train_features = extract(self.features, batches, self.device, trainer.precision_plugin.forward_context)
        self.test_parts = []

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = labelled(batch)
        self.test_parts.append(FeatureSet({k: v.float() for k, v in self.features(x).items()}, y))

    def on_test_epoch_end(self) -> None:
        train, num_classes = self.train_features, self.hparams.num_classes
        if not self.test_parts:
            raise EvaluationInputError("the data module has no test images: give it a test split (e.g. val_root)")
        test = FeatureSet.cat(self.test_parts)
        for split, labels in (("training", train.labels), ("test", test.labels)):
            if labels.min() < 0 or labels.max() >= num_classes:
                raise EvaluationInputError(
                    f"{split} labels span {int(labels.min())}..{int(labels.max())}, not 0..{num_classes - 1}"
                )
        if len(train.labels.unique()) < 2:
            raise EvaluationInputError(
                f"the training labels hold one class ({int(train.labels[0])}): probes need at least two"
            )
        folds = self.hparams.folds
        if folds:
            counts = cross_validate(FeatureSet.cat([train, test]), folds, num_classes, self.settings)
        else:
            counts = probe_counts(train, test, num_classes, self.settings)
        self.results = with_intervals(counts)
        self.log_dict({f"features/{key}": value["top1"] for key, value in self.results.items()})
        if self.trainer.is_global_zero:
            self._report(len(train), len(test))

    def _report(self, n_train: int, n_test: int) -> None:
        """Print the table; write features.md and features.json to the log folder."""
        hp, trainer = self.hparams, self.trainer
        data = type(trainer.datamodule).__name__
        if hp.folds:
            protocol = f"{hp.folds}-fold cross-validation over the {n_train + n_test:,} training and test images"
        else:
            protocol = f"{n_train:,} training images, scored on {n_test:,} test images"
        knn = f"kNN (k={hp.knn_k}, T={hp.knn_temperature})"
        title = f"Frozen features of {hp.init_from} on {data}: {protocol}; top-1 % [Wilson 95% interval]"
        table = ReportTable(
            ["features", "pooling", knn, "logistic regression", "C"],
            table_rows(self.results, hp.init_from, hp.pixel_size),
        )
        record = {
            "init_from": hp.init_from,
            "data": data,
            "protocol": {"folds": hp.folds, "train": n_train, "test": n_test},
            "knn": {"k": hp.knn_k, "temperature": hp.knn_temperature},
            "interval": "Wilson score, 95%",
            "results": self.results,
        }
        write_report(Path(trainer.log_dir or trainer.default_root_dir), "features", [table], record, heading=title)


def table_rows(results: dict[str, dict], init_from: str, pixel_size: int) -> list[list[str]]:
    """Table rows (features, pooling, kNN, logistic regression, C) of ``FeatureEvalModule.results``: the encoder's
    rows first, then the floors."""
    names = {"encoder": "random init" if init_from == "random" else "encoder", "random": "random init"}

    def accuracy(entry: dict) -> str:
        low, high = entry["ci95"]
        return f"{100 * entry['top1']:.2f} [{100 * low:.1f}, {100 * high:.1f}]"

    rows = []
    for key in dict.fromkeys(k.rpartition("/")[0] for k in results):
        source, _, pooling = key.partition("/")
        c = results[f"{key}/logreg"]["c"]
        c = ", ".join(f"{v:g}" for v in c) if isinstance(c, list) else f"{c:g}"
        label = f"raw pixels ({pixel_size} px)" if source == "pixels" else names[source]
        rows.append(
            [
                label,
                POOLING_NAMES.get(pooling, ""),
                accuracy(results[f"{key}/knn"]),
                accuracy(results[f"{key}/logreg"]),
                c,
            ]
        )
    return rows
