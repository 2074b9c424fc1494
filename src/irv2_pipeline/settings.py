"""Project settings: hooks and the configuration loader."""

from irv2_pipeline.hooks import MissingInputsHook

HOOKS = (MissingInputsHook(),)

CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
}
