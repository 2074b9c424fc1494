"""Multi-worker training: two worker processes on 127.0.0.1, CPU only.

``finetune.distribution: multi_worker`` with a ``TF_CONFIG`` per worker. The workers
are started the way a cluster starts them: the same command, each with its own task.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import PROJECT_ROOT, digest_folder

from . import child_run

CHILD = Path(child_run.__file__)
# Bounds on every process of these tests: a worker that hangs fails the test.
RUN_TIMEOUT_S = 900


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (the OS picks them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(ports: Sequence[int], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` of a cluster on 127.0.0.1."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def start(
    command: Sequence[str], cwd: Path, config: str, log: Path
) -> subprocess.Popen:
    """Starts one worker; its output goes to ``log``."""
    env = {
        **os.environ,
        "TF_CONFIG": config,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "KEDRO_DISABLE_TELEMETRY": "1",
        "MPLBACKEND": "Agg",
    }
    with log.open("w") as out:
        return subprocess.Popen(
            list(command), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def finish(workers: Sequence[subprocess.Popen], timeout_s: float) -> list[int]:
    """Waits for every worker; kills them all if one is still running at the end."""
    deadline = time.monotonic() + timeout_s
    try:
        return [w.wait(timeout=max(1.0, deadline - time.monotonic())) for w in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def kedro_command(*params: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kedro",
        "run",
        "--env",
        "smoke",
        "--pipeline",
        "finetune",
        "--params",
        ",".join(["finetune.distribution=multi_worker", *params]),
    ]


def test_a_worker_without_the_others_fails_with_a_clear_message_in_time(tmp_path):
    ports = free_ports(2)
    log = tmp_path / "alone.log"
    worker = start(
        [
            sys.executable,
            str(CHILD),
            str(tmp_path),
            "--distribution",
            "multi_worker",
            "--cluster-timeout-s",
            "15",
        ],
        PROJECT_ROOT,
        tf_config(ports, 0),
        log,
    )
    (code,) = finish([worker], timeout_s=240)
    output = log.read_text()
    assert code != 0, output[-3000:]
    assert "waited 15s (finetune.cluster_timeout_s)" in output
    assert f"nothing answers at 127.0.0.1:{ports[1]}" in output


@pytest.mark.slow
def test_two_workers_train_one_model_that_the_chief_alone_saves(
    smoke_run, project_copy_factory
):
    finished, _, _ = smoke_run
    single = pd.read_csv(finished / "data/07_model_output/training_history.csv")
    single_test = pd.read_csv(finished / "data/07_model_output/test_predictions.csv")
    metrics = json.loads(
        (finished / "data/08_reporting/evaluation_metrics.json").read_text()
    )
    # Each worker in a project folder of its own, as on two machines, with the
    # smoke run's inputs of finetune: the non-chief's data/ must stay as it was.
    projects = []
    for index in (0, 1):
        project = project_copy_factory(f"worker_{index}")
        for folder in ("02_intermediate", "05_model_input"):
            shutil.copytree(
                finished / "data" / folder,
                project / "data" / folder,
                dirs_exist_ok=True,
            )
        projects.append(project)
    untouched = digest_folder(projects[1] / "data")
    ports = free_ports(2)
    command = kedro_command("finetune.cluster_timeout_s=300")
    workers = [
        start(command, projects[i], tf_config(ports, i), projects[i] / "worker.log")
        for i in (0, 1)
    ]
    codes = finish(workers, RUN_TIMEOUT_S)
    logs = [(project / "worker.log").read_text() for project in projects]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)

    assert digest_folder(projects[1] / "data") == untouched
    assert "saves no outputs" in logs[1] and "saves no outputs" not in logs[0]
    chief = projects[0] / "data"
    history = pd.read_csv(chief / "07_model_output/training_history.csv")
    assert history[["stage", "epoch"]].equals(single[["stage", "epoch"]])
    # Both workers trained the same model: they logged the same epochs.
    assert _epoch_lines(logs[0]) == _epoch_lines(logs[1])
    assert len(_epoch_lines(logs[0])) == len(single)
    # The chief's checkpoints are deleted once its model is saved.
    assert not list((chief / "06_models/checkpoints").glob("*"))

    accuracy = _test_accuracy(projects[0], single_test)
    low, high = metrics["accuracy_ci95"]
    assert low <= accuracy <= high, (accuracy, low, high)


@pytest.mark.slow
def test_a_worker_killed_in_stage_two_resumes_from_the_chiefs_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    folders = [tmp_path / f"worker_{i}" for i in (0, 1)]
    for folder in folders:
        folder.mkdir()

    def launch(extra: dict[int, list[str]], name: str) -> list[subprocess.Popen]:
        ports = free_ports(2)
        return [
            start(
                [
                    sys.executable,
                    str(CHILD),
                    str(folders[i]),
                    "--distribution",
                    "multi_worker",
                    "--checkpoints",
                    str(checkpoints),
                    *extra.get(i, []),
                ],
                PROJECT_ROOT,
                tf_config(ports, i),
                folders[i] / f"{name}.log",
            )
            for i in (0, 1)
        ]

    # Worker 1 kills itself (SIGKILL) in the second epoch of stage two; the chief
    # must then fail on its own, not hang.
    first = launch({1: ["--kill-at", "1:1"]}, "first")
    codes = finish(first, RUN_TIMEOUT_S)
    chief_log = (folders[0] / "first.log").read_text()
    assert codes[1] == -signal.SIGKILL, (folders[1] / "first.log").read_text()[-3000:]
    assert codes[0] not in (0, -signal.SIGKILL), chief_log[-3000:]
    (state_file,) = checkpoints.glob("*/state.json")
    state = json.loads(state_file.read_text())
    assert (state["stage_index"], state["epochs_done"]) == (1, 1), state

    trained_before = (folders[0] / "epochs.log").read_text().splitlines()
    again = launch({}, "again")
    codes = finish(again, RUN_TIMEOUT_S)
    logs = [(folder / "again.log").read_text() for folder in folders]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    for log in logs:
        assert "stage 2 of 2 (top), 1 of its epochs done" in log, log[-3000:]
    result = json.loads((folders[0] / "result.json").read_text())
    epochs = [(row["stage"], row["epoch"]) for row in result["history"]]
    assert epochs == [("head", 1), ("top", 1), ("top", 2), ("top", 3)]
    # The restart trained only the two epochs left (counted from 0).
    trained = (folders[0] / "epochs.log").read_text().splitlines()
    model = trained_before[-1].split()[0]
    assert trained[len(trained_before) :] == [f"{model} 1", f"{model} 2"]
    # Only the chief wrote checkpoints: one run's folder, still there (the model
    # file is saved by the catalog, not by this node).
    assert [p.name for p in checkpoints.iterdir()] == [state_file.parent.name]


def _epoch_lines(log: str) -> list[str]:
    """The history lines of a worker's log, without their timings."""
    return [
        line.split(" - INFO - ", 1)[1].rsplit(" (", 1)[0]
        for line in log.splitlines()
        if " - INFO - stage " in line and " epoch " in line
    ]


def _test_accuracy(project: Path, single_test: pd.DataFrame) -> float:
    """The chief's saved model's accuracy on the test images of the smoke run."""
    from irv2_pipeline.datasets.atomic_model import (  # noqa: PLC0415
        AtomicTensorFlowModelDataset,
    )
    from irv2_pipeline.images import OpenPolicy  # noqa: PLC0415
    from irv2_pipeline.inputs import image_dataset  # noqa: PLC0415

    # Loaded as the pipelines load it (safe mode, the preprocessing layer registered),
    # whatever this worker process imported before.
    model = AtomicTensorFlowModelDataset(
        filepath=str(project / "data/06_models/finetuned_model.keras")
    ).load()
    classes = json.loads((project / "data/06_models/class_names.json").read_text())
    raw = project / "data/01_raw/images"
    images = image_dataset(
        [raw / path for path in single_test["path"]],
        None,
        image_size=int(model.input_shape[1]),
        batch_size=16,
        policy=OpenPolicy(),
    )
    predicted = np.asarray(classes)[model.predict(images, verbose=0).argmax(axis=1)]
    return float(np.mean(predicted == single_test["label"].to_numpy()))
