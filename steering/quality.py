"""Quality of a steered output: is it fluent, did it move toward the steering text, and
which setting (layer, coefficient) gets the most of the second while keeping the first.

* `repetition(token_ids)`: 1 - distinct-2 of the generated tokens (0 for a sentence that never
  repeats a token pair, near 1 for "dogs(dogs(dogs(..."). Perplexity alone calls such loops
  fluent (a loop is very predictable), so fluency needs both.
* `is_fluent(perplexity, repetition, n_tokens)`: the documented per-row rule (thresholds chosen
  against outputs labelled by eye, `research/quality.py`, `docs/quality.md`).
* relevance: how far the output itself moved toward the steering text, measured by the unsteered
  model, steered row minus the unsteered baseline row of the same prompt. Candidates:
  `relevance_logprob` (log-prob per token of the steering text read right after prompt +
  output). `research/quality.py` ranked it against other measures (research/metrics.py) on
  word-list labels; it won.
* `autotune(...)`: generates a grid of layers x coefficients x decays as rows of a few batches,
  greedy and at a few sampling seeds, scores every row and returns the setting that is fluent and
  relevant on the most of those outputs (with one output: the most relevant fluent row).

Scoring is memory-lean: the decoder runs without its output head (`model.model`), the hidden
states are sliced to the scored positions, and only those go through `lm_head`, a few rows at a
time, so no (rows, positions, vocabulary) tensor is ever built.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from llm_steer import DecaySchedule

from steering import generate, limits
from steering.engine import (
    DECAY_NEEDS_ALL,
    DEFAULT_CAPTURE_MODE,
    DEFAULT_POSITIONS,
    SteeringEngine,
    VectorSpec,
    check_positions,
)
from steering.errors import InputError
from steering.vocab import MAX_PERPLEXITY, MAX_REPETITION, MIN_TOKENS

logger = logging.getLogger(__name__)

# -- fluency ---------------------------------------------------------------------------------------
# The rule of `is_fluent`: its thresholds are steering/vocab.py's (MAX_PERPLEXITY, ...).

ROW_CHUNK = generate.SCORE_ROW_CHUNK  # rows per scoring forward pass
# The text read after an output by `relevance_logprob` (the steering text follows it).
CONNECTOR = "\n\nThis text is about"


def repetition(token_ids: Sequence[int]) -> float:
    """1 - distinct-2: the share of the output's token pairs that repeat an earlier pair.

    0.0 for fewer than 3 tokens. A real 40-token sentence scores about 0-0.1; a loop such as
    "ocean-ice-ocean-ice-..." scores 0.5 or more.
    """
    pairs = list(zip(token_ids, token_ids[1:]))
    if len(pairs) < 2:
        return 0.0
    return 1.0 - len(set(pairs)) / len(pairs)


def is_fluent(perplexity: float | None, repetition: float, n_tokens: int, max_new_tokens: int | None = None) -> bool:
    """The per-row fluency rule: True when the output

    * does not loop: `repetition` (1 - distinct-2) <= MAX_REPETITION,
    * reads as language to the unsteered model: `perplexity` <= MAX_PERPLEXITY, and
    * is not a fragment: at least MIN_TOKENS tokens (or `max_new_tokens`, when that is smaller).

    An empty output (perplexity None) is not fluent.
    """
    if perplexity is None or not math.isfinite(perplexity):
        return False
    floor = MIN_TOKENS if max_new_tokens is None else min(MIN_TOKENS, max_new_tokens)
    return repetition <= MAX_REPETITION and perplexity <= MAX_PERPLEXITY and n_tokens >= floor


# -- lean log-probs: generate.token_logprobs ------------------------------------------------------
def _target_ids(engine: SteeringEngine, text: str) -> list[int]:
    return engine.tokenizer.encode(" " + text.strip(), add_special_tokens=False)


def text_logprob_after(
    engine: SteeringEngine,
    context: Sequence[int],
    generations: Sequence[Sequence[int]],
    text: str,
    connector: str = CONNECTOR,
) -> tuple[list[float], list[float | None]]:
    """Per row: the mean log-prob per token of `text` read after context + output + `connector`,
    and (from the same forward pass) the perplexity of the output itself (None when empty)."""
    bridge = engine.tokenizer.encode(connector, add_special_tokens=False) if connector else []
    target = _target_ids(engine, text)
    seqs = [list(context) + list(g) + bridge + target for g in generations]
    logps = generate.token_logprobs(engine, seqs, [(len(context), len(s)) for s in seqs])
    text_lp = [float(lp[-len(target) :].mean()) for lp in logps]
    ppl = [math.exp(-float(lp[: len(g)].mean())) if len(g) else None for lp, g in zip(logps, generations)]
    return text_lp, ppl


def logprob_scores(
    engine: SteeringEngine,
    context: Sequence[int],
    generations: Sequence[Sequence[int]],
    baseline: Sequence[int],
    *,
    text: str = "",
    positive: str = "",
    negative: str = "",
    connector: str = CONNECTOR,
) -> tuple[list[float], list[float | None]]:
    """Per output: relevance (how much more likely the steering text has become after it than
    after the baseline output, nats per token; for a pair, log-prob of positive minus negative,
    likewise) and its perplexity, from one pass over the rows (two for a pair)."""
    rows = [list(baseline)] + [list(g) for g in generations]
    if positive or negative:
        pos, ppl = text_logprob_after(engine, context, rows, positive, connector)
        neg, _ = text_logprob_after(engine, context, rows, negative, connector)
        values = [p - n for p, n in zip(pos, neg)]
    else:
        values, ppl = text_logprob_after(engine, context, rows, text, connector)
    return [v - values[0] for v in values[1:]], ppl[1:]


def relevance_logprob(engine, context, generations, baseline, **texts) -> list[float]:
    """The relevance half of `logprob_scores`."""
    return logprob_scores(engine, context, generations, baseline, **texts)[0]


# -- one score per row: concept, instruction, fluency, aggregate (the benchmark's form) ------------
# Each of the three is binned 0/1/2 and the aggregate is their harmonic mean, 0 when any is 0, as
# in the published comparison of steering methods (AxBench). The bins' thresholds were chosen
# against outputs labelled by eye (research/prompting.py, docs/quality.md "Prompting beside steering").
# Fitted on the labels of two topics (ocean, music; 36 outputs) and judged on two held out (space,
# baking): concept agrees with the eye's bin on 0.83 of held-out outputs (0 vs not 0: 1.00), but
# relevance cannot tell "mentions it" from "is about it", so bin 1 is rare; instruction 0.75 (0.81).
CONCEPT_BINS = (0.5, 1.0)  # relevance (nats/token over the baseline) >= these: bin 1, bin 2
INSTRUCTION_BINS = (0.1, 0.25)  # prompt-vs-neutral log-prob gain of the output (nats/token): bin 1, 2
NEAR_FLUENT = 2.0  # fluency bin 1: not fluent, but within this factor of each threshold


def concept_targets(specs: Sequence[VectorSpec]) -> list[tuple[dict, float]]:
    """(texts for `logprob_scores`, sign) of each enabled, steering vector with words: a negative
    coefficient's text is a text to move away from (sign -1). Raw directions have none."""
    out: list[tuple[dict, float]] = []
    for v in specs:
        if v.enabled and v.coeff != 0 and not v.direction:
            texts = dict(positive=v.positive, negative=v.negative) if v.contrastive else dict(text=v.text)
            if (texts, math.copysign(1.0, v.coeff)) not in out:
                out.append((texts, math.copysign(1.0, v.coeff)))
    return out


