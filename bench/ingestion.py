"""Benchmark of the `ingestion` pipeline's validation, grouping and split.

Generates ``--images`` random-textured ``--size`` px JPEGs (10 classes, no duplicates;
``bench/synthetic.py``) in a temporary folder, then runs ``scan_images``,
``group_duplicates`` and ``split_images`` on them with 2 worker processes and with 1,
side by side, and once more with 1 process decoding every JPEG at full size (as
before reduced-scale decoding: ``images.FINGERPRINT_SIDE`` set to 0). Each
measurement runs in a fresh Python process, so its peak memory and CPU time are its
own (workers included).

Usage::

    python bench/ingestion.py                   # 2,000 images, a quick run
    python bench/ingestion.py --images 20000    # the full measurement
    python bench/ingestion.py --images 200 --size 3464   # 12-megapixel photos

Targets: at least 1,000 images/s on 2 cores, peak memory under 1 GB for 20,000
images; at least 30 images/s per core for 12-megapixel JPEGs. Wall-clock rates depend on what else the machine runs, so the CPU time
per image is reported too, with the load average; ``cpu_bound_images_per_second`` is
the rate those CPU seconds allow on the machine's idle cores. The last line printed is
one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import generate

# (workers, reduced-scale decoding); the last one is the full-decode baseline.
RUNS = ((2, True), (1, True), (1, False))


def cpu_seconds() -> float:
    """User and system CPU time of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(root: Path, workers: int, reduced: bool) -> dict:
    """Runs the three nodes once in this process; returns times and peak memory."""
    from irv2_pipeline import images as images_module  # noqa: PLC0415
    from irv2_pipeline.datasets import ImageFolder  # noqa: PLC0415
    from irv2_pipeline.pipelines.ingestion.nodes import (  # noqa: PLC0415
        group_duplicates,
        scan_images,
        split_images,
    )

    if not reduced:
        if workers != 1:
            raise ValueError("full-size decoding is measured in one process only")
        # Workers of this one process: the module constant holds for every decode.
        images_module.FINGERPRINT_SIDE = 0
    images = {"max_pixels": 50_000_000, "min_size": 8, "background": [255] * 3}
    ingestion = {
        "workers": workers,
        "split": {"train": 0.7, "val": 0.15, "test": 0.15, "seed": 1},
        "duplicates": {
            "max_hamming": 4,
            "max_colour_distance": 40,
            "exclude_label_conflicts": True,
        },
        "blank": {"min_pixel_std": 2.0, "reject": False},
    }
    wall, cpu = [time.perf_counter()], [cpu_seconds()]
    scanned, scan_rejections = scan_images(ImageFolder(root), images, ingestion)
    wall.append(time.perf_counter())
    cpu.append(cpu_seconds())
    grouped, groups = group_duplicates(scanned, ingestion)
    manifest, rejected, _ = split_images(grouped, scan_rejections, groups, ingestion)
    wall.append(time.perf_counter())
    cpu.append(cpu_seconds())

    count = len(scanned) + len(scan_rejections)
    scan_cpu, serial_cpu = cpu[1] - cpu[0], cpu[2] - cpu[1]
    cores = min(workers, os.cpu_count() or 1)
    # ru_maxrss is in KiB on Linux; the children's figure is the largest single one.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "workers": workers,
        "reduced_scale": reduced,
        "accepted": len(manifest),
        "rejected": len(rejected),
        "duplicate_groups": len(groups),
        "seconds": round(wall[2] - wall[0], 3),
        "scan_seconds": round(wall[1] - wall[0], 3),
        "group_split_seconds": round(wall[2] - wall[1], 3),
        "images_per_second": round(count / (wall[2] - wall[0]), 1),
        "cpu_ms_per_image": round(1000 * (scan_cpu + serial_cpu) / count, 3),
        # Scanning spread over the cores it may use, grouping and split on one.
        "cpu_bound_images_per_second": round(
            count / (scan_cpu / cores + serial_cpu), 1
        ),
        "main_peak_rss_mb": round(own, 1),
        "worker_peak_rss_mb": round(child, 1),
        # The main process and every worker at its own peak: an upper bound.
        "peak_rss_mb": round(own + (workers if workers > 1 else 0) * child, 1),
    }


def measure_in_subprocess(root: Path, workers: int, reduced: bool) -> dict:
    """Runs :func:`measure` in a fresh interpreter and returns its figures."""
    command = [sys.executable, __file__, "--measure", str(root)]
    command += ["--workers", str(workers)] + ([] if reduced else ["--full-decode"])
    completed = subprocess.run(
        command,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_name(workers: int, reduced: bool) -> str:
    return f"workers_{workers}" + ("" if reduced else "_full_decode")


def main() -> None:
    """Generates the images, measures both worker counts, prints table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--full-decode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.workers, not args.full_decode)))
        return

    with tempfile.TemporaryDirectory(prefix="bench_ingestion_") as tmp:
        root = Path(tmp) / "images"
        start = time.perf_counter()
        generate(root, args.images, args.size, texture="photo")
        mean_kb = (
            sum(f.stat().st_size for f in root.rglob("*.jpg")) / args.images / 1024
        )
        print(
            f"generated {args.images} {args.size} px JPEGs ({mean_kb:.1f} KB each) "
            f"in {time.perf_counter() - start:.1f} s"
        )
        load_before = os.getloadavg()[0]
        runs = {run_name(w, r): measure_in_subprocess(root, w, r) for w, r in RUNS}
        load_after = os.getloadavg()[0]

    print(f"python bench/ingestion.py --images {args.images} --size {args.size}")
    print(
        f"{'workers':>7} {'decode':>8} {'images/s':>9} {'seconds':>8} "
        f"{'CPU ms/img':>11} {'CPU-bound img/s':>16} {'peak RSS MB':>12}"
    )
    for run in runs.values():
        decode = "reduced" if run["reduced_scale"] else "full"
        print(
            f"{run['workers']:>7} {decode:>8} {run['images_per_second']:>9.0f} "
            f"{run['seconds']:>8.2f} {run['cpu_ms_per_image']:>11.2f} "
            f"{run['cpu_bound_images_per_second']:>16.0f} {run['peak_rss_mb']:>12.0f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "ingestion",
                "images": args.images,
                "size_px": args.size,
                "mean_file_kb": round(mean_kb, 1),
                "runs": runs,
                "speedup_2_vs_1": round(
                    runs["workers_1"]["seconds"] / runs["workers_2"]["seconds"], 2
                ),
                # One process each: images per CPU-second, reduced over full decoding.
                "reduced_vs_full_decode_cpu": round(
                    runs["workers_1_full_decode"]["cpu_ms_per_image"]
                    / runs["workers_1"]["cpu_ms_per_image"],
                    2,
                ),
                "images_per_cpu_second": {
                    name: round(1000 / run["cpu_ms_per_image"], 1)
                    for name, run in runs.items()
                },
                "peak_rss_mb": max(run["peak_rss_mb"] for run in runs.values()),
                "cpu_count": os.cpu_count(),
                # Other work on the machine slows the wall-clock figures.
                "load_average_1min": [round(load_before, 2), round(load_after, 2)],
            }
        )
    )


if __name__ == "__main__":
    main()
