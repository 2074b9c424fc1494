"""The `feature_shift` pipeline (empty until its issue lands)."""

from kedro.pipeline import Pipeline


def create_pipeline(**kwargs) -> Pipeline:
    """Creates the `feature_shift` pipeline."""
    return Pipeline([])
