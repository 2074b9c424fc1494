"""Tests of the project hooks: missing inputs, one run at a time, parameters."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline
from kedro_datasets.pandas import CSVDataset

from irv2_pipeline.datasets import AtomicCSVDataset, MarkdownReportDataset
from irv2_pipeline.hooks import (
    ChiefOnlyOutputsHook,
    ConcurrentRunError,
    FinishedCheckpointsHook,
    MissingInputError,
    MissingInputsHook,
    NodeTimingHook,
    ParameterCheckHook,
    ParameterError,
    RunLockHook,
    timings_markdown,
    timings_table,
)
from irv2_pipeline.settings import CONFIG_LOADER_ARGS
from tests.conftest import PROJECT_ROOT


def _identity(frame):
    return frame


@pytest.fixture
def two_pipelines(monkeypatch):
    producer = Pipeline([Node(_identity, "raw", "image_manifest", name="make")])
    consumer = Pipeline([Node(_identity, "image_manifest", "copies", name="use")])
    registry = {"ingestion": producer, "augmentation": consumer}
    monkeypatch.setattr("kedro.framework.project.pipelines", registry)
    return consumer


def test_missing_input_names_dataset_file_and_pipeline_to_run_first(
    tmp_path, two_pipelines
):
    manifest = tmp_path / "image_manifest.csv"
    catalog = DataCatalog({"image_manifest": CSVDataset(filepath=str(manifest))})
    with pytest.raises(MissingInputError) as error:
        MissingInputsHook().before_pipeline_run({}, two_pipelines, catalog)
    message = str(error.value)
    assert "`image_manifest`" in message
    assert str(manifest) in message
    assert "kedro run --pipeline ingestion" in message


def test_existing_inputs_let_the_run_start(tmp_path, two_pipelines):
    manifest = tmp_path / "image_manifest.csv"
    pd.DataFrame({"path": ["a/1.png"]}).to_csv(manifest, index=False)
    catalog = DataCatalog({"image_manifest": CSVDataset(filepath=str(manifest))})
    MissingInputsHook().before_pipeline_run({}, two_pipelines, catalog)


def test_a_second_run_is_refused_until_the_first_ends(tmp_path):
    params = {"project_path": str(tmp_path), "run_id": "first"}
    first, second = RunLockHook(), RunLockHook()
    first.before_pipeline_run(params)
    with pytest.raises(
        ConcurrentRunError, match=r"already writing.*pid \d+, run first"
    ):
        second.before_pipeline_run({**params, "run_id": "second"})
    first.after_pipeline_run()
    second.before_pipeline_run({**params, "run_id": "second"})
    second.on_pipeline_error()


def _cluster_catalog(monkeypatch, index: int, ports=(2222, 2223)) -> DataCatalog:
    """The catalog and TF_CONFIG of worker ``index`` of a two-worker run."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
    )
    finetune = {"distribution": "multi_worker"}
    return DataCatalog({"params:finetune": MemoryDataset(finetune)})


def test_the_workers_of_one_cluster_share_the_lock_but_no_other_run(
    tmp_path, monkeypatch
):
    params = {"project_path": str(tmp_path), "run_id": "cluster"}
    chief = RunLockHook()
    chief.before_pipeline_run(params, _cluster_catalog(monkeypatch, 0))
    # Its other worker starts (it writes nothing under data/)...
    RunLockHook().before_pipeline_run(params, _cluster_catalog(monkeypatch, 1))
    # ...an unrelated run does not, nor a worker of another cluster.
    with pytest.raises(ConcurrentRunError, match="already writing.*cluster"):
        RunLockHook().before_pipeline_run({**params, "run_id": "single"})
    other = _cluster_catalog(monkeypatch, 1, ports=(3333, 3334))
    with pytest.raises(ConcurrentRunError, match="not this worker's chief"):
        RunLockHook().before_pipeline_run(params, other)
    chief.after_pipeline_run()


def test_a_worker_starts_before_its_chief_but_not_beside_another_run(
    tmp_path, monkeypatch
):
    params = {"project_path": str(tmp_path), "run_id": "early"}
    RunLockHook().before_pipeline_run(params, _cluster_catalog(monkeypatch, 1))
    single = RunLockHook()
    single.before_pipeline_run({**params, "run_id": "single"})
    with pytest.raises(ConcurrentRunError, match="run single.*not this worker's"):
        RunLockHook().before_pipeline_run(params, _cluster_catalog(monkeypatch, 1))
    single.on_pipeline_error()


