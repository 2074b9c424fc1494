"""Project hooks."""

from __future__ import annotations

import fcntl
import logging
import math
import os
import resource
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import yaml
from kedro.framework.hooks import hook_impl
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline

from irv2_pipeline.cluster import ClusterRole, cluster_role
from irv2_pipeline.parameters import is_modelled, parameter_problems
from irv2_pipeline.sources import SourceError, candidate_sources, forced_source

logger = logging.getLogger(__name__)


class MissingInputsHook:
    """Stops a run before it starts when a persisted input has not been made yet.

    ``kedro run --pipeline finetune`` on a fresh clone would otherwise fail deep in a
    dataset loader; this names the dataset, its file and the pipeline to run first.
    Inputs that load ``None`` when absent (``datasets.FeatureCacheDataset``) are
    caches the run fills, not inputs to make first.
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
            if name not in catalog or _optional(catalog.get(name)):
                continue
            if not catalog.exists(name):
                missing.append(_explain(name, catalog, pipelines))
        if missing:
            raise MissingInputError(
                "These inputs of the pipeline do not exist yet:\n"
                + "\n".join(f"  - {line}" for line in missing)
            )


def _optional(dataset) -> bool:
    """A dataset that loads ``None`` when its file is absent (a cache to fill, e.g.
    ``stored_reference_features``): never a reason to stop."""
    return bool(getattr(dataset, "loads_none_when_absent", False))


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


TIMINGS_DATASET = "node_timings"
TIMINGS_REPORT_DATASET = "node_timings_report"
TIMINGS_COLUMNS = (
    "node",
    "wall_s",
    "cpu_s",
    "children_cpu_s",
    "peak_rss_mb",
    "end_rss_mb",
)
# The nodes the Markdown table shows; the CSV has every node.
TOP_NODES = 10


class Usage(NamedTuple):
    """What the process has used so far (see :func:`process_usage`)."""

    wall_s: float
    cpu_s: float
    children_cpu_s: float
    peak_rss_mb: float
    rss_mb: float


class NodeTimingHook:
    """Records each node's wall time, CPU time and memory; writes them when the run ends.

    Per node: ``wall_s``; ``cpu_s``, the process's CPU seconds (every thread's, user
    and system) while it ran; ``children_cpu_s``, those of child processes that
    ended while it ran (a node's worker pool); ``peak_rss_mb``, the process's peak
    resident memory when the node ended, a high-water mark of the whole run so far
    (a node after a larger one shows the larger one's peak); and ``end_rss_mb``, the
    resident memory when it ended. Nodes that run at once (``ThreadRunner``) share
    the process's CPU seconds; the ``ParallelRunner``'s run in other processes and
    are not recorded.

    When a run ends (or fails), the rows go to the catalog's ``node_timings`` (every
    node, in the order they ended) and ``node_timings_report`` (the nodes of most
    wall time, as Markdown) where the catalog has them. The hook writes them itself:
    the run's last node ends before the table is complete, so no node could. Each
    run replaces the previous run's files; only a multi-worker run's chief writes.
    """

    def __init__(self):
        self._started: dict[str, Usage] = {}
        self._rows: list[dict[str, float | str]] = []

    @hook_impl
    def before_pipeline_run(self) -> None:
        """Starts an empty table: one instance serves every run of a process."""
        self._started.clear()
        self._rows = []

    @hook_impl
    def before_node_run(self, node: Node) -> None:
        """Notes what the process had used when the node started."""
        self._started[node.name] = process_usage()

    @hook_impl
    def after_node_run(self, node: Node) -> None:
        """Records the node's row and logs its duration."""
        started = self._started.pop(node.name, None)
        if started is None:
            return
        row = usage_row(node.name, started, process_usage())
        self._rows.append(row)
        logger.info("Node %s took %s", node.name, _duration(float(row["wall_s"])))

    @hook_impl
    def after_pipeline_run(self, catalog: DataCatalog) -> None:
        """Writes the table of the run's nodes."""
        self._write(catalog)

    @hook_impl
    def on_pipeline_error(self, catalog: DataCatalog) -> None:
        """Writes the nodes that ended before the run failed."""
        self._write(catalog)

    def _write(self, catalog: DataCatalog) -> None:
        role = training_role(catalog)
        if role is not None and not role.is_chief:
            return
        table = timings_table(self._rows)
        if TIMINGS_DATASET in catalog:
            catalog.save(TIMINGS_DATASET, table)
        if TIMINGS_REPORT_DATASET in catalog:
            catalog.save(TIMINGS_REPORT_DATASET, timings_markdown(table))


def process_usage() -> Usage:
    """This process's wall clock, CPU seconds and memory now (Unix)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    unit = 1 if sys.platform == "darwin" else 1024
    rss_mb = _resident_mb()
    return Usage(
        wall_s=time.perf_counter(),
        cpu_s=own.ru_utime + own.ru_stime,
        children_cpu_s=children.ru_utime + children.ru_stime,
        # The kernel's high-water mark can trail the RSS read a moment later.
        peak_rss_mb=max(own.ru_maxrss * unit / 2**20, rss_mb),
        rss_mb=rss_mb,
    )


def _resident_mb() -> float:
    """The resident memory now; NaN where ``/proc`` is missing (not Linux)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return math.nan
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def usage_row(name: str, start: Usage, end: Usage) -> dict[str, float | str]:
    """One node's row of ``node_timings``, from the usage at its start and end.

    Args:
        name: The node's name.
        start: :func:`process_usage` when it started.
        end: :func:`process_usage` when it ended.

    Returns:
        The values of :data:`TIMINGS_COLUMNS`.
    """
    return {
        "node": name,
        "wall_s": end.wall_s - start.wall_s,
        "cpu_s": end.cpu_s - start.cpu_s,
        "children_cpu_s": end.children_cpu_s - start.children_cpu_s,
        "peak_rss_mb": end.peak_rss_mb,
        "end_rss_mb": end.rss_mb,
    }


def timings_table(rows: list[dict[str, float | str]]) -> pd.DataFrame:
    """The ``node_timings`` table: one row per node, in the order they ended."""
    table = pd.DataFrame(rows, columns=list(TIMINGS_COLUMNS))
    # Numbers even without rows: a run can fail before its first node ends.
    return table.astype(dict.fromkeys(TIMINGS_COLUMNS[1:], float)).round(3)


def timings_markdown(table: pd.DataFrame, top: int = TOP_NODES) -> str:
    """The "Where the time went" page: the ``top`` nodes of most wall time.

    Args:
        table: :func:`timings_table`.
        top: How many nodes the table shows.

    Returns:
        A heading, the run's total wall time and the table, with each node's
        share of that total.
    """
    # The report's own table format; imported here, when a run ends, as the
    # evaluation pipeline's modules load matplotlib.
    from irv2_pipeline.pipelines.evaluation.report import (  # noqa: PLC0415
        markdown_table,
    )

    total = float(table["wall_s"].sum())
    shown = table.nlargest(top, "wall_s")
    shown.insert(2, "share", (shown["wall_s"] / total).map("{:.0%}".format))
    return (
        "# Where the time went\n\n"
        f"{len(table)} nodes, {_duration(total)} of node wall time in all; the "
        f"{len(shown)} longest, from `node_timings.csv` (every node). "
        "`peak_rss_mb` is the process's peak so far when the node ended.\n\n"
        f"{markdown_table(shown)}\n"
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
            f"{_origin(key, origin)}: {text}" for key, text in _source_problems(params)
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


def _source_problems(params: dict) -> list[tuple[str, str]]:
    """Candidate sources that cannot be used (``sources.candidate_sources``: an
    unknown preprocessing, one the weights were not trained with, an image size IRv2
    cannot take) or a ``model.source`` that names none: found now, not when a model
    is built. Each with the key it is about."""
    model, finetune = params.get("model") or {}, params.get("finetune") or {}
    key = "model.sources" if model.get("sources") else "finetune.input_scaling"
    try:
        candidates = candidate_sources(model, finetune)
    except SourceError as error:
        return [(key, str(error))]
    try:
        forced_source(model, candidates)
    except SourceError as error:
        return [("model.source", str(error))]
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
