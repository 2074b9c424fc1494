"""Project settings: hooks and the configuration loader."""

from importlib.util import find_spec

from irv2_pipeline.hooks import (
    ChiefOnlyOutputsHook,
    FinishedCheckpointsHook,
    MissingInputsHook,
    NodeTimingHook,
    ParameterCheckHook,
    RunLockHook,
)

# The lock comes first: a second run must not even inspect half-written outputs.
# Then the parameters, then the inputs: all before any node runs.
HOOKS = (
    RunLockHook(),
    ParameterCheckHook(),
    MissingInputsHook(),
    ChiefOnlyOutputsHook(),
    NodeTimingHook(),
    FinishedCheckpointsHook(),
)

# The optional `mlflow` extra: kedro-mlflow registers its own hook through its entry
# point; ours logs the history, model and report. Without the extra, nothing of it loads.
if find_spec("kedro_mlflow") is not None:
    from irv2_pipeline.tracking import MlflowArtifactsHook

    HOOKS = (*HOOKS, MlflowArtifactsHook())

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/smoke and conf/local override single keys of a parameter block, not the
    # whole block.
    "merge_strategy": {"parameters": "soft"},
}