def test_only_the_chief_saves_the_outputs(tmp_path, monkeypatch):
    pipeline = Pipeline([Node(_identity, "raw", "copies", name="copy")])

    def catalog(index: int) -> DataCatalog:
        built = _cluster_catalog(monkeypatch, index)
        built["raw"] = MemoryDataset(pd.DataFrame({"a": [1]}))
        built["copies"] = CSVDataset(filepath=str(tmp_path / f"copies_{index}.csv"))
        return built

    for index in (0, 1):
        built = catalog(index)
        ChiefOnlyOutputsHook().before_pipeline_run(pipeline, built)
        built.save("copies", built.load("raw"))
    assert (tmp_path / "copies_0.csv").is_file()
    assert not (tmp_path / "copies_1.csv").exists()


def test_each_node_logs_its_duration(caplog):
    node = Node(_identity, "a", "b", name="scan_images")
    hook = NodeTimingHook()
    with caplog.at_level("INFO", logger="irv2_pipeline.hooks"):
        hook.before_node_run(node)
        hook.after_node_run(node)
    assert re.search(r"Node scan_images took \d+\.\ds", caplog.text)


def _timings_catalog(folder: Path, catalog: DataCatalog | None = None) -> DataCatalog:
    """``catalog`` (or a new one) with the timing datasets of conf/base, in ``folder``."""
    catalog = DataCatalog() if catalog is None else catalog
    catalog["node_timings"] = AtomicCSVDataset(filepath=str(folder / "timings.csv"))
    catalog["node_timings_report"] = MarkdownReportDataset(
        filepath=str(folder / "timings.md")
    )
    return catalog


def _burn_cpu(seconds: float) -> None:
    """Keeps this process's CPU busy until it has used ``seconds`` more."""
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass


# A child process (a node's worker) that uses 0.3 s of CPU.
_CHILD_BURNS_CPU = (
    "import time\n"
    "until = time.process_time() + 0.3\n"
    "while time.process_time() < until:\n"
    "    pass\n"
)


def _timed(hook: NodeTimingHook, name: str, work) -> None:
    node = Node(_identity, "a", "b", name=name)
    hook.before_node_run(node)
    work()
    hook.after_node_run(node)


def test_each_nodes_wall_cpu_and_memory_are_written_when_the_run_ends(tmp_path):
    catalog = _timings_catalog(tmp_path)
    hook = NodeTimingHook()
    hook.before_pipeline_run()
    _timed(hook, "wait", lambda: time.sleep(0.3))
    _timed(hook, "work", lambda: _burn_cpu(0.3))
    burn = [sys.executable, "-c", _CHILD_BURNS_CPU]
    _timed(hook, "pool", lambda: subprocess.run(burn, check=True))
    hook.after_pipeline_run(catalog)

    table = pd.read_csv(tmp_path / "timings.csv").set_index("node")
    assert list(table.index) == ["wait", "work", "pool"]
    assert table.loc["wait", "wall_s"] >= 0.3
    assert table.loc["work", "cpu_s"] >= 0.3
    assert table.loc["pool", "children_cpu_s"] >= 0.3
    assert (table["end_rss_mb"] > 0).all()
    # A high-water mark is never below the memory in use.
    assert (table["peak_rss_mb"] >= table["end_rss_mb"]).all()
    page = (tmp_path / "timings.md").read_text()
    assert page.startswith("# Where the time went")
    assert all(f"| {name} |" in page for name in table.index)


def test_the_page_shows_the_longest_nodes_and_their_share():
    table = pd.DataFrame(
        {
            "node": [f"n{i}" for i in range(12)],
            "wall_s": [1.0] * 11 + [89.0],
            "cpu_s": 1.0,
            "children_cpu_s": 0.0,
            "peak_rss_mb": 100.0,
            "end_rss_mb": 90.0,
        }
    )
    page = timings_markdown(table)
    rows = re.findall(r"^\| n\d+ \|.*$", page, flags=re.MULTILINE)
    assert len(rows) == 10
    assert rows[0].startswith("| n11 | 89 | 89% |")
    assert "12 nodes, 1m40.0s of node wall time" in page
    assert "0 nodes" in timings_markdown(timings_table([]))


