"""The typed functions behind every UI event and client API endpoint.

Each public function validates what it can before it waits for the model, then runs the model
work through one path (`_run` / `_stream`): the model manager's lock is taken once, layers are
checked against the model that will answer, the work runs, and the answer carries the fallback
event of this request's own attempt (None unless it ran out of memory and was retried on the
fallback). Values are plain JSON. Errors are the core's `SteeringError`s, whose message names the
field and the allowed range; `steering/ui/endpoints.py` translates them for Gradio. No gradio here.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from threading import Event

from steering import engine as eng
from steering import estimate, generate, lifecycle, limits, quality, vector_io
from steering.errors import InputError
from steering.loaded import LoadedModel, decoder_layers
from steering.loader import Attempt, get_manager

MAX_MODEL_ID_CHARS = 256  # checked before the id touches the filesystem
_D = {name: limit.default for name, limit in limits.LIMITS.items()}  # defaults of the signatures below


# -- the one path of every model request --------------------------------------------------------
Checks = Sequence[tuple[str, int]]  # (field, layer index) of a request


def _check_model_fit(attempt: Attempt, layers: Checks, sizes: Checks, fits: Fits = None) -> None:
    """Each (field, layer) against the model the request was first given to, and each (field,
    length) of a raw direction against the hidden size of the model that answers (under the lock)."""
    for field, layer in layers:
        limits.check_layer(layer, field, attempt.validated_layers)
    hidden = attempt.loaded.spec.hidden_size
    for field, size in sizes:
        if size != hidden:
            raise InputError(field, f"has {size} numbers; {attempt.loaded.model_id} needs its hidden size, {hidden}")
    if fits is not None:
        fits(attempt.loaded)


Fits = Callable[[LoadedModel], None] | None  # token checks of a request against a loaded model


def _run(what: str, layers: Checks, work: Callable[[Attempt], dict], sizes: Checks = (), fits: Fits = None) -> dict:
    """Run `work` on the model under its lock; the result gains this request's own `fallback`.

    `fits` (token counts against the model's positions and fitted limits) runs twice: at once on
    the model loaded now, so an oversized request is refused without waiting for the model, and
    under the lock on the model that answers."""
    _fits_now(fits)

    def attempt(a: Attempt) -> dict:
        _check_model_fit(a, layers, sizes, fits)
        with _rows_apart(a):
            result = {**work(a), "fallback": a.event}
        lifecycle.check_running()  # work cut short by a shutdown is not an answer
        return result

    return get_manager().run(attempt, what=what)


def _stream(
    what: str, layers: Checks, work: Callable[[Attempt], Iterator[dict]], sizes: Checks = (), fits: Fits = None
) -> Iterator[dict]:
    """`_run` for streaming work: every update carries this request's own `fallback`."""
    _fits_now(fits)

    def attempt(a: Attempt) -> Iterator[dict]:
        _check_model_fit(a, layers, sizes, fits)
        with _rows_apart(a):
            for update in work(a):
                lifecycle.check_running()  # work cut short by a shutdown is not an answer
                yield {**update, "fallback": a.event}

    yield from get_manager().stream(attempt, what=what)


def _fits_now(fits: Fits) -> None:
    loaded = get_manager().current  # no lock: a snapshot; the answering model is checked again
    if fits is not None and loaded is not None and loaded.tokenizer is not None:
        fits(loaded)


@contextlib.contextmanager
def _rows_apart(attempt: Attempt) -> Iterator[None]:
    """In an out-of-memory retry on the same model, captures run one text at a time as well."""
    engine = eng.engine_for(attempt.loaded)
    before = engine.max_capture_rows
    engine.max_capture_rows = 1 if attempt.one_row else before
    try:
        yield
    finally:
        engine.max_capture_rows = before


def _token_fits(
    kind: str, *, prompt: str | None = None, raw_prompt: bool = False, new_tokens: int = 0, texts=()
) -> Callable[[LoadedModel], None]:
    """A `fits` check: prompt (after the chat template) + new tokens per row, and each steering
    text, against the model's positions and its fitted limit for a `kind` ("compare", "prompted": a
    compare with the prompted row, 3 rows, or "sweep")."""

    def check(loaded: LoadedModel) -> None:
        limit, why = _token_limit(loaded, kind)
        if prompt is not None:
            count = len(generate.prompt_ids(loaded.tokenizer, prompt, raw=raw_prompt))
            if count + new_tokens > limit:
                raise InputError(
                    "prompt",
                    f"is {count} tokens (after the chat template); with {new_tokens} new tokens that is "
                    f"{count + new_tokens} per row, over the limit of {limit} for a {estimate.KIND_WORDS[kind]} on "
                    f"{loaded.model_id} "
                    f"({why}). Shorten the prompt or ask for fewer new tokens{_MORE}",
                )
        _check_text_tokens(loaded, texts, limit, why)

    return check


def _check_text_tokens(loaded: LoadedModel, texts, limit: int, why: str) -> None:
    """Each (field, text[, layer]) within the model's limit and `text_tokens`, and all of them,
    each distinct (text, layer) once, within the request's budget `steering_tokens`."""
    per_text = min(limit, int(limits.LIMITS["text_tokens"].maximum))
    budget = int(limits.LIMITS["steering_tokens"].maximum)
    seen: dict[tuple, int] = {}
    for field, text, *layer in texts:
        count = len(loaded.tokenizer.encode(text, add_special_tokens=False)) + 1  # + the start token
        if count > limit:
            raise InputError(field, f"is {count} tokens, over the limit of {limit} ({why}){_MORE}")
        if count > per_text:
            raise InputError(field, f"is {count} tokens; a steering text may be {per_text} tokens at most")
        seen[(text, *layer)] = count
        if sum(seen.values()) > budget:
            raise InputError(
                field,
                f"brings the request's steering texts to {sum(seen.values())} tokens (each text counted once per "
                f"layer it is read at); a request may read {budget} at most. Use fewer or shorter texts",
            )


_MORE = "; for more, use fewer rows, a smaller quantization, or start the server with a smaller --margin."


def _token_limit(loaded: LoadedModel, kind: str) -> tuple[int, str]:
    positions = loaded.spec.max_positions
    fitted = (loaded.fit or {}).get(f"{kind}_max_tokens")
    if fitted is None or fitted >= positions:
        return positions, f"the model has {positions} positions"
    basis = (loaded.fit or {}).get("basis", "?")
    rows = estimate.ROWS_BY_KIND[kind]
    return fitted, f"fitted to the memory left beside the model, {rows} rows, basis: {basis}"


def _vector_checks(specs: Sequence[eng.VectorSpec]) -> tuple[Checks, Checks]:
    """The (field, layer) and (field, direction length) checks of a request's vectors."""
    layers = [(f"vectors[{i}].layer", s.layer) for i, s in enumerate(specs)]
    sizes = [(f"vectors[{i}].direction", len(s.direction)) for i, s in enumerate(specs) if s.direction]
    return layers, sizes


def _known_layers() -> int | None:
    """The loaded model's layer count, read without the lock (None while none is loaded): bad
    layers are refused before waiting; `_check_layers` decides again against the answering model."""
    loaded = get_manager().current
    model = loaded.model if loaded is not None else None
    return len(decoder_layers(model)) if model is not None else None


def _parse_vectors(vectors) -> list[eng.VectorSpec]:
    limits.check_count("vectors", vectors, "vectors")
    n_layers = _known_layers()
    return [eng.parse_vector(raw, i, n_layers) for i, raw in enumerate(vectors)]


def _texts(specs: Sequence[eng.VectorSpec]) -> list[tuple[str, str, int]]:
    """(field, text, layer) of every steering text of a request."""
    return [
        (f"vectors[{i}].{key}", getattr(spec, key), spec.layer)
        for i, spec in enumerate(specs)
        for key in ("text", "positive", "negative")
        if getattr(spec, key)
    ]


def _on_model(attempt: Attempt, specs: Sequence[eng.VectorSpec]) -> tuple[list[eng.VectorSpec], dict]:
    """The vectors with their layers mapped onto the model that answers, and the answer's fields
    that say which model that is and where it steered."""
    loaded = attempt.loaded
    mapped = [replace(s, layer=attempt.layer(s.layer)) for s in specs]
    base = {
        "model": loaded.model_id,
        "quant": loaded.quant,
        "device": loaded.device,
        "layers": sorted({s.layer for s in mapped if s.enabled}),
    }
    return mapped, base


def _check_capture_mode(mode) -> str:
    if mode not in eng.CAPTURE_MODES:
        raise InputError("capture_mode", f"must be one of {', '.join(eng.CAPTURE_MODES)}; got {limits.shorten(mode)}")
    return mode


# -- endpoints ----------------------------------------------------------------------------------
def steer_stream(
    prompt: str,
    vectors: list[dict],
    max_new_tokens: int = _D["max_new_tokens"],
    temperature: float = _D["temperature"],
    top_p: float = _D["top_p"],
    seed: int = _D["seed"],
    compare: bool = True,
    *,
    stop: Event | None = None,
    capture_mode: str = eng.DEFAULT_CAPTURE_MODE,
    raw_prompt: bool = False,
    prompted: bool = False,
) -> Iterator[dict]:
    """Streaming form of `steer`: yields the result dict with the texts so far, then the final one
    (the final one, with `done`, also carries the rows' `scores`)."""
    prompt = generate.check_prompt(prompt)
    sampling = generate.check_sampling(max_new_tokens, temperature, top_p, seed)
    compare, raw_prompt = limits.check_bool(compare, "compare"), limits.check_bool(raw_prompt, "raw_prompt")
    prompted = limits.check_bool(prompted, "prompted")
    specs = _parse_vectors(vectors)
    capture_mode = _check_capture_mode(capture_mode)
    instruction = _instruction(specs, compare, prompted)

    def work(attempt: Attempt) -> Iterator[dict]:
        mapped, base = _on_model(attempt, specs)
        engine = eng.engine_for(attempt.loaded)
        rows = generate.compare_rows(mapped, compare, prompted)
        row_ids = generate.compare_row_ids(engine.tokenizer, prompt, instruction, len(rows), raw=raw_prompt)
        base = {**base, "instruction": instruction}
        for update in generate.generate_rows(
            engine, prompt, rows, sampling, one_row=attempt.one_row, stop=stop, raw_prompt=raw_prompt,
            capture_mode=capture_mode, row_ids=row_ids,
        ):  # fmt: skip
            texts = update.texts + [None] * (3 - len(update.texts))
            tokens = [len(ids) for ids in update.token_ids]  # generated so far, per row
            out = {**base, "steered": texts[0], "baseline": texts[1], "prompted": texts[2], "tokens": tokens}
            if update.done:
                stopped = stop is not None and stop.is_set()
                out["scores"] = (
                    None
                    if not compare or stopped
                    else _row_scores(engine, prompt, mapped, update, raw_prompt, sampling)
                )
            yield {**out, "done": update.done}

    layers, sizes = _vector_checks(specs)
    longest = prompt if instruction is None else generate.prompted_prompt(prompt, instruction)
    kind = "compare" if instruction is None else "prompted"  # a prompted compare is 3 rows
    fits = _token_fits(
        kind, prompt=longest, raw_prompt=raw_prompt, new_tokens=sampling.max_new_tokens, texts=_texts(specs)
    )
    yield from _stream("generation", layers, work, sizes, fits)


def _instruction(specs: Sequence[eng.VectorSpec], compare: bool, prompted: bool) -> str | None:
    """The prompted row's instruction (None without `prompted`); refusals name "prompted"."""
    if not prompted:
        return None
    if not compare:
        raise InputError("prompted", "needs compare: the prompted row is scored against the unsteered baseline")
    return generate.prompt_instruction(specs)


ROW_NAMES = ("steered", "baseline", "prompted")


def _row_scores(engine, prompt: str, specs, update, raw_prompt: bool, sampling: generate.Sampling) -> dict:
    """`quality.compare_scores` of the rows, by name ("steered", "baseline"[, "prompted"])."""
    context = generate.prompt_ids(engine.tokenizer, prompt, raw=raw_prompt)
    scored = quality.compare_scores(engine, context, update.token_ids, specs, sampling.max_new_tokens)
    return dict(zip(ROW_NAMES, scored))


def steer(
    prompt: str,
    vectors: list[dict],
    max_new_tokens: int = _D["max_new_tokens"],
    temperature: float = _D["temperature"],
    top_p: float = _D["top_p"],
    seed: int = _D["seed"],
    compare: bool = True,
    capture_mode: str = eng.DEFAULT_CAPTURE_MODE,
    raw_prompt: bool = False,
    prompted: bool = False,
) -> dict:
    """Generate with steering vectors, and (by default) the unsteered baseline beside it.

    Args:
        prompt: the user message (sent through the model's chat template).
        vectors: steering vectors, each {"text", "coeff", "layer"}, a contrastive pair
            {"positive", "negative", "coeff", "layer"}, or a raw direction {"direction": [hidden-size
            numbers], "coeff", "layer"} (an absolute vector, e.g. from /import_vectors); optional
            "enabled" (default true), "positions" ("prompt", the default: added to the prompt's
            positions only, ActAdd-style; "all": to the prompt and every generated token, as
            llm-steer does, which needs about half the coefficient) and "decay" (per-step
            coefficient multiplier in (0, 1], with positions "all"). For
            text and pairs coeff is in units of the hidden state's RMS at the last token; a direction
            is added as given, times coeff. |coeff| <= 20; layer is 0 .. n_layers-1 of the loaded
            model. Several vectors at one layer add up, each scaled by the same unsteered state.
        max_new_tokens: tokens to generate, 1 to 512.
        temperature: 0 for greedy decoding, up to 2.
        top_p: nucleus sampling threshold in (0, 1].
        seed: random seed (0 to 2**31-1); each batch row samples with its own generator.
        compare: also generate the unsteered baseline, in the same batch.
        capture_mode: how a text becomes a vector: "contexts" (default: the text read inside a
            few short sentences, minus the same sentences around neutral words), "bos-neutral"
            (after a start token, minus the mean of neutral sentences), "bos" (after a start
            token), or "stock" (llm-steer's own capture; comparison only, it does not carry the
            text's meaning).
        raw_prompt: send the prompt as it is, without the model's chat template.
        prompted: also generate a third row, unsteered, whose prompt is the prompt followed by an
            instruction to bring in the steering text ("In your answer, talk about {text}."; a pair:
            talk about the positive and not the negative; a negative coefficient: do not talk
            about it), in the same batch with the same seed and decoding: the prompting baseline
            steering has to beat. Needs compare, and at least one enabled text or pair vector with
            a non-zero coefficient (a raw direction has no words to prompt with). Adding the row
            changes neither steered nor baseline.

    Returns:
        {"steered", "baseline" (None without compare), "prompted" (None without prompted),
        "instruction" (the prompted row's added instruction, or None), "model", "quant", "device",
        "layers", "tokens" (new tokens per row: [steered, baseline(, prompted)]), "scores" (with
        compare: {"steered", "baseline"(, "prompted")}, each {"concept", "instruction",
        "perplexity", "repetition", "fluent", "bins": {"concept", "instruction", "fluency"} (0, 1
        or 2 each), "aggregate"}; None without compare), "fallback" (None, or the downgrade
        event when this request ran out of memory)}. concept: how much more likely the unsteered
        model finds the steering text after the row's output than after the baseline's (nats per
        token; toward a negative coefficient's text counts as away; 0 for the baseline);
        instruction: how much more likely the output is after the prompt than after a neutral
        prompt (nats per token: does it still answer the prompt); aggregate: the harmonic mean
        of the three bins, 0 when any is 0 (docs/quality.md).
    """
    stream = steer_stream(
        prompt, vectors, max_new_tokens, temperature, top_p, seed, compare,
        capture_mode=capture_mode, raw_prompt=raw_prompt, prompted=prompted,
    )  # fmt: skip
    result = collections.deque(stream, maxlen=1)[0]
    result.pop("done", None)
    return result


def sweep_stream(
    prompt: str,
    text: str,
    layer: int,
    coeffs: list[float],
    max_new_tokens: int = _D["sweep_max_new_tokens"],
    seed: int = _D["seed"],
    positions: str = eng.DEFAULT_POSITIONS,
    prompted: bool = False,
    *,
    stop: Event | None = None,
) -> Iterator[dict]:
    """Streaming form of `sweep` (the UI's): yields {"rows": [{"coeff", "text"}], "tokens": the
    longest row's new tokens so far, "done": False, ...} as the rows' tokens arrive, then the
    scored result with "done": True. When `stop` is set the generation ends and the last update
    carries the texts so far, unscored, with "stopped"."""
    prompt = generate.check_prompt(prompt)
    sampling = generate.check_sampling(max_new_tokens, 0.0, 1.0, seed, tokens_limit="sweep_max_new_tokens")
    layer = limits.check_layer(layer, "layer", _known_layers())
    generate.sweep_rows(text, layer, coeffs, positions)  # validate text, coefficients and positions first
    prompted = limits.check_bool(prompted, "prompted")
    instruction = generate.prompt_instruction([eng.VectorSpec(layer=0, coeff=1.0, text=text)]) if prompted else None
    stop = lifecycle.stop_flag(stop)

    def work(attempt: Attempt) -> Iterator[dict]:
        rows = generate.sweep_rows(text, attempt.layer(layer), coeffs, positions)
        n = len(rows)
        engine = eng.engine_for(attempt.loaded)
        base = {
            "model": attempt.loaded.model_id, "layer": attempt.layer(layer), "positions": positions,
            "recommended": None,
        }  # fmt: skip
        batch = rows + [[]] * prompted  # the prompted reference row last, unsteered, its own prompt
        row_ids = generate.compare_row_ids(engine.tokenizer, prompt, instruction, len(batch))
        final = None
        for final in generate.generate_rows(
            engine, prompt, batch, sampling, one_row=attempt.one_row, stop=stop, row_ids=row_ids
        ):
            texts = [{"coeff": float(row[0][1]), "text": out} for row, out in zip(rows, final.texts)]
            reference = {"text": final.texts[n], "instruction": instruction} if prompted else None
            if not final.done:
                tokens = max((len(ids) for ids in final.token_ids), default=0)
                yield {**base, "rows": texts, "prompted": reference, "tokens": tokens, "done": False}
        if stop.is_set():
            yield {**base, "rows": texts, "prompted": reference, "done": True, "stopped": True}
            return
        effects = generate.effect_scores(engine, rows, text, one_row=attempt.one_row)
        scored = _quality_columns(engine, prompt, rows, final.token_ids, text, sampling)
        out = [{**row, "effect": eff, **cols} for row, eff, cols in zip(texts, effects, scored)]
        if prompted:
            reference.update(scored[n])
        fluent = [r for r in out if r["fluent"] and r["relevance"] > 0]
        best = max(fluent, key=lambda r: r["relevance"]) if fluent else None
        recommended = None if best is None else best["coeff"]
        yield {**base, "rows": out, "prompted": reference, "recommended": recommended, "done": True}

    longest = prompt if instruction is None else generate.prompted_prompt(prompt, instruction)
    fits = _token_fits("sweep", prompt=longest, new_tokens=sampling.max_new_tokens, texts=[("text", text)])
    yield from _stream("sweep", [("layer", layer)], work, fits=fits)


def sweep(
    prompt: str,
    text: str,
    layer: int,
    coeffs: list[float],
    max_new_tokens: int = _D["sweep_max_new_tokens"],
    seed: int = _D["seed"],
    positions: str = eng.DEFAULT_POSITIONS,
    prompted: bool = False,
) -> dict:
    """Generate once per coefficient of one steering text, all as rows of one batch, with scores.

    Args:
        prompt: the user message.
        text: the steering text.
        layer: the layer to steer, 0 .. n_layers-1.
        coeffs: 1 to 8 coefficients, each |coeff| <= 20.
        max_new_tokens: tokens per row, 1 to 512.
        seed: random seed for the rows (greedy decoding is used, so it only matters for ties).
        positions: where the vector is added: "prompt" (the default; the prompt's positions only,
            ActAdd-style) or "all" (the prompt and every generated token, as llm-steer does).
        prompted: also generate a reference row, unsteered, whose prompt is the prompt followed by
            "In your answer, talk about {text}." (as /steer's prompted row), in the same batch, and
            score it like the rows: what asking achieves, to compare the sweep against.

    Returns:
        {"rows": [{"coeff", "text", "relevance", "perplexity", "repetition", "fluent", "effect"}],
        "recommended" (the coefficient of the most relevant fluent row, or None), "model", "layer",
        "positions", "prompted" (None without prompted, else {"text", "instruction", "relevance",
        "perplexity", "repetition", "fluent"}: the reference row, never recommended), "fallback"}.
        relevance: how much more likely the unsteered model finds the steering text after this
        output than after the baseline's (nats per token): the score to pick by.
        fluent: repetition (1 - distinct-2) <= 0.2, perplexity (under the unsteered model) <= 30
        and at least 8 tokens. effect: the steering text's log-prob after a neutral prompt, steered
        minus unsteered; it keeps rising where the output has degenerated, so do not pick by it.
    """
    stream = sweep_stream(prompt, text, layer, coeffs, max_new_tokens, seed, positions, prompted)
    result = collections.deque(stream, maxlen=1)[0]
    result.pop("done", None)
    return result


def _quality_columns(engine, prompt, rows, generations, text, sampling) -> list[dict]:
    """relevance, perplexity, repetition and fluent of each sweep row (steering/quality.py); the
    baseline is the coefficient-0 row when there is one, else a generation of its own. Generations
    past the rows (the prompted reference) are scored the same way, against the same baseline."""
    zero = [i for i, row in enumerate(rows) if row[0][1] == 0]
    if zero:
        baseline = generations[zero[0]]
    else:
        baseline = generate.run_rows(engine, prompt, [[]], sampling).token_ids[0]
    context = generate.prompt_ids(engine.tokenizer, prompt)
    relevance, ppl = quality.logprob_scores(engine, context, generations, baseline, text=text)
    columns = []
    for ids, rel, p in zip(generations, relevance, ppl):
        rep = quality.repetition(ids)
        fluent = quality.is_fluent(p, rep, len(ids), sampling.max_new_tokens)
        columns.append({"relevance": rel, "perplexity": p, "repetition": rep, "fluent": fluent})
    return columns


def similarity(texts: list, layer: int) -> dict:
    """Cosine similarity of the steering vectors of several texts at one layer.

    Args:
        texts: 2 to 8 items: a text, or a contrastive pair {"positive": text, "negative": text}
            (compared as its difference vector, the one that steers).
        layer: the layer to capture at, 0 .. n_layers-1.

    Returns:
        {"texts" (a pair labelled "positive − negative"), "layer", "matrix": list of lists of
        cosines in [-1, 1], "model", "fallback"}.
    """
    limits.check_count("similarity_texts", texts, "texts")
    items = [_similarity_item(item, f"texts[{i}]") for i, item in enumerate(texts)]
    layer = limits.check_layer(layer, "layer", _known_layers())
    labels = [item if isinstance(item, str) else f"{item[0]} − {item[1]}" for item in items]
    named = [(f"texts[{i}]", t) for i, item in enumerate(items) for t in ((item,) if isinstance(item, str) else item)]

    def work(attempt: Attempt) -> dict:
        mapped = attempt.layer(layer)
        matrix = eng.engine_for(attempt.loaded).similarity(items, mapped)
        return {"texts": labels, "layer": mapped, "matrix": matrix, "model": attempt.loaded.model_id}

    fits = _token_fits("sweep", texts=named)  # captures of up to 8 rows
    return _run("similarity", [("layer", layer)], work, fits=fits)


def _similarity_item(item, field: str) -> str | tuple[str, str]:
    """A text, or a pair {"positive", "negative"} as (positive, negative); else a field-named error."""
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"positive", "negative"}, key=str)
        if unknown:
            raise InputError(f"{field}.{unknown[0]}", "unknown key: a pair is {positive, negative}")
        return tuple(limits.check_text(item.get(k), f"{field}.{k}") for k in ("positive", "negative"))
    return limits.check_text(item, field)


