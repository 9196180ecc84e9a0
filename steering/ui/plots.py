"""Pictures drawn as plain SVG (no plotting library, no gradio): the sweep plot, the auto-tune
grid and the cosine heatmap, the two grids with a colour scale (a bar with its numbers).

Drawing them ourselves gives what Gradio's LinePlot did not: a marker on every measured point
(hollow where the row is not fluent), a few round ticks, relevance and perplexity each on its
own panel over one coefficient axis (perplexity on a log scale with plain perplexity ticks, so
the table's perplexity column reads straight off it), the fluency boundary on the perplexity
panel, and the recommended row marked.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from steering.vocab import MAX_PERPLEXITY

SERIES = {"relevance": "#1f77b4", "perplexity": "#d62728"}
PROMPTED = "#2ca02c"  # the prompted reference lines (the sweep run with prompted=True)
WIDTH, HEIGHT = 1000, 424  # the sweep plot's viewBox; it is drawn at the column's full width
LEFT, RIGHT = 64, 16  # margins, px
REL_TOP, PPL_TOP, PANEL = 30, 214, 160  # the relevance panel, the perplexity panel below it, their height


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


def _covering(ticks: list[float], values: list[float]) -> list[float]:
    """`ticks` extended by one step at either end until they enclose every value (the frame then
    ends at a labelled tick)."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    while ticks[0] > min(values) + 1e-9:
        ticks = [round(ticks[0] - step, 10), *ticks]
    while ticks[-1] < max(values) - 1e-9:
        ticks = [*ticks, round(ticks[-1] + step, 10)]
    return ticks


def log_ticks(low: float, high: float) -> list[float]:
    """Round perplexity ticks (1, 2, 5 x 10^k; one per decade when that is too many) from the
    largest at or below `low` to the smallest at or above `high` (both > 0)."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for steps in ((1, 2, 5), (1,)):
        series = [m * 10.0**k for k in range(first, last + 1) for m in steps]
        below = max([v for v in series if v <= low * (1 + 1e-9)], default=series[0])
        above = min([v for v in series if v >= high * (1 - 1e-9)], default=series[-1])
        ticks = [round(v, 10) for v in series if below <= v <= above]
        if len(ticks) <= 7:
            break
    return ticks if len(ticks) > 1 else [ticks[0], ticks[0] * 10]


def _panel(top: float, height: float, ticks, py, tick_class: str, label: str) -> str:
    """One panel's frame, grid lines and left-axis ticks, and its axis title."""
    out = [
        f'<rect class="panel-{tick_class.split("-")[0]}" x="{LEFT}" y="{top}" width="{WIDTH - LEFT - RIGHT}" '
        f'height="{height}" fill="none" stroke="#999"/>'
    ]
    for y in ticks:
        out.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>'
            f'<text class="{tick_class}" x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end" '
            f'font-size="12">{_fmt(y)}</text>'
        )
    middle = top + height / 2
    out.append(
        f'<text x="16" y="{middle}" font-size="12" text-anchor="middle" transform="rotate(-90 16 {middle})">'
        f"{html.escape(label)}</text>"
    )
    return "".join(out)


