"""The Steer tab's handlers (the vector form, the table, Generate and Stop) and how every UI
handler shows a refusal.

A refused request never raises out of a UI handler: Gradio would cover the handler's outputs
(the table, the model dropdown, a slider) with "Error" badges and blank them. Instead the
handler shows a notice (a toast) and writes the sentence into the message line beside the
field; every other output is left as it was (`gr.skip()`), so previous results stay.

Generate is a chain: `begin_run` (instant, no queue: adds a typed-but-unadded vector, disables
Generate, enables Stop) -> `gate` -> `generate_outputs` (the model queue) -> `end_run`. Stop sets
this session's stop flag (a run in its prefill ends within one layer) and cancels the event (a
run still queued never starts), and writes "stopped after N tokens".
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from dataclasses import dataclass, field

import gradio as gr

from steering import api, history, limits, views
from steering.errors import SteeringError
from steering.loader import get_manager

logger = logging.getLogger(__name__)


# -- refusals: a notice and an inline message, nothing blanked ----------------------------------
def inline(message: str) -> str:
    """The message line's text for a refusal ("" clears it)."""
    return f"⚠️ {message}" if message else ""


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, gr.Error) else str(exc)


def refused(message: str, n_outputs: int, at: int) -> tuple:
    """A toast with `message`, the inline message at output `at`, every other output unchanged."""
    gr.Warning(message)
    outputs = [gr.skip()] * n_outputs
    outputs[at] = inline(message)
    return tuple(outputs)