def autotune(
    prompt: str,
    text: str = "",
    positive: str = "",
    negative: str = "",
    layers: list[int] | None = None,
    max_new_tokens: int = 40,
    seed: int = _D["seed"],
    positions: str = eng.DEFAULT_POSITIONS,
    prompted: bool = True,
    *,
    stop: Event | None = None,
) -> dict:
    """Search layers x coefficients for the setting that steers the output toward the text while
    it stays fluent (candidates as rows of batches of up to 8), then say whether it beat asking.

    Candidates: the middle layer x coefficients 0.75, 1.0, 1.25 with positions "prompt" (0.45,
    0.5, 0.55 with "all"), each a row of one greedy batch with the unsteered baseline, on the
    prompt and on four neutral probe prompts; the chosen setting is the one fluent and moved
    toward the text on the most of those five outputs, ties going to the coefficient nearest the
    default (measured on our labelled set and two validation sets: docs/quality.md).
    In-process callers (the UI's Stop) may pass the keyword `stop` (a threading.Event): the
    search ends within a decoding step and chooses among the rows it finished.

    Args:
        prompt: the user message the setting is tuned on.
        text: the steering text (or give positive and negative instead).
        positive: the text to steer toward, for a contrastive pair.
        negative: the text to steer away from, for a contrastive pair.
        layers: up to 4 layers to search, 0 .. n_layers-1; default: the middle layer.
        max_new_tokens: tokens per candidate, 1 to 512 (40 measures fluency well).
        seed: random seed (decoding is greedy; kept for the record and for searches that sample).
        positions: where the candidate vectors are added: "prompt" (the default; the prompt's
            positions only, ActAdd-style) or "all" (the prompt and every generated token, as
            llm-steer does). Give the chosen setting's vector the same positions.
        prompted: also score the chosen setting against prompting (the default): the prompt and
            each probe followed by /steer's prompted instruction ("In your answer, talk about
            {text}."; a pair: toward the positive, not the negative), unsteered, as one more
            batch; every row scored as /steer scores its rows. False skips that batch.

    Returns:
        {"layer", "coeff", "decay", "positions", "score", "rows": [{"layer", "coeff", "text",
        "relevance", "perplexity", "repetition", "fluent", "score"}], "reason", "model",
        "fallback"}. score: the chosen setting's mean relevance where it was good. decay: the
        per-token multiplier of the coefficient the candidates ran with (1.0: constant). rows:
        the greedy output of each candidate on the prompt. relevance: how much more likely the
        unsteered model finds the steering text after this output than after the baseline's
        (nats per token). fluent: repetition (1 - distinct-2) <= 0.2, perplexity <= 30 and at
        least 8 tokens. "reason" says why the chosen setting won (on how many of the five outputs).
        "versus_prompted" (None with prompted=False, when stopped or when nothing was chosen):
        {"instruction", "text" (the prompted row's output on the prompt), "steered", "prompted"
        (the mean aggregate score, 0-2, of the chosen setting's rows and of the prompted rows over
        the prompt and the four probes), "steered_wins", "prompted_wins", "ties" (per output, by
        aggregate), "outputs", "per_prompt": [{"prompt", "steered", "prompted"}], "verdict" (one
        sentence: which did better, by how much)}. aggregate: concept, instruction and fluency
        each binned 0/1/2, their harmonic mean, 0 when any is 0 (/steer's "scores").
        On the embedded model at the defaults it took 17-22 s on 2 idle CPU cores without the
        prompted comparison, which adds a fifth to a third (6-12 s on 19-44 s searches).
    """
    prompt = generate.check_prompt(prompt)
    prompted = limits.check_bool(prompted, "prompted")
    tokens = limits.check("max_new_tokens", max_new_tokens)
    seed = limits.check("seed", seed)
    pair = bool(positive or negative)
    if pair == bool(text):
        raise InputError("text", "give a steering text, or a positive and a negative text (not both)")
    named = [("positive", positive), ("negative", negative)] if pair else [("text", text)]
    for field, value in named:
        limits.check_text(value, field)
    if layers is not None:
        limits.check_count("autotune_layers", layers, "layers")
        layers = [limits.check_layer(v, f"layers[{i}]", _known_layers()) for i, v in enumerate(layers)]

    def work(attempt: Attempt) -> dict:
        engine = eng.engine_for(attempt.loaded)
        mapped = None if layers is None else sorted({attempt.layer(v) for v in layers})
        result = quality.autotune(
            engine, prompt, text=text, positive=positive, negative=negative, layers=mapped,
            max_new_tokens=tokens, seed=seed, stop=lifecycle.stop_flag(stop), positions=positions,
            prompted=prompted,
        )  # fmt: skip
        # The API's rows keep the fields: every candidate ran with the result's decay.
        rows = [{k: v for k, v in row.items() if k != "decay"} for row in result["rows"]]
        return {**result, "rows": rows, "model": attempt.loaded.model_id}

    checks = [(f"layers[{i}]", v) for i, v in enumerate(layers or [])]
    read = [(field, value, layer) for field, value in named for layer in (layers or [None])]  # per searched layer
    longest = prompt
    if prompted:  # the prompted row's prompt is the longest the search runs
        words = eng.VectorSpec(layer=0, coeff=1.0, text=text, positive=positive, negative=negative)
        longest = generate.prompted_prompt(prompt, generate.prompt_instruction([words]))
    fits = _token_fits("sweep", prompt=longest, new_tokens=tokens, texts=read)
    return _run("autotune", checks, work, fits=fits)


