"""Pictures drawn as plain SVG/HTML (no plotting library, no gradio): the sweep plot, the
auto-tune grid and the colour scale of the cosine heatmap.

Drawing them ourselves gives what the issue asked of the sweep plot and that Gradio's LinePlot
did not: a marker on every measured point, a few round ticks, one scale (relevance and
ln(perplexity) are both nats per token; the right axis labels the same heights as perplexity, so
the table's perplexity column reads straight off the plot), the fluency boundary, and the
recommended row marked.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from steering.vocab import MAX_PERPLEXITY

SERIES = {"relevance": "#1f77b4", "ln(perplexity)": "#d62728"}
WIDTH, HEIGHT = 640, 320
LEFT, RIGHT, TOP, BOTTOM = 56, 64, 28, 44  # margins, px


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values (steps of 1, 2 or 5 x 10^k) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high - low < 1e-9:
        low, high = low - 1, high + 1
    raw = (high - low) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"


def sweep_svg(result: dict) -> str:
    """The sweep as an SVG line plot: relevance and ln(perplexity) per coefficient, with markers,
    the fluency boundary ln(30) dashed, and the recommended coefficient starred. Rows without
    scores yet (still generating) are left out; with none, a one-line placeholder."""
    rows = [r for r in result.get("rows") or [] if r.get("perplexity") is not None]
    if not rows:
        return '<div class="sweep-plot"><p>The plot appears when the rows are scored.</p></div>'
    series = {
        "relevance": [(r["coeff"], r.get("relevance")) for r in rows],
        "ln(perplexity)": [(r["coeff"], math.log(r["perplexity"])) for r in rows if r["perplexity"] > 0],
    }
    boundary = math.log(MAX_PERPLEXITY)
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points if y is not None] + [boundary, 0.0]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    x_low, x_high = min(x_ticks + xs), max(x_ticks + xs)
    y_low, y_high = min(y_ticks + ys), max(y_ticks + ys)
    x_high = x_high if x_high > x_low else x_low + 1
    y_high = y_high if y_high > y_low else y_low + 1

    def px(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * (WIDTH - LEFT - RIGHT)

    def py(y: float) -> float:
        return HEIGHT - BOTTOM - (y - y_low) / (y_high - y_low) * (HEIGHT - TOP - BOTTOM)

    parts = [_axes(x_ticks, y_ticks, px, py)]
    parts.append(
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(boundary):.1f}" y2="{py(boundary):.1f}" '
        'stroke="#555" stroke-dasharray="6 4"/>'
        f'<text x="{WIDTH - RIGHT - 4}" y="{py(boundary) - 5:.1f}" text-anchor="end" font-size="11" fill="#555">'
        f"fluency boundary (perplexity {MAX_PERPLEXITY:g}): above it, not fluent</text>"
    )
    for name, points in series.items():
        drawn = [(x, y) for x, y in sorted(points) if y is not None]
        colour = SERIES[name]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in drawn)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [
            f'<circle class="marker" cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{colour}">'
            f"<title>{html.escape(name)} at coeff {_fmt(x)}: {y:.3f}</title></circle>"
            for x, y in drawn
        ]
    best = result.get("recommended")
    star = [r for r in rows if r["coeff"] == best and r.get("relevance") is not None]
    if star:
        x, y = px(star[0]["coeff"]), py(star[0]["relevance"])
        parts.append(
            f'<text class="recommended" x="{x:.1f}" y="{y - 9:.1f}" text-anchor="middle" font-size="18" '
            f'fill="#e6a700">★</text>'
        )
    legend = "".join(
        f'<rect x="{LEFT + 10 + i * 150}" y="8" width="12" height="12" fill="{c}"/>'
        f'<text x="{LEFT + 27 + i * 150}" y="18" font-size="12">{html.escape(n)}</text>'
        for i, (n, c) in enumerate(SERIES.items())
    )
    legend += f'<text x="{LEFT + 310}" y="18" font-size="12" fill="#e6a700">★ recommended</text>'
    return (
        f'<div class="sweep-plot"><svg viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
        f'style="max-width:{WIDTH}px" role="img" aria-label="sweep plot">{legend}{"".join(parts)}</svg></div>'
    )


def _axes(x_ticks, y_ticks, px, py) -> str:
    """Frame, ticks and labels; the right axis labels each height as a perplexity (e^y)."""
    out = [
        f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
        'fill="none" stroke="#999"/>'
    ]
    for x in x_ticks:
        out.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{HEIGHT - BOTTOM}" y2="{HEIGHT - BOTTOM + 5}" stroke="#999"/>'
            f'<text class="x-tick" x="{px(x):.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle" '
            f'font-size="11">{_fmt(x)}</text>'
        )
    for y in y_ticks:
        out.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>'
            f'<text class="y-tick" x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end" font-size="11">{_fmt(y)}</text>'
            f'<text x="{WIDTH - RIGHT + 6}" y="{py(y) + 4:.1f}" font-size="11" fill="#d62728">{math.exp(y):.3g}</text>'
        )
    out.append(
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 6}" text-anchor="middle" font-size="12">'
        "coefficient</text>"
        f'<text x="14" y="{(TOP + HEIGHT - BOTTOM) / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {(TOP + HEIGHT - BOTTOM) / 2})">nats per token</text>'
        f'<text x="{WIDTH - 10}" y="{(TOP + HEIGHT - BOTTOM) / 2}" font-size="12" text-anchor="middle" fill="#d62728" '
        f'transform="rotate(90 {WIDTH - 10} {(TOP + HEIGHT - BOTTOM) / 2})">perplexity</text>'
    )
    return "".join(out)


def _score_colour(value: float | None, top: float) -> str:
    """White at 0, green towards the best score; grey for "not fluent" (no score)."""
    if value is None:
        return "#d9d9d9"
    share = max(0.0, min(1.0, value / top)) if top > 0 else 0.0
    fade = int(255 - share * 175)
    return f"rgb({fade},{min(255, fade + 60)},{fade})"


def autotune_html(result: dict) -> str:
    """The auto-tune search as a layer x coefficient grid coloured by score (the relevance of a
    fluent row); grey cells were not fluent, the chosen cell is outlined, and a scale explains
    the colours."""
    rows = result.get("rows") or []
    if not rows:
        return f"<p>{html.escape(str(result.get('reason') or 'No candidates were generated.'))}</p>"
    layers = sorted({r["layer"] for r in rows})
    coeffs = sorted({r["coeff"] for r in rows})
    cells = {(r["layer"], r["coeff"]): r for r in rows}
    top = max([r["score"] for r in rows if r.get("score") is not None] + [0.0])
    head = "".join(f"<th>{_fmt(c)}</th>" for c in coeffs)
    body = []
    for layer in layers:
        tds = []
        for coeff in coeffs:
            row = cells.get((layer, coeff))
            if row is None:
                tds.append("<td></td>")
                continue
            chosen = (layer, coeff) == (result.get("layer"), result.get("coeff"))
            score = row.get("score")
            label = "not fluent" if score is None else f"{score:.3f}"
            border = "3px solid #000" if chosen else "1px solid #fff"
            tds.append(
                f'<td class="{"chosen" if chosen else "cell"}" title="{html.escape(row.get("text", "")[:200])}" '
                f'style="background:{_score_colour(score, top)};border:{border};text-align:center;'
                f'padding:4px 8px;color:#000">{label}</td>'
            )
        body.append(f"<tr><th style='text-align:right'>layer {layer}</th>{''.join(tds)}</tr>")
    scale = colour_scale(
        [(_score_colour(top * i / 4, top), _fmt(round(top * i / 4, 3))) for i in range(5)]
        + [("#d9d9d9", "not fluent")],
        "score (relevance of a fluent row, nats/token)",
    )
    return (
        '<div class="autotune-grid"><table style="border-collapse:collapse">'
        f"<tr><th>layer \\ coeff</th>{head}</tr>{''.join(body)}</table>{scale}"
        f"<p style='font-size:12px'>{html.escape(str(result.get('reason') or ''))}</p></div>"
    )


def colour_scale(stops: Sequence[tuple[str, str]], title: str) -> str:
    """A row of colour swatches with their values: the legend of a heatmap."""
    swatches = "".join(
        f'<span style="display:inline-block;text-align:center;font-size:11px;margin-right:2px">'
        f'<span style="display:block;width:44px;height:12px;background:{colour};border:1px solid #ccc"></span>'
        f"{html.escape(label)}</span>"
        for colour, label in stops
    )
    caption = f'<div style="font-size:12px">{html.escape(title)}</div>'
    return f'<div class="colour-scale" style="margin-top:6px">{caption}{swatches}</div>'
