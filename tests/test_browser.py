"""Real-browser tests: Debian's Chromium driven by Playwright against a launched app.

One browser and one page for the module (a test reloads the page when it needs a clean form):
a typed-but-unadded text steers, Stop before the first token ends the run and frees the model,
an invalid Add keeps the table and says why beside the field, a recipe round trip restores the
capture mode, the Memory tab fills itself when opened. They also take the docs' screenshots:
into a temporary folder, or into `assets/` with STEERING_SCREENSHOTS=1 (`make screenshots`), so a
plain `make test` leaves the work tree as it found it. Skips with the reason when Chromium or
Playwright is missing, unless STEERING_REQUIRE_BROWSER=1 (CI sets it): then a missing browser is
a failure.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from _server import ROOT, launched

CHROMIUM = os.environ.get("STEERING_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
# Where the screenshots go: assets/ only when asked to refresh them (make screenshots).
ASSETS = ROOT / "assets" if os.environ.get("STEERING_SCREENSHOTS") == "1" else Path(tempfile.mkdtemp(prefix="shots-"))
TIMEOUT_MS = 120_000  # generation on a loaded 2-core CI machine


def _missing_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright (python) is not installed: pip install playwright"
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"Chromium not found at {CHROMIUM}: apt-get install chromium"
    return None


@pytest.fixture(scope="module")
def browser_page(embedded_dir, tmp_path_factory):
    reason = _missing_browser()
    if reason:
        if os.environ.get("STEERING_REQUIRE_BROWSER") == "1":
            pytest.fail(f"STEERING_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with launched() as url, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh user data dir
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
            accept_downloads=True,
        )
        try:
            tab = context.new_page()
            tab.set_default_timeout(TIMEOUT_MS)
            tab.url_under_test = url
            yield tab
        finally:
            context.close()


@pytest.fixture
def page(browser_page):
    """The shared page, freshly loaded (an empty table, default settings) and the model shown."""
    browser_page.goto(browser_page.url_under_test)
    browser_page.locator("#status-line").get_by_text("SmolLM2-135M-Instruct").first.wait_for()
    return browser_page


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea").input_value()


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _set_tokens(page, tokens: int) -> None:
    page.locator("#decoding").get_by_text("Decoding").first.click()  # open the accordion
    _fill_slider(page, "max-tokens", tokens)


def _fill_slider(page, elem_id: str, value: int) -> None:
    """Type into a slider's number box until the slider itself holds the value (a keystroke can be
    lost while the page re-renders, so it is typed again, at most three times)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    check = "([id, value]) => document.querySelector(`#${id} input[type=range]`).value === value"
    for attempt in range(3):
        box.fill(str(value))
        box.press("Enter")
        box.blur()
        try:
            page.wait_for_function(check, arg=[elem_id, str(value)], timeout=10_000)
            return
        except Exception:
            if attempt == 2:
                raise


def _add_vector(page, text: str) -> None:
    """Type a steering text, Add vector, and wait until the table shows it."""
    page.locator("#new-text textarea").fill(text)
    page.locator("#add-vector").click()
    page.wait_for_function("t => document.querySelector('#vectors-table').innerText.includes(t)", arg=text)


def _upload(page, button: str, path) -> None:
    """Choose `path` with the upload button `button` (a CSS selector)."""
    with page.expect_file_chooser() as chooser:
        page.locator(button).click()
    chooser.value.set_files(str(path))


def _wait_run_ended(page) -> str:
    page.wait_for_function(
        """() => {
            const line = (document.querySelector("#run-info") || {}).innerText || "";
            return /tokens\\/s, seed|stopped after|Stopped before the model/.test(line);
        }"""
    )
    return _text(page, "run-info")


