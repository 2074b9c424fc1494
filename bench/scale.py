"""Scale benchmark: `ingestion` and `augmentation` on 5,000 and 20,000 images.

For each ``--images`` count (default 5,000 and 20,000) in turn: a fresh copy of the
project (what ``tests/conftest.py`` copies) whose ``data/01_raw/images`` holds only
that many ``--size`` px photo-like JPEGs in 10 classes (``bench/synthetic.py``; the
demo images are removed), then ``kedro run --env smoke --pipeline ingestion`` and
``kedro run --env smoke --pipeline augmentation`` there, each as its own process: the
real command line, so Kedro's runner, its in-memory copies of intermediate datasets
and the catalog's savers are measured too, not only the nodes. ``conf/smoke`` renders
one copy per training image at 75 px in the Kedro process (``augmentation.workers:
1``); ingestion decodes on one worker per core.

Per run: wall time (Kedro and TensorFlow start-up included), images per second, and
peak memory two ways:

- ``peak_rss_mb``: the largest single process of the run, from ``wait4``'s resource
  usage (the Kedro process, or one of its workers); exact;
- ``tree_rss_mb``: the Kedro process and all its workers together, the sum of their
  RSS sampled from ``/proc`` every 0.5 s (pages shared between processes count once
  per process, so an upper bound; a peak shorter than 0.5 s can be missed).

Then the manifests' own size in memory (``pandas`` ``memory_usage(deep=True)`` of
``image_manifest`` and ``augmented_manifest`` read back from their CSVs) and, between
the smallest and largest count, how much the peak RSS grew per megabyte the
manifests grew. A ratio near 1 means memory grows only by the manifest itself.

Usage::

    python bench/scale.py                          # 5,000 and 20,000 images
    python bench/scale.py --images 1000 4000       # a quick run

Target: memory does not grow with the number of images beyond the manifest
itself. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
from synthetic import CLASSES, generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import copy_project  # noqa: E402 - the tests' project copy

PIPELINES = ("ingestion", "augmentation")
MANIFESTS = {
    "ingestion": "data/02_intermediate/image_manifest.csv",
    "augmentation": "data/05_model_input/augmented_manifest.csv",
}
SAMPLE_SECONDS = 0.5
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024


def process_tree_rss(root_pid: int) -> int:
    """Bytes of RSS of ``root_pid`` and all its descendants, summed (0 once gone)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # the process ended while the folder was read
            # The command name in parentheses may hold spaces: split after it.
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except OSError:
            continue
    return total * PAGE_BYTES