def export_vectors(vectors: list[dict], format: str = "gguf", capture_mode: str = eng.DEFAULT_CAPTURE_MODE) -> dict:
    """Write vectors as a llama.cpp control vector (GGUF) or safetensors file.

    Returns {"path", "format", "tensors": {name: size}, "model", "fallback"}; the endpoint sends
    the file itself. See `steering/vector_io.py` for the layer numbering and the RMS conversion.
    """
    specs = _parse_vectors(vectors)
    capture_mode = _check_capture_mode(capture_mode)
    if format not in vector_io.FORMATS:
        raise InputError("format", f"must be one of {', '.join(vector_io.FORMATS)}; got {limits.shorten(format)}")

    def work(attempt: Attempt) -> dict:
        mapped = [replace(s, layer=attempt.layer(s.layer)) for s in specs]
        engine = eng.engine_for(attempt.loaded)
        path = vector_io.export_file(engine, mapped, format, mode=capture_mode, model_id=attempt.loaded.model_id)
        tensors, _ = vector_io.read_file(path)
        return {
            "path": str(path),
            "format": format,
            "tensors": {name: int(v.size) for name, v in tensors.items()},
            "model": attempt.loaded.model_id,
        }

    layers, sizes = _vector_checks(specs)
    return _run("export", layers, work, sizes, _token_fits("sweep", texts=_texts(specs)))


