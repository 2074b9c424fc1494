"""Tests of reading a worker's role in a training cluster from TF_CONFIG."""

from __future__ import annotations

import json

import pytest

from irv2_pipeline.cluster import ClusterConfigError, cluster_role

WORKERS = ["10.0.0.1:2222", "10.0.0.2:2222", "10.0.0.3:2222"]


def _role(cluster: dict, task_type: str, index: int):
    config = {"cluster": cluster, "task": {"type": task_type, "index": index}}
    return cluster_role({"TF_CONFIG": json.dumps(config)})


def test_worker_zero_leads_a_cluster_without_a_chief():
    roles = [_role({"worker": WORKERS}, "worker", i) for i in range(3)]
    assert [r.is_chief for r in roles] == [True, False, False]
    assert [r.worker_index for r in roles] == [0, 1, 2]
    assert roles[1].address == WORKERS[1]
    assert roles[1].peers == (WORKERS[0], WORKERS[2])
    # One cluster, one key: the lock lets its workers in together.
    assert len({r.key for r in roles}) == 1


def test_the_chief_task_leads_and_workers_count_after_it():
    cluster = {"chief": ["10.0.0.9:2222"], "worker": WORKERS[:2]}
    chief = _role(cluster, "chief", 0)
    worker = _role(cluster, "worker", 0)
    assert chief.is_chief and not worker.is_chief
    assert (chief.worker_index, worker.worker_index) == (0, 1)
    assert worker.addresses == ("10.0.0.9:2222", *WORKERS[:2])


def test_another_cluster_has_another_key():
    one = _role({"worker": WORKERS[:2]}, "worker", 0)
    other = _role({"worker": [WORKERS[0], "10.0.0.7:2222"]}, "worker", 0)
    assert one.key != other.key


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "TF_CONFIG is not set"),
        ({"TF_CONFIG": "{not json"}, "not a cluster description"),
        ({"TF_CONFIG": json.dumps({"cluster": {}})}, "not a cluster description"),
    ],
)
def test_a_missing_or_broken_tf_config_is_a_clear_error(environ, message):
    with pytest.raises(ClusterConfigError, match=message):
        cluster_role(environ)


def test_tasks_outside_the_training_jobs_are_refused():
    with pytest.raises(ClusterConfigError, match="parameter servers"):
        _role({"worker": WORKERS, "ps": ["10.0.0.5:2222"]}, "ps", 0)
    with pytest.raises(ClusterConfigError, match="is not in its cluster"):
        _role({"worker": WORKERS}, "worker", 3)
