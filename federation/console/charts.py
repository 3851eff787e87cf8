"""Small charts drawn server-side as SVG: no JavaScript library, nothing to fetch."""

from __future__ import annotations

from markupsafe import Markup, escape

from .data import Activity

WIDTH, HEIGHT, GAP, MAX_BAR = 640, 160, 2, 36


def activity_svg(activity: Activity) -> Markup:
    """Batches and opinions per day, as stacked bars with the day under each."""
    days = activity.days[-30:]
    if not days:
        return Markup('<p class="empty">No submissions or opinions in the recent entries.</p>')
    batches, opinions = activity.batches[-30:], activity.opinions[-30:]
    top = max(b + o for b, o in zip(batches, opinions, strict=True)) or 1
    bar = min((WIDTH - GAP * len(days)) / len(days), MAX_BAR)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT + 30}" role="img" '
        'aria-label="submissions and opinions per day" xmlns="http://www.w3.org/2000/svg">'
    ]
    for position, (day, batch, opinion) in enumerate(zip(days, batches, opinions, strict=True)):
        x = position * (bar + GAP)
        batch_height, opinion_height = HEIGHT * batch / top, HEIGHT * opinion / top
        parts.append(
            f'<rect class="batches" x="{x:.1f}" y="{HEIGHT - batch_height:.1f}" width="{bar:.1f}" '
            f'height="{batch_height:.1f}"><title>{escape(day)}: {batch} batches</title></rect>'
        )
        parts.append(
            f'<rect class="opinions" x="{x:.1f}" y="{HEIGHT - batch_height - opinion_height:.1f}" '
            f'width="{bar:.1f}" height="{opinion_height:.1f}"><title>{escape(day)}: {opinion} opinions</title></rect>'
        )
        parts.append(
            f'<text x="{x + bar / 2:.1f}" y="{HEIGHT + 14}" text-anchor="middle">{escape(day[5:])}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))