def _series(points, px, py, colour: str, name: str, unit: str) -> str:
    """A line through the points and a marker on each: filled where the row is fluent, hollow where not."""
    path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in points)
    out = [f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>']
    out += [
        f'<circle class="marker" cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{colour if fluent else "#fff"}" '
        f'stroke="{colour}" stroke-width="2"><title>{html.escape(name)} at coeff {_fmt(x)}: {y:.3g}{unit}'
        f"{'' if fluent else ' (not fluent)'}</title></circle>"
        for x, y, fluent in points
    ]
    return "".join(out)


def sweep_svg(result: dict) -> str:
    """The sweep as two panels over one coefficient axis, full width: relevance (nats/token) on
    top, perplexity below on a log scale with plain perplexity ticks and the fluency boundary
    (perplexity 30) dashed on it. Markers are hollow on rows that are not fluent; the recommended
    coefficient is starred and marked across both panels. With a scored prompted reference row
    (`result["prompted"]`, the sweep run with prompted=True) its relevance and perplexity are
    dashed horizontal lines across their panels, labelled with their values and in the legend:
    what asking achieved, to read each coefficient against. Rows without scores yet (still
    generating) are left out; with none, a one-line placeholder."""
    rows = [r for r in result.get("rows") or [] if r.get("perplexity") is not None]
    if not rows:
        return '<div class="sweep-plot"><p>The plot appears when the rows are scored.</p></div>'
    relevance = sorted(
        (r["coeff"], r["relevance"], bool(r.get("fluent"))) for r in rows if r.get("relevance") is not None
    )
    perplexity = sorted(
        (r["coeff"], r["perplexity"], bool(r.get("fluent")))
        for r in rows if r["perplexity"] > 0 and math.isfinite(r["perplexity"])
    )  # fmt: skip
    reference = result.get("prompted") or {}
    ref_rel = reference.get("relevance")
    ref_rel = ref_rel if isinstance(ref_rel, (int, float)) and math.isfinite(ref_rel) else None
    ref_ppl = reference.get("perplexity")
    ref_ppl = ref_ppl if isinstance(ref_ppl, (int, float)) and 0 < ref_ppl and math.isfinite(ref_ppl) else None
    xs = [r["coeff"] for r in rows]
    x_ticks = nice_ticks(min(xs), max(xs))
    x_low, x_high = min(x_ticks + xs), max(x_ticks + xs)
    x_high = x_high if x_high > x_low else x_low + 1
    rel_values = [y for _, y, _ in relevance] + [0.0] + ([ref_rel] if ref_rel is not None else [])
    rel_ticks = _covering(nice_ticks(min(rel_values), max(rel_values), 4), rel_values)
    rel_low, rel_high = min(rel_ticks + rel_values), max(rel_ticks + rel_values)
    ppl_values = [y for _, y, _ in perplexity] + [MAX_PERPLEXITY] + ([ref_ppl] if ref_ppl is not None else [])
    ppl_ticks = log_ticks(min(ppl_values), max(ppl_values))
    log_low, log_high = math.log(ppl_ticks[0]), math.log(ppl_ticks[-1])

    def px(x: float) -> float:
        return LEFT + (x - x_low) / (x_high - x_low) * (WIDTH - LEFT - RIGHT)

    def py_rel(y: float) -> float:
        return REL_TOP + PANEL - (y - rel_low) / ((rel_high - rel_low) or 1) * PANEL

    def py_ppl(y: float) -> float:
        return PPL_TOP + PANEL - (math.log(y) - log_low) / ((log_high - log_low) or 1) * PANEL

    parts = [
        _panel(REL_TOP, PANEL, rel_ticks, py_rel, "rel-tick", "relevance (nats/token)"),
        _panel(PPL_TOP, PANEL, ppl_ticks, py_ppl, "ppl-tick", "perplexity (log scale)"),
    ]
    bottom = PPL_TOP + PANEL
    for x in x_ticks:
        parts.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{bottom}" y2="{bottom + 5}" stroke="#999"/>'
            f'<text class="x-tick" x="{px(x):.1f}" y="{bottom + 19}" text-anchor="middle" font-size="12">'
            f"{_fmt(x)}</text>"
        )
    parts.append(
        f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{bottom + 38}" text-anchor="middle" font-size="12">'
        "coefficient</text>"
    )
    line = py_ppl(MAX_PERPLEXITY)
    parts.append(
        f'<line class="boundary" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{line:.1f}" y2="{line:.1f}" '
        'stroke="#555" stroke-dasharray="6 4"/>'
        f'<text x="{LEFT + 6}" y="{line - 5:.1f}" font-size="12" fill="#555">'
        f"fluency boundary (perplexity {MAX_PERPLEXITY:g}): above it, not fluent</text>"
    )
    for cls, value, py, unit in (("rel", ref_rel, py_rel, " nats/token"), ("ppl", ref_ppl, py_ppl, "")):
        if value is None:
            continue
        y = py(value)
        parts.append(
            f'<line class="prompted-{cls}" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{PROMPTED}" stroke-width="2" stroke-dasharray="8 5"><title>prompted (unsteered, asked): '
            f"{value:.3g}{unit}</title></line>"
            f'<text class="prompted-{cls}-label" x="{WIDTH - RIGHT - 6}" y="{y - 5:.1f}" text-anchor="end" '
            f'font-size="12" fill="{PROMPTED}">prompted {value:.3g}</text>'
        )
    best = result.get("recommended")
    star = [(x, y) for x, y, _ in relevance if x == best]
    if star:
        x, y = px(star[0][0]), max(REL_TOP + 16, py_rel(star[0][1]) - 10)  # inside its panel, below the legend
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{REL_TOP}" y2="{bottom}" stroke="#e6a700" stroke-dasharray="2 3"/>'
            f'<text class="recommended" x="{x:.1f}" y="{y:.1f}" text-anchor="middle" font-size="18" '
            'fill="#e6a700">★</text>'
        )
    parts.append(_series(relevance, px, py_rel, SERIES["relevance"], "relevance", " nats/token"))
    parts.append(_series(perplexity, px, py_ppl, SERIES["perplexity"], "perplexity", ""))
    legend = (
        f'<g class="legend" font-size="12"><rect x="{LEFT}" y="6" width="12" height="12" fill="{SERIES["relevance"]}"/>'
        f'<text x="{LEFT + 17}" y="16">relevance</text>'
        f'<rect x="{LEFT + 100}" y="6" width="12" height="12" fill="{SERIES["perplexity"]}"/>'
        f'<text x="{LEFT + 117}" y="16">perplexity</text>'
        f'<circle cx="{LEFT + 212}" cy="12" r="5" fill="#fff" stroke="#555" stroke-width="2"/>'
        f'<text x="{LEFT + 222}" y="16">not fluent</text>'
        f'<text x="{LEFT + 310}" y="16" fill="#e6a700">★ recommended</text>'
        + (
            f'<line class="legend-prompted" x1="{LEFT + 430}" x2="{LEFT + 458}" y1="12" y2="12" stroke="{PROMPTED}" '
            f'stroke-width="2" stroke-dasharray="8 5"/><text x="{LEFT + 464}" y="16">prompted (unsteered, asked)</text>'
            if ref_rel is not None or ref_ppl is not None
            else ""
        )
        + "</g>"
    )
    return (
        f'<div class="sweep-plot" style="overflow-x:auto"><svg viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" '
        f'style="min-width:560px;display:block" role="img" aria-label="sweep plot">{legend}{"".join(parts)}</svg></div>'
    )


