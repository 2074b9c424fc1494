"""Project pipelines."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from irv2_pipeline.pipelines import (
    augmentation,
    evaluation,
    export,
    feature_shift,
    finetune,
    inference,
    ingestion,
)

# The order of the DAG, as users read it; `__default__` runs all of them.
PIPELINE_ORDER = (
    "ingestion",
    "augmentation",
    "feature_shift",
    "finetune",
    "evaluation",
)


def register_pipelines() -> dict[str, Pipeline]:
    """Registers the five pipelines, ``__default__`` as all of them, ``export`` and
    ``inference``.

    ``export`` (the model as files for other programs) and ``inference`` (predict a
    folder of new images) run on their own after the training pipelines:
    ``kedro run --pipeline export``, ``kedro run --pipeline inference``.

    Returns:
        A mapping from pipeline names to ``Pipeline`` objects.
    """
    modules = {
        "ingestion": ingestion,
        "augmentation": augmentation,
        "feature_shift": feature_shift,
        "finetune": finetune,
        "evaluation": evaluation,
    }
    pipelines = {name: modules[name].create_pipeline() for name in PIPELINE_ORDER}
    pipelines["__default__"] = sum(pipelines.values(), Pipeline([]))
    pipelines["export"] = export.create_pipeline()
    pipelines["inference"] = inference.create_pipeline()
    return pipelines