def test_typed_but_unadded_text_steers_and_the_run_line_says_how_it_ended(page):
    page.locator("#new-text textarea").fill("dogs")  # typed, never added
    _fill_slider(page, "new-coeff", 1)
    _set_tokens(page, 24)
    page.locator("#generate").click()
    # Generate is disabled while the run goes on, Stop enabled; the typed vector is in the table.
    page.wait_for_function("() => document.querySelector('#generate').disabled")
    assert page.locator("#stop").is_enabled()
    page.wait_for_function("() => document.querySelector('#vectors-table').innerText.includes('dogs')")
    assert "Added the typed vector" in _text(page, "vector-message")
    line = _wait_run_ended(page)
    assert "steered layers [15]" in line and "24 tokens" in line and "seed 0" in line, line
    steered, baseline = _value(page, "steered-output"), _value(page, "baseline-output")
    assert steered and baseline and steered != baseline
    page.wait_for_function("() => !document.querySelector('#generate').disabled")
    assert not page.locator("#stop").is_enabled()


def test_stop_before_the_first_token_ends_the_run_and_frees_the_model(page):
    long_prompt = ("Tell me everything about the history of the world. " * 80)[:3990]  # a long prefill
    page.locator("#prompt-box textarea").fill(long_prompt)
    _set_tokens(page, 512)
    page.locator("#generate").click()
    page.wait_for_function("() => !document.querySelector('#stop').disabled")
    page.locator("#stop").click()
    started = time.monotonic()
    line = _wait_run_ended(page)
    assert re.search(r"stopped after 0 tokens|Stopped before the model started \(no tokens", line), line
    assert time.monotonic() - started < 10
    assert _value(page, "steered-output") == "" and _value(page, "baseline-output") == ""
    page.wait_for_function("() => !document.querySelector('#generate').disabled")
    # At once again, while the stopped run may still be ending: the click is not dropped, Stop works.
    page.locator("#generate").click()
    page.wait_for_function("() => !document.querySelector('#stop').disabled")
    page.locator("#stop").click()
    page.wait_for_function(
        "() => /stopped after 0 tokens|Stopped before the model/.test(document.querySelector('#run-info').innerText)"
    )
    page.wait_for_function("() => !document.querySelector('#generate').disabled")
    # The model is free at once: a short run finishes (it would wait behind 512 x 2 tokens otherwise).
    page.locator("#prompt-box textarea").fill("Hi")
    _fill_slider(page, "max-tokens", 4)
    started = time.monotonic()
    page.locator("#generate").click()
    page.wait_for_function("() => /4 tokens, .* tokens\\/s/.test(document.querySelector('#run-info').innerText)")
    assert time.monotonic() - started < 60


def _error_badges(page) -> int:
    """Gradio's "Error" badges drawn over components (status trackers in the error state)."""
    return page.locator("[data-testid=status-tracker] span.error").count()


def test_invalid_add_keeps_the_table_and_says_why_beside_the_field(page):
    _add_vector(page, "dogs")
    for fill, expected in (
        ({"#new-positive textarea": "happy"}, "negative: a contrastive pair needs both"),
        (
            {"#new-text textarea": "cats", "#new-positive textarea": "happy", "#new-negative textarea": "sad"},
            "text: give a steering text or a positive and a negative text, not both",
        ),
    ):
        for selector, value in fill.items():
            page.locator(selector).fill(value)
        page.locator("#add-vector").click()
        page.wait_for_function(
            "expected => document.querySelector('#vector-message').innerText.includes(expected)", arg=expected
        )
        assert page.locator("#vectors-table").is_visible()
        assert "dogs" in _text(page, "vectors-table")
        assert _error_badges(page) == 0
        page.locator("#new-positive textarea").fill("")
        page.locator("#new-negative textarea").fill("")
    # A row added with the table's own menu gets the default coefficient, the slider's layer, enabled
    # and the default positions.
    page.locator("#vectors-table").get_by_text("dogs", exact=True).last.click()
    page.locator("#vectors-table button[aria-label='Open cell menu']:visible").first.click()
    page.get_by_role("menuitem", name="Add row below").first.click()
    page.wait_for_function("() => document.querySelector('#vectors-table').innerText.split('prompt').length === 3")
    page.locator("#remove-number input").fill("9")
    page.locator("#remove-row").click()
    page.wait_for_function("() => document.querySelector('#vector-message').innerText.includes('row: give a row')")
    assert "dogs" in _text(page, "vectors-table") and _error_badges(page) == 0


