"""RUN/index.html's page: links to a run's files, reports and exports, and its training curves as inline SVG.

Rendering only (no file is read or written here); medtl.train.rundir.RunDir.write_index owns the file.
Links are relative to the run folder, so the page still works when the folder moves with its reports.
"""
from __future__ import annotations

import html
import math
import os

_CURVES = (("loss", "train loss", "#1f5fa8"), ("val_loss", "val loss", "#d1495b"),
           ("val_auroc", "val macro AUROC", "#1f5fa8"))
_W, _H, _PAD = 460, 200, 34

STYLE = """
body { font-family: "DejaVu Sans", system-ui, sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 24px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 28px 0 6px; border-bottom: 2px solid #e3e6eb; }
table { border-collapse: collapse; font-size: 13px; } td, th { border-bottom: 1px solid #e3e6eb; padding: 5px 8px;
text-align: left; } .muted { color: #5b6270; font-size: 13px; } svg { background: #fafbfc; margin-right: 12px; }
"""


def _link(run: str, target: str, text: str | None = None) -> str:
    rel = os.path.relpath(target, run) if os.path.isabs(target) else target
    return f'<a href="{html.escape(rel)}">{html.escape(text or rel)}</a>'


def _chart(history: list[dict], keys: tuple[str, ...], title: str) -> str:
    """One SVG line chart of `keys` per epoch (None values skipped)."""
    series = [(k, n, c) for k, n, c in _CURVES if k in keys]
    values = [r.get(k) for r in history for k, _, _ in series if isinstance(r.get(k), (int, float))]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    n = max(len(history) - 1, 1)

    def xy(i, v):
        return _PAD + (_W - 2 * _PAD) * i / n, _H - _PAD - (_H - 2 * _PAD) * (v - lo) / (hi - lo)

    parts = [f'<svg width="{_W}" height="{_H}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{_PAD}" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>',
             f'<text x="4" y="{_PAD + 4}" font-size="10">{hi:.3g}</text>',
             f'<text x="4" y="{_H - _PAD}" font-size="10">{lo:.3g}</text>',
             f'<text x="{_W - _PAD}" y="{_H - 10}" font-size="10" text-anchor="end">epoch {len(history)}</text>']
    for k, (key, name, color) in enumerate(series):
        points = [xy(i, r[key]) for i, r in enumerate(history)
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        dash = ' stroke-dasharray="5,3"' if key == "val_loss" else ""
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in points) + '"/>')
        parts.append(f'<text x="{_W - _PAD}" y="{34 + 14 * k}" font-size="11" text-anchor="end" '
                     f'fill="{color}">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def _outputs_table(run: str, outputs, kind: str) -> str:
    rows = [o for o in sorted(outputs, key=lambda o: o.written_at, reverse=True) if o.kind == kind]
    if not rows:
        return ("<p class=muted>None yet: `medtl evaluate --workdir RUN` writes RUN/reports/SPLIT.</p>"
                if kind == "report" else "<p class=muted>None yet: `medtl export --workdir RUN --out DIR` "
                "writes a SavedModel with its model card.</p>")
    split = kind == "report"
    body = "".join(
        f"<tr><td>{_link(run, os.path.join(o.path, o.document))}</td>"
        + (f"<td>{html.escape(o.split)}</td>" if split else "")
        + f"<td>{html.escape(o.summary)}</td><td>{html.escape(o.written_at)}</td>"
        f"<td>{html.escape(o.checkpoint_sha256[:16])}</td></tr>" for o in rows)
    head = "<th>report</th><th>split</th>" if split else "<th>model card</th>"
    return (f"<table><tr>{head}<th>summary</th><th>written (UTC)</th><th>checkpoint sha256</th></tr>"
            f"{body}</table>")


def render_index(run: str, files: list[str], history: list[dict], outputs) -> str:
    """The page for run folder `run`: `files` (relative names), `history` rows, RunOutput entries."""
    charts = _chart(history, ("loss", "val_loss"), "loss") + _chart(history, ("val_auroc",), "val macro AUROC")
    phases = sorted({r.get("phase", "") for r in history} - {""})
    curves = (f"<p class=muted>{len(history)} epoch(s), phase(s) {html.escape(', '.join(phases))}; per-epoch rows in "
              f"{_link(run, 'history.jsonl')}.</p>{charts}" if history else "<p class=muted>No epoch completed yet.</p>")
    file_links = "".join(f"<li>{_link(run, f)}</li>" for f in files)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medtl run: {html.escape(os.path.basename(run))}</title>
<style>{STYLE}</style></head><body><main>
<h1>medtl run</h1><p class=muted>{html.escape(run)}</p>
<section id="files"><h2>Files</h2><ul>{file_links}</ul></section>
<section id="curves"><h2>Training curves</h2>{curves}</section>
<section id="reports"><h2>Reports</h2>{_outputs_table(run, outputs, "report")}</section>
<section id="exports"><h2>Exports and model cards</h2>{_outputs_table(run, outputs, "export")}</section>
</main></body></html>
"""
