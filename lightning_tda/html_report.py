"""One self-contained HTML page for a run of analyses: figures embedded as PNG, tables sortable
in the browser without a server, metrics, grouped in sections.

The :class:`~lightning_tda.reporting.Reporter` feeds it everything it logs, so every analysis
that has a ``log(reporter, prefix)`` path appears in the page the same way it appears in W&B.
The page holds no external reference: no script, font or image is fetched when it is opened.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from lightning_tda.images import ImageLike, to_uint8_image

MAX_TABLE_ROWS = 500  # rows shown per table in the page (the CSV holds all of them)

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px}header p{margin:4px 0 0;color:#c9ced8;font-size:13px}
nav{padding:8px 32px;background:#e9ecf1;font-size:13px;position:sticky;top:0;z-index:2}
nav a{margin-right:14px;color:#2650a6;text-decoration:none}
main{padding:8px 32px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:18px 0;padding:8px 20px 16px}
section h2{font-size:18px;margin:10px 0 6px}section h3{font-size:14px;margin:16px 0 6px;color:#3b4254}
p.note{color:#4b5366;font-size:13px;margin:4px 0 10px;white-space:pre-wrap}
figure{margin:8px 0}figure img{max-width:min(100%,900px);height:auto;border:1px solid #eceef2}
figcaption{font-size:12px;color:#5d6578}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #dde1e8;padding:3px 8px;text-align:right;vertical-align:middle}
th{background:#eef1f6;cursor:pointer;user-select:none;position:sticky;top:0}
th:after{content:" \\2195";color:#9aa2b3}td.s{text-align:left}td img{height:40px;image-rendering:pixelated}
.metrics td:first-child{text-align:left;font-family:ui-monospace,monospace}
.scroll{max-height:480px;overflow:auto;display:inline-block;max-width:100%}
"""

_SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var table = th.closest('table'), body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v || a.cells[col].textContent, y = b.cells[col].dataset.v || b.cells[col].textContent;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
      return asc ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_png(image: ImageLike) -> bytes:
    """One image as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(to_uint8_image(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _format(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(value)


@dataclass
class _Section:
    title: str
    anchor: str
    blocks: list[str] = field(default_factory=list)


class HtmlReport:
    """An HTML page built section by section; :meth:`write` saves it as one file."""

    def __init__(self, title: str = "lightning-tda report", subtitle: str | None = None) -> None:
        self.title = title
        self.subtitle = subtitle
        self.sections: list[_Section] = []

    def section(self, title: str, note: str | None = None) -> None:
        """Start a section (everything added next goes into it)."""
        anchor = f"s{len(self.sections)}"
        self.sections.append(_Section(title, anchor))
        if note:
            self.add_note(note)

    def _current(self) -> _Section:
        if not self.sections:
            self.section("Results")
        return self.sections[-1]

    def add_note(self, text: str) -> None:
        self._current().blocks.append(f'<p class="note">{html.escape(text)}</p>')

    def add_figure(self, name: str, png: bytes, caption: str | None = None) -> None:
        cap = html.escape(caption or name)
        self._current().blocks.append(
            f'<figure><img alt="{html.escape(name)}" src="{png_data_uri(png)}"><figcaption>{cap}</figcaption></figure>'
        )

    def add_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_format(v)}</td></tr>" for k, v in metrics.items()
        )
        head = "metric" if step is None else f"metric (step {step})"
        self._current().blocks.append(
            f'<table class="metrics"><thead><tr><th>{head}</th><th>value</th></tr></thead><tbody>{rows}</tbody></table>'
        )

    def add_table(
        self,
        name: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        images: Mapping[str, Sequence[bytes | None]] | None = None,
    ) -> None:
        """A sortable table; ``images``: image columns of PNG bytes (or None) per row."""
        images = dict(images or {})
        shown = list(rows)[:MAX_TABLE_ROWS]
        header = "".join(f"<th>{html.escape(str(c))}</th>" for c in [*columns, *images])
        body = []
        for i, row in enumerate(shown):
            cells = []
            for value in row:
                text = _format(value)
                numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
                cls = "" if numeric else ' class="s"'
                data = f' data-v="{float(value)!r}"' if numeric else ""
                cells.append(f"<td{cls}{data}>{html.escape(text)}</td>")
            for column_images in images.values():
                png = column_images[i]
                cells.append(f'<td><img alt="" src="{png_data_uri(png)}"></td>' if png is not None else "<td></td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        more = len(rows) - len(shown)
        note = f'<p class="note">first {len(shown)} of {len(rows)} rows (all in the CSV)</p>' if more > 0 else ""
        self._current().blocks.append(
            f"<h3>{html.escape(name)}</h3>{note}<div class=\"scroll\"><table class=\"sortable\">"
            f"<thead><tr>{header}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
        )

    def render(self) -> str:
        nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in self.sections)
        sections = "".join(
            f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>{"".join(s.blocks)}</section>'
            for s in self.sections
        )
        subtitle = self.subtitle or f"written {datetime.now().strftime('%Y-%m-%d %H:%M')}"
        return (
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head><body>"
            f"<header><h1>{html.escape(self.title)}</h1><p>{html.escape(subtitle)}</p></header>"
            f"<nav>{nav}</nav><main>{sections}</main><script>{_SORT_SCRIPT}</script></body></html>"
        )

    def write(self, path: str | Path) -> Path:
        """Write the page (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(self.render(), encoding="utf-8")
        tmp.replace(path)
        return path


__all__ = ["HtmlReport", "image_png", "png_data_uri"]