def instruction_scores(engine, context, generations, perplexities) -> list[float | None]:
    """Per output: mean log-prob per token after the prompt (from `perplexities`, after `context`)
    minus after a neutral prompt, under the unsteered model: how much the output depends on the
    prompt, i.e. whether it still answers it (a pointwise mutual information; None when empty)."""
    neutral = generate.context_perplexities(
        engine, generate.prompt_ids(engine.tokenizer, generate.NEUTRAL_PROMPT), generations
    )
    return [None if p is None or n is None else math.log(n) - math.log(p) for p, n in zip(perplexities, neutral)]


def _bin(value: float | None, edges: tuple[float, float]) -> int:
    return 0 if value is None or not math.isfinite(value) else (value >= edges[0]) + (value >= edges[1])


def fluency_bin(perplexity: float | None, rep: float, n_tokens: int, max_new_tokens: int | None = None) -> int:
    """2 fluent (`is_fluent`); 1 not fluent but within NEAR_FLUENT of the perplexity and repetition
    thresholds and not a fragment; 0 otherwise."""
    if is_fluent(perplexity, rep, n_tokens, max_new_tokens):
        return 2
    floor = MIN_TOKENS if max_new_tokens is None else min(MIN_TOKENS, max_new_tokens)
    near = perplexity is not None and perplexity <= NEAR_FLUENT * MAX_PERPLEXITY and rep <= NEAR_FLUENT * MAX_REPETITION
    return 1 if near and n_tokens >= floor else 0


