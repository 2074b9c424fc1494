"""Shared fixtures: run `kedro` on a throw-away copy of this project.

Tests that run pipelines never write into the working tree: ``project_copy`` gives a
fresh copy in ``tmp_path`` (``conf/`` without the user's ``conf/local`` files,
``pyproject.toml``, the demo images in ``data/01_raw``, empty ``data/02..08``), and
``run_kedro`` runs the ``kedro`` command line in it, in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from itertools import zip_longest
from pathlib import Path

import kedro.framework.project  # noqa: F401 - see below
import pytest
import yaml

# Kedro configures logging when kedro.framework.project is first imported. Importing it
# here, before test modules are collected under output capture, keeps its handlers off
# pytest's capture files, which are closed at the end (the interpreter then crashed at
# exit with "lost sys.stderr").
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_FOLDERS = (
    "02_intermediate",
    "03_primary",
    "04_feature",
    "05_model_input",
    "06_models",
    "07_model_output",
    "08_reporting",
)


def copy_project(destination: Path) -> Path:
    """Copies what ``kedro run`` needs from this project into ``destination``.

    The package is not copied: it is installed, and Kedro only needs a ``src``
    folder to exist. ``conf/local`` is left empty so the user's overrides stay out.

    Returns:
        ``destination``, a Kedro project.
    """
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", destination / "pyproject.toml")
    shutil.copytree(
        PROJECT_ROOT / "conf",
        destination / "conf",
        ignore=lambda folder, names: names if Path(folder).name == "local" else [],
    )
    (destination / "conf" / "local").mkdir(exist_ok=True)
    shutil.copytree(PROJECT_ROOT / "data" / "01_raw", destination / "data" / "01_raw")
    for folder in DATA_FOLDERS:
        (destination / "data" / folder).mkdir(parents=True, exist_ok=True)
    (destination / "src").mkdir(exist_ok=True)
    return destination


def planned_source(
    weights: str | None = None, preprocessing: str = "minus_one_to_one"
) -> dict:
    """The ``source`` of a plan written by hand: what feature_shift records when
    ``model.weights`` is the one candidate."""
    from irv2_pipeline.sources import Source, default_name  # noqa: PLC0415

    return Source(default_name(weights), weights, preprocessing, None).as_dict()


def kedro(
    args: Sequence[str], cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Runs ``kedro <args>`` in ``cwd`` with this interpreter; output is captured.

    Telemetry is off and plots use a file backend. The caller checks
    ``returncode``; ``stdout`` and ``stderr`` are text.
    """
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "kedro", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def digest_folder(root: Path) -> str:
    """A hash over every path, link target, size, timestamp and content under root.

    Links are read, never followed, so a tree with links leaving it hashes safely.
    """
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        line = (
            f"{path.relative_to(root)}|{stat.st_mode}|{stat.st_size}|{stat.st_mtime_ns}"
        )
        digest.update(line.encode())
        if path.is_symlink():
            digest.update(os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def project_copy(tmp_path) -> Path:
    """A fresh copy of the project, for one test."""
    return copy_project(tmp_path / "project")


@pytest.fixture(scope="session")
def project_copy_factory(tmp_path_factory) -> Callable[[str], Path]:
    """Makes project copies that outlive one test (for module-scoped fixtures)."""
    return lambda name="project": copy_project(tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def shared_temp(tmp_path_factory, worker_id) -> Path:
    """A folder every pytest-xdist worker of this run sees (their own temporary
    folders are inside it); the session's temporary folder without workers."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


def made_once(shared: Path, name: str, make: Callable[[Path], dict]) -> dict:
    """What ``make(folder)`` returned, made by the first worker of the run that asks;
    the others wait for it and read it.

    Every worker is a process of its own, so a session fixture alone would make an
    expensive result (a whole ``kedro run``) once per worker: here it is made once in
    ``shared / name`` under a lock, its result kept as JSON. A failed make is kept
    too, so the other workers fail at once with its message instead of making it
    again.

    Args:
        shared: ``shared_temp``.
        name: The result's folder and lock name.
        make: Makes the result in an empty folder; returns it as JSON-able data.

    Returns:
        ``make``'s result.
    """
    from irv2_pipeline.make_source import exclusive_lock  # noqa: PLC0415

    folder = shared / name
    made, failed = folder / "made.json", folder / "failed.txt"
    with exclusive_lock(shared / f".{name}.lock"):
        if not made.is_file() and not failed.is_file():
            # What a worker killed half way left.
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                result = make(folder)
            except BaseException as error:
                failed.write_text(f"{type(error).__name__}: {error}")
                raise
            made.write_text(json.dumps(result))
    if failed.is_file():
        pytest.fail(f"{name}, made by another worker, failed: {failed.read_text()}")
    return json.loads(made.read_text())


@pytest.fixture(scope="session")
def smoke_run(shared_temp) -> tuple[Path, str, float]:
    """``kedro run --env smoke`` of the whole DAG, once per test run (all workers).

    Returns:
        The finished project (read it, never write into it: other tests read it at
        the same time; copy it first, ``smoke_copy``), the run's log and its duration
        in seconds.
    """

    def run(folder: Path) -> dict:
        project = copy_project(folder / "project")
        started = time.monotonic()
        result = kedro(["run", "--env", "smoke"], cwd=project, timeout=1500)
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        log = result.stdout + result.stderr
        return {
            "project": str(project),
            "log": log,
            "seconds": time.monotonic() - started,
        }

    made = made_once(shared_temp, "smoke_run", run)
    return Path(made["project"]), made["log"], made["seconds"]


@pytest.fixture
def smoke_copy(smoke_run, tmp_path) -> Path:
    """A copy of the finished smoke run's project, for a test that runs in it."""
    return Path(shutil.copytree(smoke_run[0], tmp_path / "project", symlinks=True))


@pytest.fixture(scope="session")
def adabn_source() -> Path:
    """A pretrained source made here: IRv2 with BatchNorm statistics of fractal
    images (``irv2_pipeline.make_source``), made once per content and cached."""
    from irv2_pipeline.make_source import cached_source  # noqa: PLC0415

    return cached_source("adabn", seed=0)


@pytest.fixture(scope="session")
def adabn_strokes_source() -> Path:
    """A second source, far from fractal images: AdaBN on greyscale pen strokes."""
    from irv2_pipeline.make_source import cached_source  # noqa: PLC0415

    return cached_source("adabn", seed=0, generator="strokes")


@pytest.fixture(scope="session")
def run_kedro() -> Callable[..., subprocess.CompletedProcess]:
    """``run_kedro(args, cwd)``: runs the kedro CLI in a project copy."""
    return kedro


@pytest.fixture(scope="session")
def folder_digest() -> Callable[[Path], str]:
    """``folder_digest(root)``: compare before and after to prove nothing changed."""
    return digest_folder


def kedro_killed_when(
    args: Sequence[str],
    cwd: Path,
    moment: Callable[[], bool],
    *,
    delay: float = 0.0,
) -> str:
    """Starts ``kedro <args>`` in ``cwd`` and SIGKILLs its process group ``delay``
    seconds after ``moment()`` turns true, as a crash or an OOM kill would.

    Returns:
        The killed run's log (also in ``cwd / "killed.log"``).
    """
    log_path = cwd / "killed.log"
    with log_path.open("w") as log:
        run = subprocess.Popen(
            [sys.executable, "-m", "kedro", *args],
            cwd=cwd,
            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "MPLBACKEND": "Agg"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 900
            while not moment() and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(delay)
            assert run.poll() is None, log_path.read_text()[-3000:]
            os.killpg(run.pid, signal.SIGKILL)
            assert run.wait(60) == -signal.SIGKILL
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    return log_path.read_text()


def project_parameters(env: str = "base") -> dict:
    """The parameters Kedro gives a run in ``env``, merged over conf/base as in settings."""
    from kedro.config import OmegaConfigLoader  # noqa: PLC0415

    from irv2_pipeline.settings import CONFIG_LOADER_ARGS  # noqa: PLC0415

    args = {**CONFIG_LOADER_ARGS, "default_run_env": env}
    return dict(OmegaConfigLoader(str(PROJECT_ROOT / "conf"), **args)["parameters"])


def with_smoke_stages(project: Path, stages: Sequence[dict]) -> None:
    """Sets ``finetune.stages`` in the copy's conf/smoke/parameters_finetune.yml, the
    rest of conf/smoke's finetune settings kept (its batch, precision and short range
    test: a file of the stages alone would give conf/base's 3 seeds of 100 steps)."""
    path = project / "conf" / "smoke" / "parameters_finetune.yml"
    conf = yaml.safe_load(path.read_text())
    conf["finetune"]["stages"] = list(stages)
    path.write_text(yaml.safe_dump(conf, sort_keys=False))


# --- Two processes (pytest-xdist, `-n` in pyproject's addopts) --------------------------
# Every xdist worker is a process with its own session, so a session fixture used on
# two workers is built twice, and a module fixture once per worker its tests land on.
# The whole runs that cost minutes are made once for all workers (`made_once`: the
# smoke run) or cached by content (the sources of `make_source`), so their tests may
# go to either worker. Every test that needs an expensive session fixture made per
# process (an IRv2 probe), or a module or class fixture with another test, goes to
# the same worker (`--dist loadgroup`). The other session fixtures are factories and
# constants, cheap to build on each worker.
EXPENSIVE_SESSION_FIXTURES = ("irv2_probe",)
# The fixture made once for all workers that the most slow tests wait for.
SHARED_RUN = "smoke_run"
# Seconds per test id of the longest tests, from a CI run (tools/test_durations.py).
_DURATIONS: dict[str, float] = json.loads(
    (PROJECT_ROOT / "tests" / "durations.json").read_text()
)
# What a test not in that file is expected to take.
SLOW_TEST_SECONDS, SHORT_TEST_SECONDS = 30.0, 1.0


def _shared_instances(item: pytest.Item) -> list[tuple[str, ...]]:
    """The fixture instances ``item`` would share with other tests, one key each."""
    instances = []
    for name, definitions in item._fixtureinfo.name2fixturedefs.items():
        scope = definitions[-1].scope
        if scope == "session" and name in EXPENSIVE_SESSION_FIXTURES:
            instances.append(("session", name))
        elif scope == "package":
            instances.append(("package", definitions[-1].baseid, name))
        elif scope == "module":
            instances.append(("module", str(item.path), name))
        elif scope == "class" and item.cls is not None:
            instances.append(("class", item.parent.nodeid, name))
    return instances


def _work_units(items: list[pytest.Item]) -> list[list[int]]:
    """The indices of ``items`` in groups that share a fixture instance, transitively
    (a union-find over tests and the instances they use), in order of first item."""
    parent = list(range(len(items)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    first_user: dict[tuple[str, ...], int] = {}
    for index, item in enumerate(items):
        for instance in _shared_instances(item):
            other = first_user.setdefault(instance, index)
            parent[root(index)] = root(other)
    units: dict[int, list[int]] = {}
    for index in range(len(items)):
        units.setdefault(root(index), []).append(index)
    return sorted(units.values(), key=lambda unit: unit[0])


def _join_group(item: pytest.Item, group: str) -> None:
    """Puts ``item`` in xdist group ``group``, as an ``xdist_group`` mark would.

    xdist's scheduler reads the group from a ``@group`` suffix of the node id, which
    its own hook writes to ``item._nodeid``. pytest 9.2 keeps the id in ``item._id``
    (a ``NodeId``), so that write is lost and every test becomes a unit of its own
    (pytest-dev/pytest-xdist#1386): the suffix is written here where pytest reads it.
    Should neither place work any more, the collection stops rather than build the
    smoke run once per worker.
    """
    item.add_marker(pytest.mark.xdist_group(group))
    nodeid = f"{item.nodeid}@{group}"
    item._id = type(item._id).parse(nodeid)
    if item.nodeid != nodeid:
        raise pytest.UsageError(
            f"cannot put {item.nodeid} in xdist group {group}: run with -n 0"
        )


def _expected_seconds(item: pytest.Item) -> float:
    """How long ``item`` took in the run tests/durations.json was made from."""
    listed = _DURATIONS.get(item.nodeid.split("@")[0])
    if listed is not None:
        return listed
    return SLOW_TEST_SECONDS if item.get_closest_marker("slow") else SHORT_TEST_SECONDS


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]):
    """On an xdist worker: marks each group of tests that share an expensive fixture
    with one ``xdist_group``, and puts the groups with the most slow tests first.

    Runs before xdist's own hook, which reads the marks. Every worker sorts the same
    collection the same way, as xdist requires. A run without workers (``-n 0``) keeps
    the collection order.
    """
    if not hasattr(config, "workerinput"):
        return
    units = _work_units(items)
    for unit in units:
        if len(unit) < 2:
            continue
        names = {
            name
            for index in unit
            for name in items[index].fixturenames
            if name in EXPENSIVE_SESSION_FIXTURES
        }
        # A readable group: the expensive fixture, or else the file of its first test.
        group = "+".join(sorted(names)) or items[unit[0]].nodeid.split("::")[0]
        for index in unit:
            _join_group(items[index], group)

    # Longest first shortens the run: xdist (`--no-loadscope-reorder`) hands out the
    # groups in this order as workers free up, so the ones holding whole `kedro run`s
    # start at once and the many short tests fill the end, instead of a long test
    # starting last and running alone. A group's length is its tests' seconds in
    # tests/durations.json (a CI run's, `tools/test_durations.py`); a test not listed
    # counts as SLOW_TEST_SECONDS if marked slow, else as short. Ties keep the
    # collection order. The long groups (SLOW_TEST_SECONDS or more) that wait for the
    # smoke run alternate with those that do not, so that while one worker makes it
    # the other has work of its own.
    def seconds(unit: list[int]) -> float:
        return sum(_expected_seconds(items[index]) for index in unit)

    def waits(unit: list[int]) -> bool:
        return any(SHARED_RUN in items[index].fixturenames for index in unit)

    def long(unit: list[int]) -> bool:
        return seconds(unit) >= SLOW_TEST_SECONDS

    order = sorted(units, key=lambda unit: (-seconds(unit), unit[0]))
    slow = [unit for unit in order if long(unit)]
    queues = [[u for u in slow if waits(u)], [u for u in slow if not waits(u)]]
    alternating = [
        unit for pair in zip_longest(*queues) for unit in pair if unit is not None
    ]
    order = alternating + [unit for unit in order if not long(unit)]
    items[:] = [items[index] for unit in order for index in unit]
