"""Self-contained HTML timeline: inline SVG plus a few lines of JS for wheel zoom and drag
(no external scripts or styles)."""

from __future__ import annotations

import html as _html

from deeppar._io import write_text

from ._lanes import COLORS, build_lanes, phase_color_map
from .analysis import TraceReport
from .classify import Classifier
from .loader import RankTrace

_LANE_H, _LABEL_W, _WIDTH = 22, 190, 1400

_SCRIPT = """
const svg = document.getElementById('tl'), g = document.getElementById('plot');
const W = %(w)f, L = %(l)d; let x0 = 0, x1 = W, drag = null;
function draw() {
  const k = %(pw)d / (x1 - x0);
  g.setAttribute('transform', `translate(${L - x0 * k},0) scale(${k},1)`);
  document.getElementById('range').textContent = `${x0.toFixed(3)} .. ${x1.toFixed(3)} ms`;
}
svg.addEventListener('wheel', e => {
  e.preventDefault();
  const r = svg.getBoundingClientRect();
  const f = Math.min(Math.max((e.clientX - r.left - L) / %(pw)d, 0), 1);
  const c = x0 + f * (x1 - x0), s = e.deltaY < 0 ? 0.8 : 1.25;
  x0 = Math.max(0, c - (c - x0) * s); x1 = Math.min(W, c + (x1 - c) * s); draw();
});
svg.addEventListener('mousedown', e => drag = [e.clientX, x0, x1]);
window.addEventListener('mouseup', () => drag = null);
window.addEventListener('mousemove', e => {
  if (!drag) return;
  const d = (e.clientX - drag[0]) / %(pw)d * (drag[2] - drag[1]);
  x0 = Math.max(0, drag[1] - d); x1 = Math.min(W, drag[2] - d); draw();
});
document.getElementById('reset').onclick = () => { x0 = 0; x1 = W; draw(); };
draw();
"""


def write_html(path: str, traces: list[RankTrace], report: TraceReport,
               classifier: Classifier | None = None, max_ranks: int = 8) -> None:
    """Write a zoomable timeline (wheel to zoom, drag to pan; hover shows names)."""
    lanes, end_ms = build_lanes(traces, report, classifier or Classifier(), max_ranks)
    end_ms = end_ms or 1.0
    phase_colors = phase_color_map(lanes)
    pw = _WIDTH - _LABEL_W - 10
    height = _LANE_H * (len(lanes) + 1) + 10
    labels, rects = [], []
    for row, lane in enumerate(lanes):
        y = 5 + row * _LANE_H
        labels.append(f'<text x="4" y="{y + 15}" font-size="12">{_html.escape(lane.label)}</text>')
        for key, (s, e) in lane.bars.items():
            for a, b in zip(s.tolist(), e.tolist()):
                rects.append(f'<rect x="{a:.6f}" y="{y + 3}" width="{max(b - a, 1e-6):.6f}" '
                             f'height="{_LANE_H - 6}" fill="{COLORS[key]}"><title>{key} '
                             f'{a:.3f}-{b:.3f} ms</title></rect>')
        for a, b, name in lane.names:
            rects.append(f'<rect x="{a:.6f}" y="{y + 2}" width="{max(b - a, 1e-6):.6f}" '
                         f'height="{_LANE_H - 4}" fill="{phase_colors[name]}" stroke="#555" '
                         f'stroke-width="0.3" vector-effect="non-scaling-stroke"><title>'
                         f'{_html.escape(name)} {a:.3f}-{b:.3f} ms</title></rect>')
    legend = " ".join(
        f'<span style="background:{c};padding:0 8px;margin-right:4px"></span>{_html.escape(k)}'
        for k, c in [*COLORS.items(), *phase_colors.items()])
    figures = ""
    for r in report.ranks:
        for d in r.devices:
            figures += (f"<li>rank {d.rank} GPU {d.device}: span {d.span_us / 1000:.3f} ms, "
                        f"overlap ratio {d.overlap_ratio:.3f}, exposed communication "
                        f"{d.exposed_comm_us / 1000:.3f} ms</li>")
    doc = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>deeppar timeline</title></head>
<body style="font-family:sans-serif">
<h3>Communication/computation timeline</h3><ul>{figures or "<li>no GPU activity</li>"}</ul>
<p>{legend}</p>
<p>Wheel: zoom, drag: pan. <button id="reset">reset</button> <span id="range"></span></p>
<svg id="tl" width="{_WIDTH}" height="{height}" style="border:1px solid #ccc;cursor:grab">
<defs><clipPath id="clip"><rect x="{_LABEL_W}" y="0" width="{pw}" height="{height}"/></clipPath>
</defs>{''.join(labels)}
<g clip-path="url(#clip)"><g id="plot">{''.join(rects)}</g></g></svg>
<script>{_SCRIPT % {"w": end_ms, "l": _LABEL_W, "pw": pw}}</script>
</body></html>
"""
    write_text(path, doc)