def aggregate(bins: Sequence[int | None]) -> float | None:
    """The harmonic mean of the bins, 0 when any is 0 (None when one is unknown)."""
    if any(b is None for b in bins):
        return None
    return 0.0 if min(bins) == 0 else round(len(bins) / sum(1 / b for b in bins), 4)


def compare_scores(
    engine: SteeringEngine,
    context: Sequence[int],
    generations: Sequence[Sequence[int]],
    specs: Sequence[VectorSpec],
    max_new_tokens: int | None = None,
) -> list[dict]:
    """One score dict per row of a compare (row 1 is the unsteered baseline): {"concept",
    "instruction", "perplexity", "repetition", "fluent", "bins": {"concept", "instruction",
    "fluency"}, "aggregate"}. Every row is read by the unsteered model after the same `context`
    (the user's prompt, also for the prompted row), so the numbers compare across rows.

    concept: `relevance_logprob` over the baseline row (so 0 for the baseline), averaged over the
    request's texts, sign-flipped for a negative coefficient (None for raw directions only)."""
    targets = concept_targets(specs)
    rows = [list(g) for g in generations]
    concept: list[float | None] = [None] * len(rows)
    ppl: list[float | None] | None = None
    if targets:
        total = [0.0] * len(rows)
        for texts, sign in targets:
            rel, p = logprob_scores(engine, context, rows, rows[1], **texts)
            ppl = ppl or p
            total = [t + sign * r for t, r in zip(total, rel)]
        concept = [t / len(targets) for t in total]
        concept[1] = 0.0  # by construction (the same row read twice)
    if ppl is None:
        ppl = generate.context_perplexities(engine, context, rows)
    follows = instruction_scores(engine, context, rows, ppl)
    return [row_score(c, f, p, ids, max_new_tokens) for c, f, p, ids in zip(concept, follows, ppl, rows)]


def row_score(
    concept: float | None, follows: float | None, ppl: float | None, ids: Sequence[int], max_new_tokens: int | None
) -> dict:
    """One row's score dict of `compare_scores` from its concept, instruction and perplexity."""
    rep = repetition(ids)
    bins = {
        "concept": None if concept is None else _bin(concept, CONCEPT_BINS),
        "instruction": _bin(follows, INSTRUCTION_BINS),
        "fluency": fluency_bin(ppl, rep, len(ids), max_new_tokens),
    }
    return {
        "concept": None if concept is None else round(concept, 4),
        "instruction": None if follows is None else round(follows, 4),
        "perplexity": None if ppl is None else round(ppl, 2),
        "repetition": round(rep, 3),
        "fluent": is_fluent(ppl, rep, len(ids), max_new_tokens),
        "bins": bins,
        "aggregate": aggregate(list(bins.values())),
    }


def best_row(scores: dict) -> tuple[str | None, str]:
    """(name of the row with the highest aggregate, a line saying so); ties and unknowns said."""
    known = {name: s["aggregate"] for name, s in scores.items() if s and s.get("aggregate") is not None}
    if not known:
        return None, "no aggregate score (a raw direction has no text to score against)"
    top = max(known.values())
    winners = [name for name, value in known.items() if value == top]
    if top == 0:
        return None, "no row scored above 0 (each needs concept, instruction and fluency all above 0)"
    if len(winners) > 1:
        return None, f"{' and '.join(winners)} tied at {top:.2f} of 2"
    return winners[0], f"{winners[0]} scored highest: {top:.2f} of 2"