def test_a_failed_run_writes_the_nodes_that_ended_and_the_next_run_replaces_them(
    tmp_path,
):
    catalog = _timings_catalog(tmp_path)
    hook = NodeTimingHook()
    hook.before_pipeline_run()
    _timed(hook, "first", lambda: None)
    hook.before_node_run(Node(_identity, "a", "b", name="fails"))
    hook.on_pipeline_error(catalog)
    assert list(pd.read_csv(tmp_path / "timings.csv")["node"]) == ["first"]
    hook.before_pipeline_run()
    _timed(hook, "second", lambda: None)
    hook.after_pipeline_run(catalog)
    assert list(pd.read_csv(tmp_path / "timings.csv")["node"]) == ["second"]


def test_only_the_chief_writes_the_timings(tmp_path, monkeypatch):
    for index in (0, 1):
        folder = tmp_path / str(index)
        folder.mkdir()
        catalog = _timings_catalog(folder, _cluster_catalog(monkeypatch, index))
        hook = NodeTimingHook()
        hook.before_pipeline_run()
        _timed(hook, "train", lambda: None)
        hook.after_pipeline_run(catalog)
    assert (tmp_path / "0" / "timings.csv").is_file()
    assert not any((tmp_path / "1").iterdir())


def _project_with(tmp_path: Path, local_params: str) -> Path:
    """A conf/ folder: this project's conf/base and one conf/local parameters file."""
    conf = tmp_path / "conf"
    shutil.copytree(PROJECT_ROOT / "conf" / "base", conf / "base")
    (conf / "local").mkdir()
    (conf / "local" / "parameters.yml").write_text(local_params)
    return conf


def _check(tmp_path: Path, runtime_params: dict | None = None) -> None:
    """Runs the hook as ``kedro run`` would, on parameters merged by Kedro's loader."""
    loader = OmegaConfigLoader(
        str(tmp_path / "conf"), **CONFIG_LOADER_ARGS, runtime_params=runtime_params
    )
    catalog = DataCatalog({"parameters": MemoryDataset(loader["parameters"])})
    ParameterCheckHook().before_pipeline_run(
        {
            "project_path": str(tmp_path),
            "env": "local",
            "runtime_params": runtime_params,
        },
        catalog,
    )


def _problems(tmp_path: Path, runtime_params: dict | None = None) -> str:
    with pytest.raises(ParameterError) as error:
        _check(tmp_path, runtime_params)
    return str(error.value)


def test_checkpoints_of_finished_runs_go_once_the_model_is_saved(tmp_path):
    root = tmp_path / "checkpoints"
    for key, finished in (("done", True), ("killed", False)):
        (root / key).mkdir(parents=True)
        (root / key / "state.json").write_text(json.dumps({"finished": finished}))
    hook = FinishedCheckpointsHook()
    catalog = DataCatalog(
        {"params:finetune": MemoryDataset({"checkpoint_dir": str(root)})}
    )
    hook.before_pipeline_run(catalog=catalog)

    hook.after_dataset_saved(dataset_name="training_history")
    assert sorted(p.name for p in root.iterdir()) == ["done", "killed"]
    hook.after_dataset_saved(dataset_name="finetuned_model")
    assert [p.name for p in root.iterdir()] == ["killed"]


def test_a_worker_that_is_not_the_chief_leaves_the_chiefs_checkpoints(
    tmp_path, monkeypatch
):
    root = tmp_path / "checkpoints"
    (root / "done").mkdir(parents=True)
    (root / "done" / "state.json").write_text(json.dumps({"finished": True}))
    catalog = _cluster_catalog(monkeypatch, 1)
    catalog["params:finetune"] = MemoryDataset(
        {**catalog.load("params:finetune"), "checkpoint_dir": str(root)}
    )
    hook = FinishedCheckpointsHook()
    hook.before_pipeline_run(catalog=catalog)
    hook.after_dataset_saved(dataset_name="finetuned_model")
    assert [p.name for p in root.iterdir()] == ["done"]


