"""KNNMonitor: what it logs during pre-training agrees with scikit-learn's kNN on the same images, for the clean and
the auxiliary branch, with the per-method pooling; it rises with pre-training; bad settings."""

import lightning as L
import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from advmim_pl.adversarial import AEMIM, Attacker
from advmim_pl.errors import EvaluationInputError
from advmim_pl.eval import KNNMonitor
from advmim_pl.models.branch_norm import branch
from tests.helpers.micro import bundled_sample, micro_module, trainer


def reference_accuracy(module, monitor: KNNMonitor, branch_name: str, pooling: str) -> float:
    """scikit-learn's temperature-weighted cosine kNN on features that timm computes (its own forward_features for the
    cls token, forward_intermediates for the mean pre-norm patch token), not the monitor's code."""
    encoder = module.encoder.eval()

    def features(x):
        with torch.no_grad(), branch(encoder, branch_name):
            x = encoder.normalize(x)
            if pooling == "token":
                return encoder.vit.forward_features(x)[:, 0].numpy()
            (last,) = encoder.vit.forward_intermediates(x, indices=1, intermediates_only=True)  # (B, D, H, W)
            mean_patch = last.mean(dim=(2, 3))
            return torch.nn.functional.layer_norm(mean_patch, mean_patch.shape[-1:], eps=1e-6).numpy()

    (bank_x, bank_y), (query_x, query_y) = monitor.images["bank"], monitor.images["query"]
    weights = lambda d: np.exp((1 - d) / monitor.temperature)
    knn = KNeighborsClassifier(monitor.k, metric="cosine", algorithm="brute", weights=weights)
    predicted = knn.fit(features(bank_x), bank_y.numpy()).predict(features(query_x))
    return float((predicted == query_y.numpy()).mean())


def test_the_clean_and_aux_accuracies_agree_with_scikit_learn():
    L.seed_everything(0)
    data = bundled_sample()
    module = micro_module(plugin=AEMIM(attack=Attacker(eps=8 / 255)), mean=data.mean, std=data.std, batch_size=64)
    monitor = KNNMonitor(bank_size=600, query_size=300)
    t = trainer(-1, [monitor], max_epochs=1, limit_train_batches=4, limit_val_batches=1, num_sanity_val_steps=0)
    t.fit(module, datamodule=data)
    assert [len(monitor.images[p][1]) for p in ("bank", "query")] == [600, 300]
    assert monitor.seconds > 0
    for key, name in (("val/knn_top1", "clean"), ("val/knn_top1_aux", "aux")):
        logged = float(t.callback_metrics[key])
        assert abs(logged - reference_accuracy(module, monitor, name, "token")) <= 1 / 300, key  # one image


def test_simmim_is_monitored_on_the_patch_average_and_only_every_n_epochs():
    L.seed_everything(0)
    data = bundled_sample()
    module = micro_module("simmim", mean=data.mean, std=data.std, batch_size=64)
    monitor = KNNMonitor(every_n_epochs=2, bank_size=400, query_size=200)
    runs = []

    class Runs(L.Callback):  # after the monitor: did it log this epoch?
        def on_validation_epoch_end(self, trainer, pl_module):
            runs.append(monitor.images is not None and "val/knn_top1" in trainer.callback_metrics)

    t = trainer(-1, [monitor, Runs()], max_epochs=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    t.fit(module, datamodule=data)
    assert runs == [False, True]  # first run at the end of epoch 2
    assert "val/knn_top1_aux" not in t.callback_metrics  # no plug-in: no auxiliary branch
    logged = float(t.callback_metrics["val/knn_top1"])
    assert abs(logged - reference_accuracy(module, monitor, "clean", "avg")) <= 1 / 200


def test_the_monitored_accuracy_rises_with_pre_training(pretrained):
    """The monitor on the session's pre-trained micro MAE (400 steps on the sample; one more step at lr 0 here)
    against the same micro encoder at its initialisation."""
    L.seed_everything(0)
    data = bundled_sample()
    settings = dict(mean=data.mean, std=data.std, batch_size=64)
    module = micro_module(**settings, base_lr=0.0, init_from=pretrained["mae"])
    monitor = KNNMonitor(bank_size=1000, query_size=500)
    untrained = None

    class Untrained(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal untrained
            monitor._load(trainer)
            untrained = reference_accuracy(micro_module(**settings), monitor, "clean", "token")

    t = trainer(-1, [Untrained(), monitor], max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                num_sanity_val_steps=0)  # fmt: skip
    t.fit(module, datamodule=data)
    assert float(t.callback_metrics["val/knn_top1"]) >= untrained + 0.04, (untrained, t.callback_metrics)


def test_bad_settings_and_data():
    with pytest.raises(ValueError, match="k=50 is larger than bank_size=20"):
        KNNMonitor(k=50, bank_size=20)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        KNNMonitor(pooling="max")
    module = micro_module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(16, 1, 32, 32)), batch_size=8)
    t = trainer(-1, [KNNMonitor()], max_epochs=1, num_sanity_val_steps=0)
    with pytest.raises(EvaluationInputError, match="needs one of the project's data modules"):
        t.fit(module, train_dataloaders=loader, val_dataloaders=loader)
