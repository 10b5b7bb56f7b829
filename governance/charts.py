"""Charts drawn on the server as inline SVG: a line over time (an area under it, a dashed forecast after it)
and horizontal bars. No JavaScript, nothing fetched from elsewhere. Each chart names itself (<title>,
aria-label) and the page puts its data table right after it, which is what a screen reader reads."""
from collections.abc import Sequence
from decimal import Decimal

from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

WIDTH, HEIGHT = 640, 220
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 64, 16, 12, 28
BAR_HEIGHT, BAR_GAP, BAR_LABEL = 18, 6, 180


def _number(value) -> float:
    return float(value) if isinstance(value, Decimal | int | float) else 0.0


def _axis_label(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 1_000:
        return f"{value / 1_000:.1f}k"
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _svg(chart_id: str, title: str, width: int, height: int, body: list[str]) -> SafeString:
    title = escape(title)
    return mark_safe(
        f'<svg class="chart" id="{escape(chart_id)}" role="img" aria-label="{title}" '
        f'aria-labelledby="{escape(chart_id)}-title" viewBox="0 0 {width} {height}" preserveAspectRatio="xMinYMin meet" '
        f'xmlns="http://www.w3.org/2000/svg"><title id="{escape(chart_id)}-title">{title}</title>{"".join(body)}</svg>')


def line_chart(*, chart_id: str, title: str, points: Sequence[tuple[str, object]],
               forecast: Sequence[tuple[str, object]] = ()) -> SafeString:
    """Values over time as a line with the area under it; `forecast` continues it as a dashed line (its first
    point is usually the last actual one, so the two join)."""
    labels = [label for label, _ in points] + [label for label, _ in forecast if label not in {p for p, _ in points}]
    values = {label: _number(value) for label, value in points}
    ahead = {label: _number(value) for label, value in forecast}
    top = max([*values.values(), *ahead.values(), 0.0]) or 1.0
    plot_w, plot_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - PAD_TOP - PAD_BOTTOM
    step = plot_w / max(len(labels) - 1, 1)
    x = {label: PAD_LEFT + i * step for i, label in enumerate(labels)}

    def y(value: float) -> float:
        return PAD_TOP + plot_h - value / top * plot_h

    body = []
    for fraction in (0, 0.5, 1):  # grid lines with their values
        gy = y(top * fraction)
        body.append(f'<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{gy:.1f}" y2="{gy:.1f}"/>'
                    f'<text class="axis" x="{PAD_LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end">{_axis_label(top * fraction)}</text>')
    if points:
        line = " ".join(f"{x[label]:.1f},{y(values[label]):.1f}" for label, _ in points)
        first, last = x[points[0][0]], x[points[-1][0]]
        body.append(f'<polygon class="area" points="{first:.1f},{y(0):.1f} {line} {last:.1f},{y(0):.1f}"/>')
        body.append(f'<polyline class="line" points="{line}"/>')
    if forecast:
        dashed = " ".join(f"{x[label]:.1f},{y(ahead[label]):.1f}" for label, _ in forecast)
        body.append(f'<polyline class="forecast" stroke-dasharray="6 4" points="{dashed}"/>')
    if labels:  # first, middle and last labels on the time axis
        for label in dict.fromkeys([labels[0], labels[len(labels) // 2], labels[-1]]):
            anchor = "start" if label == labels[0] else "end" if label == labels[-1] else "middle"
            body.append(f'<text class="axis" x="{x[label]:.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">{escape(label)}</text>')
    return _svg(chart_id, title, WIDTH, HEIGHT, body)


def bar_chart(*, chart_id: str, title: str, bars: Sequence[tuple[str, object]]) -> SafeString:
    """One horizontal bar per (label, value), longest first as given."""
    top = max([_number(value) for _, value in bars] + [0.0]) or 1.0
    height = max(len(bars), 1) * (BAR_HEIGHT + BAR_GAP) + BAR_GAP
    plot_w = WIDTH - BAR_LABEL - 80
    body = []
    for i, (label, value) in enumerate(bars):
        top_y = BAR_GAP + i * (BAR_HEIGHT + BAR_GAP)
        width = max(_number(value) / top * plot_w, 1)
        text = escape(str(label)[:28])
        body.append(f'<text class="axis" x="{BAR_LABEL - 6}" y="{top_y + 13}" text-anchor="end">{text}</text>'
                    f'<rect class="bar" x="{BAR_LABEL}" y="{top_y}" width="{width:.1f}" height="{BAR_HEIGHT}"/>'
                    f'<text class="axis" x="{BAR_LABEL + width + 6:.1f}" y="{top_y + 13}">{_axis_label(_number(value))}</text>')
    return _svg(chart_id, title, WIDTH, height, body)
