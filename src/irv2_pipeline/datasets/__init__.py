"""Custom Kedro datasets, only where kedro-datasets has none."""

from .image_folder import ImageFolder, ImageFolderDataset

__all__ = ["ImageFolder", "ImageFolderDataset"]
