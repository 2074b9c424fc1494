"""Markdown reports as Kedro datasets: rendered to HTML with their images inlined."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from fsspec import AbstractFileSystem
from kedro.io.core import get_filepath_str
from kedro_datasets._typing import HTMLPreview
from markdown_it import MarkdownIt

from .atomic import AtomicTextDataset

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def markdown_to_html(markdown: str, image_source: Callable[[str], str | None]) -> str:
    """Markdown (tables included) rendered to HTML, image sources replaced.

    Args:
        markdown: CommonMark text, with GitHub-style tables.
        image_source: Given an image's ``src``, what to put there instead, or
            ``None`` to keep it.

    Returns:
        The HTML fragment (no ``<html>`` or ``<head>``).
    """
    renderer = MarkdownIt("commonmark").enable("table")
    tokens = renderer.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                replacement = image_source(str(child.attrGet("src") or ""))
                if replacement:
                    child.attrSet("src", replacement)
    return renderer.renderer.render(tokens, renderer.options, {})


def image_data_uri(
    fs: AbstractFileSystem, protocol: str, folder: PurePosixPath, source: str
) -> str | None:
    """A ``data:`` URI of the image ``source`` names relative to ``folder``.

    Args:
        fs: The file system the report is on.
        protocol: Its protocol (``file``, ``s3``, ...).
        folder: The report's folder.
        source: An image's ``src`` in the report.

    Returns:
        The URI, or ``None`` when ``source`` is absolute (a URL or a rooted path),
        not a PNG or JPEG, or not there.
    """
    if urlparse(source).scheme or source.startswith("/"):
        return None
    path = folder / unquote(source)
    kind = IMAGE_TYPES.get(path.suffix.lower())
    location = get_filepath_str(path, protocol)
    if kind is None or not fs.exists(location):
        return None
    with fs.open(location, mode="rb") as image:
        encoded = base64.b64encode(image.read()).decode("ascii")
    return f"data:{kind};base64,{encoded}"


class MarkdownReportDataset(AtomicTextDataset):
    """A Markdown file whose Kedro-Viz preview is the rendered report.

    Saving (atomic) and loading are ``text.TextDataset``'s. The preview renders the Markdown
    (tables included) to HTML and inlines the images it links to by relative path,
    so the plots next to the report show up in Kedro-Viz too.

    Example (``catalog.yml``)::

        evaluation_report:
          type: irv2_pipeline.datasets.MarkdownReportDataset
          filepath: data/08_reporting/evaluation_report.md
    """

    def preview(self) -> HTMLPreview:
        """The report rendered to HTML, with its relative images inlined."""
        folder = PurePosixPath(self._get_load_path()).parent
        return HTMLPreview(
            markdown_to_html(
                self.load(),
                lambda source: image_data_uri(self._fs, self._protocol, folder, source),
            )
        )
