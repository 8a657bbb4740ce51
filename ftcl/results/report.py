"""``results/<experiment>/report.html``: one self-contained page with the tables and the plots.

No external assets: the CSS is inline and every plot is embedded as a base64 PNG ``data:`` URI, so
the file can be opened from disk, mailed, or viewed as an MLflow artifact. The ablation table has
``id="ablation-table"`` and each of its lines starts with the row name (what the browser test and
people look for).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from ftcl.files import write_text

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2rem; }
.meta { color: #57606a; font-size: 0.9rem; }
.meta code, .notes code { background: #f6f8fa; padding: 0.1rem 0.3rem; border-radius: 4px; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
th, td { border-top: 1px solid #d0d7de; border-bottom: 1px solid #d0d7de; padding: 0.35rem 0.7rem; }
th { background: #f6f8fa; text-align: left; }
td { text-align: right; white-space: nowrap; }
td:first-child { text-align: left; font-weight: 600; }
.notes { color: #57606a; font-size: 0.88rem; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.9rem; }
dl.rows dt { font-weight: 600; } dl.rows dd { margin: 0 0 0.4rem 1.2rem; color: #57606a; }
"""


def embed_png(path: str | Path) -> str:
    """A ``data:image/png;base64,...`` URI of the file."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table_html(table: pd.DataFrame, table_id: str) -> str:
    return table.to_html(index=False, table_id=table_id, border=0, escape=True, na_rep="–")


def render_report(
    *,
    experiment: str,
    ablation: pd.DataFrame,
    ablation_notes: Sequence[str] = (),
    paper: pd.DataFrame | None = None,
    floor: pd.DataFrame | None = None,
    floor_notes: Sequence[str] = (),
    plots: Mapping[str, str | Path] | None = None,
    command: str = "ftcl aggregate",
    descriptions: Mapping[str, str] | None = None,
    generated_at: datetime | None = None,
) -> str:
    """The report's HTML. ``ablation``/``paper``/``floor`` are display tables (strings; first column
    the row name), ``plots`` maps a title to a PNG file, ``descriptions`` maps a row to its description."""
    when = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M %Z")
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ftcl report: {esc(experiment)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>ftcl report: <span id=\"experiment\">{esc(experiment)}</span></h1>",
        f'<p class="meta">Generated {esc(when)} by <code id="command">{esc(command)}</code></p>',
        "<h2>Ablation table</h2>",
        _table_html(ablation, "ablation-table"),
    ]
    if ablation_notes:
        parts.append('<p class="notes">' + "<br>".join(esc(n) for n in ablation_notes) + "</p>")
    described = {row: text for row, text in (descriptions or {}).items() if text}
    if described:
        parts.append('<dl class="rows">')
        parts += [f"<dt>{esc(row)}</dt><dd>{esc(text)}</dd>" for row, text in described.items()]
        parts.append("</dl>")
    if floor is not None and len(floor):
        parts.append("<h2>Against the floor (random initialisation)</h2>")
        parts.append(_table_html(floor, "floor-table"))
        if floor_notes:
            parts.append('<p class="notes">' + "<br>".join(esc(n) for n in floor_notes) + "</p>")
    parts.append("<h2>Comparison with published numbers</h2>")
    if paper is not None and len(paper):
        parts.append(_table_html(paper, "paper-table"))
    else:
        parts.append('<p class="notes">No row of this config records published numbers.</p>')
    parts.append("<h2>Plots</h2>")
    for title, path in (plots or {}).items():
        parts.append(
            f'<figure><img src="{embed_png(path)}" alt="{esc(title)}">'
            f"<figcaption>{esc(title)} ({esc(Path(path).name)})</figcaption></figure>"
        )
    if not plots:
        parts.append('<p class="notes">No plot could be drawn (no results with scores yet).</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(path: str | Path, **kwargs) -> Path:
    """Write :func:`render_report` to ``path`` (written to a temporary file, then renamed)."""
    return write_text(path, render_report(**kwargs))