# -- the score autotune uses -----------------------------------------------------------------------
# Relevance is `relevance_logprob`: of the measures tried against word-list labels (the others,
# hidden-state and embedding cosines, live in research/metrics.py), it agreed best (docs/quality.md).
RELEVANCE = "logprob"


# -- autotune --------------------------------------------------------------------------------------
# The default search (measured with research/quality.py, docs/quality.md): the middle layer x the
# default coefficient and one step either side (0.75, 1.0, 1.25 with positions "prompt"; 0.45,
# 0.5, 0.55 with "all"), constant, greedy, each tried on the user's prompt and on four neutral
# probe prompts; the setting fluent and relevant on the most of those five outputs wins, ties
# going to the one nearest the default coefficient. One greedy output decides by luck: tuned on
# the user's prompt alone, every rule tried stayed below the fixed default on the labelled set.
# The decaying and sampled searches (`decays`, `samples`) were measured with the older
# "bos-neutral" capture only (docs/quality.md).
LAYER_FRACTIONS = (0.5,)
COEFFS_BY_POSITIONS = {"prompt": (0.75, 1.0, 1.25), "all": (0.45, 0.5, 0.55)}
COEFFS = COEFFS_BY_POSITIONS[DEFAULT_POSITIONS]
# Ties between settings go to the coefficient nearest this (the measured default of each rule).
ANCHOR_BY_POSITIONS = {"prompt": limits.DEFAULT_COEFF, "all": 0.45}
DECAYS = (1.0,)
BATCH_ROWS = limits.MAX_SWEEP_ROWS
# Every candidate also runs on these neutral prompts (autotune(probes=...), default), so that one
# prompt's greedy output does not decide alone: each costs as much as the search on the prompt.
PROBE_PROMPTS = (
    "Tell me about your day.",
    "Write a few sentences about anything you like.",
    "What is a good way to spend an evening?",
    "Give me some advice for the week ahead.",
)
# autotune(samples=N): also sample N outputs of every candidate on the user's prompt at this
# temperature (seeds seed+1 .. seed+N) and choose as with probes: the setting fluent and relevant
# on the most of the 1 + N outputs. One greedy output decides by luck (docs/quality.md).
SAMPLE_TEMPERATURE = 0.7
SAMPLES = 0  # autotune(samples=...) default (3 with decays=(0.95,): docs/quality.md)
MAX_SAMPLES = 8  # each sample costs as much as the greedy search itself


def default_layers(n_layers: int) -> list[int]:
    """The layers autotune searches by default: a few around the middle of the model."""
    return sorted({min(n_layers - 1, max(0, round(f * n_layers))) for f in LAYER_FRACTIONS})


def _check_request(engine, prompt, text, positive, negative, layers, coeffs, decays, max_new_tokens, positions):
    limits.check_text(prompt, "prompt", "prompt_chars")
    if positive or negative:
        positive, negative = limits.check_text(positive, "positive"), limits.check_text(negative, "negative")
        text = ""
    else:
        text = limits.check_text(text, "text")
    layers = default_layers(engine.n_layers) if not layers else layers
    layers = list(dict.fromkeys(limits.check_layer(v, f"layers[{i}]", engine.n_layers) for i, v in enumerate(layers)))
    check_positions(positions)
    coeffs = COEFFS_BY_POSITIONS[positions] if not coeffs else coeffs
    coeffs = list(dict.fromkeys(limits.check("coeff", c, f"coeffs[{i}]") for i, c in enumerate(coeffs)))
    if 0.0 in coeffs:
        raise InputError("coeffs", "0 is the baseline, which autotune always runs; give non-zero coefficients")
    decays = DECAYS if not decays else decays
    decays = list(dict.fromkeys(float(limits.check("decay", d, f"decays[{i}]")) for i, d in enumerate(decays)))
    if positions == "prompt" and decays != [1.0]:
        raise InputError("decays", DECAY_NEEDS_ALL)
    tokens = limits.check("max_new_tokens", max_new_tokens)
    specs = {
        layer: VectorSpec(layer=layer, coeff=1.0, text=text, positive=positive, negative=negative, positions=positions)
        for layer in layers
    }
    return specs, [(c, d) for d in decays for c in coeffs], tokens


