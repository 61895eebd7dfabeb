"""One static page per report folder (index.html): tables, figures, plans and links to timelines.

The page is self-contained: PNG figures are embedded (base64), styles are inline, nothing is
fetched from a server or the network, so it opens from the file system, from an archive or as a
CI artifact. Other files of the folder (timelines, plans, JSON, Parquet) are linked by relative
path. A short inline script marks a figure that failed to load, so a broken page says so.
Output is deterministic: the same report gives the same bytes (no dates, no versions).

Used by `tidesim demo`, `compare --figure`, `sweep` and `validate`; a command builds a Report of
Sections and calls write_report.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidesim.atomic import write_text
from tidesim.formatting import format_cell

INDEX = "index.html"
PERFETTO = "https://ui.perfetto.dev"


@dataclass
class Table:
    """A table as the command prints it: header plus rows of plain values."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass
class Link:
    """A file of the report folder (relative path) with a label and a one-line hint."""

    path: str
    label: str
    hint: str = ""


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)       # paths relative to the report folder
    links: list[Link] = field(default_factory=list)


@dataclass
class Report:
    title: str
    intro: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; }
th { background: #f2f2f2; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: bold; padding: 0.3em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.8em; color: #555; } .broken { color: #b00; font-weight: bold; }
code { background: #f4f4f4; padding: 0 0.2em; }
""".strip()

# Marks every image once the page has loaded: data-loaded="1" when it decoded, and a visible
# warning beside it when it did not (naturalWidth 0). Runs locally; fetches nothing.
CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.querySelectorAll("img");
  var broken = 0;
  images.forEach(function (img) {
    var ok = img.complete && img.naturalWidth > 0;
    img.setAttribute("data-loaded", ok ? "1" : "0");
    if (!ok) {
      broken += 1;
      var note = document.createElement("p");
      note.className = "broken";
      note.textContent = "figure did not load: " + img.getAttribute("alt");
      img.parentNode.insertBefore(note, img);
    }
  });
  document.body.setAttribute("data-figures", images.length + " " + broken);
});
""".strip()


def write_report(report: Report, folder: str | Path, name: str = INDEX) -> Path:
    """Write the page into `folder` (atomically) and return its path."""
    folder = Path(folder)
    path = folder / name
    write_text(path, render(report, folder))
    return path


def render(report: Report, folder: Path) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e(report.title)}</title>", f"<style>\n{STYLE}\n</style>", "</head>", "<body>",
             f"<h1>{_e(report.title)}</h1>"]
    parts += [f"<p>{_e(p)}</p>" for p in report.intro]
    if len(report.sections) > 1:
        parts.append("<nav><ul>" + "".join(f'<li><a href="#s{i}">{_e(s.title)}</a></li>'
                                           for i, s in enumerate(report.sections)) + "</ul></nav>")
    for i, section in enumerate(report.sections):
        parts += _section(section, folder, f"s{i}")
    parts += [f"<script>\n{CHECK_SCRIPT}\n</script>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _section(section: Section, folder: Path, anchor: str) -> list[str]:
    out = [f'<section id="{anchor}">', f"<h2>{_e(section.title)}</h2>"]
    out += [f"<p>{_e(p)}</p>" for p in section.paragraphs]
    out += [_table(t) for t in section.tables]
    out += [_figure(folder, f) for f in section.figures]
    if section.links:
        out.append("<ul>")
        for link in section.links:
            hint = f" ({_e(link.hint)})" if link.hint else ""
            out.append(f'<li><a href="{_e(link.path)}">{_e(link.label)}</a>{hint}</li>')
        out.append("</ul>")
    out.append("</section>")
    return out


def _table(table: Table) -> str:
    rows = ["<table>"]
    if table.caption:
        rows.append(f"<caption>{_e(table.caption)}</caption>")
    rows.append("<tr>" + "".join(f"<th>{_e(c)}</th>" for c in table.columns) + "</tr>")
    for row in table.rows:
        rows.append("<tr>" + "".join(_cell(v) for v in row) + "</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _cell(value: Any) -> str:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if numeric and isinstance(value, float) and math.isnan(value):
        numeric = False
    cls = ' class="num"' if numeric else ""
    return f"<td{cls}>{_e(format_cell(value))}</td>"


def _figure(folder: Path, rel: str) -> str:
    """A PNG is embedded (the page stands alone); other formats are linked by relative path."""
    path = folder / rel
    alt = _e(Path(rel).name)
    if path.suffix.lower() == ".png" and path.is_file():
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        src = f"data:image/png;base64,{data}"
    else:
        src = _e(rel)
    return (f'<figure><img src="{src}" alt="{alt}">'
            f'<figcaption><a href="{_e(rel)}">{alt}</a></figcaption></figure>')


def timeline_link(rel: str) -> Link:
    return Link(rel, Path(rel).name, f"Chrome trace JSON: open {PERFETTO} and drop the file in, "
                                     "or chrome://tracing; the page itself fetches nothing")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)