def test_recipe_round_trip_restores_capture_mode_and_raw_prompt(page, tmp_path):
    _add_vector(page, "the ocean")
    page.locator("#decoding").get_by_text("Decoding").first.click()
    page.locator("#capture-mode").get_by_label("stock").check()
    page.locator("#raw-prompt input").check()
    page.get_by_role("tab", name="Recipes").click()
    page.locator("#save-recipe").click()
    with page.expect_download() as download:
        page.locator("#recipe-file a").first.click()
    saved = tmp_path / "recipe.json"
    download.value.save_as(saved)
    recipe = json.loads(saved.read_text())
    assert recipe["settings"]["capture_mode"] == "stock" and recipe["settings"]["raw_prompt"] is True
    assert recipe["model"]["id"] == "SmolLM2-135M-Instruct"

    page.reload()  # a fresh form: contexts capture, raw prompt off, empty table
    page.locator("#status-line").get_by_text("SmolLM2-135M-Instruct").first.wait_for()
    page.get_by_role("tab", name="Recipes").click()
    _upload(page, "#load-recipe", saved)
    page.wait_for_function("() => document.querySelector('#recipe-message').innerText.includes('Loaded the recipe')")
    assert "capture mode stock, raw prompt on" in _text(page, "recipe-message")
    page.get_by_role("tab", name="Steer").click()
    page.locator("#decoding").get_by_text("Decoding").first.click()
    assert page.locator("#capture-mode").get_by_label("stock").is_checked()
    assert page.locator("#raw-prompt input").is_checked()
    assert "the ocean" in _text(page, "vectors-table")


def test_memory_tab_fills_itself_when_opened(page):
    """No Refresh click: opening the tab draws the bars (need per term against the headroom)."""
    page.get_by_role("tab", name="Memory").click()
    page.wait_for_function(
        "() => (document.querySelector('#memory-bars') || {innerHTML: ''}).innerHTML.includes('bar-row')"
    )
    assert "loaded: SmolLM2-135M-Instruct" in page.locator("#memory-bars").inner_text()
    page.screenshot(path=str(ASSETS / "screenshot-memory.png"), full_page=True)


def test_sweep_streams_its_rows_and_plots_them(page):
    page.get_by_role("tab", name="Sweep").click()
    page.locator("#sweep-coeffs textarea").fill("0, 0.5, 1, 1.5")
    _fill_slider(page, "sweep-tokens", 16)
    page.locator("#run-sweep").click()
    page.wait_for_function("() => !document.querySelector('#stop-sweep').disabled")
    page.wait_for_function("() => document.querySelectorAll('#sweep-plot circle.marker').length >= 8")
    assert "layer 15" in _text(page, "sweep-info")
    ticks = page.locator("#sweep-plot text.x-tick").all_inner_texts()
    assert 3 <= len(ticks) <= 10, ticks  # a few round ticks, not one per point
    page.wait_for_function("() => !document.querySelector('#run-sweep').disabled")
    page.screenshot(path=str(ASSETS / "screenshot-sweep.png"), full_page=True)


def test_phone_width_puts_the_outputs_right_after_generate(page):
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        page.reload()
        # the model bar says what is loaded; the Load controls start folded
        page.locator("#status-line").get_by_text("SmolLM2-135M-Instruct").first.wait_for()
        top = "e => e.getBoundingClientRect().top + window.scrollY"
        generate, steered, table = (
            page.locator(selector).evaluate(top) for selector in ("#generate", "#steered-output", "#vectors-table")
        )
        assert generate < steered < table  # outputs right after the controls that produce them
        assert steered - generate < 300
        assert steered < 1200  # the model panel starts folded: the outputs are not far down
        assert "open" not in page.locator("#model-panel .label-wrap").get_attribute("class")
        viewport = page.locator("#vectors-table .virtual-table-viewport")
        width, scroll = viewport.evaluate("e => [e.clientWidth, e.scrollWidth]")
        assert width < 390 and scroll > width  # all columns there: the table scrolls within itself
        assert page.get_by_text("Use via API").first.is_visible()
    finally:
        page.set_viewport_size({"width": 1400, "height": 1000})


