"""Helpers of the offline HTML tests: the resources a page names, and Chromium offline.

:func:`open_offline` opens a page in headless Chromium whose every connection goes to
a local proxy that records the request and answers it with an error; host names do not
resolve either. A page that renders there needs no network, and a page that asks for
something shows up in the proxy's record (a test holds it to one that does).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tools.make_screenshots import CHROMIUM_FLAGS, REPORT_WINDOW

# The attributes through which a page loads something (not ``<a href>``: a link is
# only followed when clicked).
RESOURCE_ATTRIBUTES = {"src", "srcset", "poster", "data", "href", "background"}
# Chromium's own background calls (extension updates, sign-in, network time), which
# its flags do not all turn off; they come whatever the page is, so they are not the
# page's requests.
BROWSER_HOSTS = {"update.googleapis.com", "accounts.google.com", "clients2.google.com"}


class Resources(HTMLParser):
    """Every URL a page loads from: resource attributes and CSS ``url(...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._in_style = tag == "style"
        for name, value in attrs:
            if value and name in RESOURCE_ATTRIBUTES and tag != "a":
                self.urls.append(value)
            if value and name == "style":
                self.urls += css_urls(value)

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.urls += css_urls(data)

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False


def css_urls(css: str) -> list[str]:
    """The ``url(...)`` and ``@import`` targets of a stylesheet."""
    found = re.findall(r"""url\(\s*['"]?([^'")]+)|@import\s+['"]([^'"]+)""", css)
    return [url or imported for url, imported in found]


def resource_urls(page: str) -> list[str]:
    """The URLs ``page`` loads resources from (images, scripts, styles, fonts)."""
    parser = Resources()
    parser.feed(page)
    return parser.urls


def tags(page: str) -> set[str]:
    """The names of the elements in ``page``."""
    return {name.lower() for name in re.findall(r"<([a-zA-Z][a-zA-Z0-9-]*)", page)}


def requested_host(request_line: str) -> str:
    """The host of a proxy request line (``CONNECT host:443 ...``, ``GET http://...``)."""
    target = request_line.split()[1]
    return urlsplit(target if "//" in target else f"//{target}").hostname or ""


def page_requests(request_lines: Iterable[str]) -> list[str]:
    """The request lines that are not Chromium's own (:data:`BROWSER_HOSTS`)."""
    return [line for line in request_lines if requested_host(line) not in BROWSER_HOSTS]


def recording_handler(requests: list[str]) -> type[BaseHTTPRequestHandler]:
    """A proxy request handler that appends each request line to ``requests``."""

    class Recorder(BaseHTTPRequestHandler):
        def handle_one_request(self) -> None:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline or not self.parse_request():
                return
            requests.append(self.requestline)
            self.send_error(502, "offline")

        def log_message(self, *_: object) -> None:
            """Keeps the request lines off the console."""

    return Recorder


@contextmanager
def recording_proxy() -> Iterator[tuple[int, list[str]]]:
    """A local proxy that records requests and serves none; yields its port and log."""
    requests: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), recording_handler(requests))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port, requests
    finally:
        server.shutdown()
        server.server_close()


def open_offline(
    page: Path, mode: list[str], profile: Path
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Opens ``page`` in headless Chromium with no way out but the recording proxy.

    Args:
        page: The HTML file.
        mode: What Chromium does with it (``["--dump-dom"]``,
            ``["--screenshot=..."]``).
        profile: A fresh folder for Chromium's profile.

    Returns:
        Chromium's finished process (the DOM on its stdout with ``--dump-dom``) and
        the page's request lines the proxy received (:func:`page_requests`).
    """
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no `chromium` on the PATH (Debian: apt-get install chromium)")
    with recording_proxy() as (port, requests):
        finished = subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                *REPORT_WINDOW,
                f"--proxy-server=http://127.0.0.1:{port}",
                # Loopback too goes through the proxy, and no name resolves.
                "--proxy-bypass-list=<-loopback>",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                f"--user-data-dir={profile}",
                *mode,
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
    return finished, page_requests(requests)
