"""Custom Kedro datasets: atomic saves of kedro-datasets' files, and what it has not."""

from .atomic import (
    AtomicCSVDataset,
    AtomicJSONDataset,
    AtomicMatplotlibDataset,
    AtomicTextDataset,
)
from .feature_cache import FeatureCacheDataset
from .generated_images import GeneratedImageFolderDataset, ImageJobs
from .html_report import HTMLReportDataset
from .image_folder import ImageFolder, ImageFolderDataset
from .markdown_report import MarkdownReportDataset

__all__ = [
    "AtomicCSVDataset",
    "AtomicJSONDataset",
    "AtomicMatplotlibDataset",
    "AtomicTextDataset",
    "FeatureCacheDataset",
    "GeneratedImageFolderDataset",
    "HTMLReportDataset",
    "ImageJobs",
    "ImageFolder",
    "ImageFolderDataset",
    "MarkdownReportDataset",
]
