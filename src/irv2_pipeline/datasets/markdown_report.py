"""A Markdown report as a Kedro dataset, previewed in Kedro-Viz as HTML."""

from __future__ import annotations

import base64
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from kedro.io.core import get_filepath_str
from kedro_datasets._typing import HTMLPreview
from markdown_it import MarkdownIt

from .atomic import AtomicTextDataset

IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


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
        markdown = MarkdownIt("commonmark").enable("table")
        tokens = markdown.parse(self.load())
        folder = PurePosixPath(self._get_load_path()).parent
        for token in tokens:
            for child in token.children or []:
                if child.type == "image":
                    source = str(child.attrGet("src") or "")
                    inlined = self._inline(folder, source)
                    if inlined:
                        child.attrSet("src", inlined)
        return HTMLPreview(markdown.renderer.render(tokens, markdown.options, {}))

    def _inline(self, folder: PurePosixPath, source: str) -> str | None:
        """A ``data:`` URI of a relative image next to the report, if it exists."""
        if urlparse(source).scheme or source.startswith("/"):
            return None
        path = folder / unquote(source)
        kind = IMAGE_TYPES.get(path.suffix.lower())
        location = get_filepath_str(path, self._protocol)
        if kind is None or not self._fs.exists(location):
            return None
        with self._fs.open(location, mode="rb") as image:
            encoded = base64.b64encode(image.read()).decode("ascii")
        return f"data:{kind};base64,{encoded}"
