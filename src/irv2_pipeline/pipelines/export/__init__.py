"""The `export` pipeline: the fine-tuned model as files other programs can load."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
