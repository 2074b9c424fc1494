"""Kedro-Viz as a user opens it: `kedro viz run --env smoke`, then a browser.

One Viz server (module-scoped) runs on the session's finished smoke run. Its API must
show the five pipelines in their layers, and headless Chromium must draw the DAG from
it: node labels in the SVG graph, not just names somewhere in the page's data. The
browser checks skip when there is no ``chromium`` on the PATH; the API checks do not.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from irv2_pipeline.pipeline_registry import register_pipelines
from tools.make_screenshots import free_port, signal_group

PIPELINES = ("ingestion", "augmentation", "feature_shift", "finetune", "evaluation")
# Registered, run on their own, not part of __default__.
STANDALONE = ("inference", "export", "counterfactuals")
# The nodes of each counterfactual variant's namespace.
VARIANT_TASKS = {"configure_variant", "train_classifier", "predict_test_split"}
# Top to bottom, as DESIGN.md's catalog places the datasets.
LAYERS = ["raw", "intermediate", "model_input", "models", "reporting"]
# One dataset of each layer, from the catalog.
DATASET_LAYERS = {
    "raw_images": "raw",
    "image_manifest": "intermediate",
    "finetune_plan": "model_input",
    "finetuned_model": "models",
    "evaluation_metrics": "reporting",
}
STARTUP_SECONDS = 240


def node_names(pipeline: str) -> set[str]:
    """The names of the nodes (functions) of a registered pipeline."""
    return {node.name for node in register_pipelines()[pipeline].nodes}


def get_json(url: str) -> dict:
    """The JSON body ``url`` answers with."""
    with urllib.request.urlopen(url, timeout=60) as answer:
        return json.load(answer)


def wait_for_viz(process: subprocess.Popen, log: Path) -> str:
    """Waits until Viz answers on the URL it announces; returns that base URL.

    Viz moves to the next port when the one asked for is taken, so the URL is read
    from what it prints rather than assumed.

    Raises:
        Failed: (``pytest.fail``) Viz exited, or did not answer within
            ``STARTUP_SECONDS``; the message holds its output.
    """
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"kedro viz run exited ({process.returncode}):\n{log_tail(log)}"
            )
        announced = re.search(r"running at\s+(http://\S+?)/?\s", log.read_text())
        if announced:
            try:
                get_json(f"{announced.group(1)}/api/main")
            except OSError:
                pass
            else:
                return announced.group(1)
        time.sleep(1)
    pytest.fail(
        f"kedro viz run did not answer in {STARTUP_SECONDS} s:\n{log_tail(log)}"
    )


def log_tail(log: Path) -> str:
    """The end of the server's output, for failure messages."""
    return log.read_text(errors="replace")[-4000:]


def stop(process: subprocess.Popen) -> None:
    """Stops Viz and its server child: they share the process group we started."""
    signal_group(process, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    # Whatever is left of the group, the server child included, goes now.
    signal_group(process, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def viz(smoke_run, tmp_path_factory) -> Iterator[str]:
    """``kedro viz run`` on the smoke run's project; yields its base URL."""
    project, _, _ = smoke_run
    log = tmp_path_factory.mktemp("viz") / "viz.log"
    command = [sys.executable, "-m", "kedro", "viz", "run", "--no-browser"]
    options = ["--host", "127.0.0.1", "--port", str(free_port()), "--env", "smoke"]
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"}
    with log.open("w") as output:
        process = subprocess.Popen(
            [*command, *options],
            cwd=project,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield wait_for_viz(process, log)
    finally:
        stop(process)


class RenderedGraph(HTMLParser):
    """Collects the labels Viz draws: node labels in the SVG and layer names."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[str] = []
        self._layers: list[tuple[float, str]] = []
        self._label: str | None = None
        self._layer_y = 0.0

    @property
    def layers(self) -> list[str]:
        """Layer names top to bottom, as drawn (not in the page's element order)."""
        return [name for _, name in sorted(self._layers)]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "text" and "pipeline-node__text" in classes:
            self._label = "node"
        elif tag == "li" and "pipeline-layer-name" in classes:
            self._label = "layer"
            shift = re.search(
                r"translateY\((-?[\d.]+)px\)", attributes.get("style") or ""
            )
            self._layer_y = float(shift.group(1)) if shift else 0.0

    def handle_data(self, data: str) -> None:
        text = data.strip()
        if not text:
            return
        if self._label == "node":
            self.nodes.append(text)
        elif self._label == "layer":
            self._layers.append((self._layer_y, text))
        self._label = None


def rendered(url: str, profile: Path) -> RenderedGraph:
    """What headless Chromium shows at ``url`` once the page has settled."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no `chromium` on the PATH (Debian: apt-get install chromium)")
    page = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--window-size=1600,1000",
            "--virtual-time-budget=15000",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    graph = RenderedGraph()
    graph.feed(page.stdout)
    return graph


def test_the_api_lists_every_pipeline_and_layer(viz):
    main = get_json(f"{viz}/api/main")
    assert {p["id"] for p in main["pipelines"]} == {
        *PIPELINES,
        *STANDALONE,
        "__default__",
    }
    assert main["selected_pipeline"] == "__default__"
    assert main["layers"] == LAYERS
    tasks = {n["name"] for n in main["nodes"] if n["type"] == "task"}
    assert tasks == node_names("__default__")
    layers = {n["name"]: n.get("layer") for n in main["nodes"] if n["type"] == "data"}
    assert {name: layers.get(name) for name in DATASET_LAYERS} == DATASET_LAYERS
    assert set(layers.values()) - {None} == set(LAYERS)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_api_selects_one_pipeline(viz, pipeline):
    selected = get_json(f"{viz}/api/pipelines/{pipeline}")
    assert selected["selected_pipeline"] == pipeline
    tasks = {n["name"] for n in selected["nodes"] if n["type"] == "task"}
    assert tasks == node_names(pipeline)
    assert all(pipeline in n["pipelines"] for n in selected["nodes"])


def test_the_counterfactual_variants_fold_into_groups(viz):
    variants = {
        node.namespace
        for node in register_pipelines()["counterfactuals"].nodes
        if node.namespace
    }
    selected = get_json(f"{viz}/api/pipelines/counterfactuals")
    groups = selected["modular_pipelines"]
    assert set(groups) - {"__root__"} == variants
    folded = {n["name"] for n in selected["nodes"] if n["type"] == "modularPipeline"}
    assert folded == variants
    tasks = {n["id"]: n for n in selected["nodes"] if n["type"] == "task"}
    for name in variants:
        members = [c["id"] for c in groups[name]["children"] if c["type"] == "task"]
        assert {tasks[i]["name"] for i in members} == VARIANT_TASKS
        assert all(tasks[i]["modular_pipelines"] == [name] for i in members)


def test_the_browser_draws_the_whole_dag_in_its_layers(viz, tmp_path):
    graph = rendered(f"{viz}/", tmp_path / "chromium")
    # Every node of the five pipelines, and datasets between them, as drawn labels.
    missing = (node_names("__default__") | set(DATASET_LAYERS)) - set(graph.nodes)
    assert not missing, f"not drawn: {sorted(missing)}; drawn: {graph.nodes}"
    assert graph.layers == LAYERS


def test_the_browser_shows_one_pipeline_from_the_url(viz, tmp_path):
    graph = rendered(f"{viz}/?pid=finetune", tmp_path / "chromium")
    drawn = set(graph.nodes)
    assert node_names("finetune") <= drawn, graph.nodes
    assert not drawn & (node_names("__default__") - node_names("finetune"))
