"""Lightning data modules yielding (images float32 [0, 1] (B, C, H, W), labels int64 (B,))."""

from advmim_pl.data.base import ImageDataModule, InMemoryDataModule, MapStyleDataModule
from advmim_pl.data.fashion_mnist import BundledSampleDataModule, FashionMNISTDataModule
from advmim_pl.data.image_folder import ImageFolderDataModule
from advmim_pl.data.mnist import MNISTSubsetDataModule
from advmim_pl.data.streaming import StreamingImageDataModule
from advmim_pl.data.synthetic import SyntheticDataModule

__all__ = [
    "BundledSampleDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "InMemoryDataModule",
    "MapStyleDataModule",
    "MNISTSubsetDataModule",
    "StreamingImageDataModule",
    "SyntheticDataModule",
]
