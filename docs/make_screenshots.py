"""Makes the README's pictures from a finished smoke run (`kedro run --env smoke`).

Starts `kedro viz run` on a free local port, screenshots the DAG with headless Chromium
(Debian's `chromium` package), and copies the key plots of the run next to it:

    python docs/make_screenshots.py
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
IMAGES = PROJECT / "docs" / "images"
PLOTS = (
    "class_distribution.png",
    "bn_shift_by_depth.png",
    "training_curves.png",
    "confusion_matrix.png",
)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1600,1000",
    "--virtual-time-budget=20000",
)


def free_port() -> int:
    """A TCP port nothing listens on, on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, seconds: float) -> None:
    """Waits until ``url`` answers, or raises after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def main() -> None:
    """Screenshots Kedro-Viz and copies the plots into docs/images."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    port = free_port()
    viz = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kedro",
            "viz",
            "run",
            "--no-browser",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--env",
            "smoke",
        ],
        cwd=PROJECT,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/api/main", 300)
        subprocess.run(
            [
                "chromium",
                *CHROMIUM_FLAGS,
                f"--user-data-dir={IMAGES / '.chromium'}",
                f"--screenshot={IMAGES / 'kedro_viz.png'}",
                f"http://127.0.0.1:{port}/",
            ],
            check=True,
            timeout=180,
        )
    finally:
        viz.terminate()
        viz.wait(timeout=60)
        shutil.rmtree(IMAGES / ".chromium", ignore_errors=True)
    for name in PLOTS:
        shutil.copy2(PROJECT / "data" / "08_reporting" / name, IMAGES / name)


if __name__ == "__main__":
    main()