def _score_colour(value: float | None, top: float) -> str:
    """White at 0, green towards the best score; grey for "not fluent" (no score)."""
    if value is None:
        return NOT_FLUENT
    share = max(0.0, min(1.0, value / top)) if top > 0 else 0.0
    fade = int(255 - share * 175)
    return f"rgb({fade},{min(255, fade + 60)},{fade})"


NOT_FLUENT = "#d9d9d9"


def cosine_colour(value: float) -> str:
    """White at 0, blue towards +1, red towards -1."""
    v = max(-1.0, min(1.0, float(value)))
    fade = int(255 * (1 - abs(v)))
    return f"rgb({fade},{fade},255)" if v >= 0 else f"rgb(255,{fade},{fade})"


def _luminance(colour: str) -> float:
    """Relative luminance (WCAG) of "rgb(r,g,b)" or "#rrggbb"."""
    if colour.startswith("#"):
        digits = colour[1:] if len(colour) == 7 else "".join(c * 2 for c in colour[1:4])  # #rgb = #rrggbb
        channels = [int(digits[i : i + 2], 16) for i in (0, 2, 4)]
    else:
        channels = [int(float(c)) for c in colour[colour.index("(") + 1 : colour.index(")")].split(",")]

    def linear(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_colour(background: str) -> str:
    """Black or white, whichever contrasts more with `background` (WCAG contrast ratio)."""
    lum = _luminance(background)
    return "#000" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "#fff"


def _short(label: str, limit: int = 22) -> str:
    return label if len(label) <= limit else label[: limit - 1] + "…"


def grid_svg(
    rows: Sequence[str],
    columns: Sequence[str],
    cells: Sequence[Sequence[tuple[str, str, str] | None]],
    *,
    x_title: str,
    y_title: str,
    scale: str,
    label: str,
    cell_w: int = 72,
    cell_h: int = 36,
    chosen: tuple[int, int] | None = None,
) -> str:
    """A heatmap as SVG: `cells[i][j]` is (fill colour, the number drawn in it, its tooltip) or
    None (left empty). Row labels on the left, column labels on top (slanted when long), both
    axis titles, each number in black or white by the cell's contrast, the `chosen` (row,
    column) outlined, and the colour scale (`scale`, SVG drawn below the grid by `scale_bar`)."""
    long_labels = max((len(c) for c in columns), default=0) > 8
    label_chars = max((len(_short(r)) for r in rows), default=0)
    left = 30 + max(40, 7 * label_chars)  # y title + row labels
    top = 28 + (min(22, max(len(c) for c in columns)) * 5 if long_labels else 18)  # x title + column labels
    grid_w, grid_h = cell_w * len(columns), cell_h * len(rows)
    width = max(left + grid_w, left + SCALE_WIDTH) + 16
    parts, outlined = [], []
    for j, name in enumerate(columns):
        x = left + (j + 0.5) * cell_w
        if long_labels:
            parts.append(
                f'<text class="col-label" x="{x:.1f}" y="{top - 6}" font-size="12" text-anchor="start" '
                f'transform="rotate(-40 {x:.1f} {top - 6})"><title>{html.escape(name)}</title>'
                f"{html.escape(_short(name))}</text>"
            )
        else:
            parts.append(
                f'<text class="col-label" x="{x:.1f}" y="{top - 6}" font-size="12" text-anchor="middle">'
                f"{html.escape(name)}</text>"
            )
    for i, name in enumerate(rows):
        y = top + (i + 0.5) * cell_h
        parts.append(
            f'<text class="row-label" x="{left - 6}" y="{y + 4:.1f}" font-size="12" text-anchor="end">'
            f"<title>{html.escape(name)}</title>{html.escape(_short(name))}</text>"
        )
        for j, cell in enumerate(cells[i]):
            if cell is None:
                continue
            fill, number, tip = cell
            x = left + j * cell_w
            is_chosen = chosen == (i, j)
            stroke = 'stroke="#000" stroke-width="3"' if is_chosen else 'stroke="#fff" stroke-width="1"'
            (outlined if is_chosen else parts).append(  # the outlined cell last: no neighbour covers its frame
                f'<g class="{"chosen" if is_chosen else "cell"}"><title>{html.escape(tip)}</title>'
                f'<rect x="{x}" y="{top + i * cell_h}" width="{cell_w}" height="{cell_h}" fill="{fill}" {stroke}/>'
                f'<text class="cell-value" x="{x + cell_w / 2:.1f}" y="{top + i * cell_h + cell_h / 2 + 4:.1f}" '
                f'font-size="12" text-anchor="middle" fill="{text_colour(fill)}">{html.escape(number)}</text></g>'
            )
    parts += outlined
    parts.append(
        f'<text class="x-title" x="{left + grid_w / 2:.1f}" y="14" font-size="12" text-anchor="middle" '
        f'font-weight="bold">{html.escape(x_title)}</text>'
    )
    middle = top + grid_h / 2
    parts.append(
        f'<text class="y-title" x="12" y="{middle:.1f}" font-size="12" text-anchor="middle" font-weight="bold" '
        f'transform="rotate(-90 12 {middle:.1f})">{html.escape(y_title)}</text>'
    )
    bar_top = top + grid_h + 16
    height = bar_top + SCALE_HEIGHT
    parts.append(f'<g transform="translate({left},{bar_top})">{scale}</g>')
    return (
        f'<svg viewBox="0 0 {width} {height}" width="100%" style="max-width:{width}px;display:block" '
        f'role="img" aria-label="{html.escape(label)}" font-family="sans-serif">'
        f'<rect width="{width}" height="{height}" fill="#fff"/>{"".join(parts)}</svg>'
    )


SCALE_HEIGHT = 56  # the colour scale under a grid: its title, the bar, its numbers
SCALE_WIDTH = 340  # its bar (220) and the swatch beside it with its label


def scale_bar(
    stops: Sequence[tuple[float, str]], ticks: Sequence[float], title: str, *, extra: tuple[str, str] | None = None
) -> str:
    """A colour scale as SVG (class "colour-scale"): the title, a gradient bar through `stops`
    ((value, colour), ascending) with a tick and its number at each of `ticks`, and optionally one
    swatch more beside it (`extra`: (colour, label), e.g. "not fluent")."""
    low, high = stops[0][0], stops[-1][0]
    span = (high - low) or 1.0
    width = 220
    gradient_id = f"scale-{abs(hash((tuple(stops), title))) % 10**8}"
    gradient = "".join(f'<stop offset="{(v - low) / span:.3f}" stop-color="{colour}"/>' for v, colour in stops)
    parts = [
        f'<defs><linearGradient id="{gradient_id}" x1="0" x2="1" y1="0" y2="0">{gradient}</linearGradient></defs>',
        f'<text x="0" y="10" font-size="12">{html.escape(title)}</text>',
        f'<rect class="scale-bar" x="0" y="16" width="{width}" height="14" fill="url(#{gradient_id})" stroke="#999"/>',
    ]
    for t in ticks:
        x = (t - low) / span * width
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="30" y2="35" stroke="#555"/>'
            f'<text class="scale-tick" x="{x:.1f}" y="48" font-size="11" text-anchor="middle">{_fmt(t)}</text>'
        )
    if extra is not None:
        colour, name = extra
        parts.append(
            f'<rect class="scale-extra" x="{width + 24}" y="16" width="20" height="14" fill="{colour}" stroke="#999"/>'
            f'<text x="{width + 50}" y="27" font-size="11">{html.escape(name)}</text>'
        )
    return f'<g class="colour-scale">{"".join(parts)}</g>'


