"""Auto-tune, in the Steer tab's vector form: search layers x coefficients for the typed vector on
the prompt and fill the form's layer and coefficient with the setting found.

A chain like Generate's (steering/ui/steer.py): `begin_search` (no queue: registered, the button
disabled, its Stop shown) -> `autotune_run` (the model queue; the buttons come back at its end,
whether it found a setting, was refused or was stopped). Every finished or stopped search goes
into the session's history.
"""

from __future__ import annotations

import gradio as gr

from steering import api, history, limits
from steering.ui import plots
from steering.ui.common import (
    MODEL,
    PRIVATE,
    UI_ONLY,
    inline,
    loaded_quant,
    n_layers_now,
    notices,
    registry,
    session_of,
    with_buttons,
)

tunes = registry()  # each session's searches, from the click on: what Stop reaches


def begin_search(request: gr.Request = None) -> tuple:
    """Before an auto-tune: its button disabled, its Stop shown, the message saying it searches; outputs
    (buttons, message, run id)."""
    run_id = tunes.begin(session_of(request))
    searching = (
        "Auto-tune is searching: three coefficients on your prompt and four probe prompts, then asking in words "
        "to compare (Stop ends it)…"
    )
    return gr.Button(interactive=False), gr.Button(visible=True, interactive=True), searching, run_id


def end_search() -> tuple:
    """After it: its button enabled again, its Stop hidden."""
    return gr.Button(interactive=True), gr.Button(visible=False)


def sentence(text: str) -> str:
    """`text` as a sentence: stripped, its first letter a capital."""
    text = (text or "").strip()
    return text[:1].upper() + text[1:]


def _message(result: dict, layer: int) -> str:
    """What the search set, with the number the grid's outlined cell shows (the score of the
    chosen setting on the prompt), then why it won, then whether it beat prompting."""
    chosen = next(
        (r for r in result.get("rows") or [] if (r.get("layer"), r.get("coeff")) == (result["layer"], result["coeff"])),
        {},
    )
    score = chosen.get("score")
    message = f"Auto-tune set layer {layer} and coefficient {result['coeff']:g}"
    if chosen:
        message += f" (score {score:.3f} on your prompt" if score is not None else " (not fluent on your prompt"
        message += ": the outlined cell)"
    reason = sentence(result.get("reason") or "")
    message += "." + (f" {reason}." if reason and not reason.endswith(".") else f" {reason}" if reason else "")
    versus = result.get("versus_prompted") or {}
    if versus.get("verdict"):  # did the chosen setting beat simply asking (the prompt and the probes)?
        message += " " + versus["verdict"]
    message += " Click **Add vector** to add it."
    decay = result.get("decay")
    if isinstance(decay, (int, float)) and decay != 1:  # the table has no decay column
        message += f" ⚠️ It was found with a decay of {decay:g} per token, which the table cannot hold; /steer can."
    return message


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
    run = tunes.start(run_id, session)
    if run is None:  # stopped while it waited in the queue
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    # api.autotune reports no progress: an indeterminate status (no percentage stuck at 0.0 %)
    progress(None, desc="Auto-tune is searching (about half a minute on a CPU)…")
    try:
        result = api.autotune(**arguments, stop=run.stop)
    finally:
        tunes.end(run)
    context = {"quant": loaded_quant(), **({"stopped": True} if run.stop.is_set() else {})}
    history.record(session, "autotune", arguments, result, context=context)
    picture = plots.autotune_html(result)
    if result.get("layer") is None or result.get("coeff") is None:
        return (
            gr.skip(),
            gr.skip(),
            picture,
            inline(sentence(str(result.get("reason") or "auto-tune found no setting"))),
        )
    n_layers = n_layers_now()
    layer = result["layer"] if n_layers is None else min(result["layer"], n_layers - 1)
    gr.Info(f"Auto-tune: layer {layer}, coefficient {result['coeff']:g}")
    return gr.Slider(value=layer), result["coeff"], picture, _message(result, layer)


def stop_autotune(request: gr.Request = None) -> tuple:
    """Stop this session's auto-tune (a queued one never starts); outputs (message, buttons)."""
    run = tunes.latest(session_of(request))
    if run is not None:
        run.stop.set()
    return "Auto-tune stopped.", *end_search()


def _search(prompt, text, positive, negative, seed, run_id=None, progress=gr.Progress(), request: gr.Request = None):
    """The button's step: `autotune_form` with the UI's defaults (Gradio reads this signature, and
    `request` must be annotated for Gradio to pass the session: without it the run is registered
    under no session and its buttons never come back)."""
    return autotune_form(prompt, text, positive, negative, seed, run_id=run_id, progress=progress, request=request)


# `autotune_form` plus (Auto-tune button, its Stop) back to rest, unless a newer auto-tune began.
autotune_run = with_buttons(_search, tunes, 4, rest=end_search)


def wire_autotune(prompt: gr.Textbox, form, decoding) -> None:
    """Auto-tune fills the form's layer and coefficient; Stop ends (or unqueues) the search."""
    buttons = [form.autotune_btn, form.autotune_stop]
    run_id = gr.State("")
    begun = form.autotune_btn.click(
        begin_search, None, [*buttons, form.message, run_id], show_progress="hidden", **UI_ONLY
    )
    begun.then(
        autotune_run,
        [prompt, form.text, form.positive, form.negative, decoding.seed, run_id],
        [form.layer, form.coeff, form.autotune_picture, form.message, *buttons],
        trigger_mode="multiple",  # see steer.wire_steer
        **PRIVATE,
        **MODEL,
    )
    form.autotune_stop.click(stop_autotune, None, [form.message, *buttons], **UI_ONLY)
