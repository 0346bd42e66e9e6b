"""Small inline SVG charts (no script, no external file): a sparkline and a bar chart."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape


def _scale(values: Sequence[float]) -> float:
    top = max(values, default=0.0)
    return top if top > 0 else 1.0


def sparkline(
    points: Sequence[tuple[float, float]], width: int = 120, height: int = 24, label: str = ""
) -> Markup:
    """A polyline of ``(time, value)`` samples, oldest left; empty with fewer than two."""
    if len(points) < 2:
        return Markup("")
    t0, t1 = points[0][0], points[-1][0]
    span = (t1 - t0) or 1.0
    top = _scale([v for _, v in points])
    coords = " ".join(
        f"{(t - t0) / span * (width - 2) + 1:.1f},{height - 1 - v / top * (height - 2):.1f}"
        for t, v in points
    )
    return Markup(
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>'
        f'<polyline fill="none" stroke="currentColor" stroke-width="1.5" points="{coords}"/>'
        "</svg>"
    )


def bars(
    points: Sequence[tuple[float, float]], width: int = 480, height: int = 80, label: str = ""
) -> Markup:
    """One bar per ``(time, value)`` point, with the largest value written at the top."""
    if not points:
        return Markup("")
    values = [v for _, v in points]
    top = _scale(values)
    step = width / len(points)
    rects = []
    for i, (_, value) in enumerate(points):
        h = value / top * (height - 14)
        rects.append(
            f'<rect x="{i * step + 1:.1f}" y="{height - h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{h:.1f}"><title>{value:g}</title></rect>'
        )
    return Markup(
        f'<svg class="bars" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>'
        f'<text x="2" y="10" class="axis">peak {max(values):g}/min</text>{"".join(rects)}</svg>'
    )
