"""The `counterfactuals` pipeline: the usual recipes and ablations of ours, side by side."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
