"""Project settings: hooks and the configuration loader."""

from irv2_pipeline.hooks import (
    MissingInputsHook,
    NodeTimingHook,
    ParameterCheckHook,
    RunLockHook,
)

# The lock comes first: a second run must not even inspect half-written outputs.
# Then the parameters, then the inputs: all before any node runs.
HOOKS = (RunLockHook(), ParameterCheckHook(), MissingInputsHook(), NodeTimingHook())

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/smoke and conf/local override single keys of a parameter block, not the
    # whole block.
    "merge_strategy": {"parameters": "soft"},
}
