"""A Markdown report saved as one HTML page that renders offline, from any folder."""

from __future__ import annotations

import html
from pathlib import PurePosixPath
from typing import Any

from kedro_datasets._typing import HTMLPreview

from .atomic import AtomicTextDataset
from .markdown_report import image_data_uri, markdown_to_html

# The page may load nothing but what it holds: inline styles and data: images. A
# link or image left pointing elsewhere stays unloaded instead of reaching out.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{policy}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{style}
</style>
</head>
<body>
<main class="report">
{body}
</main>
</body>
</html>
"""


class HTMLReportDataset(AtomicTextDataset):
    """One self-contained HTML file: Markdown in, a page that needs nothing else out.

    Saving takes Markdown (tables, and raw HTML where it has some), renders it as
    :class:`MarkdownReportDataset`'s preview does, inlines the PNG and JPEG images it
    links to by a path relative to ``filepath``'s folder as ``data:`` URIs, and writes
    one page (atomically) with its stylesheet inline and a Content-Security-Policy
    that lets it load nothing else: no script, font, stylesheet or image from the
    network or the disk. Loading returns the page's HTML, and so does the Kedro-Viz
    preview.

    Example (``catalog.yml``)::

        report_html:
          type: irv2_pipeline.datasets.HTMLReportDataset
          filepath: data/08_reporting/report.html
          title: Evaluation report
    """

    DEFAULT_TITLE = "Report"
    # Every rule under .report: a page that embeds the HTML (Kedro-Viz's preview
    # panel) keeps its own look.
    STYLE = """\
.report { max-width: 1000px; margin: 0 auto; padding: 8px 24px 48px; color: #1d2330;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
.report h2 { border-bottom: 1px solid #d8dce3; padding-bottom: 4px; margin-top: 2em; }
.report code { background: #eef0f4; padding: 0 3px; border-radius: 3px;
  font-size: 90%; }
.report table { border-collapse: collapse; margin: 12px 0; font-size: 13px;
  display: block; overflow-x: auto; }
.report th, .report td { border: 1px solid #d8dce3; padding: 3px 8px;
  text-align: left; }
.report th { background: #eef0f4; }
.report img { max-width: 100%; height: auto; display: block; margin: 12px 0; }
.report .verdict { font-size: 18px; padding: 12px 16px; border-radius: 6px;
  border-left: 8px solid; }
.report .verdict.passed { background: #e6f4ea; border-color: #1e8e3e; }
.report .verdict.high { background: #fce8e6; border-color: #c5221f; }
.report .verdict.medium { background: #fef3e0; border-color: #e37400; }
.report .verdict.low { background: #fef9e0; border-color: #c9a100; }
"""

    def __init__(
        self, *, filepath: str, title: str = DEFAULT_TITLE, **kwargs: Any
    ) -> None:
        """Creates the dataset.

        Args:
            filepath: Where the page goes; the images the Markdown links to by a
                relative path are looked up next to it.
            title: The page's title (the browser's tab).
            **kwargs: ``text.TextDataset``'s other arguments (``fs_args``,
                ``credentials``, ``version``, ``metadata``).
        """
        super().__init__(filepath=filepath, **kwargs)
        self._title = title

    def save(self, data: str) -> None:
        """Writes the Markdown ``data`` as the page (see the class)."""
        super().save(self._page(data))

    def _page(self, markdown: str) -> str:
        """The HTML page of ``markdown``, its relative images inlined."""
        folder = PurePosixPath(self._filepath).parent
        body = markdown_to_html(
            markdown,
            lambda source: image_data_uri(self._fs, self._protocol, folder, source),
        )
        return PAGE.format(
            policy=CONTENT_SECURITY_POLICY,
            title=html.escape(self._title),
            style=self.STYLE,
            body=body,
        )

    def preview(self) -> HTMLPreview:
        """The saved page, as Kedro-Viz shows it."""
        return HTMLPreview(self.load())

    def _describe(self) -> dict[str, Any]:
        return {**super()._describe(), "title": self._title}