def import_vectors(path: str) -> dict:
    """Read a control vector file (GGUF or safetensors) into request vectors for the loaded model.

    Returns {"vectors": [...], "metadata": {...}, "model"}: a file written by /export_vectors
    gives back its original relative vectors; a foreign control vector gives one raw
    {"direction", "coeff": 1, "layer": N+1, "positions": "all"} per direction.N tensor (llama.cpp
    adds control vectors at every position).
    """
    tensors, metadata = vector_io.read_file(path)

    def work(attempt: Attempt) -> dict:
        loaded = attempt.loaded
        vectors, info = vector_io.vectors_from_file(
            tensors, metadata, n_layers=loaded.n_layers, hidden_size=loaded.spec.hidden_size
        )
        if info["model_id"] and info["model_id"] != loaded.model_id:
            info["warning"] = f"written for {info['model_id']}; {loaded.model_id} is loaded"
        return {"vectors": vectors, "metadata": info, "model": loaded.model_id}

    return _run("import", [], work)


def load_model(model: str, quant: str = "auto", force: bool = False, allow_offload: bool = False) -> dict:
    """Load a model (the previous one is freed first) and return the status.

    Args:
        model: a catalog id (see /plan), a Hugging Face id already in the local cache, a model
            folder under the server's --models-dir, or "SmolLM2-135M-Instruct" (the embedded
            offline model). At most 256 characters.
        quant: auto, 4bit, 8bit, bf16, fp16 or fp32. auto picks the most precise that fits.
        force: load even when the memory plan says it will not fit stably.
        allow_offload: load an "offload" model with part of its layers in RAM (much slower).
            The plan row's offload.expected_tokens_per_s estimates how slow; without this flag
            such a model is replaced by the fallback. A split across several GPUs needs no flag.

    Returns:
        the same object as /status; when the model was replaced by the fallback, the newest
        entry of "events" says what was asked, what was loaded and why.
    """
    if not isinstance(model, str):
        raise InputError("model", f"must be a text (a model id or folder); got {limits.shorten(model)}")
    if len(model) > MAX_MODEL_ID_CHARS:
        raise InputError("model", f"is {len(model)} characters; model ids and folders are at most {MAX_MODEL_ID_CHARS}")
    if any(ord(c) < 32 or ord(c) == 127 for c in model):
        raise InputError("model", "contains a control character (such as a null byte); give a model id or folder name")
    limits.check_unicode(model, "model")
    force, allow_offload = limits.check_bool(force, "force"), limits.check_bool(allow_offload, "allow_offload")
    return get_manager().load(model, quant, force, allow_offload=allow_offload)


