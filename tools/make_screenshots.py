"""Makes the documentation's pictures from a finished smoke run (`kedro run --env smoke`).

Starts `kedro viz run` on a free local port, screenshots the DAG with headless Chromium
(Debian's `chromium` package), screenshots the top of the offline HTML report
(`data/08_reporting/report.html`), and copies the key plots of the run next to them:

    python tools/make_screenshots.py

Chromium reaches Kedro-Viz through a small local proxy that makes the page open as
it does for someone who has used Viz before: the onboarding tour marked as seen (the
``showFeatureHints`` flag in the ``KedroViz`` localStorage entry, where Viz keeps its
settings), the side bar and mini-map closed so the DAG gets the room, and no "new
version" banner. Viz 12.5 shows that banner, as "Kedro-Viz None is here!", on every
machine that cannot reach PyPI, because its ``/api/version`` compares the installed
version with the string ``"None"``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
IMAGES = PROJECT / "docs" / "images"
PLOTS = (
    "class_distribution.png",
    "bn_shift_by_depth.png",
    "training_curves.png",
    "confusion_matrix.png",
    "lr_finder.png",
    "validation_curves.png",
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
    "--virtual-time-budget=20000",
)
# Portrait and twice the pixels: the DAG is tall, and its labels stay legible.
VIZ_WINDOW = ("--window-size=1300,1800", "--force-device-scale-factor=2")
# The report's column and its verdict, findings and first plots, at the size read.
REPORT_WINDOW = ("--window-size=1100,1500", "--force-device-scale-factor=1")
REPORT = PROJECT / "data" / "08_reporting" / "report.html"
VIZ_SETTINGS = {
    "showFeatureHints": False,
    "visible": {"sidebar": False, "miniMap": False},
}
# Runs before Viz's own (module, hence deferred) script reads its saved settings.
SAVE_SETTINGS = (
    f"<script>localStorage.setItem('KedroViz', '{json.dumps(VIZ_SETTINGS)}');</script>"
).encode()


def free_port() -> int:
    """A TCP port nothing listens on, on the loopback interface.

    Viz refuses ports above 49151, where the system's own picks (``bind`` to port 0)
    often land, so the port is drawn below Linux's ephemeral range instead.
    """
    while True:
        port = random.randrange(10_000, 32_768)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def wait_for(url: str, seconds: float, server: subprocess.Popen) -> None:
    """Waits until ``url`` answers, or raises after ``seconds`` or if ``server`` exits."""
    deadline = time.monotonic() + seconds
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"kedro viz run exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def proxy_handler(upstream: str) -> type[BaseHTTPRequestHandler]:
    """A request handler that forwards GETs to ``upstream``, adjusted as above.

    Args:
        upstream: Kedro-Viz's base URL, without a trailing slash.

    Returns:
        The handler class for an ``http.server`` server.
    """
    installed = version("kedro-viz")
    up_to_date = {"installed": installed, "is_outdated": False, "latest": installed}

    class VizProxy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            if self.path.split("?")[0] == "/api/version":
                self.reply(200, "application/json", json.dumps(up_to_date).encode())
                return
            try:
                with urllib.request.urlopen(upstream + self.path, timeout=60) as answer:
                    status, kind, body = answer.status, answer.headers, answer.read()
            except urllib.error.HTTPError as error:
                status, kind, body = error.code, error.headers, error.read()
            content_type = kind.get("Content-Type", "application/octet-stream")
            if content_type.startswith("text/html"):
                body = body.replace(b"<head>", b"<head>" + SAVE_SETTINGS, 1)
            self.reply(status, content_type, body)

        def reply(self, status: int, content_type: str, body: bytes) -> None:
            """Sends one complete response."""
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            """Keeps the per-request lines off the console."""

    return VizProxy


@contextmanager
def kedro_viz(port: int) -> Iterator[str]:
    """Runs ``kedro viz run --env smoke`` on ``port``; yields its base URL.

    Viz serves from a child process of the ``kedro`` command, so the command gets its
    own process group and the whole group is stopped on the way out.
    """
    command = [sys.executable, "-m", "kedro", "viz", "run", "--no-browser"]
    options = ["--host", "127.0.0.1", "--port", str(port), "--env", "smoke"]
    viz = subprocess.Popen([*command, *options], cwd=PROJECT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/api/main", 300, viz)
        yield url
    finally:
        signal_group(viz, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            viz.wait(timeout=30)
        # Whatever is left of the group, the server child included, goes now.
        signal_group(viz, signal.SIGKILL)
        viz.wait()


def signal_group(process: subprocess.Popen, number: signal.Signals) -> None:
    """Sends a signal to the process group ``process`` leads, if any of it is left."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, number)


@contextmanager
def proxy(upstream: str) -> Iterator[str]:
    """Serves :func:`proxy_handler` in a thread; yields the proxy's base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), proxy_handler(upstream))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def screenshot(url: str, target: Path, window: tuple[str, ...]) -> None:
    """Saves a headless Chromium screenshot of ``url`` to ``target``.

    Args:
        url: The page.
        target: The PNG file to write.
        window: Chromium's window flags (:data:`VIZ_WINDOW`, :data:`REPORT_WINDOW`).
    """
    profile = target.parent / ".chromium"
    try:
        subprocess.run(
            [
                "chromium",
                *CHROMIUM_FLAGS,
                *window,
                f"--user-data-dir={profile}",
                f"--screenshot={target}",
                url,
            ],
            check=True,
            timeout=180,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    """Screenshots Kedro-Viz and the HTML report, and copies the plots into docs/images."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    with kedro_viz(free_port()) as viz, proxy(viz) as url:
        screenshot(f"{url}/", IMAGES / "kedro_viz.png", VIZ_WINDOW)
    screenshot(REPORT.as_uri(), IMAGES / "report_html.png", REPORT_WINDOW)
    for name in PLOTS:
        shutil.copy2(PROJECT / "data" / "08_reporting" / name, IMAGES / name)


if __name__ == "__main__":
    main()
