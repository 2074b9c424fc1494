"""The `finetune` pipeline (empty until its issue lands)."""

from kedro.pipeline import Pipeline


def create_pipeline(**kwargs) -> Pipeline:
    """Creates the `finetune` pipeline."""
    return Pipeline([])
