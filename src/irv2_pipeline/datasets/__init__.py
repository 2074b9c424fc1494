"""Custom Kedro datasets, only where kedro-datasets has none."""

from .generated_images import GeneratedImageFolderDataset, ImageJobs
from .image_folder import ImageFolder, ImageFolderDataset
from .markdown_report import MarkdownReportDataset

__all__ = [
    "GeneratedImageFolderDataset",
    "ImageJobs",
    "ImageFolder",
    "ImageFolderDataset",
    "MarkdownReportDataset",
]