def _decayed(spec: VectorSpec, decay: float) -> VectorSpec:
    return spec if decay == 1.0 else replace(spec, decay=DecaySchedule(rate=decay))


def generate_candidates(engine, prompt, specs, strengths, sampling, *, capture_mode, stop, progress):
    """Baseline + every (layer, coefficient, decay) as rows of batches of <= BATCH_ROWS, in layer
    order (middle layer first). Returns (baseline ids, [(layer, coeff, decay, text, ids)], stopped)."""
    from steering import generate as G

    middle = engine.n_layers / 2
    order = sorted(specs, key=lambda layer: (abs(layer - middle), layer))
    jobs: list[tuple[int | None, float, float]] = [(None, 0.0, 1.0)]
    jobs += [(layer, c, d) for layer in order for c, d in strengths]
    batches = [jobs[i : i + BATCH_ROWS] for i in range(0, len(jobs), BATCH_ROWS)]
    baseline: list[int] = []
    out = []
    for index, batch in enumerate(batches):
        if stop is not None and stop.is_set():
            return baseline, out, True
        rows = [[] if layer is None else [(_decayed(specs[layer], d), c)] for layer, c, d in batch]
        final = G.run_rows(engine, prompt, rows, sampling, stop=stop, capture_mode=capture_mode)
        if stop is not None and stop.is_set():  # this batch was cut short: its rows are partial
            return baseline, out, True
        for (layer, coeff, decay), text, ids in zip(batch, final.texts, final.token_ids):
            if layer is None:
                baseline = list(ids)
            else:
                out.append((layer, coeff, decay, text, list(ids)))
        if progress is not None:
            progress(0.9 * (index + 1) / len(batches), f"generated batch {index + 1} of {len(batches)}")
    return baseline, out, False


def score_rows(
    engine, prompt, specs, candidates, baseline, max_new_tokens, *, capture_mode=DEFAULT_CAPTURE_MODE
) -> list[dict]:
    """Relevance, perplexity, repetition, fluent and score of every candidate row."""
    from steering.generate import prompt_ids

    context = prompt_ids(engine.tokenizer, prompt)
    gens = [c[-1] for c in candidates]
    spec = next(iter(specs.values()))
    texts = dict(text=spec.text, positive=spec.positive, negative=spec.negative)
    relevance, ppl = logprob_scores(engine, context, gens, baseline, **texts)  # one forward pass for both
    rows = []
    for (layer, coeff, decay, text, ids), rel, p in zip(candidates, relevance, ppl):
        rep = repetition(ids)
        fluent = is_fluent(p, rep, len(ids), max_new_tokens)
        rows.append(
            dict(
                layer=layer,
                coeff=coeff,
                decay=decay,
                text=text,
                relevance=round(rel, 4),
                perplexity=None if p is None else round(p, 2),
                repetition=round(rep, 3),
                fluent=fluent,
                score=round(rel, 4) if fluent else None,
            )
        )
    return rows


def setting(row: dict) -> tuple[int, float, float]:
    """(layer, coeff, decay) of a row; rows without a decay are constant (decay 1)."""
    return row["layer"], row["coeff"], row.get("decay", 1.0)


def _gentleness(row: dict, n_layers: int) -> tuple:
    """Sort key, gentlest first: smaller coefficient, then faster decay, then nearer the middle."""
    return row["coeff"], row.get("decay", 1.0), abs(row["layer"] - n_layers / 2)


def choose(rows: Sequence[dict], n_layers: int) -> tuple[dict | None, str]:
    """The row with the highest relevance among fluent rows that moved toward the text."""
    good = [r for r in rows if r["fluent"] and r["relevance"] > 0]
    if good:
        best = max(good, key=lambda r: (r["relevance"], [-v for v in _gentleness(r, n_layers)]))
        return best, (
            f"highest relevance ({best['relevance']:+.3f} nats/token over the unsteered output) among "
            f"{len(good)} of {len(rows)} candidate rows that stayed fluent and moved toward the text"
        )
    fluent = [r for r in rows if r["fluent"]]
    if fluent:
        best = min(fluent, key=lambda r: _gentleness(r, n_layers))
        return (
            best,
            "no fluent row moved toward the text; the gentlest fluent setting is returned: "
            "try other layers or a longer text",
        )
    if rows:
        best = min(rows, key=lambda r: _gentleness(r, n_layers))
        return best, "no candidate row stayed fluent; the gentlest setting is returned: try smaller coefficients"
    return None, "no candidate row was generated"


