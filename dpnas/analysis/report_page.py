"""The HTML of the study report: the page around the sections, a sortable table, and the few lines of JS it runs.

Every piece of text that reaches the page passes through :func:`esc` (or is built from escaped pieces), so a
study name, a description or a failure reason that holds markup is shown as text. Plotly's own JSON escapes
``<`` itself, so a figure cannot close the script it sits in.
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: .2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
.sub { color: #666; margin-top: 0; } .headline { font-size: 1.15rem; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .85rem; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: .25rem 1rem; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
table.sortable { border-collapse: collapse; font-size: .85rem; width: 100%; }
table.sortable th, table.sortable td { border: 1px solid #ddd; padding: .25rem .45rem; text-align: left; }
table.sortable th { background: #f0f2f5; cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th[data-order="asc"]::after { content: " \\25B2"; } table.sortable th[data-order="desc"]::after { content: " \\25BC"; }
div.wide { overflow-x: auto; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.state-FAIL td, tr.state-PRUNED td { color: #8a4b00; }
figure { margin: 1.5rem 0; } figcaption { color: #444; font-style: italic; margin-top: .3rem; }
"""

# Set before any other script runs, so an error anywhere on the page (plotly.js included) is counted.
_ERROR_TRAP = """
window.dpnasErrors = [];
window.addEventListener("error", function (e) { window.dpnasErrors.push(String(e.message || e)); });
"""

_PAGE_SCRIPT = """
(function () {
  function key(cell) {
    var text = cell.getAttribute("data-sort");
    if (text === null) { text = cell.textContent.trim(); }
    if (text === "") { return null; }
    var number = Number(text);  // Number("Infinity") is Infinity; words stay words
    return isNaN(number) ? text : number;
  }
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0], column = th.cellIndex;
    var ascending = th.getAttribute("data-order") !== "asc";
    Array.prototype.forEach.call(th.parentNode.children, function (h) { h.removeAttribute("data-order"); });
    th.setAttribute("data-order", ascending ? "asc" : "desc");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[column]), y = key(b.cells[column]);
      if (x === null || y === null) { return x === y ? 0 : x === null ? 1 : -1; }  // blanks last either way
      var order = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });
  window.addEventListener("load", function () {
    document.body.setAttribute("data-plots", String(document.querySelectorAll(".js-plotly-plot .main-svg").length));
    document.body.setAttribute("data-rendered",
      window.dpnasErrors.length ? "errors: " + window.dpnasErrors.join(" | ") : "ok");
  });
})();
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def format_value(value: Any) -> tuple[str, str]:
    """(text shown, sort key) for one table cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "", ""
    if isinstance(value, bool):
        return str(value).lower(), str(value).lower()
    if isinstance(value, float):
        if math.isinf(value):
            return ("∞" if value > 0 else "-∞"), ("Infinity" if value > 0 else "-Infinity")
        return f"{value:.4g}", repr(value)
    if isinstance(value, int):
        return f"{value:,}", str(value)
    return str(value), str(value)


def sortable_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, row_classes: Sequence[str] = ()) -> str:
    """A table whose headers sort it when clicked (numbers as numbers, blanks last)."""
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for value in row:
            text, sort = format_value(value)
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            css = ' class="num"' if numeric else ""
            cells.append(f'<td{css} data-sort="{esc(sort)}">{esc(text)}</td>')
        row_css = f' class="{esc(row_classes[i])}"' if i < len(row_classes) else ""
        body.append(f"<tr{row_css}>{''.join(cells)}</tr>")
    return (f'<div class="wide"><table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def facts(items: Sequence[tuple[str, Any]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items) + "</dl>"


def page(*, title: str, plotly_js: str, body: str) -> str:
    """The whole page: plotly.js inline once in the head, the error trap before it, the page's script last."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>\n'
            f"<style>{_STYLE}</style>\n<script>{_ERROR_TRAP}</script>\n"
            f'<script type="text/javascript">{plotly_js}</script>\n</head>\n<body>\n{body}\n'
            f"<script>{_PAGE_SCRIPT}</script>\n</body></html>\n")