def test_chat_stop_then_send_again_is_not_dropped_and_keeps_both_conversations(page):
    _add_vector(page, "dogs")
    _set_tokens(page, 200)
    page.get_by_role("tab", name="Chat").click()
    box = page.locator("#chat-message textarea")

    box.fill("Tell me a long story about the sea.")
    box.press("Enter")
    page.wait_for_function("() => !document.querySelector('#chat-stop').disabled")
    page.locator("#chat-baseline").get_by_text("Tell me a long story about the sea.").first.wait_for()
    page.locator("#chat-stop").click()
    page.wait_for_function(
        "() => /stopped after/.test(document.querySelector('#chat-run-info').innerText)"
        " && !document.querySelector('#chat-send').disabled"
    )
    # At once again: the turn runs (its message shows in both chats), it is not dropped. Its reply
    # may end by itself at once (after a stopped reply the small model sometimes repeats it), so
    # Stop is pressed only if the turn still runs; either way Send comes back.
    box.fill("And then?")
    page.locator("#chat-send").click()
    page.locator("#chat-baseline").get_by_text("And then?").first.wait_for()
    if page.locator("#chat-stop").is_enabled():
        page.locator("#chat-stop").click()
    page.wait_for_function("() => !document.querySelector('#chat-send').disabled")
    for chat in ("#chat-steered", "#chat-baseline"):  # each conversation holds both messages
        assert page.locator(chat).get_by_text("Tell me a long story about the sea.").count() >= 1
        assert page.locator(chat).get_by_text("And then?").count() >= 1


def _autotune_at_rest(page) -> None:
    """Auto-tune enabled again and its Stop hidden."""
    page.wait_for_function(
        "() => !document.querySelector('#autotune').disabled && !document.querySelector('#stop-autotune')"
        " || (!document.querySelector('#autotune').disabled"
        " && document.querySelector('#stop-autotune').offsetParent === null)"
    )


def test_autotune_gives_its_button_back_and_its_result_reaches_history(page):
    page.locator("#new-text textarea").fill("the ocean")
    page.locator("#autotune").click()
    page.wait_for_function("() => document.querySelector('#autotune').disabled")
    assert page.locator("#stop-autotune").is_visible()
    # While it runs: a clear status, no progress stuck at 0.0 % (api.autotune reports no progress).
    page.wait_for_function("() => document.querySelector('#vector-message').innerText.includes('is searching')")
    for _ in range(6):
        assert "0.0%" not in page.locator("body").inner_text()
        page.wait_for_timeout(500)
    page.wait_for_function(
        "() => /Auto-tune set layer|⚠️/.test(document.querySelector('#vector-message').innerText)", timeout=300_000
    )
    _autotune_at_rest(page)
    assert not page.locator("#stop-autotune").is_visible()
    # One number: the message quotes the outlined cell's score; the grid says what it is (one layer);
    # every sentence starts with a capital.
    message = _text(page, "vector-message")
    assert not re.search(r"[.;] [a-z]", message.replace("e.g.", "")), message
    assert re.search(r"(beat|tied)[^.]* on your prompt and the 4 probes: mean aggregate score", message), message
    page.locator("#autotune-result").get_by_text("Auto-tune: the search").first.click()  # open the accordion
    grid = page.locator("#autotune-picture")
    assert "Score per coefficient at layer 15" in grid.text_content()
    chosen = grid.locator("g.chosen text.cell-value").text_content().strip()
    assert grid.locator("svg .colour-scale text.scale-tick").count() >= 2  # the scale has its numbers
    assert f"(score {chosen} on your prompt" in message or f"({chosen} on your prompt" in message, (chosen, message)
    # A refusal (no text) gives the button back too.
    page.locator("#new-text textarea").fill("")
    page.locator("#autotune").click()
    page.wait_for_function(
        "() => document.querySelector('#vector-message').innerText.includes('type the steering text')"
    )
    _autotune_at_rest(page)
    assert not page.locator("#stop-autotune").is_visible()
    # The finished search is in the session's history.
    page.get_by_role("tab", name="History").click()
    page.wait_for_function("() => document.querySelector('#history-table').innerText.includes('autotune')")
    assert "the ocean" in _text(page, "history-table")


