"""The typed functions behind every UI event and client API endpoint.

Each public function validates its input, runs the model work through the one model manager
(which serialises it and recovers from out-of-memory by loading the fallback), and returns plain
JSON-ready values. Domain errors from the core become `gr.Error` here, so a browser user and a
`gradio_client` caller read the same sentence, naming the field and the allowed range.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator

import gradio as gr

from steering import engine as eng
from steering import estimate, generate, gpu
from steering.errors import InputError, SteeringError
from steering.loader import LoadedModel, get_manager, map_layer

logger = logging.getLogger(__name__)


def _user_errors(fn: Callable) -> Callable:
    """Translate domain errors into `gr.Error` and log one line per request (no prompts)."""

    def report(exc: Exception):
        logger.info("%s refused: %s", fn.__name__, exc)
        return gr.Error(str(exc), print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                yield from fn(*args, **kwargs)
            except SteeringError as exc:
                raise report(exc) from None
            finally:
                logger.info("request %s %.2f s", fn.__name__, time.perf_counter() - started)

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except SteeringError as exc:
            raise report(exc) from None
        finally:
            logger.info("request %s %.2f s", fn.__name__, time.perf_counter() - started)

    return wrapper


def _parse_vectors(vectors, n_layers: int) -> list[eng.VectorSpec]:
    if not isinstance(vectors, list):
        raise InputError("vectors", "must be a list of vector objects")
    if len(vectors) > eng.MAX_VECTORS:
        raise InputError("vectors", f"at most {eng.MAX_VECTORS} vectors per request; got {len(vectors)}")
    return [eng.parse_vector(raw, i, n_layers) for i, raw in enumerate(vectors)]


def _remap(specs: list[eng.VectorSpec], from_layers: int, loaded: LoadedModel) -> list[eng.VectorSpec]:
    """Vectors validated against one model, moved by relative depth onto the model that answers."""
    if loaded.n_layers == from_layers:
        return specs
    from dataclasses import replace

    return [replace(s, layer=map_layer(s.layer, from_layers, loaded.n_layers)) for s in specs]


def _last_event_since(count: int) -> dict | None:
    """The newest downgrade event if one was recorded after `event_count` was `count`."""
    manager = get_manager()
    return manager.events[-1] if manager.event_count > count else None


def _current_layers() -> int:
    manager = get_manager()
    with manager.session() as loaded:
        return loaded.n_layers


@_user_errors
def steer_stream(
    prompt: str,
    vectors: list[dict],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    compare: bool = True,
    *,
    stop: threading.Event | None = None,
    capture_mode: str = eng.DEFAULT_CAPTURE_MODE,
    raw_prompt: bool = False,
) -> Iterator[dict]:
    """Streaming form of `steer`: yields the result dict with the texts so far, then the final one."""
    prompt = generate.check_prompt(prompt)
    sampling = generate.check_sampling(max_new_tokens, temperature, top_p, seed)
    manager = get_manager()
    n_layers = _current_layers()
    specs = _parse_vectors(vectors, n_layers)
    events_before = manager.event_count

    def work(loaded: LoadedModel) -> Iterator[dict]:
        mapped = _remap(specs, n_layers, loaded)
        rows = generate.compare_rows(mapped, compare)
        base = {
            "model": loaded.model_id,
            "quant": loaded.quant,
            "device": loaded.device,
            "layers": sorted({s.layer for s in mapped if s.enabled}),
            "fallback": None,
            "done": False,
        }
        for update in generate.stream_rows(
            eng.engine_for(loaded),
            prompt,
            rows,
            sampling,
            stop=stop,
            raw_prompt=raw_prompt,
            capture_mode=capture_mode,
        ):
            yield {
                **base,
                "steered": update.texts[0],
                "baseline": update.texts[1] if compare else None,
                "done": update.done,
            }

    for result in manager.stream(work, what="generation"):
        result["fallback"] = _last_event_since(events_before)
        yield result


@_user_errors
def steer(
    prompt: str,
    vectors: list[dict],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    compare: bool = True,
) -> dict:
    """Generate with steering vectors, and (by default) the unsteered baseline beside it.

    Args:
        prompt: the user message (sent through the model's chat template).
        vectors: steering vectors, each {"text", "coeff", "layer"} or a contrastive pair
            {"positive", "negative", "coeff", "layer"}; optional "enabled" (default true) and
            "decay" (per-step coefficient multiplier in (0, 1]). coeff is in units of the hidden
            state's RMS at the last token, |coeff| <= 20; layer is 0 .. n_layers-1 of the loaded model.
        max_new_tokens: tokens to generate, 1 to 512.
        temperature: 0 for greedy decoding, up to 2.
        top_p: nucleus sampling threshold in (0, 1].
        seed: random seed (0 to 2**31-1); each batch row samples with its own generator.
        compare: also generate the unsteered baseline, in the same batch.

    Returns:
        {"steered", "baseline" (None without compare), "model", "quant", "device", "layers",
        "fallback" (None, or the downgrade event when the model ran out of memory)}.
    """
    # The undecorated generator: this function's own wrapper already logs and translates errors.
    result = collections.deque(
        steer_stream.__wrapped__(prompt, vectors, max_new_tokens, temperature, top_p, seed, compare), maxlen=1
    )[0]
    result.pop("done", None)
    return result


@_user_errors
def sweep(
    prompt: str,
    text: str,
    layer: int,
    coeffs: list[float],
    max_new_tokens: int = 48,
    seed: int = 0,
) -> dict:
    """Generate once per coefficient of one steering text, all as rows of one batch, with scores.

    Args:
        prompt: the user message.
        text: the steering text.
        layer: the layer to steer, 0 .. n_layers-1.
        coeffs: 1 to 8 coefficients, each |coeff| <= 20.
        max_new_tokens: tokens per row, 1 to 512.
        seed: random seed for the rows (greedy decoding is used, so it only matters for ties).

    Returns:
        {"rows": [{"coeff", "text", "effect", "perplexity"}], "model", "layer"}. effect: mean
        per-token log-prob of the steering text after a neutral prompt, steered minus unsteered
        (higher = the model leans towards the text). perplexity: of the generated text under the
        unsteered model (lower = more fluent).
    """
    prompt = generate.check_prompt(prompt)
    sampling = generate.check_sampling(max_new_tokens, 0.0, 1.0, seed)
    if not isinstance(coeffs, list):
        raise InputError("coeffs", f"must be a list of 1 to {generate.MAX_SWEEP_ROWS} numbers")
    n_layers = _current_layers()
    layer = eng.check_layer(layer, "layer", n_layers)
    generate.sweep_rows(text, layer, coeffs)  # validate text and coefficients before queueing for the model
    manager = get_manager()
    events_before = manager.event_count

    def work(loaded: LoadedModel) -> dict:
        mapped_layer = map_layer(layer, n_layers, loaded.n_layers)
        mapped_rows = generate.sweep_rows(text, mapped_layer, coeffs)
        engine = eng.engine_for(loaded)
        final = generate.run_rows(engine, prompt, mapped_rows, sampling)
        effects = generate.effect_scores(engine, mapped_rows, text)
        ppl = generate.perplexities(engine, prompt, final.token_ids)
        return {
            "rows": [
                {"coeff": float(row[0][1]), "text": out, "effect": eff, "perplexity": p}
                for row, out, eff, p in zip(mapped_rows, final.texts, effects, ppl)
            ],
            "model": loaded.model_id,
            "layer": mapped_layer,
        }

    result = manager.run(work, what="sweep")
    result["fallback"] = _last_event_since(events_before)
    return result


@_user_errors
def similarity(texts: list[str], layer: int) -> dict:
    """Cosine similarity of the steering vectors of several texts at one layer.

    Args:
        texts: 2 to 8 texts.
        layer: the layer to capture at, 0 .. n_layers-1.

    Returns:
        {"texts", "layer", "matrix": list of lists of cosines in [-1, 1]}.
    """
    if not isinstance(texts, list) or not 2 <= len(texts) <= eng.MAX_VECTORS:
        raise InputError("texts", f"give 2 to {eng.MAX_VECTORS} texts")
    texts = [eng.check_text(t, f"texts[{i}]") for i, t in enumerate(texts)]
    n_layers = _current_layers()
    layer = eng.check_layer(layer, "layer", n_layers)

    def work(loaded: LoadedModel) -> dict:
        mapped = map_layer(layer, n_layers, loaded.n_layers)
        return {"texts": texts, "layer": mapped, "matrix": eng.engine_for(loaded).similarity(texts, mapped)}

    return get_manager().run(work, what="similarity")


@_user_errors
def load_model(model: str, quant: str = "auto", force: bool = False) -> dict:
    """Load a model (the previous one is freed first) and return the status.

    Args:
        model: a catalog id (see /plan), a Hugging Face id already in the local cache, a local
            folder, or "SmolLM2-135M-Instruct" (the embedded offline model).
        quant: auto, 4bit, 8bit, bf16, fp16 or fp32. auto picks the most precise that fits.
        force: load even when the memory plan says it will not fit stably.

    Returns:
        the same object as /status; when the model was replaced by the fallback, the newest
        entry of "events" says what was asked, what was loaded and why.
    """
    return get_manager().load(model, quant, force)


@_user_errors
def status() -> dict:
    """What is loaded and how memory stands.

    Returns:
        {"model", "quant", "device", "n_layers", "default_layer", "memory", "events", ...}.
    """
    manager = get_manager()
    if manager.current is None:
        manager.load_default()
    return manager.status()


@_user_errors
def plan(context: int = 2048) -> dict:
    """The memory plan of this machine: need and verdict of every model and quantization.

    Args:
        context: context length in tokens to plan for, 128 to 32768.

    Returns:
        the same object as `python -m steering plan --json`: device, headroom_bytes, models, choice.
    """
    number = eng.check_finite(context, "context")
    if not number.is_integer() or not 128 <= number <= 32768:
        raise InputError("context", f"must be an integer from 128 to 32768; got {context!r}")
    context = int(number)
    manager = get_manager()
    reading = gpu.probe(manager.cuda_index, vram_limit_bytes=manager.vram_limit_bytes)
    return estimate.plan(reading, context_tokens=context, margin_bytes=manager.margin_bytes)
