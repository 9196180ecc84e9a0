"""What every tab shares: the concurrency groups, how a refusal is shown, the run registry that
Stop reaches, the run/stop buttons' reset, and controls bound to a declared limit.

A refused request never raises out of a UI handler: Gradio would cover the handler's outputs
(the table, the model dropdown, a slider) with "Error" badges and blank them. Instead the
handler shows a notice (a toast) and writes the sentence into the message line beside the
field; every other output is left as it was (`gr.skip()`), so previous results stay.

Client endpoints (steering/ui/endpoints.py) are the other edge: there the core's
`SteeringError`s become `gr.Error`s (`user_errors`), and each request logs one line.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import gradio as gr

from steering import limits
from steering.errors import SteeringError
from steering.loader import get_manager
from steering.ui import views

logger = logging.getLogger(__name__)

# Concurrency: Gradio's limits are per handler, so every handler that runs the model shares the
# concurrency id "model" with limit 1 (the manager's lock is the backstop). Status and memory
# readings share "info" and never wait behind a generation.
MODEL = {"concurrency_id": "model", "concurrency_limit": 1}  # everything that runs the model
INFO = {"concurrency_id": "info", "concurrency_limit": 4}  # readings: never wait behind a generation
UI_ONLY = {"concurrency_limit": None, "api_visibility": "private"}  # table edits: no model, no waiting
PRIVATE = {"api_visibility": "private"}
PROMPT = "Tell me about your weekend."  # the prompt box's first text (the Steer tab's and the Sweep tab's)


# -- refusals: a notice and an inline message, nothing blanked ----------------------------------


def inline(message: str) -> str:
    """The message line's text for a refusal ("" clears it)."""
    return f"⚠️ {message}" if message else ""


def message_of(exc: Exception) -> str:
    return exc.message if isinstance(exc, gr.Error) else str(exc)


def refused(message: str, n_outputs: int, at: int) -> tuple:
    """A toast with `message` (plain: a toast shows no Markdown, so no raw backticks), the inline
    message at output `at`, every other output unchanged."""
    gr.Warning(message.replace("`", ""))
    outputs = [gr.skip()] * n_outputs
    outputs[at] = inline(message)
    return tuple(outputs)


def notices(n_outputs: int, at: int):
    """Decorate a UI handler with `n_outputs` outputs: a refusal (a `SteeringError` or a
    `gr.Error` it raises) becomes `refused(...)` with the message at output `at`."""

    def decorate(fn):
        def refuse(exc: Exception) -> tuple:
            logger.info("%s refused: %s", fn.__name__, message_of(exc))
            return refused(message_of(exc), n_outputs, at)

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


def people_errors(stream, row_numbers):
    """`stream` with its refusals counted the way the table counts rows (from 1)."""
    try:
        yield from stream
    except SteeringError as exc:
        raise gr.Error(views.for_people(str(exc), row_numbers)) from None


def user_errors(fn):
    """`fn` with the core's errors shown to the user and one log line per call (never a prompt)."""

    def refuse(exc: SteeringError) -> gr.Error:
        logger.info("%s refused: %s", fn.__name__, exc)
        return gr.Error(str(exc), print_exception=False)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args, **kwargs):
            started = time.perf_counter()
            try:
                yield from fn(*args, **kwargs)
            except SteeringError as exc:
                raise refuse(exc) from None
            finally:
                logger.info("request %s %.2f s", fn.__name__, time.perf_counter() - started)

        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except SteeringError as exc:
            raise refuse(exc) from None
        finally:
            logger.info("request %s %.2f s", fn.__name__, time.perf_counter() - started)

    return call


def named_upload(file_path, suffixes: tuple[str, ...], what: str) -> str:
    """For an upload handler: the file's name, and a refusal when it does not end
    in one of `suffixes` (the upload buttons take any file, so a wrong one reaches the handler and
    its message line says so, instead of Gradio's own toast leaving the line as it was)."""
    name = os.path.basename(str(file_path or "")) or "the file"
    if not name.lower().endswith(suffixes):
        raise gr.Error(f"{name}: {what} takes a {' or '.join(suffixes)} file")
    return name


def with_file_name(name: str, exc: Exception) -> gr.Error:
    """A refusal about the uploaded file `name`, which it names ("file: ..." becomes "NAME: ...";
    another field's message keeps its field and gets the name after it)."""
    message = message_of(exc)
    named = f"{name}: {message.removeprefix('file: ')}" if message.startswith("file: ") else f"{message} ({name})"
    return gr.Error(named, print_exception=False)


# -- the session and the loaded model, as handlers see them ----------------------------------------
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


def bounded_rows(rows) -> list[list]:
    """Every row of the vectors table (blank ones too); a table longer than any request is
    refused at once (these handlers can be called by name with any payload)."""
    rows = rows or []
    if not isinstance(rows, list) or len(rows) > 2 * limits.MAX_VECTORS:
        raise gr.Error(f"vectors: the table holds too many rows; at most {limits.MAX_VECTORS} vectors")
    return [list(r) for r in rows if isinstance(r, (list, tuple))]


