"""Self-contained HTML timeline: inline SVG plus a few lines of JS for wheel zoom, drag, and a
time axis in microseconds that follows the zoom; hovering a bar shows its kernel name, start,
end and length (no external scripts or styles)."""

from __future__ import annotations

import html as _html

from deeppar._io import write_text

from ._lanes import COLORS, Window, build_lanes, phase_color_map
from .analysis import TraceReport
from .classify import Classifier
from .loader import RankTrace

_LANE_H, _LABEL_W, _WIDTH, _AXIS_H = 22, 190, 1400, 20

_SCRIPT = """
const svg = document.getElementById('tl'), g = document.getElementById('plot');
const axis = document.getElementById('axis');
const W = %(w)r, L = %(l)d, PW = %(pw)d, OFF = %(off)r, H = %(h)d;
let x0 = 0, x1 = W, drag = null;
function niceStep(span) {
  const raw = span / 8, p = Math.pow(10, Math.floor(Math.log10(raw))), m = raw / p;
  return p * (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10);
}
function drawAxis(k) {
  const step = niceStep(x1 - x0);
  let s = '';
  for (let t = Math.ceil(x0 / step) * step; t <= x1; t += step) {
    const x = L + (t - x0) * k;
    s += `<line x1="${x}" x2="${x}" y1="${%(ah)d - 4}" y2="${H}" stroke="#e4e4e4"/>` +
         `<text x="${x}" y="${%(ah)d - 7}" font-size="10" text-anchor="middle">` +
         `${(t + OFF).toLocaleString()}</text>`;
  }
  axis.innerHTML = s;
}
function draw() {
  const k = PW / (x1 - x0);
  g.setAttribute('transform', `translate(${L - x0 * k},0) scale(${k},1)`);
  drawAxis(k);
  document.getElementById('range').textContent =
    `${(x0 + OFF).toLocaleString()} .. ${(x1 + OFF).toLocaleString()} us`;
}
svg.addEventListener('wheel', e => {
  e.preventDefault();
  const r = svg.getBoundingClientRect();
  const f = Math.min(Math.max((e.clientX - r.left - L) / PW, 0), 1);
  const c = x0 + f * (x1 - x0), s = e.deltaY < 0 ? 0.8 : 1.25;
  x0 = Math.max(0, c - (c - x0) * s); x1 = Math.min(W, c + (x1 - c) * s); draw();
});
svg.addEventListener('mousedown', e => drag = [e.clientX, x0, x1]);
window.addEventListener('mouseup', () => drag = null);
window.addEventListener('mousemove', e => {
  if (!drag) return;
  const d = (e.clientX - drag[0]) / PW * (drag[2] - drag[1]);
  x0 = Math.max(0, drag[1] - d); x1 = Math.min(W, drag[2] - d); draw();
});
document.getElementById('reset').onclick = () => { x0 = 0; x1 = W; draw(); };
draw();
"""


def _title(name: str, a: float, b: float) -> str:
    return (f"<title>{_html.escape(name)}\n{a:,.3f} - {b:,.3f} us "
            f"({b - a:,.3f} us)</title>")


def write_html(path: str, traces: list[RankTrace], report: TraceReport,
               classifier: Classifier | None = None, max_ranks: int = 8,
               window: Window = (None, None)) -> None:
    """Write a zoomable timeline (wheel to zoom, drag to pan; hover shows kernel names),
    times in microseconds from the first activity, cut to ``window`` when given."""
    lanes, (lo, hi) = build_lanes(traces, report, classifier or Classifier(), max_ranks,
                                  window, names=True)
    width = hi - lo
    phase_colors = phase_color_map(lanes)
    pw = _WIDTH - _LABEL_W - 10
    height = _AXIS_H + _LANE_H * (len(lanes) + 1) + 10
    labels, rects = [], []
    for row, lane in enumerate(lanes):
        y = _AXIS_H + 5 + row * _LANE_H
        labels.append(f'<text x="4" y="{y + 15}" font-size="12">{_html.escape(lane.label)}</text>')
        for key, (s, e) in lane.bars.items():
            for a, b, name in zip(s.tolist(), e.tolist(), lane.bar_names[key]):
                rects.append(f'<rect x="{a - lo:.6f}" y="{y + 3}" width="{max(b - a, 1e-6):.6f}" '
                             f'height="{_LANE_H - 6}" fill="{COLORS[key]}">'
                             f'{_title(f"{name} [{key}]", a, b)}</rect>')
        for a, b, name in lane.names:
            rects.append(f'<rect x="{a - lo:.6f}" y="{y + 2}" width="{max(b - a, 1e-6):.6f}" '
                         f'height="{_LANE_H - 4}" fill="{phase_colors[name]}" stroke="#555" '
                         f'stroke-width="0.3" vector-effect="non-scaling-stroke">'
                         f'{_title(name, a, b)}</rect>')
    legend = " ".join(
        f'<span style="background:{c};padding:0 8px;margin-right:4px"></span>{_html.escape(k)}'
        for k, c in [*COLORS.items(), *phase_colors.items()])
    figures = ""
    for r in report.ranks:
        for d in r.devices:
            figures += (f"<li>rank {d.rank} GPU {d.device}: span {d.span_us:,.1f} us, "
                        f"overlap ratio {d.overlap_ratio:.3f}, exposed communication "
                        f"{d.exposed_comm_us:,.1f} us</li>")
    shown = f"{lo:,.1f} .. {hi:,.1f} us" + (" (window)" if window != (None, None) else "")
    doc = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>deeppar timeline</title></head>
<body style="font-family:sans-serif">
<h3>Communication/computation timeline</h3><ul>{figures or "<li>no GPU activity</li>"}</ul>
<p>{legend}</p>
<p>Times in microseconds from the first activity; shown: {shown}. Wheel: zoom, drag: pan,
hover: kernel name and times. <button id="reset">reset</button> <span id="range"></span></p>
<svg id="tl" width="{_WIDTH}" height="{height}" style="border:1px solid #ccc;cursor:grab">
<defs><clipPath id="clip"><rect x="{_LABEL_W}" y="0" width="{pw}" height="{height}"/></clipPath>
</defs><g id="axis"></g>{''.join(labels)}
<g clip-path="url(#clip)"><g id="plot">{''.join(rects)}</g></g></svg>
<script>{_SCRIPT % {"w": width, "l": _LABEL_W, "pw": pw, "off": lo, "h": height,
                    "ah": _AXIS_H}}</script>
</body></html>
"""
    write_text(path, doc)
