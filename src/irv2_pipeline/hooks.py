"""Project hooks."""

from __future__ import annotations

from kedro.framework.hooks import hook_impl
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline


class MissingInputsHook:
    """Stops a run before it starts when a persisted input has not been made yet.

    ``kedro run --pipeline finetune`` on a fresh clone would otherwise fail deep in a
    dataset loader; this names the dataset, its file and the pipeline to run first.
    """

    @hook_impl
    def before_pipeline_run(
        self, run_params: dict, pipeline: Pipeline, catalog: DataCatalog
    ) -> None:
        """Checks that every free input of the pipeline exists on disk."""
        from kedro.framework.project import pipelines  # noqa: PLC0415 - lazy registry

        missing = []
        for name in sorted(pipeline.inputs()):
            if name.startswith("params:") or name == "parameters":
                continue
            if name in catalog and not catalog.exists(name):
                missing.append(_explain(name, catalog, pipelines))
        if missing:
            raise MissingInputError(
                "These inputs of the pipeline do not exist yet:\n"
                + "\n".join(f"  - {line}" for line in missing)
            )


class MissingInputError(RuntimeError):
    """A pipeline input that an earlier pipeline must write first."""


def _explain(name: str, catalog: DataCatalog, registry) -> str:
    dataset = catalog.get(name)
    where = getattr(dataset, "_filepath", None) or getattr(dataset, "_path", None)
    producers = [
        pipeline_name
        for pipeline_name, pipeline in registry.items()
        if pipeline_name != "__default__" and name in pipeline.all_outputs()
    ]
    first = (
        f"run `kedro run --pipeline {producers[0]}` first"
        if producers
        else "it is an input you provide"
    )
    location = f" (expected at {where})" if where else ""
    return f"`{name}`{location}: {first}"