def _edit_cell(page, row: int, column: int, value: str) -> None:
    """Type `value` into the vectors table's cell (row, column), both from 0, and press Enter."""
    cell = page.locator(f"#vectors-table [data-testid=cell-{row}-{column}]")
    cell.dblclick()
    box = cell.locator("input, textarea").first
    box.fill(value)
    box.press("Enter")


def test_a_bad_table_cell_is_reset_and_its_sentence_stays_with_one_notice(page):
    _add_vector(page, "dogs")
    for column, value, expected, reset in (
        (3, "abc", "row 1, coeff: must be a number; got 'abc' (reset to 1)", "1"),
        (4, "99", "row 1, layer: must be an integer from 0 to 29; got 99 (set to 29)", "29"),
        (3, "1000", "row 1, coeff: must be a number from -20 to 20", "1"),
        (6, "everywhere", "row 1, positions: must be one of prompt, all (reset to prompt)", "prompt"),
    ):
        _edit_cell(page, 0, column, value)
        page.wait_for_function(
            "expected => document.querySelector('#vector-message').innerText.includes(expected)", arg=expected
        )
        cell = page.locator(f"#vectors-table [data-testid=cell-0-{column}]")
        page.wait_for_function(
            "([e, v]) => e.innerText.replace('⋮', '').trim() === v", arg=[cell.element_handle(), reset]
        )
        page.wait_for_timeout(1500)  # the reset's own .change has come and gone
        assert expected in _text(page, "vector-message")
        assert page.locator(".toast-body", has_text=expected).count() == 1


def test_sweep_plot_and_table_read_at_a_glance(page):
    """The plot fills its column, the fluency boundary lies on the perplexity panel (not where
    relevance is drawn), perplexity ticks are plain round values, the ★ is clear of the legend;
    the table shows each output beside its coefficient, wrapped, with whole-word headers. Run with
    Prompted, the prompted reference row is a dashed line on each panel, in the legend, and the
    table's last row."""
    page.set_viewport_size({"width": 1366, "height": 900})
    try:
        page.reload()
        page.locator("#status-line").get_by_text("SmolLM2-135M-Instruct").first.wait_for()
        page.get_by_role("tab", name="Sweep").click()
        page.locator("#sweep-prompted input").check()
        page.locator("#sweep-coeffs textarea").fill("0, 0.5, 1")
        _fill_slider(page, "sweep-tokens", 40)
        page.locator("#run-sweep").click()
        page.wait_for_function("() => /recommended|no fluent/.test(document.querySelector('#sweep-info').innerText)")
        plot = page.locator("#sweep-plot")
        svg_width, column_width = plot.evaluate(
            "e => [e.querySelector('svg').getBoundingClientRect().width, e.getBoundingClientRect().width]"
        )
        assert svg_width >= 0.95 * column_width and column_width > 1000, (svg_width, column_width)
        box = "e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom]; }"
        boundary = plot.locator("line.boundary").evaluate(box)[0]  # a horizontal line: no bounding box
        (rel_top, rel_bottom), (ppl_top, ppl_bottom) = (
            plot.locator(f"rect.panel-{n}").evaluate(box) for n in ("rel", "ppl")
        )
        assert ppl_top <= boundary <= ppl_bottom and not rel_top <= boundary <= rel_bottom
        prompted_rel = plot.locator("line.prompted-rel").evaluate(box)[0]
        assert rel_top <= prompted_rel <= rel_bottom  # the prompted reference, on the relevance panel
        assert plot.locator("line.prompted-ppl").count() == 1 and plot.locator("line.legend-prompted").count() == 1
        assert "prompted (dashed): relevance" in page.locator("#sweep-info").inner_text()
        ticks = [float(t) for t in plot.locator("text.ppl-tick").all_text_contents()]
        assert ticks and all(t / 10 ** math.floor(math.log10(t)) in (1, 2, 5) for t in ticks), ticks
        if plot.locator("text.recommended").count():
            star, legend = plot.locator("text.recommended").bounding_box(), plot.locator("g.legend").bounding_box()
            assert star["y"] >= legend["y"] + legend["height"] or star["x"] >= legend["x"] + legend["width"]
        table = page.locator("#sweep-table")
        header = "e => { const r = e.getBoundingClientRect(); return [r.left, r.right]; }"
        left, right = table.locator(".table-wrap").first.evaluate(header)
        text_left, text_right = table.locator("[data-testid=header-2]").evaluate(header)
        assert "text" in table.locator("[data-testid=header-2]").inner_text()
        assert left <= text_left and text_right <= right + 1, (left, right, text_left, text_right)
        lines = table.evaluate(
            "e => [...e.querySelectorAll('th span.header')].filter(s => s.offsetParent).map(s => {"
            " const r = document.createRange(); r.selectNodeContents(s); return r.getClientRects().length; })"
        )
        assert lines and max(lines) == 1, lines  # every header on one line, none broken mid-word
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(500)
        text_left = table.locator("[data-testid=header-2]").evaluate(header)[0]
        assert text_left < 200  # on a phone the outputs start on screen
        assert "prompted" in table.inner_text()  # the reference row, last
    finally:
        page.locator("#sweep-prompted input").uncheck()
        page.set_viewport_size({"width": 1400, "height": 1000})