def choose_across(
    rows_per_prompt: Sequence[Sequence[dict]],
    n_layers: int,
    what: str = "neutral probes",
    anchor: float | None = None,
) -> tuple[dict | None, float | None, str]:
    """The setting that is fluent and moved toward the text on the most outputs (the user's
    prompt's and those of probes or samples). Ties: with `anchor`, the coefficient nearest it,
    then the gentler; without, the higher mean relevance on those outputs. Returns (the user's
    prompt's row of it, its mean relevance over the outputs where it was good, reason)."""
    if len(rows_per_prompt) == 1 or not any(rows_per_prompt[1:]):
        best, reason = choose(rows_per_prompt[0], n_layers)
        return best, None if best is None else best["relevance"], reason
    table: dict[tuple, list[dict]] = {}
    for rows in rows_per_prompt:
        for r in rows:
            table.setdefault(setting(r), []).append(r)
    own = {setting(r): r for r in rows_per_prompt[0]}
    ranked = []
    for key, rows in table.items():
        ok = [r["relevance"] for r in rows if r["fluent"] and r["relevance"] > 0]
        if key in own and ok:
            mean = sum(ok) / len(ok)
            gentle = [-v for v in _gentleness(own[key], n_layers)]
            tie = (-abs(own[key]["coeff"] - anchor), gentle) if anchor is not None else (mean, gentle)
            ranked.append((len(ok), tie, mean, key))
    if not ranked:
        best, reason = choose(rows_per_prompt[0], n_layers)
        return best, None if best is None else best["relevance"], reason
    n_ok, _, mean, key = max(ranked)
    ties = sum(r[0] == n_ok for r in ranked)
    tie_note = ""
    if ties > 1:
        tie_note = f"; {ties} settings tied, " + (
            f"the one nearest the default coefficient {anchor:g} won" if anchor is not None else "the most relevant won"
        )
    return (
        own[key],
        mean,
        (
            f"fluent and moved toward the text on {n_ok} of {len(rows_per_prompt)} outputs (your prompt's "
            f"and {len(rows_per_prompt) - 1} {what}){tie_note}, "
            f"mean relevance {mean:+.3f} nats/token over the unsteered output"
        ),
    )