# -- runs: what Stop reaches ----------------------------------------------------------------------
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
            self._latest.pop(session, None)  # re-inserted last: the dict is oldest session first
            self._latest[session] = run_id
            while len(self._runs) > self.MAX:
                self._runs.pop(next(iter(self._runs)))
            while len(self._latest) > self.MAX:  # sessions that never came back
                self._latest.pop(next(iter(self._latest)))
        return run_id

    def get(self, run_id: str | None, session: str | None) -> Run:
        """The run `run_id` (a new one, for callers by name that did not begin one)."""
        with self._lock:
            run = self._runs.get(run_id) if run_id else None
        return run if run is not None else self._runs[self.begin(session)]

    def start(self, run_id: str | None, session: str | None) -> Run | None:
        """The run, as its handler starts it; None (and the run forgotten) when Stop reached it
        while it waited in the queue: the handler then ends without the model, and Stop has
        already said so."""
        run = self.get(run_id, session)
        if run.stop.is_set():
            self.end(run)
            return None
        return run

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

    def clear(self) -> None:
        """Forget every run (tests reset the registries between cases)."""
        with self._lock:
            self._runs.clear()
            self._latest.clear()


REGISTRIES: list[Runs] = []  # every tab's registry, for `reset_runs`


def registry() -> Runs:
    """A new run registry, known to `reset_runs`."""
    REGISTRIES.append(Runs())
    return REGISTRIES[-1]


def reset_runs() -> None:
    for runs in REGISTRIES:
        runs.clear()


def end_run() -> tuple:
    """The run button enabled again, Stop disabled."""
    return gr.Button(interactive=True), gr.Button(interactive=False)


def gate(run_id: str) -> None:
    """Ends a chain quietly when its begin step refused (no toast: it showed one)."""
    if not run_id:
        raise gr.Error("not started", visible=False, print_exception=False)


