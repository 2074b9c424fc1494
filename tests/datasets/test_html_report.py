"""HTMLReportDataset: Markdown saved as one page that renders with nothing else."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

from irv2_pipeline.datasets import HTMLReportDataset, MarkdownReportDataset
from tests.offline_html import resource_urls, tags

MARKDOWN = """# A report

| metric | value |
|---|---|
| accuracy | 0.9 |

![A plot](plot.png)

See [the other report](other_report.md).
"""


def write_png(path: Path) -> bytes:
    """A small PNG at ``path``; returns its bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (0, 200, 0)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_the_page_is_one_file_with_its_images_and_style_inside(tmp_path):
    png = write_png(tmp_path / "plot.png")
    HTMLReportDataset(filepath=str(tmp_path / "report.html")).save(MARKDOWN)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "plot.png",
        "report.html",
    ]
    page = (tmp_path / "report.html").read_text()
    (source,) = resource_urls(page)
    kind, encoded = source.split(",", 1)
    assert kind == "data:image/png;base64"
    assert base64.b64decode(encoded) == png
    assert "<style>" in page
    assert "<table>" in page
    assert not tags(page) & {"script", "link", "iframe", "object", "embed"}


def test_the_page_may_load_nothing_from_elsewhere(tmp_path):
    dataset = HTMLReportDataset(filepath=str(tmp_path / "report.html"))
    dataset.save("![remote](https://example.com/plot.png)\n\n![missing](gone.png)\n")
    page = dataset.load()
    # Neither can be inlined; the page's policy stops the browser fetching them.
    assert resource_urls(page) == ["https://example.com/plot.png", "gone.png"]
    assert (
        '<meta http-equiv="Content-Security-Policy" content="default-src '
        "'none'; img-src data:; style-src 'unsafe-inline'\">" in page
    )


def test_it_renders_the_markdown_as_the_markdown_preview_does(tmp_path):
    write_png(tmp_path / "plot.png")
    (tmp_path / "report.md").write_text(MARKDOWN)
    preview = MarkdownReportDataset(filepath=str(tmp_path / "report.md")).preview()
    dataset = HTMLReportDataset(filepath=str(tmp_path / "report.html"))
    dataset.save(MARKDOWN)
    assert preview in dataset.load()
    assert '<a href="other_report.md">the other report</a>' in preview


def test_its_preview_is_the_saved_page_with_its_title(tmp_path):
    dataset = HTMLReportDataset(
        filepath=str(tmp_path / "report.html"), title="Runs & results"
    )
    dataset.save("# Heading\n")
    assert dataset.preview() == (tmp_path / "report.html").read_text()
    assert "<title>Runs &amp; results</title>" in dataset.preview()
    assert "<h1>Heading</h1>" in dataset.preview()
    default = HTMLReportDataset(filepath=str(tmp_path / "other.html"))
    default.save("text\n")
    assert f"<title>{HTMLReportDataset.DEFAULT_TITLE}</title>" in default.load()


def test_its_style_reaches_nothing_outside_the_report(tmp_path):
    """A page that embeds the HTML (Kedro-Viz's preview panel) keeps its own look."""
    dataset = HTMLReportDataset(filepath=str(tmp_path / "report.html"))
    dataset.save("# Heading\n")
    page = dataset.load()
    style = page.split("<style>", 1)[1].split("</style>", 1)[0]
    selectors = [
        selector.strip()
        for rule in re.findall(r"([^{}]+)\{", style)
        for selector in rule.split(",")
    ]
    assert selectors, style
    assert all(selector.startswith(".report") for selector in selectors), selectors
    assert '<main class="report">\n<h1>Heading</h1>' in page
