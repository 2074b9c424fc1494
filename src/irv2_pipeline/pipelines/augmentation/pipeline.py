"""The `augmentation` pipeline (empty until its issue lands)."""

from kedro.pipeline import Pipeline


def create_pipeline(**kwargs) -> Pipeline:
    """Creates the `augmentation` pipeline."""
    return Pipeline([])
