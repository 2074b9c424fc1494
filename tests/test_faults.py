"""Faults during a `kedro run`, end to end: a full disk, and runs killed part way.

Each test runs the ``kedro`` command line in a subprocess on a copy of the project.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from irv2_pipeline.hooks import TIMINGS_COLUMNS
from irv2_pipeline.pipelines.ingestion import create_pipeline as ingestion
from tests.conftest import kedro, kedro_killed_when, with_smoke_stages

# The size of a tmpfs mounted for the project copy, and what is left free on it when
# the second run starts: enough for Kedro to start, less than ingestion writes.
TMPFS_SIZE = "64m"
LEFT_FREE_BYTES = 16 * 1024


def contents(root: Path) -> dict[str, str]:
    """Every file under ``root`` and a hash of its bytes (times and modes left out)."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def can_mount_a_tmpfs() -> bool:
    """Whether this machine lets a process mount a tmpfs in its own namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs -o size=1m tmpfs /mnt",
        ],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not can_mount_a_tmpfs(),
    reason="needs `unshare` and user namespaces to mount a small tmpfs as a full disk",
)
def test_a_full_disk_fails_the_run_with_the_error_and_keeps_earlier_outputs(
    project_copy, tmp_path
):
    """On a tmpfs that ingestion fills, the second run fails with ENOSPC."""
    mount_point, out = tmp_path / "disk", tmp_path / "out"
    mount_point.mkdir()
    out.mkdir()
    # Inside a private mount namespace: the project on a small tmpfs, a first run
    # that fits, the disk filled to LEFT_FREE_BYTES, a second run, and copies of the
    # data folder after each run kept on the real disk.
    script = textwrap.dedent(
        f"""
        set -e
        mount -t tmpfs -o size={TMPFS_SIZE} tmpfs {mount_point}
        cp -a {project_copy}/. {mount_point}/
        cd {mount_point}
        run() {{ {sys.executable} -m kedro run --env smoke --pipeline ingestion; }}
        run > {out}/first.log 2>&1
        cp -a data {out}/data_before
        free=$(df --output=avail -B1 . | tail -1)
        head -c $((free - {LEFT_FREE_BYTES})) /dev/zero > filler || true
        set +e
        run > {out}/second.log 2>&1
        echo $? > {out}/second.rc
        cp -a data {out}/data_after
        """
    )
    subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", script],
        env={
            "PATH": "/usr/bin:/bin",
            "KEDRO_DISABLE_TELEMETRY": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "MPLBACKEND": "Agg",
            "HOME": str(tmp_path),
        },
        check=True,
        timeout=900,
    )

    first_log = (out / "first.log").read_text()
    second_log = (out / "second.log").read_text()
    assert "Pipeline execution completed successfully" in first_log, first_log[-3000:]
    assert int((out / "second.rc").read_text()) != 0, second_log[-3000:]
    assert "No space left on device" in second_log, second_log[-3000:]
    assert "Could not write" in second_log, "the message names the output's own file"

    before, after = contents(out / "data_before"), contents(out / "data_after")
    before.pop(".kedro_run.lock")  # holds the pid of the run that last took it
    after.pop(".kedro_run.lock")
    # The failed run's own timings replace the first run's: where it spent its time
    # up to the failure (the nodes that ended, the one whose output failed included).
    for timings in ("08_reporting/node_timings.csv", "08_reporting/node_timings.md"):
        assert before.pop(timings) != after.pop(timings)
    failed_run = pd.read_csv(out / "data_after" / "08_reporting" / "node_timings.csv")
    assert list(failed_run.columns) == list(TIMINGS_COLUMNS)
    assert set(failed_run["node"]) <= {node.name for node in ingestion().nodes}
    assert after == before, "every earlier output is whole and nothing else was left"


# The smoke plan trains one epoch per stage; a kill in the middle of stage two needs
# more. conf/smoke is the environment `--env smoke` reads (conf/local is not read then).
HEAD = {
    "name": "head",
    "unfreeze_from": None,
    "epochs": 1,
    "learning_rate": 1.0e-3,
    "bn_policy": "frozen",
}
TOP = {
    "name": "top",
    "unfreeze_from": "conv_7b",
    "epochs": 2,
    "learning_rate": 1.0e-4,
    "bn_policy": "frozen",
}
TYPO = {**TOP, "unfreeze_from": "block8_99"}
EXPECTED_EPOCHS = [("head", 1), ("top", 1), ("top", 2)]
# Stage two runs the whole backbone in every step: on the frozen layers' cached
# outputs its epochs would end within the 2 s the kill waits.
COMMAND = [
    "run",
    "--env",
    "smoke",
    "--pipelines",
    "feature_shift,finetune",
    "--params",
    "finetune.cache_trunk_outputs=false",
]
MODEL = Path("data/06_models/finetuned_model.keras")
CHECKPOINTS = Path("data/06_models/checkpoints")
UPSTREAM_OUTPUTS = (
    "data/02_intermediate/image_manifest.csv",
    "data/05_model_input/augmented_manifest.csv",
    "data/05_model_input/augmented/.generated_images.json",
    "data/05_model_input/finetune_plan.json",
)


def checkpoint_state(project: Path) -> dict | None:
    """The state of the project's one training checkpoint, if there is one."""
    states = list((project / CHECKPOINTS).glob("*/state.json"))
    return json.loads(states[0].read_text()) if states else None