def test_unknown_keys_and_impossible_values_are_named_with_their_file(tmp_path):
    _project_with(
        tmp_path,
        "model: {image_sise: 80, image_size: 64}\n"
        "ingestion: {split: {train: 0.8}}\n"
        "augmentation: {copiez: 2}\n",
    )
    message = _problems(tmp_path)
    assert "conf/local/parameters.yml: unknown key `model.image_sise`" in message
    assert "did you mean `image_size`?" in message
    assert "conf/local/parameters.yml: model.image_size = 64: must be at least 75" in (
        message
    )
    assert "conf/local/parameters.yml: ingestion.split: train + val + test" in message
    assert "sum to 1" in message
    # Blocks without a model are still checked against conf/base's keys.
    assert (
        "conf/local/parameters.yml: unknown key `augmentation.copiez` "
        "(conf/base has no such key)" in message
    )


def test_each_problem_is_reported_once(tmp_path):
    _project_with(tmp_path, "model: {image_sise: 80}\n")
    assert _problems(tmp_path).count("model.image_sise") == 1


def test_a_partly_modelled_block_names_each_unknown_key_once(tmp_path):
    _project_with(
        tmp_path,
        "evaluation: {fail_onn: high, diagnosis: {weak_segment: {alpah: 0.1}}}\n",
    )
    message = _problems(tmp_path)
    # The weak_segment model forbids unknown keys and suggests one ...
    assert message.count("evaluation.diagnosis.weak_segment.alpah") == 1
    assert "did you mean `alpha`?" in message
    # ... the rest of evaluation is checked against conf/base's keys.
    assert "unknown key `evaluation.fail_onn` (conf/base has no such key)" in message


def test_a_value_set_in_conf_base_is_named_with_its_pipeline_file(tmp_path):
    conf = _project_with(tmp_path, "model: {weights: null}\n")
    ingestion = conf / "base" / "parameters_ingestion.yml"
    ingestion.write_text(ingestion.read_text().replace("seed: 20240601", "seed: 1.5"))
    message = _problems(tmp_path)
    assert (
        "conf/base/parameters_ingestion.yml: ingestion.split.seed = 1.5: "
        "must be a valid integer" in message
    )


def test_a_runtime_parameter_is_named_as_params(tmp_path):
    _project_with(tmp_path, "model: {seed: 1}\n")
    message = _problems(tmp_path, runtime_params={"model": {"image_size": 50}})
    assert "--params: model.image_size = 50" in message


def test_known_keys_and_own_presets_pass(tmp_path):
    _project_with(
        tmp_path,
        "model: {image_size: 150, weights: null}\n"
        "augmentation: {presets: {mine: []}}\n",
    )
    _check(tmp_path)


def test_a_preprocessing_the_weights_were_not_trained_with_stops_the_run(tmp_path):
    _project_with(tmp_path, "finetune: {input_scaling: caffe}\n")
    message = _problems(tmp_path)
    assert (
        "conf/local/parameters.yml: finetune.input_scaling = 'caffe', but "
        "model.weights (imagenet) were trained with 'minus_one_to_one'" in message
    )
    assert "Set finetune.input_scaling: minus_one_to_one" in message


def test_a_deliberate_preprocessing_override_lets_the_run_start(tmp_path):
    _project_with(
        tmp_path,
        "finetune: {input_scaling: zero_to_one, input_scaling_override: true}\n",
    )
    _check(tmp_path)


def test_a_source_that_cannot_be_used_stops_the_run_before_it_starts(tmp_path):
    _project_with(
        tmp_path,
        "model:\n"
        "  sources:\n"
        "    - {name: imagenet, weights: imagenet}\n"
        "    - {name: rad, weights: null, preprocessing: torch}\n",
    )
    message = _problems(tmp_path)
    assert (
        "conf/local/parameters.yml: model.sources `rad`: preprocessing = 'torch'; "
        "use one of minus_one_to_one" in message
    )


def test_a_forced_source_must_be_one_of_the_candidates(tmp_path):
    _project_with(
        tmp_path,
        "model:\n  sources:\n    - {name: imagenet, weights: imagenet}\n",
    )
    message = _problems(tmp_path, runtime_params={"model": {"source": "rad"}})
    assert "--params: model.source = 'rad' is none of the candidates (imagenet)" in (
        message
    )
    _check(tmp_path, runtime_params={"model": {"source": "imagenet"}})