def status() -> dict:
    """What is loaded and how memory stands (a reading: it never loads or waits for the model).

    Returns:
        {"model", "quant", "device" (None before a model is loaded), "n_layers", "default_layer"
        (the middle layer), "fit" ({"compare_max_tokens", "sweep_max_tokens", "max_positions",
        "basis"}: the token limits fitted to memory), "placement" (how layers are split across GPUs
        and CPU RAM, or None), "memory" ({"device": the card's or the CPU's reading (mode, name,
        total_bytes, used_bytes, free_bytes, processes, ...), "process_rss_bytes", "model_bytes", and
        on CUDA "cuda_allocated_bytes", "cuda_reserved_bytes"}),
        "locked" (true when the server was started with --lock-model: /load_model is refused),
        "fallback_model", "events" (the recent downgrade events, newest last: what was asked, what
        was loaded and why), "event_count"}.
    """
    return get_manager().status()


def plan(context: int = _D["context"]) -> dict:
    """The memory plan of this machine: need and verdict of every model and quantization.

    Args:
        context: context length in tokens to plan for, 128 to 32768.

    Returns:
        the same object as `python -m steering plan --json`: device, gpus, headroom_bytes, models,
        choice (with this server's fallback model). Each model row has its verdict (stable,
        fragile, offload or wont_fit), devices [{device, layers, bytes}] and, for offload, the
        split {gpu_layers, cpu_layers, gpu_bytes, cpu_bytes, expected_tokens_per_s}.
    """
    return get_manager().plan(limits.check("context", context))