def in_stage_two(project: Path) -> bool:
    """Whether stage two has checkpointed an epoch (the next one is training)."""
    state = checkpoint_state(project)
    return state is not None and state["stage_index"] == 1 and state["epochs_done"] >= 1


def saving_the_model(project: Path) -> bool:
    """Whether the model file is being written (its temporary file exists)."""
    return any((project / MODEL).parent.glob(f".{MODEL.name}.*.tmp*"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_failed_then_twice_killed_training_goes_on_from_where_it_stopped(
    smoke_run, tmp_path
):
    """A typo, a kill mid-epoch in stage two, a kill while saving: nothing is lost."""
    finished, _, _ = smoke_run
    project = tmp_path / "project"
    shutil.copytree(finished, project, ignore=shutil.ignore_patterns("tensorboard"))
    previous_model = sha256(project / MODEL)

    # 0. A typo in a stage stops train_classifier; Kedro prints how to go on.
    with_smoke_stages(project, [HEAD, TYPO])
    failed = kedro(COMMAND, cwd=project)
    log = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "block8_99" in log, log[-5000:]
    suggestion = re.search(r"--from-nodes\s+\"?([\w,]+)\"?", log)
    assert suggestion and suggestion.group(1) == "train_classifier", log[-5000:]
    resume = [*COMMAND, "--from-nodes", suggestion.group(1)]
    upstream = {path: (project / path).stat().st_mtime_ns for path in UPSTREAM_OUTPUTS}

    # 1. The typo fixed, the suggested command is killed 2 s into stage two's 2nd epoch.
    with_smoke_stages(project, [HEAD, TOP])
    kedro_killed_when(resume, project, lambda: in_stage_two(project), delay=2)
    saved = checkpoint_state(project)
    assert (saved["stage_index"], saved["epochs_done"], saved["finished"]) == (
        1,
        1,
        False,
    ), "killed in the middle of stage two"

    # 2. The rerun resumes there; killed while it writes the model file.
    log = kedro_killed_when(resume, project, lambda: saving_the_model(project))
    assert "stage 2 of 2 (top), 1 of its epochs done" in log, log[-5000:]
    assert "stage head epoch" not in log, "stage one is not trained again"
    assert sha256(project / MODEL) == previous_model, "the previous model is whole"
    assert checkpoint_state(project)["finished"]

    # 3. The next rerun trains nothing, saves the model, deletes the checkpoint.
    last = kedro(resume, cwd=project, timeout=900)
    log = last.stdout + last.stderr
    assert last.returncode == 0, log[-5000:]
    assert "Training had finished" in log and " epoch 1/" not in log, log[-5000:]
    history = pd.read_csv(project / "data/07_model_output/training_history.csv")
    assert list(zip(history["stage"], history["epoch"], strict=True)) == EXPECTED_EPOCHS
    kept = pd.DataFrame(saved["history"])[["stage", "epoch", "loss", "val_loss"]]
    pd.testing.assert_frame_equal(
        history[kept.columns].head(len(kept)), kept, check_exact=False, rtol=1e-6
    )
    assert sha256(project / MODEL) != previous_model
    leftovers = [p.name for p in (project / MODEL).parent.iterdir()]
    assert not [name for name in leftovers if name.startswith(".")], leftovers
    assert not any((project / CHECKPOINTS).iterdir())
    assert {p: (project / p).stat().st_mtime_ns for p in UPSTREAM_OUTPUTS} == upstream


AUGMENTED = Path("data/05_model_input/augmented")
AUGMENTED_MANIFEST = Path("data/05_model_input/augmented_manifest.csv")


def test_a_run_killed_during_augmentation_leaves_nothing_a_rerun_accepts(
    smoke_run, tmp_path
):
    """The rerun after the kill writes exactly what an uninterrupted run wrote."""
    finished, _, _ = smoke_run
    project = tmp_path / "project"
    shutil.copytree(
        finished,
        project,
        ignore=shutil.ignore_patterns("*.keras", "tensorboard", "checkpoints"),
    )
    shutil.rmtree(project / AUGMENTED)
    (project / AUGMENTED_MANIFEST).unlink()
    augment = ["run", "--env", "smoke", "--pipeline", "augmentation"]

    def some_copies_written() -> bool:
        return len(list((project / AUGMENTED).rglob("*.jpg"))) >= 20

    kedro_killed_when(augment, project, some_copies_written)
    assert not (project / AUGMENTED_MANIFEST).exists()
    written = contents(project / AUGMENTED)
    uninterrupted = contents(finished / AUGMENTED)
    assert 20 <= len(written) < len(uninterrupted)
    # Every image under its own name is whole: the uninterrupted run's file. Half
    # written ones have hidden temporary names, and so does the folder's index.
    images = {n: d for n, d in written.items() if not Path(n).name.startswith(".")}
    assert images and all(uninterrupted[n] == d for n, d in images.items())

    rerun = kedro(augment, cwd=project, timeout=900)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-5000:]
    assert contents(project / AUGMENTED) == uninterrupted
    assert sha256(project / AUGMENTED_MANIFEST) == sha256(finished / AUGMENTED_MANIFEST)
