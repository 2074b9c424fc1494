"""Project pipelines."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kedro.pipeline import Pipeline
from kedro.utils import find_kedro_project

from irv2_pipeline.pipelines import (
    augmentation,
    counterfactuals,
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

logger = logging.getLogger(__name__)


def register_pipelines() -> dict[str, Pipeline]:
    """Registers the five pipelines, ``__default__`` as all of them, ``export``,
    ``inference`` and ``counterfactuals``.

    ``export`` (the model as files for other programs), ``inference`` (predict a
    folder of new images) and ``counterfactuals`` (the usual recipes beside ours)
    run on their own after the training pipelines: ``kedro run --pipeline export``.

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
    variants = counterfactual_variants()
    if variants:
        pipelines["counterfactuals"] = counterfactuals.create_pipeline(variants)
    return pipelines


def counterfactual_variants() -> list[str]:
    """The variants of ``counterfactuals``, read from the configuration files.

    Kedro builds its pipelines before it reads a run's ``--env`` and ``--params``, so
    the variants (one namespace each) come from conf/base and conf/local, or from
    conf/$KEDRO_ENV when that is set; each variant's settings come from the run's
    parameters as usual. A broken variant is logged and leaves ``counterfactuals``
    unregistered, so that the other pipelines still run.
    """
    # Imported here: the config loader is only needed for this.
    from kedro.config import OmegaConfigLoader  # noqa: PLC0415

    from irv2_pipeline.pipelines.counterfactuals.variants import (  # noqa: PLC0415
        VariantError,
        selected_variants,
    )
    from irv2_pipeline.settings import CONFIG_LOADER_ARGS  # noqa: PLC0415

    project = find_kedro_project(Path.cwd())
    if project is None:
        return []
    env = os.environ.get("KEDRO_ENV") or CONFIG_LOADER_ARGS["default_run_env"]
    loader = OmegaConfigLoader(
        str(project / "conf"), **{**CONFIG_LOADER_ARGS, "default_run_env": env}
    )
    try:
        return selected_variants(loader["parameters"].get("counterfactuals") or {})
    except VariantError as error:
        logger.error("The counterfactuals pipeline is not registered: %s", error)
        return []