def versus_prompted(
    engine: SteeringEngine,
    runs: Sequence[tuple[str, list[int], list[tuple]]],
    best: dict,
    spec: VectorSpec,
    sampling,
    *,
    stop: threading.Event | None = None,
) -> dict | None:
    """The chosen setting against asking in words, on each greedy run of the search (the user's
    prompt first, then the probes): `runs` is [(prompt, baseline ids, candidates)] as
    `generate_candidates` returned them. The prompted rows (each prompt followed by /steer's
    instruction, `generate.prompt_instruction`, unsteered) run as one batch of their own; then
    the chosen setting's row, the baseline and the prompted row of each prompt get the scores
    /steer gives (`compare_scores`). Returns {"instruction", "text" (the prompted row on the
    user's prompt), "steered", "prompted" (mean aggregate, 0-2), "steered_wins",
    "prompted_wins", "ties", "outputs", "per_prompt": [{"prompt", "steered", "prompted"}],
    "verdict"}, or None when `stop` ended the prompted batch."""
    from steering import generate as G

    instruction = G.prompt_instruction([spec])
    key = setting(best)
    chosen = [(each, base, next(c for c in cands if c[:3] == key)) for each, base, cands in runs]
    row_ids = [G.prompt_ids(engine.tokenizer, G.prompted_prompt(each, instruction)) for each, _, _ in chosen]
    final = G.run_rows(engine, chosen[0][0], [[] for _ in chosen], sampling, stop=stop, row_ids=row_ids)
    if stop is not None and stop.is_set():
        return None
    # compare_scores' numbers, without what the comparison does not need (the baseline's own score)
    # and with every row's neutral-prompt reading in one batch: per prompt one pass over the
    # baseline, the chosen row and the prompted row (concept and perplexity), then one for all.
    texts = dict(positive=spec.positive, negative=spec.negative) if spec.contrastive else dict(text=spec.text)
    pairs, read = [], []
    for (each, base, row), asked in zip(chosen, final.token_ids):
        context = G.prompt_ids(engine.tokenizer, each)
        pair = [list(row[-1]), list(asked)]
        concept, ppl = logprob_scores(engine, context, pair, base, **texts)
        pairs.append((each, pair, concept, ppl))
        read += pair
    neutral = G.context_perplexities(engine, G.prompt_ids(engine.tokenizer, G.NEUTRAL_PROMPT), read)
    per = []
    for index, (each, pair, concept, ppl) in enumerate(pairs):
        follows = [
            None if p is None or n is None else math.log(n) - math.log(p) for p, n in zip(ppl, neutral[2 * index :])
        ]
        scored = [row_score(c, f, p, ids, sampling.max_new_tokens) for c, f, p, ids in zip(concept, follows, ppl, pair)]
        per.append({"prompt": each, "steered": scored[0]["aggregate"], "prompted": scored[1]["aggregate"]})
    n = len(per)
    steered_mean = round(sum(r["steered"] for r in per) / n, 3)
    prompted_mean = round(sum(r["prompted"] for r in per) / n, 3)
    wins = sum(r["steered"] > r["prompted"] for r in per), sum(r["steered"] < r["prompted"] for r in per)
    ties = n - sum(wins)
    outputs = f"your prompt{' and the ' + str(n - 1) + ' probes' if n > 1 else ''}"
    if steered_mean > prompted_mean:
        head = "The chosen setting beat prompting"
    elif steered_mean < prompted_mean:
        head = "Prompting beat the chosen setting"
    else:
        head = "The chosen setting and prompting tied"
    verdict = (
        f"{head} on {outputs}: mean aggregate score {steered_mean:g} steered vs {prompted_mean:g} prompted, "
        f"out of 2 (steering higher on {wins[0]}, prompting higher on {wins[1]}, {ties} tied, "
        f"asked with “{instruction}”)."
    )
    return {
        "instruction": instruction,
        "text": final.texts[0],
        "steered": steered_mean,
        "prompted": prompted_mean,
        "steered_wins": wins[0],
        "prompted_wins": wins[1],
        "ties": ties,
        "outputs": n,
        "per_prompt": per,
        "verdict": verdict,
    }


