"""The Sweep tab's handlers (rows stream in, Stop ends them) and the vector form's Auto-tune.

Both follow the Steer tab's rules (steering/ui_steer.py): a refusal is a notice and a message
line, and the previous results stay; the run button is disabled while a run goes and Stop
enabled only then. Every finished (or stopped) result goes into the session's history.
"""

from __future__ import annotations

import inspect

import gradio as gr

from steering import api, history, limits, plots, views
from steering.ui_steer import (
    Runs,
    end_run,
    end_search,
    inline,
    loaded_quant,
    n_layers_now,
    notices,
    session_of,
    with_buttons,
)

sweeps, tunes = Runs(), Runs()  # what Stop reaches (see ui_steer.Runs: no Gradio `cancels`)


def begin_sweep(request: gr.Request = None) -> tuple:
    """Run disabled, Stop enabled, the message line set; outputs (buttons, info, run id)."""
    run_id = sweeps.begin(session_of(request))
    return gr.Button(interactive=False), gr.Button(interactive=True), "Waiting for the model…", run_id


@notices(3, at=2)
def run_sweep(
    prompt, text, layer, coeffs_text, max_new_tokens, seed, positions="prompt", run_id=None, request: gr.Request = None
):
    """One row per coefficient, streamed as the tokens arrive, then scored: outputs (table, plot,
    info). The table keeps the previous sweep until this one has its first text."""
    session = session_of(request)
    run = sweeps.get(run_id, session)
    stop = run.stop
    if stop.is_set():  # stopped while it waited in the queue
        sweeps.end(run)
        yield gr.skip(), gr.skip(), gr.skip()
        return
    arguments = dict(
        prompt=prompt, text=text, layer=layer, coeffs=views.parse_coeffs(coeffs_text),
        max_new_tokens=max_new_tokens, seed=seed, positions=positions,
    )  # fmt: skip
    result = None
    stream = api.sweep_stream(stop=stop, **arguments)
    try:
        for result in stream:
            info = f"{result['model']} · layer {result['layer']} · positions {result['positions']}"
            if not result["done"]:
                tokens = max((len(r["text"]) for r in result["rows"]), default=0)
                yield views.sweep_rows(result), gr.skip(), f"{info} · generating… ({tokens} characters so far)"
                continue
            if result.get("stopped"):
                info += " · stopped: the texts so far, unscored"
            else:
                best = result.get("recommended")
                info += f" · recommended coefficient {best:g} (★)" if best is not None else " · no fluent row"
            notice = views.fallback_notice(result.get("fallback"))
            yield views.sweep_rows(result), plots.sweep_svg(result), info + (f"  \n{notice}" if notice else "")
    finally:
        stop.set()
        stream.close()
        sweeps.end(run)
        if result is not None:
            stopped = bool(result.get("stopped")) or not result["done"]
            context = {"quant": loaded_quant(), **({"stopped": True} if stopped else {})}
            history.record(session, "sweep", arguments, result, context=context)


def stop_sweep(request: gr.Request = None) -> tuple:
    """Stop this session's sweep; outputs (info, run button, stop button)."""
    run = sweeps.latest(session_of(request))
    if run is not None:
        run.stop.set()
    return "Stopped.", *end_run()


# -- Auto-tune in the vector form ------------------------------------------------------------------
def _accepts(name: str) -> bool:
    return name in inspect.signature(api.autotune).parameters


@notices(4, at=3)
def autotune_form(
    prompt, text, positive, negative, seed, run_id=None, progress=gr.Progress(), request: gr.Request = None, **search
):
    """Search layers x coefficients for the form's vector on the prompt; fill the form's layer and
    coefficient with the chosen setting. Outputs (layer slider, coefficient, picture, message).
    `search` passes api.autotune's own `layers` / `max_new_tokens` (the UI uses its defaults)."""
    given = {k: v for k, v in (("text", text), ("positive", positive), ("negative", negative)) if v and v.strip()}
    if not given:
        raise gr.Error("text: type the steering text (or a positive and a negative text) to tune first")
    arguments = dict(prompt=prompt, **given, seed=limits.check("seed", seed), **search)
    session = session_of(request)
    run = tunes.get(run_id, session)
    stop = run.stop
    if stop.is_set():  # stopped while it waited in the queue
        tunes.end(run)
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    extra = {"stop": stop} if _accepts("stop") else {}  # api.autotune may not take a stop flag yet
    progress(0, desc="Auto-tune: searching layers × coefficients")
    try:
        result = api.autotune(**arguments, **extra)
    finally:
        tunes.end(run)
    context = {"quant": loaded_quant(), **({"stopped": True} if stop.is_set() else {})}
    history.record(session, "autotune", arguments, result, context=context)
    picture = plots.autotune_html(result)
    if result.get("layer") is None or result.get("coeff") is None:
        return gr.skip(), gr.skip(), picture, inline(str(result.get("reason") or "auto-tune found no setting"))
    n_layers = n_layers_now()
    layer = result["layer"] if n_layers is None else min(result["layer"], n_layers - 1)
    score = result.get("score")
    message = (
        f"Auto-tune set layer {layer} and coefficient {result['coeff']:g}"
        + (f" (score {score:.3f} nats/token)" if score is not None else "")
        + f". {result.get('reason') or ''} Click **Add vector** to add it."
    )
    decay = result.get("decay")
    if isinstance(decay, (int, float)) and decay != 1:  # the table has no decay column yet
        message += f" ⚠️ It was found with a decay of {decay:g} per token, which the table cannot hold; /steer can."
    gr.Info(f"Auto-tune: layer {layer}, coefficient {result['coeff']:g}")
    return gr.Slider(value=layer), result["coeff"], picture, message


def stop_autotune(request: gr.Request = None) -> tuple:
    """Stop this session's auto-tune (a queued one never starts); outputs (message, buttons)."""
    run = tunes.latest(session_of(request))
    if run is not None:
        run.stop.set()
    finished = "" if _accepts("stop") else " (a search already running finishes its current batch first)"
    return f"Auto-tune stopped{finished}.", *end_search()


sweep_run = with_buttons(run_sweep, sweeps, 3)  # the Sweep chain's step: outputs + run and stop buttons


def autotune_run(prompt, text, positive, negative, seed, run_id=None, progress=gr.Progress(), request=None):
    """`autotune_form` plus (Auto-tune button, its Stop) back to rest, unless a newer auto-tune began."""
    outputs = autotune_form(prompt, text, positive, negative, seed, run_id=run_id, progress=progress, request=request)
    latest = tunes.is_latest(run_id, session_of(request))
    return (*outputs, *(end_search() if latest else (gr.skip(), gr.skip())))