def autotune_html(result: dict) -> str:
    """The auto-tune search as a layer x coefficient heatmap (SVG) coloured by score (the
    relevance of a fluent row); grey cells were not fluent, the chosen cell is outlined, and a
    colour scale with its numbers explains the colours."""
    rows = result.get("rows") or []
    if not rows:
        return f"<p>{html.escape(str(result.get('reason') or 'No candidates were generated.'))}</p>"
    layers = sorted({r["layer"] for r in rows})
    coeffs = sorted({r["coeff"] for r in rows})
    by_cell = {(r["layer"], r["coeff"]): r for r in rows}
    top = max([r["score"] for r in rows if r.get("score") is not None] + [0.0])
    cells, chosen = [], None
    for i, layer in enumerate(layers):
        line = []
        for j, coeff in enumerate(coeffs):
            row = by_cell.get((layer, coeff))
            if row is None:
                line.append(None)
                continue
            if (layer, coeff) == (result.get("layer"), result.get("coeff")):
                chosen = (i, j)
            score = row.get("score")
            number = "not fluent" if score is None else f"{score:.3f}"
            tip = f"layer {layer}, coeff {_fmt(coeff)}: {number}. {row.get('text', '')[:200]}"
            line.append((_score_colour(score, top), number, tip))
        cells.append(line)
    ticks = nice_ticks(0, top, 4) if top > 0 else [0.0]
    ticks = [t for t in ticks if t <= top + 1e-9] or [0.0]
    high = top if top > 0 else 1.0
    stops = [(high * i / 4, _score_colour(high * i / 4, high)) for i in range(5)]
    scale = scale_bar(stops, ticks, "score (relevance of a fluent row, nats/token)", extra=(NOT_FLUENT, "not fluent"))
    svg = grid_svg(
        [f"layer {layer}" for layer in layers],
        [_fmt(c) for c in coeffs],
        cells,
        x_title="coefficient",
        y_title="layer" if len(layers) > 1 else "",
        scale=scale,
        label="auto-tune grid",
        cell_w=84,
        chosen=chosen,
    )
    what = f"per coefficient at layer {layers[0]}" if len(layers) == 1 else "per layer × coefficient"
    title = f"Score {what} on your prompt (the outlined cell: the setting chosen)"
    reason = str(result.get("reason") or "").strip()
    return (
        f'<div class="autotune-grid" style="overflow-x:auto"><p class="autotune-title"><b>{html.escape(title)}</b></p>'
        f"{svg}<p style='font-size:12px'>{html.escape(reason[:1].upper() + reason[1:])}</p></div>"
    )


def heatmap_svg(texts: Sequence[str], matrix: Sequence[Sequence[float]], layer: int) -> str:
    """The cosine-similarity matrix of the steering vectors as an SVG heatmap: blue similar, white
    unrelated, red opposite, each cell's cosine written in it, and the scale from -1 to 1."""
    cells = [
        [(cosine_colour(v), f"{v:.2f}", f"{a} · {b}: cosine {v:.3f}") for b, v in zip(texts, row, strict=True)]
        for a, row in zip(texts, matrix, strict=True)
    ]
    values = (-1.0, -0.5, 0.0, 0.5, 1.0)
    scale = scale_bar([(v, cosine_colour(v)) for v in values], values, "cosine similarity")
    svg = grid_svg(
        list(texts), list(texts), cells, x_title="steering vector", y_title="steering vector", scale=scale,
        label="cosine similarity heatmap", cell_w=64,
    )  # fmt: skip
    return (
        f'<div class="heatmap" style="overflow-x:auto"><p>Cosine similarity of the steering vectors at layer '
        f"{layer} (blue: similar, white: unrelated, red: opposite).</p>{svg}</div>"
    )