def notices(n_outputs: int, at: int):
    """Decorate a UI handler with `n_outputs` outputs: a refusal (a `SteeringError` or a
    `gr.Error` it raises) becomes `refused(...)` with the message at output `at`."""

    def decorate(fn):
        def refuse(exc: Exception) -> tuple:
            logger.info("%s refused: %s", fn.__name__, _message(exc))
            return refused(_message(exc), n_outputs, at)

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def stream(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except (SteeringError, gr.Error) as exc:
                    yield refuse(exc)

            return stream

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (SteeringError, gr.Error) as exc:
                return refuse(exc)

        return call

    return decorate


def session_of(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None) if request is not None else None


def n_layers_now() -> int | None:
    """The loaded model's depth (no lock: a snapshot; the API checks again under the lock)."""
    loaded = get_manager().current
    return loaded.n_layers if loaded is not None else None


def loaded_quant() -> str | None:
    """The loaded model's quantization (for results that do not carry it)."""
    loaded = get_manager().current
    return loaded.quant if loaded is not None else None


# -- the vectors table ---------------------------------------------------------------------------
def bounded_rows(rows) -> list[list]:
    """Every row of the table (blank ones too); a table longer than any request is refused at
    once (these handlers can be called by name with any payload)."""
    rows = rows or []
    if not isinstance(rows, list) or len(rows) > 2 * limits.MAX_VECTORS:
        raise gr.Error(f"vectors: the table holds too many rows; at most {limits.MAX_VECTORS} vectors")
    return [list(r) for r in rows if isinstance(r, (list, tuple))]


def _kept(rows) -> list[list]:
    """The rows that hold a vector."""
    return [r for r in bounded_rows(rows) if views.rows_to_vectors([r], 0)]


def _form_row(rows, text, positive, negative, coeff, layer) -> list[list] | None:
    """The table with the form's vector appended (None when the form is empty)."""
    vector = views.form_vector(text, positive, negative, coeff, layer, n_layers_now())
    if vector is None:
        return None
    kept = _kept(rows)
    if len(kept) >= limits.MAX_VECTORS:
        raise gr.Error(f"vectors: at most {limits.MAX_VECTORS} vectors")
    return kept + [views.vector_row(vector)]


@notices(5, at=4)
def add_vector_row(rows: list, text: str, positive: str, negative: str, coeff: float, layer: int) -> tuple:
    """Append the form's vector to the table and clear the form's texts; outputs
    (table, text, positive, negative, message)."""
    table = _form_row(rows, text, positive, negative, coeff, layer)
    if table is None:
        raise gr.Error("text: type a steering text (or a positive and a negative text) first")
    return table, "", "", "", ""


@notices(2, at=1)
def remove_vector_row(rows: list, row_number: float | None) -> tuple:
    """Remove row `row_number` (1-based); 0 or empty removes the last row. Outputs (table, message)."""
    kept = _kept(rows)
    if not kept:
        return [], ""
    number = 0 if row_number in (None, "") else limits.check_finite(row_number, "row")
    index = len(kept) - 1 if not number else int(number) - 1
    if not 0 <= index < len(kept) or number != int(number):
        raise gr.Error(f"row: give a row number from 1 to {len(kept)} (0 removes the last)")
    del kept[index]
    return kept, ""


def clear_vector_rows() -> tuple:
    """Empty the vectors table (and its message line)."""
    return [], ""


@notices(2, at=1)
def check_table(rows: list, layer: int, message: str = "") -> tuple:
    """After the table changes: new rows get working defaults, bad cells are reset and said so
    (rows counted from 1). Outputs (table or unchanged, message line); the message line is only
    cleared when it showed the table's own earlier problems (other messages stay)."""
    rows = bounded_rows(rows)
    fixed, problems = views.normalize_rows(rows, limits.check_layer(layer, "layer", None), n_layers_now())
    table = fixed if fixed != rows else gr.skip()
    if problems:
        gr.Warning("; ".join(problems))
        return table, inline("; ".join(problems))
    was_ours = isinstance(message, str) and message.startswith(inline("row "))
    return table, "" if was_ours else gr.skip()


# -- Generate and Stop ---------------------------------------------------------------------------
@dataclass
class _Run:
    """A session's generation in progress: what Stop needs."""

    stop: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None  # the newest update


_runs: dict[str | None, _Run] = {}
_runs_lock = threading.Lock()


def begin_run(rows, text, positive, negative, coeff, layer) -> tuple:
    """Before a run: a vector typed into the form but not added is added now (and said so), then
    Generate is disabled and Stop enabled. Outputs (table, text, positive, negative, message,
    generate button, stop button, run line, go): `go` False leaves everything and skips the run."""
    try:
        table = _form_row(rows, text, positive, negative, coeff, layer)
    except (SteeringError, gr.Error) as exc:
        return refused(_message(exc), 9, at=4)[:8] + (False,)
    busy = (gr.Button(interactive=False), gr.Button(interactive=True), "Waiting for the model…")
    if table is None:
        return (gr.skip(),) * 4 + ("", *busy, True)
    added = table[-1]
    note = f"Added the typed vector to the table (row {len(table)}, coefficient {added[3]:g}, layer {added[4]})."
    gr.Info(note)
    return (table, "", "", "", note, *busy, True)


def begin_search() -> tuple:
    """Before a slower action (auto-tune): its button disabled, its Stop shown, the message cleared."""
    return gr.Button(interactive=False), gr.Button(visible=True, interactive=True), ""


def end_search() -> tuple:
    """After it: its button enabled again, its Stop hidden."""
    return gr.Button(interactive=True), gr.Button(visible=False)


def gate(go: bool) -> None:
    """Ends the Generate chain quietly when `begin_run` refused (no toast: it showed one)."""
    if go is not True:
        raise gr.Error("not started", visible=False, print_exception=False)


def end_run() -> tuple:
    """Generate enabled again, Stop disabled."""
    return gr.Button(interactive=True), gr.Button(interactive=False)


@notices(3, at=2)
def generate_outputs(
    prompt,
    rows,
    layer,
    max_new_tokens,
    temperature,
    top_p,
    seed,
    capture_mode,
    raw_prompt,
    directions=None,
    request: gr.Request = None,
):
    """Stream steered and baseline text side by side (both rows of one batch); outputs
    (steered, baseline, run line). Stop (or a closed page) sets the stop flag: generation ends
    within one decoding step, or one layer of the prefill, and the model lock is released."""
    session = session_of(request)
    run = _Run()
    with _runs_lock:
        _runs[session] = run
    rows = bounded_rows(rows)
    vectors = views.rows_to_vectors(rows, int(layer), directions)
    arguments = dict(
        prompt=prompt, vectors=vectors, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, capture_mode=capture_mode, raw_prompt=bool(raw_prompt),
    )  # fmt: skip
    started = time.perf_counter()
    stream = api.steer_stream(stop=run.stop, compare=True, **arguments)
    try:
        for run.result in _people_errors(stream, views.table_row_numbers(rows)):
            line = views.run_line(run.result, elapsed_s=0, seed=seed, running=not run.result["done"])
            if run.result["done"]:
                stopped = run.stop.is_set()
                line = views.run_line(run.result, elapsed_s=time.perf_counter() - started, seed=seed, stopped=stopped)
            notice = views.fallback_notice(run.result.get("fallback"))
            yield run.result["steered"], run.result["baseline"], line + (f"  \n{notice}" if notice else "")
    finally:
        stopped = not (run.result or {}).get("done") or run.stop.is_set()
        run.stop.set()
        stream.close()
        with _runs_lock:
            if _runs.get(session) is run:
                del _runs[session]
        if run.result is not None:
            context = {"stopped": True} if stopped else None
            history.record(session, "steer", arguments, run.result, context=context)


def _people_errors(stream, row_numbers):
    """`stream` with its refusals counted the way the table counts rows (from 1)."""
    try:
        yield from stream
    except SteeringError as exc:
        raise gr.Error(views.for_people(str(exc), row_numbers)) from None


def stop_run(request: gr.Request = None) -> tuple:
    """Stop this session's run, wherever it is; outputs (run line, generate button, stop button)."""
    with _runs_lock:
        run = _runs.get(session_of(request))
    line = None
    if run is not None:
        run.stop.set()
        result = run.result
        line = views.run_line(result, elapsed_s=0, seed=0, stopped=True) if result else None
    return line or "Stopped before the model started: stopped after 0 tokens", *end_run()
