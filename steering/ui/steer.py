"""The Steer tab's handlers (the vector form, the table, Generate and Stop) and how every UI
handler shows a refusal.

A refused request never raises out of a UI handler: Gradio would cover the handler's outputs
(the table, the model dropdown, a slider) with "Error" badges and blank them. Instead the
handler shows a notice (a toast) and writes the sentence into the message line beside the
field; every other output is left as it was (`gr.skip()`), so previous results stay.

Generate is a chain: `begin_run` (instant, no queue: adds a typed-but-unadded vector, disables
Generate, enables Stop) -> `gate` -> `generate_outputs` (the model queue) -> `end_run`. Stop sets
this run's stop flag (a run in its prefill ends within one layer, a run still queued ends as
soon as it starts, without the model) and writes "stopped after N tokens".
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
import uuid
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
class Run:
    """A run from its button click on: the flag Stop sets, and its newest update."""

    session: str | None
    stop: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None


class Runs:
    """The runs begun in each session, by id. A run is registered when its button is clicked,
    before it waits in the queue, so Stop reaches it wherever it is: a queued run whose flag is
    set starts and ends at once without touching the model, a running one ends within a layer.
    (Stop does not use Gradio's `cancels`: cancelling a generator as it finishes by itself could
    leave the model's queue slot taken, and every later run waiting; measured in a browser.)"""

    MAX = 256  # runs whose handler never came (a page closed while queued) are dropped oldest first

    def __init__(self) -> None:
        self._runs: dict[str, Run] = {}
        self._latest: dict[str | None, str] = {}
        self._lock = threading.Lock()

    def begin(self, session: str | None) -> str:
        run_id = uuid.uuid4().hex
        with self._lock:
            self._runs[run_id] = Run(session)
            self._latest[session] = run_id
            while len(self._runs) > self.MAX:
                self._runs.pop(next(iter(self._runs)))
        return run_id

    def get(self, run_id: str | None, session: str | None) -> Run:
        """The run `run_id` (a new one, for callers by name that did not begin one)."""
        with self._lock:
            run = self._runs.get(run_id) if run_id else None
        return run if run is not None else self._runs[self.begin(session)]

    def latest(self, session: str | None) -> Run | None:
        with self._lock:
            return self._runs.get(self._latest.get(session, ""))

    def is_latest(self, run_id: str | None, session: str | None) -> bool:
        """Whether no newer run was begun in the session (a stopped run that ends after the next
        one was begun must not re-enable its button or overwrite its line)."""
        with self._lock:
            return not run_id or self._latest.get(session) == run_id

    def end(self, run: Run) -> None:
        with self._lock:
            for run_id, known in list(self._runs.items()):
                if known is run:
                    del self._runs[run_id]


runs = Runs()


def with_buttons(stream_fn, registry: Runs, n_outputs: int):
    """`stream_fn`'s outputs plus (run button, stop button): when the run ends the run button is
    enabled and Stop disabled again, unless a newer run was begun meanwhile (its chain owns them).
    Gradio cannot end a chain with `.then()` here: a stopped run's `.then` would fire after the
    next run began."""

    signature = inspect.signature(stream_fn)

    @functools.wraps(stream_fn)
    def stream(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for outputs in stream_fn(*bound.args, **bound.kwargs):
            yield (*outputs, gr.skip(), gr.skip())
        run_id, request = bound.arguments.get("run_id"), bound.arguments.get("request")
        latest = registry.is_latest(run_id, session_of(request))
        yield (*([gr.skip()] * n_outputs), *(end_run() if latest else (gr.skip(), gr.skip())))

    stream.__signature__ = signature  # Gradio reads the inputs and gr.Request from it
    return stream


def begin_run(rows, text, positive, negative, coeff, layer, request: gr.Request = None) -> tuple:
    """Before a run: a vector typed into the form but not added is added now (and said so), then
    Generate is disabled and Stop enabled. Outputs (table, text, positive, negative, message,
    generate button, stop button, run line, run id): an empty run id (a refusal) leaves
    everything and skips the run."""
    try:
        table = _form_row(rows, text, positive, negative, coeff, layer)
    except (SteeringError, gr.Error) as exc:
        return refused(_message(exc), 9, at=4)[:8] + ("",)
    run_id = runs.begin(session_of(request))
    busy = (gr.Button(interactive=False), gr.Button(interactive=True), "Waiting for the model…")
    if table is None:
        return (gr.skip(),) * 4 + ("", *busy, run_id)
    added = table[-1]
    note = f"Added the typed vector to the table (row {len(table)}, coefficient {added[3]:g}, layer {added[4]})."
    gr.Info(note)
    return (table, "", "", "", note, *busy, run_id)


def begin_search(request: gr.Request = None) -> tuple:
    """Before an auto-tune: its button disabled, its Stop shown, the message cleared; outputs
    (buttons, message, run id)."""
    from steering.ui_sweep import tunes  # (ui_sweep imports this module)

    run_id = tunes.begin(session_of(request))
    return gr.Button(interactive=False), gr.Button(visible=True, interactive=True), "", run_id


def end_search() -> tuple:
    """After it: its button enabled again, its Stop hidden."""
    return gr.Button(interactive=True), gr.Button(visible=False)


def gate(run_id: str) -> None:
    """Ends the Generate chain quietly when `begin_run` refused (no toast: it showed one)."""
    if not run_id:
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
    run_id: str | None = None,
    request: gr.Request = None,
):
    """Stream steered and baseline text side by side (both rows of one batch); outputs
    (steered, baseline, run line). Stop (or a closed page) sets the stop flag: generation ends
    within one decoding step, or one layer of the prefill, and the model lock is released."""
    session = session_of(request)
    run = runs.get(run_id, session)
    if run.stop.is_set():  # stopped while it waited in the queue: Stop has said so already
        runs.end(run)
        yield gr.skip(), gr.skip(), gr.skip()
        return
    rows = bounded_rows(rows)
    vectors = views.rows_to_vectors(rows, int(layer), directions)
    arguments = dict(
        prompt=prompt, vectors=vectors, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed, capture_mode=capture_mode, raw_prompt=bool(raw_prompt),
    )  # fmt: skip
    started = time.perf_counter()
    stream = api.steer_stream(stop=run.stop, compare=True, **arguments)
    try:
        for run.result in people_errors(stream, views.table_row_numbers(rows)):
            stopped = run.stop.is_set()  # Stop has written "stopped after": no "generating…" after it
            line = views.run_line(run.result, elapsed_s=0, seed=seed, running=not (run.result["done"] or stopped))
            if run.result["done"] or stopped:
                line = views.run_line(run.result, elapsed_s=time.perf_counter() - started, seed=seed, stopped=stopped)
            notice = views.fallback_notice(run.result.get("fallback"))
            if not runs.is_latest(run_id, session):  # a newer run was begun: its line shows
                line, notice = gr.skip(), ""
            yield run.result["steered"], run.result["baseline"], line if not notice else line + f"  \n{notice}"
    finally:
        stopped = not (run.result or {}).get("done") or run.stop.is_set()
        run.stop.set()
        stream.close()
        runs.end(run)
        if run.result is not None:
            context = {"stopped": True} if stopped else None
            history.record(session, "steer", arguments, run.result, context=context)


def people_errors(stream, row_numbers):
    """`stream` with its refusals counted the way the table counts rows (from 1)."""
    try:
        yield from stream
    except SteeringError as exc:
        raise gr.Error(views.for_people(str(exc), row_numbers)) from None


def stop_run(request: gr.Request = None) -> tuple:
    """Stop this session's run, wherever it is; outputs (run line, generate button, stop button)."""
    run = runs.latest(session_of(request))
    line = None
    if run is not None:
        run.stop.set()
        result = run.result
        line = views.run_line(result, elapsed_s=0, seed=0, stopped=True) if result else None
    return line or "Stopped before the model started: stopped after 0 tokens", *end_run()


generate_run = with_buttons(generate_outputs, runs, 3)  # the Generate chain's step: outputs + the two buttons
