"""This process's place in a multi-worker training cluster, read from ``TF_CONFIG``.

``finetune.distribution: multi_worker`` starts the same ``kedro run`` once per worker,
each with its own ``TF_CONFIG`` (managed platforms set it: Kubeflow's TFJob, Vertex AI,
Azure ML). TensorFlow's convention names the chief: the ``chief`` task, or worker 0
when the cluster has no ``chief`` job. Only the chief writes outputs, checkpoints and
logs. No TensorFlow import here: the project's hooks use this module too.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass

TRAINING_JOBS = ("chief", "worker")
# Seconds a worker that timed out gets to end on SIGTERM before SIGKILL.
KILL_GRACE_S = 5.0


class ClusterConfigError(ValueError):
    """``TF_CONFIG`` is missing or does not describe a training cluster."""


@dataclass(frozen=True)
class ClusterRole:
    """One task of a training cluster.

    Attributes:
        task_type: ``chief`` or ``worker``.
        task_index: Its index within its job.
        addresses: ``host:port`` of every training task, chief first.
        key: A short hash of the cluster spec: the same on every task of one
            cluster, different for another cluster.
        chief_job: Whether the cluster has a ``chief`` job (else worker 0 leads).
    """

    task_type: str
    task_index: int
    addresses: tuple[str, ...]
    key: str
    chief_job: bool = False

    @property
    def is_chief(self) -> bool:
        """Whether this task saves outputs, checkpoints and logs."""
        return self.worker_index == 0

    @property
    def address(self) -> str:
        """This task's own ``host:port``."""
        return self.addresses[self.worker_index]

    @property
    def worker_index(self) -> int:
        """This task's place among all training tasks (the chief is 0)."""
        if self.task_type == "chief":
            return 0
        return self.task_index + (len(self.addresses) - self.workers_in_job)

    @property
    def workers_in_job(self) -> int:
        """Tasks of the ``worker`` job."""
        return len(self.addresses) - (1 if self.chief_job else 0)

    @property
    def peers(self) -> tuple[str, ...]:
        """The other tasks' ``host:port``."""
        return tuple(a for i, a in enumerate(self.addresses) if i != self.worker_index)


def cluster_role(environ: Mapping[str, str] | None = None) -> ClusterRole:
    """This process's role, from the ``TF_CONFIG`` environment variable.

    Raises:
        ClusterConfigError: ``TF_CONFIG`` is not set, is not JSON, or does not name
            this task within a cluster of ``chief``/``worker`` tasks.
    """
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG")
    if not text:
        raise ClusterConfigError(
            "finetune.distribution = multi_worker, but TF_CONFIG is not set: start "
            'every worker with TF_CONFIG=\'{"cluster": {"worker": ["host1:port", '
            '"host2:port"]}, "task": {"type": "worker", "index": 0}}\' (its own '
            "index), or use finetune.distribution: none on one machine."
        )
    try:
        config = json.loads(text)
        cluster = config["cluster"]
        task_type = str(config["task"]["type"])
        task_index = int(config["task"]["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterConfigError(
            f"TF_CONFIG is not a cluster description ({exc!r}): it needs "
            '"cluster" (job name to addresses) and "task" ({"type", "index"}).'
        ) from exc
    chiefs = list(cluster.get("chief") or [])
    workers = list(cluster.get("worker") or [])
    if len(chiefs) > 1:
        raise ClusterConfigError(f"TF_CONFIG names {len(chiefs)} chiefs; at most one")
    if task_type not in TRAINING_JOBS:
        raise ClusterConfigError(
            f"TF_CONFIG task type {task_type!r}: this pipeline trains with "
            f"{' and '.join(TRAINING_JOBS)} tasks only (no parameter servers, no "
            "evaluator)."
        )
    job = chiefs if task_type == "chief" else workers
    if not 0 <= task_index < len(job):
        raise ClusterConfigError(
            f"TF_CONFIG task {task_type}:{task_index} is not in its cluster "
            f"({len(job)} {task_type} tasks)"
        )
    addresses = tuple(chiefs + workers)
    spec = json.dumps({"chief": chiefs, "worker": workers}, sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:12]
    return ClusterRole(task_type, task_index, addresses, key, chief_job=bool(chiefs))


def unreachable(addresses: tuple[str, ...], timeout_s: float = 2.0) -> list[str]:
    """The ``host:port`` addresses where nothing accepts a TCP connection."""
    missing = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                pass
        except OSError:
            missing.append(address)
    return missing


def timeout_message(role: ClusterRole, timeout_s: float) -> str:
    """Why a worker stops when the cluster did not form in time."""
    missing = unreachable(role.peers)
    return (
        f"Worker {role.worker_index} ({role.address}) waited {timeout_s:g}s "
        "(finetune.cluster_timeout_s) for the other workers of TF_CONFIG and stops; "
        + (
            f"nothing answers at {', '.join(missing)}. Start every worker (the same "
            "command, each with its own TF_CONFIG task)."
            if missing
            else "they answer but did not join: check that every worker runs the "
            "same project, parameters and TF_CONFIG cluster."
        )
    )


def watch(parent: int, timeout_s: float) -> None:
    """Stops process ``parent`` when it is still alive after ``timeout_s``.

    Run as ``python -m irv2_pipeline.cluster PID TIMEOUT`` by a worker that starts
    joining its cluster, and ended by it once it joined. A separate process: while
    TensorFlow waits for the cluster, it holds the worker's interpreter lock, so no
    thread of the worker itself could act.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if os.getppid() != parent:
            return
    sys.stderr.write(f"ERROR: {timeout_message(cluster_role(), timeout_s)}\n")
    sys.stderr.flush()
    os.kill(parent, signal.SIGTERM)
    # TensorFlow's runtime may hold SIGTERM back while it waits: then SIGKILL.
    time.sleep(KILL_GRACE_S)
    if os.getppid() == parent:
        os.kill(parent, signal.SIGKILL)


if __name__ == "__main__":
    watch(int(sys.argv[1]), float(sys.argv[2]))