class TreeSampler(threading.Thread):
    """Samples a process tree's summed RSS until stopped; keeps the largest."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self._pid = pid
        self._stop_event = threading.Event()
        self.peak_bytes = 0

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_bytes = max(self.peak_bytes, process_tree_rss(self._pid))
            self._stop_event.wait(SAMPLE_SECONDS)

    def stop(self) -> int:
        """Stops sampling; returns the peak in bytes."""
        self._stop_event.set()
        self.join()
        return self.peak_bytes


def run_pipeline(
    project: Path,
    pipeline: str | None,
    log: Path,
    extra_env: dict[str, str] | None = None,
) -> dict:
    """Runs ``kedro run --env smoke --pipeline <pipeline>``; wall time and peak RSS.

    ``pipeline`` ``None`` runs the whole DAG (no ``--pipeline``); ``extra_env`` adds
    to or overrides the environment (``bench/recipe.py`` sets ``PYTHONPATH``).

    Raises:
        RuntimeError: The run failed; the message holds the end of its log.
    """
    args = ["run", "--env", "smoke"]
    if pipeline is not None:
        args += ["--pipeline", pipeline]
    return run_kedro(args, project, log, extra_env)


def run_kedro(
    args: list[str],
    project: Path,
    log: Path,
    extra_env: dict[str, str] | None = None,
) -> dict:
    """Runs ``kedro <args>`` in ``project``; wall time, peak RSS and CPU time.

    ``extra_env`` adds to or overrides the environment.

    Raises:
        RuntimeError: The command failed; the message holds the end of its log.
    """
    env = {
        **os.environ,
        "KEDRO_DISABLE_TELEMETRY": "1",
        "MPLBACKEND": "Agg",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **(extra_env or {}),
    }
    command = [sys.executable, "-m", "kedro", *args]
    with log.open("w") as output:
        start = time.perf_counter()
        process = subprocess.Popen(
            command,
            cwd=project,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        sampler = TreeSampler(process.pid)
        sampler.start()
        # wait4, not wait: its resource usage is this run's alone, and ru_maxrss is
        # the largest of the Kedro process and the workers it waited for.
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        tree_peak = sampler.stop()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{' '.join(command[2:])} failed in {project}:\n{tail}")
    return {
        "seconds": round(seconds, 1),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "tree_rss_mb": round(tree_peak / MB, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
    }


def manifest_megabytes(path: Path) -> tuple[int, float]:
    """Rows of a manifest CSV and its size in memory as a DataFrame, in MB."""
    frame = pd.read_csv(path)
    return len(frame), float(frame.memory_usage(deep=True).sum()) / MB


def measure(count: int, size: int, workdir: Path) -> dict:
    """Generates ``count`` images in a project copy and runs both pipelines on it."""
    project = copy_project(workdir / f"project_{count}")
    shutil.rmtree(project / "data" / "01_raw" / "images")  # only generated images
    start = time.perf_counter()
    generate(project / "data" / "01_raw" / "images", count, size, texture="photo")
    generated = time.perf_counter() - start
    print(f"\n{count} images of {size} px generated in {generated:.1f} s")
    result: dict = {"images": count, "generate_seconds": round(generated, 1)}
    for pipeline in PIPELINES:
        run = run_pipeline(project, pipeline, workdir / f"{pipeline}_{count}.log")
        rows, megabytes = manifest_megabytes(project / MANIFESTS[pipeline])
        # Ingestion scans every file; augmentation writes one copy per row.
        done = count if pipeline == "ingestion" else rows
        run.update(
            rows=rows,
            images_processed=done,
            manifest_mb=round(megabytes, 2),
            images_per_second=round(done / run["seconds"], 1),
        )
        print(
            f"  {pipeline:<12} {run['seconds']:>7.1f} s  {run['images_per_second']:>7.1f}"
            f" img/s  peak RSS {run['peak_rss_mb']:>7.1f} MB  tree RSS "
            f"{run['tree_rss_mb']:>7.1f} MB  manifest {rows} rows, "
            f"{run['manifest_mb']:.2f} MB"
        )
        result[pipeline] = run
    shutil.rmtree(project)
    return result


def growth(small: dict, large: dict) -> dict:
    """How the figures of each pipeline changed from the smaller count to the larger.

    The manifests a pipeline holds: ingestion builds ``image_manifest``; augmentation
    reads it and builds ``augmented_manifest``.
    """
    held = {
        "ingestion": lambda run: run["ingestion"]["manifest_mb"],
        "augmentation": lambda run: (
            run["ingestion"]["manifest_mb"] + run["augmentation"]["manifest_mb"]
        ),
    }
    figures = {}
    for pipeline in PIPELINES:
        before, after = small[pipeline], large[pipeline]
        manifest = held[pipeline](large) - held[pipeline](small)
        figures[pipeline] = {
            "manifest_growth_mb": round(manifest, 2),
            "peak_rss_growth_mb": round(
                after["peak_rss_mb"] - before["peak_rss_mb"], 1
            ),
            "tree_rss_growth_mb": round(
                after["tree_rss_mb"] - before["tree_rss_mb"], 1
            ),
            "peak_rss_growth_per_manifest_mb": round(
                (after["peak_rss_mb"] - before["peak_rss_mb"]) / manifest, 2
            ),
            "tree_rss_growth_per_manifest_mb": round(
                (after["tree_rss_mb"] - before["tree_rss_mb"]) / manifest, 2
            ),
            # The rate once start-up is paid: extra images over extra seconds.
            "marginal_images_per_second": round(
                (after["images_processed"] - before["images_processed"])
                / (after["seconds"] - before["seconds"]),
                1,
            ),
        }
    return figures


def main() -> None:
    """Measures every count, prints the table, the growth and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    counts = sorted(set(args.images))

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        runs = {count: measure(count, args.size, Path(tmp)) for count in counts}
    load_after = os.getloadavg()[0]

    print(
        f"\n{'images':>7} {'pipeline':<12} {'seconds':>8} {'img/s':>7} "
        f"{'peak RSS MB':>11} {'tree RSS MB':>11} {'manifest MB':>11}"
    )
    for count, run in runs.items():
        for pipeline in PIPELINES:
            figures = run[pipeline]
            print(
                f"{count:>7} {pipeline:<12} {figures['seconds']:>8.1f} "
                f"{figures['images_per_second']:>7.1f} {figures['peak_rss_mb']:>11.1f} "
                f"{figures['tree_rss_mb']:>11.1f} {figures['manifest_mb']:>11.2f}"
            )
    growths = growth(runs[counts[0]], runs[counts[-1]]) if len(counts) > 1 else {}
    for pipeline, figures in growths.items():
        print(
            f"{pipeline}, {counts[0]} -> {counts[-1]} images: peak RSS "
            f"+{figures['peak_rss_growth_mb']} MB (tree +{figures['tree_rss_growth_mb']}"
            f" MB) for +{figures['manifest_growth_mb']} MB of manifest: "
            f"{figures['peak_rss_growth_per_manifest_mb']}x "
            f"(tree {figures['tree_rss_growth_per_manifest_mb']}x); "
            f"{figures['marginal_images_per_second']} img/s once started"
        )
    print(
        json.dumps(
            {
                "benchmark": "scale",
                "size_px": args.size,
                "classes": CLASSES,
                "env": "smoke",
                "runs": {str(count): run for count, run in runs.items()},
                "growth": growths,
                "cpu_count": os.cpu_count(),
                # pandas keeps text in Arrow arrays when pyarrow is installed (the
                # `mlflow` extra brings it), else as Python strings: other figures.
                "string_storage": pd.Series(["text"]).dtype.storage,
                # Other work on the machine slows the wall-clock figures.
                "load_average_1min": [round(load_before, 2), round(load_after, 2)],
            }
        )
    )


if __name__ == "__main__":
    main()