def with_buttons(stream_fn, runs: Runs, n_outputs: int, rest=end_run):
    """`stream_fn`'s outputs plus (run button, stop button): when the run ends the buttons go
    back to `rest()` (run enabled, Stop disabled), unless a newer run was begun meanwhile (its
    chain owns them). Gradio cannot end a chain with `.then()` here: a stopped run's `.then`
    would fire after the next run began. `stream_fn` may be a plain function (one output tuple)
    or a generator; its `run_id` and `request` arguments name the run."""

    signature = inspect.signature(stream_fn)

    def finish(bound) -> tuple:
        run_id, request = bound.arguments.get("run_id"), bound.arguments.get("request")
        latest = runs.is_latest(run_id, session_of(request))
        return rest() if latest else (gr.skip(), gr.skip())

    if not inspect.isgeneratorfunction(stream_fn):

        @functools.wraps(stream_fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            return (*stream_fn(*bound.args, **bound.kwargs), *finish(bound))

        call.__signature__ = signature  # Gradio reads the inputs, gr.Request and gr.Progress from it
        return call

    @functools.wraps(stream_fn)
    def stream(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        for outputs in stream_fn(*bound.args, **bound.kwargs):
            yield (*outputs, gr.skip(), gr.skip())
        yield (*([gr.skip()] * n_outputs), *finish(bound))

    stream.__signature__ = signature
    return stream


# -- controls bound to a declared limit -------------------------------------------------------------
def _limited(name: str) -> dict:
    """Range, default and the `limit-NAME` class of a control for the limit `name`."""
    limit = limits.LIMITS[name]
    step = 1 if limit.integer else 0.05
    low = limit.minimum + step if limit.min_exclusive else limit.minimum
    kwargs = {"minimum": low, "maximum": limit.maximum, "value": limit.default, "elem_classes": [f"limit-{name}"]}
    return {**kwargs, "precision": 0} if limit.integer else kwargs


# A slider's number box shows what was typed while the slider itself already holds its nearest end
# (Gradio clamps the slider at once and the box only on blur): Generate would run 512 tokens under a
# box that says 100000. This page script says so beneath the slider, in words, until the next edit.
SAY_CLAMPED = """() => {
    const say = (input) => {
        const block = input.closest('.block');
        if (!block) return;
        let note = block.querySelector(':scope > .clamp-note');
        const value = parseFloat(input.value), low = parseFloat(input.min), high = parseFloat(input.max);
        const end = value > high ? high : value < low ? low : null;
        if (input.value === '' || Number.isNaN(value) || end === null) { if (note) note.remove(); return; }
        if (!note) {
            note = document.createElement('p');
            note.className = 'clamp-note';
            note.setAttribute('role', 'status');
            block.appendChild(note);
        }
        const name = (input.getAttribute('aria-label') || '').replace('number input for ', '') || 'This value';
        note.textContent = `${name}: ${input.value} is ${value > high ? 'above the largest' : 'below the smallest'}`
            + ` value, ${end}; ${end} is used.`;
    };
    document.addEventListener('input', (event) => {
        const input = event.target;
        if (input instanceof HTMLInputElement && input.type === 'number' && input.closest('.block')
            && input.closest('.block').querySelector('input[type=range]')) say(input);
    }, true);
}"""


def number_box(name: str, label: str, **kwargs) -> gr.Number:
    """A number box for the limit `name` whose range is checked by the handler, not by Gradio:
    an out-of-range number then gets the field's message beside it instead of an "Error" badge
    over the handler's outputs."""
    limit = limits.LIMITS[name]
    kwargs = {"value": limit.default, "elem_classes": [f"limit-{name}"], "info": limit.range_text(), **kwargs}
    return gr.Number(label=label, **({"precision": 0} if limit.integer else {}), **kwargs)


def slider(name: str, label: str, **kwargs) -> gr.Slider:
    limit = limits.LIMITS[name]
    return gr.Slider(step=1 if limit.integer else 0.05, label=label, **_limited(name), **kwargs)


def layer_slider(n_layers: int, label: str) -> gr.Slider:
    return gr.Slider(0, n_layers - 1, value=n_layers // 2, step=1, precision=0, label=label)


# -- the vectors table's fixed columns and its add-row button -----------------------------------
# Gradio 6.31's Dataframe ignores `column_limits` (and warns on every build). With
# `column_count=(n, "fixed")` its cell menu no longer offers "Add column", but it still offers
# "Delete column" (the click then does nothing): the style hides that item. Its dashed "+" (add a
# row) is drawn only while the table is empty; the script puts the same button under the table
# once rows exist, and a click adds a row below the last one through the last row's own cell menu
# ("Add row below"), so the row gets the app's defaults as one added with "+" does. Served in the
# page's <head> (`launch(head=...)`, steering/ui/serving.py `launch_kwargs`), with the script that
# makes the address /?view=api open the API page.
VECTORS_TABLE_ID = "vectors-table"
PAGE_HEAD = """
<style>
#vectors-table [role="menuitem"][aria-label="Delete column"] { display: none !important; }
#vectors-table .steering-add-row { display: flex; justify-content: center; align-items: center;
  width: 100%; min-height: 2.2em; margin-top: 4px; border: 1px dashed var(--border-color-primary, #ccc);
  border-radius: var(--radius-sm, 4px); background: transparent; color: var(--body-text-color-subdued, #666);
  cursor: pointer; font-size: 1.1em; }
#vectors-table .steering-add-row:hover { border-color: var(--color-accent, #f97316);
  color: var(--color-accent, #f97316); }
</style>
<script>
(() => {
  const ID = "vectors-table";
  const later = () => new Promise((done) => requestAnimationFrame(() => setTimeout(done, 0)));
  const press = (element) => {  // the table selects a cell on mousedown, not on a bare click
    for (const type of ["pointerdown", "mousedown", "pointerup", "mouseup", "click"]) {
      element.dispatchEvent(new MouseEvent(type, { bubbles: true, cancelable: true, view: window }));
    }
  };
  async function addRow(table) {
    await later();  // after this click has reached the page (a click outside the table deselects)
    const firsts = [...table.querySelectorAll('[role="gridcell"][data-col="0"]')];
    const last = firsts.sort((a, b) => Number(a.dataset.row) - Number(b.dataset.row)).pop();
    if (!last) return;
    press(last);
    await later();
    const menu = last.querySelector(".cell-menu-button");
    if (!menu) return;
    menu.click();
    await later();
    const item = table.querySelector('[role="menuitem"][aria-label="Add row below"]');
    if (item) item.click();
  }
  function ensure() {
    const table = document.getElementById(ID);
    if (!table) return;
    let ours = table.querySelector(":scope > .steering-add-row");
    if (!ours) {
      ours = document.createElement("button");
      ours.type = "button";
      ours.className = "steering-add-row";
      ours.textContent = "+";
      ours.title = "Add a row below the last one";
      ours.setAttribute("aria-label", "Add row below the last");
      ours.addEventListener("click", (event) => {
        event.stopPropagation();
        addRow(table);
      });
      table.appendChild(ours);
    }
    const rows = table.querySelector('[role="gridcell"]') !== null;
    const gradios = table.querySelector(".add-row-button") !== null;
    const shown = rows && !gradios && table.querySelector(".table-container") !== null;
    if (ours.hidden === shown) ours.hidden = !shown;
  }
  new MutationObserver(ensure).observe(document.documentElement, { childList: true, subtree: true });
})();
(() => {
  // /?view=api: Gradio 6.31 marks the API page open from the address but draws it only after its
  // footer button has loaded it, so the link alone shows the app. Close and reopen it once.
  if (new URLSearchParams(location.search).get("view") !== "api") return;
  const watch = new MutationObserver(() => {
    const button = document.querySelector("footer button.show-api");
    if (!button) return;
    watch.disconnect();
    if (document.querySelector(".api-docs")) return;
    button.click();  // closes what the address opened (nothing drawn)
    setTimeout(() => button.click(), 50);  // opens it, loaded and drawn
  });
  watch.observe(document.documentElement, { childList: true, subtree: true });
})();
</script>
"""
