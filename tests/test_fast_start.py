"""Commands that need no model start without TensorFlow or Keras.

Importing TensorFlow costs seconds and most of a gigabyte; ``kedro registry list``, the
ingestion pipeline and Kedro-Viz only need the registry and the node functions. The
heavy imports happen inside the nodes and datasets that use them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = {"tensorflow", "keras"}

# Builds the registry and the ingestion nodes as `kedro run --pipeline ingestion` does,
# and resolves every node's type hints as Kedro's parameter validation does.
REGISTRY_SCRIPT = """
import json, sys
from pathlib import Path
from typing import get_type_hints
from kedro.framework.startup import bootstrap_project
bootstrap_project(Path.cwd())
from kedro.framework.project import pipelines
from irv2_pipeline.pipelines.ingestion import create_pipeline
assert create_pipeline().nodes
for pipeline in pipelines.values():
    for node in pipeline.nodes:
        get_type_hints(node.func)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def imported_packages(stderr: str) -> set[str]:
    """The top-level packages named in a ``-X importtime`` log.

    Args:
        stderr: The standard error of a process (and its children) run with
            ``PYTHONPROFILEIMPORTTIME=1``.

    Returns:
        The first component of every module name the log shows as imported.
    """
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:") and not line.endswith("| package")
    }


def test_registry_and_ingestion_nodes_import_no_tensorflow(project_copy: Path):
    result = subprocess.run(
        [sys.executable, "-c", REGISTRY_SCRIPT],
        cwd=project_copy,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    modules = set(json.loads(result.stdout.splitlines()[-1]))
    assert "irv2_pipeline" in modules
    assert sorted(modules & HEAVY) == []


@pytest.mark.parametrize("command", [["registry", "list"], ["viz", "build"]])
def test_listing_and_drawing_pipelines_import_no_tensorflow(
    project_copy: Path, run_kedro, monkeypatch, command: list[str]
):
    # Inherited by `kedro` and its child processes: every import is logged.
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    result = run_kedro(command, cwd=project_copy, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = imported_packages(result.stderr)
    assert "irv2_pipeline" in imported
    assert sorted(imported & HEAVY) == []


def test_ingestion_run_imports_no_tensorflow(
    project_copy: Path, run_kedro, monkeypatch
):
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    result = run_kedro(
        ["run", "--env", "smoke", "--pipeline", "ingestion"], cwd=project_copy
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert (project_copy / "data" / "02_intermediate" / "image_manifest.csv").is_file()
    imported = imported_packages(result.stderr)
    assert "irv2_pipeline" in imported
    assert sorted(imported & HEAVY) == []