def test_a_refused_import_says_so_on_the_import_line_and_in_recipes(page, tmp_path):
    _add_vector(page, "the ocean")
    page.locator("#vector-files").get_by_text("Export / import").first.click()
    page.locator("#export-vectors").click()
    with page.expect_download() as download:
        page.locator("#vector-files a[download]").first.click()
    good = tmp_path / "good.gguf"
    download.value.save_as(good)

    _upload(page, "#import-vectors", good)
    page.wait_for_function("() => document.querySelector('#import-info').innerText.includes('Imported 1 vector')")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a control vector" * 10)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    for bad in (garbage, text):
        _upload(page, "#import-vectors", bad)
        page.wait_for_function("name => document.querySelector('#import-info').innerText.includes(name)", arg=bad.name)
        line = _text(page, "import-info")
        assert "Imported" not in line and "⚠️" in line, line
        assert "GGUF" in line if bad.suffix == ".gguf" else ".gguf or .safetensors" in line, line

    page.get_by_role("tab", name="Recipes").click()
    page.locator("#save-recipe").click()
    with page.expect_download() as download:
        page.locator("#recipe-file a").first.click()
    recipe = tmp_path / "recipe.json"
    download.value.save_as(recipe)

    _upload(page, "#load-recipe", recipe)
    page.wait_for_function("() => document.querySelector('#recipe-message').innerText.includes('Loaded the recipe')")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for bad in (broken, text):
        _upload(page, "#load-recipe", bad)
        page.wait_for_function(
            "name => document.querySelector('#recipe-message').innerText.includes(name)", arg=bad.name
        )
        line = _text(page, "recipe-message")
        assert "Loaded the recipe" not in line and "⚠️" in line, line


