"""Online kNN monitor: how good the encoder's frozen features are, while pre-training runs.

The kNN probe of ``advmim_pl.eval.probes`` on a fixed labelled subset, every N epochs, as solo-learn's and
lightly's online kNN monitors do: a newcomer sees representation quality rise, not only the loss fall.
"""

import time

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat, PositiveInt
from torch import Tensor

from advmim_pl.adversarial.attack import frozen_eval
from advmim_pl.checks import require_positive
from advmim_pl.data.base import ImageDataModule
from advmim_pl.errors import EvaluationInputError
from advmim_pl.eval.extract import evaluation_batches, extract, labelled, pooled_features
from advmim_pl.eval.probes import knn_predict
from advmim_pl.models.branch_norm import BranchNorm, branch
from advmim_pl.models.pooling import GlobalPool, method_pooling


class KNNMonitor(L.Callback):
    """kNN top-1 accuracy of the pre-training encoder's frozen features, logged every ``every_n_epochs`` epochs.

    A fixed, seeded random subset of ``bank_size`` training images (labelled, with the data module's evaluation
    transform) is the neighbour bank and ``query_size`` validation images are the queries; at the end of every
    N-th validation epoch both are encoded (eval mode, no gradients, under the trainer's precision) and the
    temperature-weighted cosine kNN of ``advmim_pl.eval.probes`` scores the queries. It logs ``val/knn_top1``
    and, when the AEMIM plug-in gave the encoder its own auxiliary normalisation layers, ``val/knn_top1_aux``
    (the same images through ``branch(encoder, "aux")``). ``seconds`` accumulates the time it took. Needs one of
    the project's data modules (a labelled training set and a validation set); with validation off it never runs.

    Args:
        every_n_epochs: run at the end of every N-th epoch's validation.
        bank_size: labelled training images that vote.
        query_size: validation images scored.
        k: neighbours that vote.
        temperature: T of the vote weights exp(cosine / T).
        pooling: ``token`` or ``avg``; null reads the method's ``pooling`` (``avg`` for SimMIM, whose loss never
            reads the cls token's output; ``token`` for MAE and for a method that declares none).
        batch_size: encoding batch.
        seed: seed of the two subsets.
    """

    def __init__(
        self,
        every_n_epochs: PositiveInt = 1,
        bank_size: PositiveInt = 1000,
        query_size: PositiveInt = 500,
        k: PositiveInt = 20,
        temperature: PositiveFloat = 0.07,
        pooling: GlobalPool | None = None,
        batch_size: PositiveInt = 256,
        seed: NonNegativeInt = 0,
    ) -> None:
        require_positive(every_n_epochs=every_n_epochs, bank_size=bank_size, query_size=query_size, k=k)
        require_positive(temperature=temperature, batch_size=batch_size)
        if k > bank_size:
            raise ValueError(f"KNNMonitor: k={k} is larger than bank_size={bank_size}: choose k <= bank_size")
        if pooling not in (None, "token", "avg"):
            raise ValueError(f"KNNMonitor: unknown pooling {pooling!r}: choose token, avg or null (per method)")
        self.every_n_epochs, self.bank_size, self.query_size = every_n_epochs, bank_size, query_size
        self.k, self.temperature, self.pooling = k, temperature, pooling
        self.batch_size, self.seed = batch_size, seed
        self.images: dict[str, tuple[Tensor, Tensor]] | None = None  # bank and query, loaded at the first run
        self.num_classes = 0
        self.seconds = 0.0

    def _subset(self, dataset, transform, size: int) -> tuple[Tensor, Tensor]:
        """(images, labels) of a seeded random subset of ``size`` images of ``dataset`` (all, if it has fewer)."""
        index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[:size].sort().values
        batches = [labelled(b) for b in evaluation_batches(dataset, transform, self.batch_size, indices=index)]
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    def _load(self, trainer: L.Trainer) -> None:
        data = trainer.datamodule
        if not isinstance(data, ImageDataModule) or data.train_set is None or data.val_set is None:
            raise EvaluationInputError(
                "KNNMonitor needs one of the project's data modules (advmim_pl.data) with training and validation "
                f"images, got {type(data).__name__}"
            )
        transform = data.eval_transform()
        self.images = {
            "bank": self._subset(data.train_set, transform, self.bank_size),
            "query": self._subset(data.val_set, transform, self.query_size),
        }
        self.num_classes = data.num_classes
        if len(self.images["bank"][1]) < self.k:
            raise EvaluationInputError(
                f"KNNMonitor: k={self.k} is larger than the {len(data.train_set)} training images"
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        start = time.perf_counter()
        if self.images is None:
            self._load(trainer)
        encoder = pl_module.encoder
        pooling = self.pooling or method_pooling(pl_module.method, "token")
        branches = ["clean"] + (["aux"] if any(isinstance(m, BranchNorm) for m in encoder.modules()) else [])
        for name in branches:
            features = {}
            with frozen_eval(encoder), branch(encoder, name):
                for part, (x, y) in self.images.items():
                    batches = zip(x.split(self.batch_size), y.split(self.batch_size), strict=True)
                    features[part] = extract(
                        lambda images: {"f": pooled_features(encoder, images)[pooling]},
                        batches,
                        pl_module.device,
                        trainer.precision_plugin.forward_context,
                    )
            bank, query = features["bank"], features["query"]
            predicted = knn_predict(
                bank.features["f"], bank.labels, query.features["f"], self.num_classes, self.k, self.temperature
            )
            key = "val/knn_top1_aux" if name == "aux" else "val/knn_top1"
            accuracy = (predicted == query.labels).float().mean()
            pl_module.log(key, accuracy, prog_bar=name == "clean", sync_dist=True)
        self.seconds += time.perf_counter() - start
