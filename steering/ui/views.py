"""Pure conversions between the API's JSON values and what the UI's components show.

`steering/ui/` wires components to handlers; everything here is plain Python (no gradio, no
torch) so it can be tested without a server: the vectors table <-> the `/steer` vector dicts,
recipe files, the status line, the fallback notice, the sweep table and plot data, the memory
tab's tables and the cosine heatmap.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence

from steering import catalog, engine, generate, weights
from steering.errors import InputError
from steering.gpu import format_bytes
from steering.limits import (
    DEFAULT_COEFF,
    LIMITS,
    MAX_PROMPT_CHARS,
    MAX_SWEEP_ROWS,
    MAX_VECTORS,
    check,
    check_layer,
    check_text,
    shorten,
)
from steering.quality import best_row
from steering.ui import plots
from steering.vocab import CAPTURE_MODES, DEFAULT_CAPTURE_MODE, DEFAULT_POSITIONS, POSITIONS

# The vectors table: one row per steering vector. A row with `positive`/`negative` is a
# contrastive pair (CAA-style: mean(positive) - mean(negative)); otherwise `text` is used.
VECTOR_COLUMNS = ("text", "positive", "negative", "coeff", "layer", "enabled", "positions")
SWEEP_COLUMNS = ("coeff", "pick", "text", "relevance", "fluent", "perplexity", "repetition", "effect")
SWEEP_WIDTHS = ("64px", "52px", "480px", "96px", "64px", "104px", "104px", "72px")  # the text beside its coeff
RECIPE_FORMAT = "steering-lab-recipe"
# 2 added capture_mode, raw_prompt and the model; 3 made vector positions "prompt" the default
# (older files replay with "all", llm-steer's rule, which they were made with); 1 and 2 still load
RECIPE_VERSION = 3
VERSION_1_CAPTURE_MODE = "bos-neutral"  # the default when version 1 recipes were written
# A recipe's settings are `/steer`'s keyword arguments, so `**recipe["settings"]` replays it.
DEFAULT_SETTINGS = {
    **{name: LIMITS[name].default for name in ("max_new_tokens", "temperature", "top_p", "seed")},
    "capture_mode": DEFAULT_CAPTURE_MODE,
    "raw_prompt": False,
    "prompted": False,
}

# Built-in recipes on the embedded SmolLM2-135M (30 layers, greedy, capture "contexts", positions
# "prompt"): at the middle layer 1.0 is the measured default (docs/quality.md); each was
# read at 0.75, 1, 1.25 and 1.5 and keeps the one that read best (dogs loops from 1.0 on: "a mix
# of breeds, including a mix of breeds", the pair from 1.5 on).
# A layer of None means "the loaded model's default layer"
# (n_layers // 2), so the recipes also apply to other models.
EXAMPLES: dict[str, dict] = {
    "Dogs": {
        "prompt": "Tell me about your weekend.",
        "vectors": [{"text": "dogs", "coeff": 0.75, "layer": None}],
    },
    "Happy, not sad": {
        "prompt": "Tell me about your weekend.",
        "vectors": [
            {
                "positive": "I am so happy and joyful",
                "negative": "I am so sad and miserable",
                "coeff": 1.0,
                "layer": None,
            }
        ],
    },
    "Golden Gate Bridge": {
        "prompt": "What should I do on my holiday?",
        "vectors": [{"text": "the Golden Gate Bridge", "coeff": 1.0, "layer": None}],
    },
}


def _blank(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):  # pandas' empty cell
        return True
    return isinstance(value, str) and not value.strip()


def _number(cell):
    """What a person typed in a numeric cell, as a number when it reads as one ("1.5" -> 1.5);
    anything else goes through unchanged, and the API refuses it naming the field."""
    if isinstance(cell, str):
        try:
            number = float(cell)
        except ValueError:
            return cell
        return int(number) if number.is_integer() and "." not in cell else number
    return cell


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "")
    return bool(value) if not _blank(value) else True  # an empty cell means "on"


def direction_label(number: int, size: int, name: str = "") -> str:
    """What the table's text cell shows for a raw direction vector (its numbers live in a State);
    a named one (a trained vector) shows its name first, and keeps it when the row is read back."""
    return f"⟨{name} · direction {number}: {size} numbers⟩" if name else f"⟨direction {number}: {size} numbers⟩"


def _direction_name(label: str) -> str:
    """The name in a `direction_label` ("" when it has none)."""
    return label[1:].split(" · direction ", 1)[0] if " · direction " in label else ""


def rows_to_vectors(
    rows: Sequence[Sequence] | None, default_layer: int, directions: dict[str, list] | None = None
) -> list[dict]:
    """The vectors table (list of rows in `VECTOR_COLUMNS` order) -> `/steer` vector dicts.

    Empty rows are skipped; an empty layer cell takes `default_layer` (the layer slider) and an
    empty coefficient cell is left out so the engine's documented default applies. A text cell
    that is a key of `directions` (an imported raw direction) becomes {"direction": numbers}.
    Values are passed through unchanged otherwise: the API validates them and names the field.
    """
    vectors = []
    for row in rows or []:
        padded = list(row)[: len(VECTOR_COLUMNS)] + [None] * (len(VECTOR_COLUMNS) - len(row))
        cells = dict(zip(VECTOR_COLUMNS, padded, strict=True))
        text, positive, negative = (cells[k] for k in ("text", "positive", "negative"))
        if all(_blank(v) for v in (text, positive, negative)):
            continue
        if directions and isinstance(text, str) and text in directions:
            vector = {"direction": directions[text], **({"name": n} if (n := _direction_name(text)) else {})}
        elif _blank(positive) and _blank(negative):
            vector = {"text": str(text)}
        else:
            vector = {
                "positive": "" if _blank(positive) else str(positive),
                "negative": "" if _blank(negative) else str(negative),
            }
        if not _blank(cells["coeff"]):
            vector["coeff"] = _number(cells["coeff"])
        vector["layer"] = default_layer if _blank(cells["layer"]) else _number(cells["layer"])
        vector["enabled"] = _truthy(cells["enabled"])
        if not _blank(cells["positions"]):
            where = cells["positions"]
            vector["positions"] = where.strip() if isinstance(where, str) else where
        vectors.append(vector)
    return vectors


def vectors_to_rows(
    vectors: Sequence[dict], default_layer: int, directions: dict[str, list] | None = None
) -> list[list]:
    """`/steer` vector dicts -> vectors table rows (a missing or None layer -> `default_layer`).

    A raw direction's numbers go into `directions` (the UI's State) under a new label that the
    row's text cell shows; without `directions` such a vector is refused.
    """
    rows = []
    for vector in vectors:
        layer = vector.get("layer")
        text = vector.get("text", "")
        if "direction" in vector:
            if directions is None:
                raise InputError("vectors", "raw direction vectors need the vectors table's direction store")
            text = direction_label(len(directions) + 1, len(vector["direction"]), str(vector.get("name") or "")[:60])
            directions[text] = list(vector["direction"])
        rows.append(
            [
                text,
                vector.get("positive", ""),
                vector.get("negative", ""),
                vector.get("coeff", ""),
                default_layer if layer is None else layer,
                bool(vector.get("enabled", True)),
                vector.get("positions", DEFAULT_POSITIONS),
            ]
        )
    return rows


def form_vector(text, positive, negative, coeff, layer, n_layers: int | None) -> dict | None:
    """The vector form's fields as a `/steer` vector, checked at entry (None: the form is empty).

    A pair needs both texts; a text and a pair at once is refused rather than half-used."""
    given = {k: v.strip() for k, v in (("text", text), ("positive", positive), ("negative", negative)) if _filled(v)}
    if not given:
        return None
    if "text" in given and len(given) > 1:
        raise InputError("text", "give a steering text or a positive and a negative text, not both")
    if len(given) == 1 and "text" not in given:
        missing = "negative" if "positive" in given else "positive"
        raise InputError(missing, "a contrastive pair needs both a positive and a negative text")
    vector = {k: check_text(v, k) for k, v in given.items()}
    vector["coeff"] = check("coeff", DEFAULT_COEFF if _blank(coeff) else _number(coeff), "coeff")
    vector["layer"] = check_layer(_number(layer), "layer", n_layers)
    vector["enabled"] = True
    return vector


def _filled(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def vector_row(vector: dict) -> list:
    """One `/steer` text or pair vector as a table row."""
    return [
        vector.get("text", ""),
        vector.get("positive", ""),
        vector.get("negative", ""),
        vector["coeff"],
        vector["layer"],
        bool(vector.get("enabled", True)),
        vector.get("positions", DEFAULT_POSITIONS),
    ]


def normalize_rows(rows, layer: int, n_layers: int | None) -> tuple[list[list], list[str]]:
    """The vectors table as a person left it -> rows that mean what they show, and what was fixed.

    A row without any text (a row added with the table's "+") gets the default coefficient, the
    layer slider's layer and "enabled", so typing a text into it makes a working vector. A cell
    that is not a number, or out of range, is reset (to the default coefficient; a layer to the
    nearest valid one) and said so, counting rows from 1. A pair with one text is reported."""
    fixed, problems = [], []
    for number, row in enumerate(rows or [], start=1):
        cells = list(row)[: len(VECTOR_COLUMNS)] + [None] * (len(VECTOR_COLUMNS) - len(row))
        text, positive, negative, coeff, row_layer, enabled, positions = cells
        if not any(_filled(v) for v in (text, positive, negative)):
            fixed.append(
                ["" if _blank(v) else v for v in (text, positive, negative)]
                + [DEFAULT_COEFF, layer, True, DEFAULT_POSITIONS]
            )
            continue
        positions = DEFAULT_POSITIONS if _blank(positions) else str(positions).strip()
        if positions not in POSITIONS:
            problems.append(
                f"row {number}, positions: must be one of {', '.join(POSITIONS)} (reset to {DEFAULT_POSITIONS})"
            )
            positions = DEFAULT_POSITIONS
        coeff = DEFAULT_COEFF if _blank(coeff) else _number(coeff)
        try:
            coeff = check("coeff", coeff)
        except InputError as exc:
            problems.append(f"row {number}, {exc} (reset to {DEFAULT_COEFF:g})")
            coeff = DEFAULT_COEFF
        row_layer = layer if _blank(row_layer) else _number(row_layer)
        try:
            row_layer = check_layer(row_layer, "layer", n_layers)
        except InputError as exc:
            in_range = isinstance(row_layer, (int, float)) and not isinstance(row_layer, bool)
            top = (n_layers - 1) if n_layers else row_layer
            row_layer = max(0, min(int(row_layer), top)) if in_range and math.isfinite(row_layer) else layer
            problems.append(f"row {number}, {exc} (set to {row_layer})")
        if _filled(positive) != _filled(negative) and not _filled(text):
            problems.append(f"row {number}: a contrastive pair needs both a positive and a negative text")
        fixed.append(
            ["" if _blank(v) else v for v in (text, positive, negative)]
            + [coeff, row_layer, _truthy(enabled), positions]
        )
    return fixed, problems


def table_row_numbers(rows) -> list[int]:
    """The 1-based table row of each vector `rows_to_vectors` makes (it skips rows without text)."""
    return [n for n, row in enumerate(rows or [], start=1) if rows_to_vectors([row], 0)]


def for_people(message: str, row_numbers: Sequence[int] | None = None) -> str:
    """An API error as people read it: "vectors[0].coeff: ..." -> "row 1, coeff: ..." (1-based,
    the table's own row numbers when they are known)."""

    def row(match: re.Match) -> str:
        index = int(match.group(1))
        number = row_numbers[index] if row_numbers and index < len(row_numbers) else index + 1
        return f"row {number}" + (", " + match.group(2) if match.group(2) else "")

    return re.sub(r"vectors\[(\d+)\](?:\.(\w+))?", row, message)


def run_line(result: dict, *, elapsed_s: float, seed: int, stopped: bool = False, running: bool = False) -> str:
    """The line under the outputs: who answered, which layers were steered, and how the run ended:
    "N tokens, X tokens/s, seed S", "stopped after N tokens", or "generating… N tokens"."""
    tokens = max(result.get("tokens") or [0])
    layers = result.get("layers") or []
    parts = [
        f"{result['model']} ({result['quant']}, {result['device']})",
        f"steered layers {layers}" if layers else "no vector active: both outputs are unsteered",
    ]
    if running:
        parts.append(f"generating… {tokens} tokens")
    elif stopped:
        parts.append(f"stopped after {tokens} tokens")
    else:
        rate = tokens / elapsed_s if elapsed_s > 0 else 0.0
        parts.append(f"{tokens} tokens, {rate:.1f} tokens/s, seed {seed}")
    return " · ".join(parts)


# -- scores of the steer rows: small badges under each output box ------------------------------
_BADGE = (
    'style="display:inline-block;margin:2px 4px 2px 0;padding:1px 7px;border-radius:9px;font-size:0.8em;'
    'border:1px solid var(--border-color-primary);background:{bg}" title="{title}"'
)
_BIN_BACKGROUND = {0: "rgba(220,38,38,0.15)", 1: "rgba(234,179,8,0.18)", 2: "rgba(22,163,74,0.18)", None: "none"}
_BADGE_TITLES = {
    "concept": "concept: moved toward the steering text, over the baseline (nats/token); bins 0/1/2",
    "instruction": "instruction: how much more likely the output is after the prompt than after a neutral one "
    "(nats/token): does it still answer the prompt; bins 0/1/2",
    "fluency": "fluency: 2 fluent (perplexity <= 30, repetition <= 0.2, >= 8 tokens), 1 near it, 0 not",
    "aggregate": "aggregate: harmonic mean of the three bins, 0 when any is 0 (out of 2)",
}


def _badge(name: str, shown: str, level) -> str:
    style = _BADGE.format(bg=_BIN_BACKGROUND.get(level, "none"), title=html.escape(_BADGE_TITLES[name]))
    return f"<span {style}>{html.escape(shown)}</span>"


def score_badges(score: dict | None) -> str:
    """One row's scores as small badges (HTML): concept, instruction, fluency, aggregate."""
    if not score:
        return ""
    bins = score["bins"]
    concept = "–" if score["concept"] is None else f"{score['concept']:+.2f}"
    follows = "–" if score["instruction"] is None else f"{score['instruction']:+.2f}"
    ppl = "–" if score["perplexity"] is None else f"ppl {score['perplexity']:.0f}"
    aggregate = "–" if score["aggregate"] is None else f"{score['aggregate']:.2f}"
    level = None if score["aggregate"] is None else min(2, round(score["aggregate"]))
    return "".join(
        [
            _badge("concept", f"concept {bins['concept'] if bins['concept'] is not None else '–'} ({concept})",
                   bins["concept"]),
            _badge("instruction", f"instruction {bins['instruction']} ({follows})", bins["instruction"]),
            _badge("fluency", f"fluency {bins['fluency']} ({ppl})", bins["fluency"]),
            _badge("aggregate", f"score {aggregate}/2", level),
        ]
    )  # fmt: skip


def steer_scores(result: dict | None) -> tuple[str, str, str, str]:
    """(steered badges, baseline badges, prompted badges, the line saying which row scored
    highest) of a `/steer` answer; blank while it streams."""
    scores = (result or {}).get("scores")
    if not scores:
        return "", "", "", ""
    _, line = best_row(scores)
    if result.get("instruction"):
        line += f" · prompted with “{result['instruction']}”"
    return (*(score_badges(scores.get(name)) for name in ("steered", "baseline", "prompted")), line)


# Where a steered text that is not fluent most often comes from: a coefficient far above the
# defaults (1 with positions "prompt", 0.45 with "all"; docs/quality.md), or the same vector twice
# (a file imported twice), whose coefficients add up. Twice the default is where the hint starts.
USUAL_COEFF = {"prompt": 1.0, "all": 0.45}


def strength_hint(rows, default_layer: int, result: dict | None) -> str:
    """A sentence for a steered text that is not fluent: which rows repeat one vector (their
    coefficients add up) and which layer gets a strength far above the usual; "" when the steered
    text is fluent, has no scores, or neither cause is in the table."""
    steered = ((result or {}).get("scores") or {}).get("steered") or {}
    if not steered or steered.get("fluent") is not False:
        return ""
    seen: dict[tuple, list[int]] = {}
    totals: dict[tuple, float] = {}
    for number, row in enumerate(rows or [], start=1):  # the table's own row numbers
        vectors = rows_to_vectors([row], default_layer)
        if not vectors or not vectors[0].get("enabled", True):
            continue
        (vector,) = vectors
        coeff = _finite(vector.get("coeff", LIMITS["coeff"].default))
        if coeff is None:
            continue
        where = (vector.get("layer"), vector.get("positions") or DEFAULT_POSITIONS)
        identity = (*[str(list(row)[i]).strip() if i < len(row) else "" for i in range(3)], *where)
        seen.setdefault(identity, []).append(number)
        totals[where] = totals.get(where, 0.0) + abs(coeff)
    parts = []
    for (text, positive, negative, layer, _), numbers in seen.items():
        if len(numbers) > 1:
            name = text or f"{positive} − {negative}"
            rows_said = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
            parts.append(
                f"rows {rows_said} are the same vector (“{name[:40]}”, layer {layer}; a file imported "
                "twice?): their coefficients add up"
            )
    for (layer, positions), total in totals.items():
        usual = USUAL_COEFF.get(positions, 1.0)
        if total > 2 * usual:
            parts.append(
                f"layer {layer} gets strength {total:g} in all, far above the usual {usual:g} with positions "
                f"{positions}: try {usual:g}, or Auto-tune or a Sweep"
            )
    if not parts:
        return ""
    return "The steered text is not fluent: " + "; ".join(parts) + "."


def _finite(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def similarity_items(vectors: Sequence[dict]) -> list:
    """The distinct items of the enabled vectors for the heatmap, in order: a text, or a pair as
    {"positive", "negative"} (its difference vector steers, so that is what is compared)."""
    items: list = []
    for vector in vectors:
        if not vector.get("enabled", True):
            continue
        text, positive, negative = (vector.get(k) for k in ("text", "positive", "negative"))
        if isinstance(positive, str) and isinstance(negative, str) and (positive.strip() or negative.strip()):
            item = {"positive": positive, "negative": negative}
        elif isinstance(text, str) and text.strip():
            item = text
        else:
            continue
        if item not in items:
            items.append(item)
    return items


def parse_coeffs(text: str) -> list[float]:
    """'0, 0.5, 1 2' -> [0.0, 0.5, 1.0, 2.0]; raises InputError naming `coeffs`."""
    parts = [p for p in str(text or "").replace(",", " ").split() if p]
    if not parts:
        raise InputError("coeffs", f"give 1 to {MAX_SWEEP_ROWS} numbers separated by commas, e.g. 0, 0.5, 1, 2")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise InputError("coeffs", f"must be numbers separated by commas; got {text!r}") from None


# -- recipes -----------------------------------------------------------------------------------
MAX_RECIPE_BYTES = 2**20  # 1 MiB: 64 vectors with directions of a large model fit; nothing bigger is read


def make_recipe(prompt: str, vectors: list[dict], settings: dict, model: dict | None = None) -> dict:
    """A recipe: everything that shapes a result, to repeat a run. Its `vectors` are `/steer`'s
    vector dicts, its `settings` `/steer`'s other arguments (decoding, capture mode, raw prompt),
    and `model` the {"id", "quant"} it was made with (None: not recorded).

    Bounded like `/steer` itself: the prompt's length and the number of vectors."""
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS:
        raise InputError("recipe.prompt", f"must be a text of at most {MAX_PROMPT_CHARS} characters")
    if len(vectors) > MAX_VECTORS:
        raise InputError("recipe.vectors", f"holds {len(vectors)} vectors; at most {MAX_VECTORS}")
    known = {k: settings[k] for k in DEFAULT_SETTINGS if k in settings}
    merged = {**DEFAULT_SETTINGS, **known}
    if merged["capture_mode"] not in CAPTURE_MODES:
        raise InputError("recipe.settings.capture_mode", f"must be one of {', '.join(CAPTURE_MODES)}")
    for flag in ("raw_prompt", "prompted"):
        if not isinstance(merged[flag], bool):
            raise InputError(f"recipe.settings.{flag}", "must be true or false")
    recipe = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "prompt": prompt, "vectors": vectors}
    recipe["settings"] = merged
    if model is not None:
        if not all(isinstance(model.get(k), str) and len(model[k]) <= 256 for k in ("id", "quant")):
            raise InputError("recipe.model", 'must be {"id": text, "quant": text}')
        recipe["model"] = {"id": model["id"], "quant": model["quant"]}
    return recipe


def recipe_summary(recipe: dict, loaded: dict | None) -> str:
    """What loading a recipe changed, and a warning when it was made with another model."""
    s = recipe["settings"]
    n = len(recipe["vectors"])
    text = (
        f"Loaded the recipe: prompt, {n} vector{'s' if n != 1 else ''}, {s['max_new_tokens']} new tokens, "
        f"temperature {s['temperature']:g}, top-p {s['top_p']:g}, seed {s['seed']}, capture mode "
        f"{s['capture_mode']}, raw prompt {'on' if s['raw_prompt'] else 'off'}, "
        f"prompted {'on' if s['prompted'] else 'off'}."
    )
    made = recipe.get("model")
    if made and loaded and (made["id"], made["quant"]) != (loaded.get("model"), loaded.get("quant")):
        text += (
            f" ⚠️ It was made with {made['id']} ({made['quant']}); {loaded.get('model')} ({loaded.get('quant')}) "
            "is loaded, so results will differ: load that model in the Model panel to repeat it."
        )
    return text


def recipe_json(recipe: dict) -> str:
    """The recipe as standard JSON (no NaN or Infinity: the README's replay line must read it)."""
    try:
        return json.dumps(recipe, indent=2, allow_nan=False)
    except ValueError:
        raise InputError("recipe", "holds a number that is not finite (NaN or infinity); fix the table first") from None


def parse_recipe(text: str) -> dict:
    """Read a recipe file's text back; raises InputError naming `recipe` when it is not one."""
    if len(text) > MAX_RECIPE_BYTES:
        raise InputError("recipe", f"is {len(text)} characters; a recipe is at most {MAX_RECIPE_BYTES}")
    try:
        data = json.loads(text)
    except RecursionError:
        raise InputError("recipe", "is nested too deeply to be a recipe") from None
    except ValueError as exc:
        raise InputError("recipe", f"is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT:
        raise InputError("recipe", f'is not a Steering Lab recipe (expected "format": "{RECIPE_FORMAT}")')
    vectors = data.get("vectors", [])
    if not isinstance(vectors, list) or not all(isinstance(v, dict) for v in vectors):
        raise InputError("recipe.vectors", "must be a list of vector objects")
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    if data.get("version") == 1:  # made before capture modes were recorded: the default of then
        settings = {"capture_mode": VERSION_1_CAPTURE_MODE, **settings}
    if data.get("version") in (1, 2):  # made when every vector was added at all positions
        vectors = [{"positions": "all", **v} for v in vectors]
    model = data.get("model") if isinstance(data.get("model"), dict) else None
    prompt = data.get("prompt", "")
    if not isinstance(prompt, str):
        raise InputError("recipe.prompt", f"must be a text; got {shorten(prompt)}")
    recipe = make_recipe(prompt, vectors, settings, model)
    _check_recipe_values(recipe)
    return recipe


def _check_recipe_values(recipe: dict) -> None:
    """Every setting and vector of a read recipe checked as /steer checks its arguments, each
    refusal naming the recipe's field (a file can hold anything JSON can)."""
    s = recipe["settings"]
    try:
        generate.check_sampling(s["max_new_tokens"], s["temperature"], s["top_p"], s["seed"])
        for i, vector in enumerate(recipe["vectors"]):
            layer = vector.get("layer")
            engine.parse_vector({**vector, "layer": 0} if layer is None else vector, i, None)  # None: the form's
    except InputError as exc:
        where = "recipe.settings." if exc.field in DEFAULT_SETTINGS else "recipe."
        raise InputError(where + exc.field, str(exc)[len(exc.field) + 2 :]) from None


# -- status and memory -------------------------------------------------------------------------
def status_line(status: dict) -> str:
    """One Markdown line: model, quantization, device, layers, memory in use."""
    if not status.get("model"):
        return "No model loaded yet."
    memory = status.get("memory") or {}
    in_use = memory.get("cuda_allocated_bytes")
    where = "VRAM allocated" if in_use is not None else "weights"
    in_use = memory.get("model_bytes") if in_use is None else in_use
    parts = [
        f"**{status['model']}**",
        str(status.get("quant")),
        str(status.get("device")),
        f"{status.get('n_layers')} layers (default {status.get('default_layer')})",
        f"{where} {format_bytes(in_use)}",
    ]
    if status.get("locked"):
        parts.append("model switching locked")
    more = [f"process RSS {format_bytes(memory.get('process_rss_bytes'))}"]  # a phone's bar leaves these out
    fit = status.get("fit")
    if fit:
        more.append(
            f"fits {fit['compare_max_tokens']} tokens per row in a compare"
            + (f" ({fit['prompted_max_tokens']} with the prompted row)" if "prompted_max_tokens" in fit else "")
            + f", {fit['sweep_max_tokens']} in a sweep ({fit['basis']})"
        )
    return " · ".join(parts) + f'<span class="status-more"> · {" · ".join(more)}</span>'


def fallback_notice(event: dict | None) -> str:
    """What was asked, what was loaded and why; empty when no downgrade happened."""
    if not event:
        return ""
    asked, loaded = event.get("asked", {}), event.get("loaded", {})
    if event.get("recovery") == "rows one at a time":
        return (
            f"⚠️ **Out of memory** ({event.get('time', '')}, during {event.get('stage', '?')}): retried on "
            f"`{loaded.get('model')}` with the batch rows one at a time (slower, same answer). "
            f"Why: {event.get('reason', '')}"
        )
    return (
        f"⚠️ **Fallback** ({event.get('time', '')}, during {event.get('stage', '?')}): asked for "
        f"`{asked.get('model')}` ({asked.get('quant')}), loaded `{loaded.get('model')}` ({loaded.get('quant')}) "
        f"on {loaded.get('device')}. Why: {event.get('reason', '')}"
    )


def card_markdown(device: dict) -> str:
    """The card reading: name, mode, total/used/free, headroom, desktop overhead, limit."""
    lines = [f"**{device.get('name') or 'unknown device'}** — mode `{device.get('mode')}`"]
    if device.get("reason"):
        lines.append(f"_{device['reason']}_")
    lines.append(
        f"total {format_bytes(device.get('total_bytes'))} · used {format_bytes(device.get('used_bytes'))} · "
        f"free {format_bytes(device.get('free_bytes'))} · headroom for the app "
        f"{format_bytes(device.get('headroom_bytes'))}"
    )
    extra = []
    if device.get("desktop_overhead_bytes"):
        extra.append(f"desktop overhead {format_bytes(device['desktop_overhead_bytes'])}")
    if device.get("reserved_bytes"):
        extra.append(f"driver reserved {format_bytes(device['reserved_bytes'])}")
    if device.get("vram_limit_bytes") is not None:
        extra.append(f"--vram-limit {format_bytes(device['vram_limit_bytes'])}")
    if device.get("compute_capability"):
        major, minor = device["compute_capability"]
        extra.append(f"compute capability {major}.{minor} ({'bf16' if device.get('supports_bf16') else 'no bf16'})")
    if extra:
        lines.append(" · ".join(extra))
    return "  \n".join(lines)


def process_rows(device: dict) -> list[list]:
    """Processes on the card: pid, name, memory, kind, and whether it is desktop overhead."""
    return [
        [
            p["pid"],
            p["name"],
            format_bytes(p.get("used_bytes")),
            p.get("kind", ""),
            "desktop" if p.get("desktop") else "",
        ]
        for p in device.get("processes") or []
    ]


PLAN_COLUMNS = (
    "model", "quant", "need", "verdict", "spare / short by", "fits (compare / sweep tokens)", "runs on"
)  # fmt: skip
VERDICTS_LEGEND = (
    "**stable**: the need plus the safety margin fits the headroom (of one card, or of each card when "
    "the model is split across several GPUs) · **fragile**: only the need fits (no margin left) · "
    "**offload**: it fits only with part of its layers in CPU RAM (much slower: *runs on* gives the "
    "split and an estimated speed; never loaded unless asked for) · **wont_fit**: not even that. The need "
    "is the larger of a 2-row compare at the planned context and an 8-row sweep of 256 tokens; *fits* are "
    "the longest prompt + new tokens per row that keep the margin."
)
# The Memory tab's strip under a split model's bar: one colour per device.
DEVICE_COLOURS = {"cuda:0": "#1f4e79", "cuda:1": "#4a90c8", "cuda:2": "#8fbde6", "cpu": "#9a9a9a", "disk": "#555"}
# One colour per term of the estimate (the Memory tab's bars and their legend).
TERM_COLOURS = {
    "weights": "#4e79a7",
    "kv_cache": "#f28e2b",
    "activations": "#e15759",
    "load_extra": "#76b7b2",
    "steering_capture": "#59a14f",
    "cuda_context": "#edc948",
    "scoring": "#b07aa1",
}


def _spare(need: int, headroom: int, margin: int) -> str:
    left = headroom - margin - need
    return f"spare {format_bytes(left)}" if left >= 0 else f"short by {format_bytes(-left)}"


def split_text(row: dict) -> str:
    """Where a plan row runs: "cuda:0", "cuda:0 16 + cuda:1 16 layers", or for an offload
    "cuda:0 9 + cpu 23 layers · ~1.15 tokens/s (estimate)"; empty when it does not fit."""
    devices = row.get("devices") or []
    if len(devices) < 2:
        return devices[0]["device"] if devices else ""
    text = " + ".join(f"{d['device']} {d['layers']}" for d in devices) + " layers"
    offload = row.get("offload")
    return text + (f" · ~{offload['expected_tokens_per_s']} tokens/s (estimate)" if offload else "")


def load_advice(row: dict) -> str:
    """One sentence for the model picker about loading a plan row: the expected speed of an
    `offload` row and how to ask for it, the split of a row across GPUs, or why nothing loads."""
    name, devices, offload = f"{row['id']} {row['quant']}", row.get("devices") or [], row.get("offload")
    if row["verdict"] == "offload" and offload:
        layers = offload["cpu_layers"] + offload["gpu_layers"]
        return (
            f"{name} fits only with {offload['cpu_layers']} of its {layers} layers in CPU RAM: expect about "
            f"{offload['expected_tokens_per_s']} tokens/s (an estimate). Tick **Allow offload** to load it that way."
        )
    if row["verdict"] == "stable" and len(devices) > 1:
        return f"{name} runs split across {len(devices)} GPUs ({split_text(row)})."
    if row["verdict"] == "wont_fit":
        return f"{name} does not fit this machine, not even with layers in CPU RAM" + (
            f" ({row['note']})." if row.get("note") else "."
        )
    return ""


def _row_spare(row: dict, plan: dict, margin: int) -> str:
    """Spare memory of a plan row: on the card, or on the tightest GPU of a split model."""
    headroom = {f"cuda:{g.get('cuda_index')}": g["headroom_bytes"] for g in plan.get("gpus") or []}
    on_gpus = [d for d in row.get("devices") or [] if d["device"] in headroom]
    if len(row.get("devices") or []) > 1 and on_gpus:
        tightest = min(on_gpus, key=lambda d: headroom[d["device"]] - d["bytes"])
        return f"{_spare(tightest['bytes'], headroom[tightest['device']], margin)} on {tightest['device']}"
    return _spare(row["need_bytes"], plan.get("headroom_bytes", 0), margin)


# Seconds per generated token per GB of weights on the CPU, measured on this project's 2-core
# machine (one decoding step reads every weight): fp32 SmolLM2-135M at ~28 tokens/s and
# Mistral-7B's layer shapes timed as nn.Linear (fp32, bf16) and bitsandbytes 0.50 Linear4bit (NF4,
# which runs on the CPU but dequantizes every weight each step): bench/cpu_speed.py. 8bit was not measured.
CPU_SECONDS_PER_WEIGHT_GB = {"fp32": 0.08, "bf16": 0.21, "fp16": 0.21, "4bit": 3.4}


def cpu_speed(row: dict) -> str:
    """A CPU plan row's *runs on*: "cpu RAM · ~0.07 tokens/s" (rough, measured on 2 cores: the CPU note
    says so); "" when it does not run."""
    if not row.get("devices"):
        return ""
    per_gb = CPU_SECONDS_PER_WEIGHT_GB.get(row["quant"])
    weights = (row.get("breakdown") or {}).get("weights")
    if per_gb is None or not weights:
        return "cpu RAM · speed not measured"
    tokens_per_s = 1 / (weights / 1e9 * per_gb)
    return f"cpu RAM · ~{tokens_per_s:.2g} tokens/s"


def cpu_note(plan: dict, device: dict) -> str:
    """On a machine without an NVIDIA GPU, what *stable · cpu* means; "" on a GPU."""
    if device.get("mode") != "cpu":
        return ""
    four_bit = [r for r in plan.get("models", []) if r["quant"] == "4bit" and (r.get("breakdown") or {}).get("weights")]
    example = ""
    if four_bit:
        big = max(four_bit, key=lambda r: r["need_bytes"])
        seconds = big["breakdown"]["weights"] / 1e9 * CPU_SECONDS_PER_WEIGHT_GB["4bit"]
        name = big["id"].rsplit("/", 1)[-1]
        example = f" ({name} 4bit needs {format_bytes(big['need_bytes'])}, about {seconds:.0f} s per token)"
    return (
        f"**No NVIDIA GPU: every model runs on the CPU, in system RAM** ({format_bytes(device.get('free_bytes'))} "
        f"free of {format_bytes(device.get('total_bytes'))}). A *stable* row fits in that RAM with the margin; "
        "it is not quick: each new token reads all the weights, so a 7B model decodes at well under one token "
        "per second on a few cores. 4bit loads (bitsandbytes NF4 runs on the CPU) and needs the least RAM, "
        f"but it is the slowest per byte{example}. *runs on* gives rough speeds measured on a 2-core CPU. "
        "Without a GPU there are no GPU processes to list."
    )


def choice_text(choice: dict, device: dict) -> str:
    """The plan's choice and its reason, without repeating the card's own reason (NVML's error)."""
    reason = choice["reason"]
    if device.get("reason"):
        reason = reason.replace(f" ({device['reason']})", "")
    return f"**Choice for this machine:** `{choice['id']}` {choice['quant']} — {reason}"


def plan_rows(plan: dict, margin_bytes: int) -> list[list]:
    """The compatibility matrix in `PLAN_COLUMNS` order (on a CPU, *runs on* with a rough speed)."""
    on_cpu = (plan.get("device") or {}).get("mode") == "cpu"
    rows = []
    for row in plan.get("models", []):
        fit = row.get("fit") or {}
        rows.append(
            [
                row["id"],
                row["quant"],
                format_bytes(row["need_bytes"]),
                row["verdict"],
                _row_spare(row, plan, margin_bytes),
                f"{fit.get('compare_max_tokens', '-')} / {fit.get('sweep_max_tokens', '-')}",
                cpu_speed(row) if on_cpu else split_text(row),
            ]
        )
    return rows


def _device_strip(row: dict, pct) -> str:
    """A thin strip under a split model's bar: the bytes each device holds, in device colours."""
    devices = row.get("devices") or []
    if len(devices) < 2:
        return ""
    cells = "".join(
        f'<div title="{html.escape(d["device"])}: {d["layers"]} layers, {format_bytes(d["bytes"])}" '
        f'style="width:{pct(d["bytes"])};background:{DEVICE_COLOURS.get(d["device"], "#777")};height:100%"></div>'
        for d in devices
    )
    return f'<div class="device-strip" style="display:flex;height:5px;margin-top:1px">{cells}</div>'


def _marker(left: str, style: str) -> str:
    return f'<div style="position:absolute;top:-2px;bottom:-2px;left:{left};border-left:2px {style} #000"></div>'


def memory_bars_html(bars: Sequence[tuple[str, dict]], headroom_bytes: int, margin_bytes: int) -> str:
    """Stacked bars of the estimate's terms against the headroom: one bar per (label, plan row).

    A solid line marks the headroom and a dashed one the headroom minus the margin, so "will it
    fit, and by how much" is seen: a bar ending left of the dashed line is stable.
    """
    if not bars:
        return "<p>No plan rows to draw.</p>"
    scale = max([headroom_bytes] + [row["need_bytes"] for _, row in bars]) or 1
    scale = max([scale] + [sum(d["bytes"] for d in row.get("devices") or []) for _, row in bars])

    def pct(value: int) -> str:
        return f"{100 * value / scale:.2f}%"

    lines = []
    for label, row in bars:
        segments = "".join(
            f'<div title="{html.escape(term)} {format_bytes(value)}" style="width:{pct(value)};'
            f'background:{TERM_COLOURS.get(term, "#999")};height:100%"></div>'
            for term, value in row["breakdown"].items()
            if value > 0
        )
        verdict = html.escape(row["verdict"])
        spare = _spare(row["need_bytes"], headroom_bytes, margin_bytes)
        strip = _device_strip(row, pct)
        if strip:  # split: where it runs instead of one card's spare
            spare = html.escape(split_text(row))
        lines.append(
            '<div class="bar-row" style="display:flex;align-items:center;gap:8px;margin:3px 0">'
            f'<div style="width:260px;font-size:12px;text-align:right">{html.escape(label)}</div>'
            '<div style="position:relative;flex:1;height:18px;background:#f3f3f3">'
            f'<div style="display:flex;height:{"12px" if strip else "100%"}">{segments}</div>{strip}'
            f"{_marker(pct(headroom_bytes), 'solid')}{_marker(pct(max(0, headroom_bytes - margin_bytes)), 'dashed')}"
            "</div>"
            f'<div style="width:240px;font-size:12px">{format_bytes(row["need_bytes"])} · {verdict} · {spare}</div>'
            "</div>"
        )
    legend = " ".join(
        f'<span style="display:inline-block;width:10px;height:10px;background:{colour}"></span> {html.escape(term)}'
        for term, colour in TERM_COLOURS.items()
    )
    if any(len(row.get("devices") or []) > 1 for _, row in bars):
        legend += " · thin strip under a split model: what each device holds, " + " ".join(
            f'<span style="display:inline-block;width:10px;height:10px;background:{colour}"></span> {device}'
            for device, colour in DEVICE_COLOURS.items()
        )
    return (
        f'<div class="memory-bars"><p style="font-size:12px">{legend} · solid line: headroom '
        f"{format_bytes(headroom_bytes)} · dashed: headroom minus the {format_bytes(margin_bytes)} margin</p>"
        + "".join(lines)
        + "</div>"
    )


def event_rows(events: Sequence[dict]) -> list[list]:
    """The fallback event log, newest first."""
    return [
        [
            e.get("time", ""),
            e.get("stage", ""),
            f"{e['asked']['model']} ({e['asked']['quant']})",
            f"{e['loaded']['model']} ({e['loaded']['quant']}, {e['loaded']['device']})",
            e.get("reason", ""),
            format_bytes(e.get("free_before_bytes")),
            format_bytes(e.get("free_after_bytes")),
        ]
        for e in reversed(list(events))
    ]


# -- sweep and similarity ----------------------------------------------------------------------
def _rounded(value, digits: int):
    return None if value is None else round(value, digits)


def sweep_prompted_line(result: dict) -> str:
    """The info line's part about the prompted reference row ("" without one): its relevance and
    fluency, and which fluent coefficients beat its relevance."""
    reference = result.get("prompted")
    if not reference or reference.get("relevance") is None:
        return ""
    rel = reference["relevance"]
    beat = [r["coeff"] for r in result.get("rows", []) if r.get("fluent") and (r.get("relevance") or 0) > rel]
    fluent = "fluent" if reference.get("fluent") else "not fluent"
    if beat:
        verdict = (
            f"fluent and more relevant at coefficient{'s' if len(beat) > 1 else ''} {', '.join(f'{c:g}' for c in beat)}"
        )
    else:
        verdict = "no fluent coefficient was more relevant than asking"
    return f" · prompted (dashed): relevance {rel:.3g}, {fluent}; {verdict}"


def sweep_table(result: dict) -> list[list]:
    """The sweep table in `SWEEP_COLUMNS` order, numbers rounded; ★ marks the recommended row. A
    sweep run with prompted=True ends with its reference row, "prompted" in the coefficient column
    (unsteered, never recommended, no effect)."""
    reference = result.get("prompted")
    tail = []
    if reference:
        tail = [
            [
                "prompted",
                "",
                reference.get("text") or "",
                _rounded(reference.get("relevance"), 3),
                "…" if "fluent" not in reference else "yes" if reference["fluent"] else "no",
                _rounded(reference.get("perplexity"), 2),
                _rounded(reference.get("repetition"), 2),
                None,
            ]
        ]
    return [
        [
            r["coeff"],
            "★" if r["coeff"] == result.get("recommended") else "",
            r["text"],
            _rounded(r.get("relevance"), 3),
            "…" if "fluent" not in r else "yes" if r["fluent"] else "no",  # "…": still generating, unscored
            _rounded(r.get("perplexity"), 2),
            _rounded(r.get("repetition"), 2),
            _rounded(r.get("effect"), 3),
        ]
        for r in result.get("rows", [])
    ] + tail


_cosine_colour = plots.cosine_colour  # white at 0, blue towards +1, red towards -1


def heatmap_html(texts: Sequence[str], matrix: Sequence[Sequence[float]], layer: int) -> str:
    """The cosine-similarity matrix as an SVG heatmap with its colour scale (`plots.heatmap_svg`)."""
    return plots.heatmap_svg(texts, matrix, layer)


# -- the History tab's re-run ----------------------------------------------------------------------
def rerun_texts(result: dict) -> tuple[str, str, str, str | None]:
    """What a re-run shows instead of its JSON: (label of the first box, its text, the baseline's
    text, the prompted row's text or None). A steer or chat entry gives its steered and baseline
    texts (and prompted when it has one); a sweep its rows, one "coeff: text" paragraph each (its
    unsteered row is its coefficient 0, when asked for); an auto-tune its choice and candidates."""
    if "steered" in result:  # steer and chat
        return "Steered", result.get("steered") or "", result.get("baseline") or "", result.get("prompted")
    rows = result.get("rows") or []
    if "recommended" in result:  # a sweep
        text = "\n\n".join(f"coeff {row['coeff']:g}: {row['text']}" for row in rows)
        prompted = result.get("prompted")
        return "Sweep rows", text, "", (prompted or {}).get("text")
    chosen = f"chosen: layer {result.get('layer')}, coeff {result.get('coeff')} ({result.get('reason', '')})"
    lines = [f"layer {row['layer']}, coeff {row['coeff']:g}: {row['text']}" for row in rows]
    return "Auto-tune candidates", "\n\n".join([chosen, *lines]), "", None


# -- the model picker ------------------------------------------------------------------------------
NOT_DOWNLOADED = "not downloaded (offline)"


def model_choices(online=weights.hub_reachable) -> list[tuple[str, str]]:
    """The model dropdown's (label, id) choices, catalog order. Offline (HF_HUB_OFFLINE set, or
    the hub unreachable: `online()` false) a model that is not in the local Hugging Face cache is
    labelled "Qwen2.5-1.5B-Instruct — not downloaded (offline)", since loading it would fail;
    cached ones and the embedded model keep their plain names. Online every name is plain."""
    specs = list(catalog.CATALOG)
    if all(weights.is_cached(spec) for spec in specs) or online():
        return [(spec.short_name, spec.id) for spec in specs]
    return [
        (spec.short_name if weights.is_cached(spec) else f"{spec.short_name} — {NOT_DOWNLOADED}", spec.id)
        for spec in specs
    ]
