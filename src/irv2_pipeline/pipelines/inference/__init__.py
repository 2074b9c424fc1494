"""The `inference` pipeline: predict a folder of new images, flag the unfamiliar ones."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