def test_polish_one_sweep_per_double_click_one_log_line_per_request_plain_toasts(page, caplog):
    caplog.set_level(logging.INFO, logger="steering")
    page.locator("#decoding").get_by_text("Decoding").first.click()
    assert "an integer from 0 to 2147483647" in _text(page, "seed")  # not "2.14748e+09"
    # A model that cannot be found: the toast says `hf download` without raw backticks.
    page.locator("#model-panel").get_by_text("Change model").first.click()  # the Load controls start folded
    model_box = page.locator("#model-panel input[role=listbox], #model-panel input").first
    model_box.fill("nobody/no-such-model")
    model_box.press("Enter")
    page.locator("#model-panel").get_by_role("button", name="Load").click()
    toast = page.locator(".toast-body", has_text="hf download")
    toast.first.wait_for()
    assert "`" not in toast.first.inner_text()
    assert "SmolLM2-135M-Instruct" in _text(page, "status-line")
    # A double-click on Run sweep runs one sweep (the server also refuses a second begin while the
    # session's sweep is on); the sweep and a Generate log one line each.
    caplog.clear()
    page.get_by_role("tab", name="Sweep").click()
    page.locator("#sweep-coeffs textarea").fill("0, 1")
    _fill_slider(page, "sweep-tokens", 4)
    page.locator("#run-sweep").dblclick()
    page.wait_for_function("() => /recommended|no fluent/.test(document.querySelector('#sweep-info').innerText)")
    page.wait_for_function("() => !document.querySelector('#run-sweep').disabled")
    page.wait_for_timeout(2000)  # a second sweep would have begun by now
    page.get_by_role("tab", name="History").click()
    page.wait_for_function("() => document.querySelector('#history-table').innerText.includes('sweep')")
    kinds = page.locator("#history-table").evaluate(
        "e => [...e.querySelectorAll('[role=gridcell], td')].filter(c => c.offsetParent).map(c => c.innerText.trim())"
    )
    assert kinds.count("sweep") == 1, kinds
    assert caplog.text.count("request sweep (page)") == 1, caplog.text
    page.get_by_role("tab", name="Steer").click()
    _fill_slider(page, "max-tokens", 4)
    page.locator("#generate").click()
    _wait_run_ended(page)
    page.wait_for_function("() => !document.querySelector('#generate').disabled")
    assert caplog.text.count("request generate (page)") == 1, caplog.text


def test_heatmap_numbers_are_readable_on_dark_cells(page):
    for text in ("dogs", "cats"):
        _add_vector(page, text)
    page.get_by_role("tab", name="Vectors").click()
    page.locator("#show-similarity").click()
    page.locator("#heatmap svg text.cell-value").first.wait_for()
    colours = page.locator("#heatmap svg text.cell-value").evaluate_all(
        "cells => cells.map(c => [c.textContent.trim(), getComputedStyle(c).fill])"
    )
    diagonal = [colour for value, colour in colours if value == "1.00"]
    assert diagonal and all(colour == "rgb(255, 255, 255)" for colour in diagonal), colours  # white on pure blue
    assert page.locator("#heatmap svg .colour-scale text.scale-tick").all_text_contents() == [
        "-1",
        "-0.5",
        "0",
        "0.5",
        "1",
    ]
    labels = page.locator("#heatmap svg text.row-label").evaluate_all(  # the drawn text, not the tooltip
        "ls => ls.map(l => [...l.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent).join(''))"
    )
    assert labels == ["dogs", "cats"], labels
    width = page.locator("#heatmap svg").evaluate("e => e.getBoundingClientRect().width")
    assert width > 200, width  # drawn at a readable size, not squeezed


def test_history_rows_show_the_prompt_under_whole_headers(page):
    page.locator("#prompt-box textarea").fill("Hi there, history")
    _set_tokens(page, 4)
    page.locator("#generate").click()
    _wait_run_ended(page)
    page.get_by_role("tab", name="History").click()
    page.wait_for_function("() => document.querySelector('#history-table').innerText.includes('Hi there, history')")
    lines = page.locator("#history-table").evaluate(
        "e => [...e.querySelectorAll('th span.header')].filter(s => s.offsetParent).map(s => {"
        " const r = document.createRange(); r.selectNodeContents(s);"
        " return [s.innerText, r.getClientRects().length]; })"
    )
    assert lines and all(n == 1 for _, n in lines), lines  # "seed", not "se ed"
