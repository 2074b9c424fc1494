"""Project hooks."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml
from kedro.framework.hooks import hook_impl
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline

from irv2_pipeline.backbone import WeightsError, model_input_scaling
from irv2_pipeline.cluster import ClusterRole, cluster_role
from irv2_pipeline.parameters import is_modelled, parameter_problems

logger = logging.getLogger(__name__)


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


class ConcurrentRunError(RuntimeError):
    """Another run holds this project's data folder."""


def training_role(catalog: DataCatalog | None) -> ClusterRole | None:
    """This process's place in a multi-worker training cluster; ``None`` for a run
    on one machine (``finetune.distribution`` is not ``multi_worker``)."""
    if catalog is None or "params:finetune" not in catalog:
        return None
    finetune = catalog.load("params:finetune")
    if (finetune or {}).get("distribution") != "multi_worker":
        return None
    return cluster_role()


class RunLockHook:
    """Lets one ``kedro run`` at a time write a project's outputs.

    The lock is an ``flock`` on ``data/.kedro_run.lock``: the operating system drops it
    when the process ends, so a killed run never leaves a stale lock behind. In a
    multi-worker run the chief takes it, naming its cluster. The other workers write
    nothing under ``data/`` and take no lock (their project folder may be the
    chief's, or a copy of their own on another machine): they start unless another
    run, not their chief, holds it.
    """

    LOCK_FILE = "data/.kedro_run.lock"
    CLUSTER_TAG = "cluster "
    # A worker's look at the lock holds it for an instant: the chief retries this long.
    PATIENCE_S = 0.5

    def __init__(self):
        self._handle = None

    @hook_impl(tryfirst=True)
    def before_pipeline_run(
        self, run_params: dict, catalog: DataCatalog | None = None
    ) -> None:
        """Takes the lock, or stops with a message naming the run that holds it."""
        path = Path(run_params["project_path"]) / self.LOCK_FILE
        role = training_role(catalog)
        if role is not None and not role.is_chief:
            self._check_holder(path, role)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
        try:
            _lock_exclusive(handle, self.PATIENCE_S)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise ConcurrentRunError(
                f"Another `kedro run` is already writing this project's outputs "
                f"({holder}). Wait for it to finish, or run from another copy of the "
                "project."
            ) from None
        handle.seek(0)
        handle.truncate()
        cluster = "" if role is None else f", {self.CLUSTER_TAG}{role.key} chief"
        handle.write(
            f"pid {os.getpid()}, run {run_params.get('run_id')}{cluster}, "
            f"started {datetime.now(UTC).isoformat(timespec='seconds')}"
        )
        handle.flush()
        self._handle = handle

    def _check_holder(self, path: Path, role: ClusterRole) -> None:
        """Raises when a run other than this worker's cluster holds the lock."""
        if not path.is_file():
            return
        # Read-only: this worker writes nothing under data/, not even the lock file.
        with path.open() as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(handle)
                if f"{self.CLUSTER_TAG}{role.key} " not in holder:
                    raise ConcurrentRunError(
                        f"Another `kedro run` is writing this project's outputs "
                        f"({holder}), not this worker's chief "
                        f"({role.addresses[0]}). Wait for it to finish."
                    ) from None
            else:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @hook_impl
    def after_pipeline_run(self) -> None:
        """Releases the lock."""
        self._release()

    @hook_impl
    def on_pipeline_error(self) -> None:
        """Releases the lock when the run fails."""
        self._release()

    def _release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _lock_exclusive(handle, patience_s: float) -> None:
    """Takes the lock, trying for ``patience_s``: a waiting worker's look at the
    lock holds it shared for an instant."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip() or "another process"


class ChiefOnlyOutputsHook:
    """In a multi-worker run, only the chief saves the pipeline's outputs.

    Every worker runs the same nodes (training needs all of them in its
    all-reduces), and so would save the same files. On the other workers this hook
    turns every output of the run into a ``MemoryDataset`` before any node runs:
    their results stay in memory and go with the process, and nothing of theirs
    lands under ``data/``.
    """

    @hook_impl
    def before_pipeline_run(self, pipeline: Pipeline, catalog: DataCatalog) -> None:
        """On a non-chief worker, keeps every output of the run in memory."""
        role = training_role(catalog)
        if role is None or role.is_chief:
            return
        for name in sorted(pipeline.all_outputs()):
            # Assigned, not copied: a Keras model cannot be deep-copied.
            catalog[name] = MemoryDataset(copy_mode="assign")
        logger.info(
            "Worker %d of cluster %s: not the chief, so this run saves no outputs "
            "(%s stay in memory)",
            role.worker_index,
            role.key,
            ", ".join(sorted(pipeline.all_outputs())),
        )


class FinishedCheckpointsHook:
    """Deletes a training run's checkpoints once its model file is saved.

    The ``train_classifier`` node leaves its checkpoint, marked finished, for this
    hook: Kedro saves a node's outputs after the node returns, and a run killed
    while the model is written must find the final weights instead of training again.
    A counterfactual variant's model (``<variant>.finetuned_model``) clears its own
    folder (``<checkpoint_dir>/counterfactuals/<variant>``) only.
    """

    MODEL_DATASET = "finetuned_model"
    SUMMARY_DATASET = "counterfactual_summary"

    def __init__(self):
        self._checkpoint_dir: str | None = None

    @hook_impl
    def before_pipeline_run(self, catalog: DataCatalog) -> None:
        """Notes ``finetune.checkpoint_dir`` of this run (none on a worker that is
        not the chief: the checkpoints are the chief's)."""
        finetune = (
            catalog.load("params:finetune") if "params:finetune" in catalog else {}
        )
        role = training_role(catalog)
        self._checkpoint_dir = (
            finetune.get("checkpoint_dir") if role is None or role.is_chief else None
        )

    @hook_impl
    def after_dataset_saved(self, dataset_name: str) -> None:
        """After the model file is saved, deletes finished runs' checkpoints; after
        the counterfactual summary, the features the variants shared."""
        if dataset_name == self.SUMMARY_DATASET and self._checkpoint_dir is not None:
            self._remove_shared_features()
            return
        namespace, _, name = dataset_name.rpartition(".")
        if name != self.MODEL_DATASET or self._checkpoint_dir is None:
            return
        # Imported here: it imports Keras, which other commands need not load.
        from irv2_pipeline.pipelines.counterfactuals.variants import (  # noqa: PLC0415
            variant_folder,
        )
        from irv2_pipeline.pipelines.finetune.checkpoints import (  # noqa: PLC0415
            remove_finished_checkpoints,
        )

        root = (
            variant_folder(self._checkpoint_dir, namespace)
            if namespace
            else self._checkpoint_dir
        )
        for folder in remove_finished_checkpoints(root):
            logger.info("The model is saved; deleted its checkpoints in %s", folder)

    def _remove_shared_features(self) -> None:
        from irv2_pipeline.pipelines.counterfactuals.variants import (  # noqa: PLC0415
            FEATURE_CACHE,
            variant_folder,
        )

        folder = Path(variant_folder(self._checkpoint_dir, FEATURE_CACHE))
        if folder.is_dir():
            shutil.rmtree(folder)
            logger.info("The variants are compared; deleted their shared features")


class NodeTimingHook:
    """Logs each node's duration when it ends, so a log file shows where time went."""

    def __init__(self):
        self._started: dict[str, float] = {}

    @hook_impl
    def before_node_run(self, node: Node) -> None:
        """Notes when the node starts."""
        self._started[node.name] = time.perf_counter()

    @hook_impl
    def after_node_run(self, node: Node) -> None:
        """Logs the node's duration."""
        started = self._started.pop(node.name, None)
        if started is not None:
            logger.info(
                "Node %s took %s", node.name, _duration(time.perf_counter() - started)
            )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m{secs:04.1f}s" if minutes >= 1 else f"{secs:.1f}s"


class ParameterError(ValueError):
    """Parameters that cannot work; the message names each file and key."""


class ParameterCheckHook:
    """Checks the parameters when the run starts, not halfway through it.

    The rules live in ``irv2_pipeline.parameters`` (Pydantic models of the blocks that
    have them); this hook applies them and names the file that set each key. For the
    blocks without a model, conf/base is the schema: a key that an environment's file
    (``conf/local``, ``conf/smoke``, ...) sets but conf/base does not have is a typo,
    not a setting. Every problem is reported at once.
    """

    # Mappings whose keys users may add to (their own augmentation presets and
    # counterfactual variants).
    OPEN_MAPPINGS = ("augmentation.presets", "counterfactuals.variants")

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict, catalog: DataCatalog) -> None:
        """Raises ``ParameterError`` listing every problem found."""
        conf = Path(run_params["project_path"]) / "conf"
        env = run_params.get("env") or "local"
        base_files = sorted((conf / "base").glob("parameters*.yml"))
        env_files = (
            sorted((conf / env).glob("parameters*.yml")) if env != "base" else []
        )
        problems = self._unknown_keys(base_files, env_files, conf)
        params = catalog.load("parameters") if "parameters" in catalog else {}
        origin = _key_origins(base_files + env_files, conf)
        # --params is merged last, over every file.
        origin.update(
            dict.fromkeys(
                _key_paths(run_params.get("runtime_params") or {}), "--params"
            )
        )
        problems += [
            f"{_origin(problem.key, origin)}: {problem.text}"
            for problem in parameter_problems(params)
        ]
        problems += [
            f"{_origin('finetune.input_scaling', origin)}: {text}"
            for text in _preprocessing_problems(params)
        ]
        if problems:
            raise ParameterError(
                "The parameters cannot work:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )

    def _unknown_keys(
        self, base_files: list[Path], env_files: list[Path], conf: Path
    ) -> list[str]:
        """Keys of an environment's files that conf/base lacks, outside the models."""
        base_keys = set().union(*(_key_paths(_read_yaml(f)) for f in base_files))
        return [
            f"{_relative(path, conf)}: unknown key `{key}` (conf/base has no such key)"
            for path in env_files
            for key in sorted(_key_paths(_read_yaml(path)))
            if key not in base_keys
            and not key.startswith(self.OPEN_MAPPINGS)
            # The models forbid unknown keys themselves, with a suggestion.
            and not is_modelled(key)
        ]


def _preprocessing_problems(params: dict) -> list[str]:
    """An unknown ``finetune.input_scaling``, or one the weights were not trained
    with (``backbone.model_input_scaling``): found now, not when a model is built."""
    try:
        model_input_scaling(
            params.get("finetune") or {}, (params.get("model") or {}).get("weights")
        )
    except (ValueError, WeightsError) as error:
        return [str(error)]
    return []


def _read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _relative(path: Path, conf: Path) -> str:
    return f"conf/{path.relative_to(conf).as_posix()}"


def _key_paths(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= _key_paths(value, f"{prefix}{key}.")
    return keys


def _key_origins(files: list[Path], conf: Path) -> dict[str, str]:
    """For each key, the last file that sets it (later files override earlier ones)."""
    origins = {}
    for path in files:
        origins.update(
            dict.fromkeys(_key_paths(_read_yaml(path)), _relative(path, conf))
        )
    return origins


def _origin(key: str, origins: dict[str, str]) -> str:
    """The file that set ``key``, or its closest parent that a file sets."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        where = origins.get(".".join(parts[:end]))
        if where:
            return where
    return "conf/base"
