"""The `evaluation` pipeline (empty until its issue lands)."""

from kedro.pipeline import Pipeline


def create_pipeline(**kwargs) -> Pipeline:
    """Creates the `evaluation` pipeline."""
    return Pipeline([])