def autotune(
    engine: SteeringEngine,
    prompt: str,
    *,
    text: str = "",
    positive: str = "",
    negative: str = "",
    layers: Sequence[int] | None = None,
    coeffs: Sequence[float] | None = None,
    decays: Sequence[float] | None = None,
    max_new_tokens: int = 40,
    seed: int = 0,
    capture_mode: str = DEFAULT_CAPTURE_MODE,
    stop: threading.Event | None = None,
    progress: Callable[[float, str], None] | None = None,
    probes: Sequence[str] = PROBE_PROMPTS,
    samples: int = SAMPLES,
    positions: str = DEFAULT_POSITIONS,
    prompted: bool = False,
) -> dict:
    """Search layers x coefficients (x decays) for the setting that moves the output most toward
    the steering text (or positive minus negative) among rows that stay fluent (greedy decoding).

    Candidates run as rows of batches of <= 8 (the unsteered baseline among them). `positions`
    is where every candidate vector is added ("prompt", the default, or "all"); `coeffs` defaults
    to `COEFFS_BY_POSITIONS[positions]`. `decays` (default `DECAYS`, constant only; other rates
    need positions "all") adds per-step decay rates to the search. With `probes` (default
    `PROBE_PROMPTS`, four neutral prompts; () for the user's prompt alone) every candidate also
    runs on those prompts, and with `samples` N it is also sampled N times on the user's prompt
    (temperature SAMPLE_TEMPERATURE, seeds seed+1 .. seed+N); the chosen setting is then the one
    fluent and relevant on the most outputs, ties going to the coefficient nearest the default
    (`choose_across`); `rows` are always the user's prompt's greedy rows. With `prompted` the
    chosen setting is then scored against asking in words on the prompt and the probes
    (`versus_prompted`, one more batch); the answer gains "versus_prompted" (None without
    `prompted`, when stopped or when no setting was chosen).

    Returns {"layer", "coeff", "decay", "positions", "score", "rows": [{"layer", "coeff", "decay",
    "text", "relevance", "perplexity", "repetition", "fluent", "score"}], "reason"}. `score` is the
    chosen setting's mean relevance where it was good (the row's own relevance without probes or
    samples); a row's `score` is its relevance when it is fluent, else None. When no row
    is fluent and relevant, the gentlest fluent (else gentlest) setting is returned and `reason`
    says so; layer, coeff, decay and score are None only when no row was generated (stopped at
    once). `stop` (set from another thread) ends the search between or within batches; the rows
    finished so far are still scored. The caller holds the model manager's lock.
    """
    from steering import generate as G

    started = time.monotonic()
    specs, strengths, tokens = _check_request(
        engine, prompt, text, positive, negative, layers, coeffs, decays, max_new_tokens, positions
    )
    seed = limits.check("seed", seed)
    if isinstance(samples, bool) or not isinstance(samples, int) or not 0 <= samples <= MAX_SAMPLES:
        raise InputError("samples", f"must be an integer from 0 to {MAX_SAMPLES}; got {limits.shorten(samples)}")
    greedy = G.Sampling(max_new_tokens=tokens, seed=seed)
    runs = [(prompt, greedy)] + [(p, greedy) for p in probes]
    runs += [
        (prompt, G.Sampling(tokens, SAMPLE_TEMPERATURE, 1.0, (seed + i) % limits.MAX_SEED))
        for i in range(1, 1 + samples)
    ]
    rows_per_prompt, stopped, greedy_runs = [], False, []
    for index, (each, sampling) in enumerate(runs):
        share = lambda f, m, i=index: progress and progress((i + f) / len(runs) * 0.95, m)  # noqa: E731
        baseline, candidates, stopped = generate_candidates(
            engine, each, specs, strengths, sampling, capture_mode=capture_mode, stop=stop, progress=share
        )
        if candidates and (not stopped or index == 0):
            rows_per_prompt.append(
                score_rows(engine, each, specs, candidates, baseline, tokens, capture_mode=capture_mode)
            )
            if index <= len(probes) and not stopped:  # the user's prompt and the probes (greedy)
                greedy_runs.append((each, baseline, candidates))
        if stopped:
            break
    rows = rows_per_prompt[0] if rows_per_prompt else []
    what = "neutral probes" if not samples else ("samples" if not probes else "probes and samples")
    best, score, reason = (
        choose_across(rows_per_prompt, engine.n_layers, what, ANCHOR_BY_POSITIONS[positions])
        if rows
        else (None, None, "no candidate row was generated")
    )
    versus = None
    if prompted and best is not None and not stopped and greedy_runs:
        if progress is not None:
            progress(0.95, "asking in words: the prompted rows")
        spec = replace(_decayed(specs[best["layer"]], best.get("decay", 1.0)), coeff=best["coeff"])
        versus = versus_prompted(engine, greedy_runs, best, spec, greedy, stop=stop)
    n_all = len(specs) * len(strengths)
    if stopped:
        more = max(len(rows_per_prompt) - 1, 0)
        extra = f" and {more} more run{'s' if more != 1 else ''}" if more else ""
        reason = f"stopped after {len(rows)} of {n_all} candidates on your prompt{extra}; " + reason
    elapsed = time.monotonic() - started
    searched = sorted({d for _, d in strengths})
    shown = f" x decays {searched}" if searched != [1.0] else ""
    shown += f", {samples} sampled output{'s' if samples > 1 else ''} each" if samples else ""
    coeff_list = list(dict.fromkeys(c for c, _ in strengths))
    reason += f" ({n_all} candidates at layers {sorted(specs)} x coefficients {coeff_list}{shown}, {elapsed:.0f} s)"
    if progress is not None:
        progress(1.0, "done")
    return {
        "layer": None if best is None else best["layer"],
        "coeff": None if best is None else best["coeff"],
        "decay": None if best is None else best["decay"],
        "positions": positions,
        "score": None if score is None else round(score, 4),
        "rows": rows,
        "reason": reason,
        "versus_prompted": versus,
    }
