"""Polish of issue 25 in a real browser (Debian's Chromium, Playwright) against a launched app on
this machine's CPU: the Memory tab says plainly what running a model on the CPU means (no NVML
error twice, no empty processes table, a rough speed per row) and the History tab's re-run shows
the steered and baseline texts, not a JSON tree. Skips like tests/test_browser.py (a failure
under STEERING_REQUIRE_BROWSER=1)."""

from __future__ import annotations

import test_browser
from test_browser import _set_tokens, _value, _wait_run_ended

browser_page, page = test_browser.browser_page, test_browser.page  # the shared browser fixtures


def test_memory_tab_on_the_cpu_says_what_that_means(page):
    page.get_by_role("tab", name="Memory").click()
    page.wait_for_function("() => document.querySelector('#memory-card').innerText.includes('Choice for')")
    card = page.locator("#memory-card").inner_text()
    assert card.count("NVML could not start") == 1, card  # the card's reason, not again in the choice's
    assert "No NVIDIA GPU: every model runs on the CPU, in system RAM" in card
    assert "bitsandbytes NF4 runs on the CPU" in card and "well under one token per second" in card
    assert not page.get_by_text("Processes on the card").is_visible()  # no card: no processes table
    rows = page.evaluate(
        """() => [...document.querySelectorAll('#memory-plan .virtual-row')].map(r =>
             [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim()))"""
    )
    (mistral,) = [row for row in rows if row[:2] == ["mistralai/Mistral-7B-Instruct-v0.3", "4bit"]]
    assert mistral[3] == "stable" and mistral[-1] == "cpu RAM · ~0.071 tokens/s", mistral
    assert "rough speeds measured on a 2-core CPU" in card  # what the number is, said once in the note
    cut = page.evaluate(
        """() => { const wrap = document.querySelector('#memory-plan .table-wrap').getBoundingClientRect();
             return [...document.querySelectorAll('#memory-plan [role=gridcell]')]
               .filter(c => c.innerText.includes('tokens/s') && c.getBoundingClientRect().right > wrap.right + 1)
               .length; }"""
    )
    assert cut == 0  # the runs-on column ends inside the page at 1400 px


def test_history_rerun_shows_the_two_texts(page):
    page.locator("#new-text textarea").fill("the ocean")
    _set_tokens(page, 8)
    page.locator("#generate").click()
    _wait_run_ended(page)
    steered, baseline = _value(page, "steered-output"), _value(page, "baseline-output")
    page.get_by_role("tab", name="History").click()
    page.locator("#history-number input").fill("1")
    page.locator("#history-rerun").click()
    page.wait_for_function(
        "() => (document.querySelector('#history-message') || {innerText: ''}).innerText.includes('Re-ran entry 1')"
    )
    page.wait_for_function("() => document.querySelector('#history-steered textarea').value.length > 0")
    assert _value(page, "history-steered") == steered and _value(page, "history-baseline") == baseline
    assert not page.locator("#history-prompted").is_visible()  # no prompted row in this entry
    assert not page.locator("#history-answer .json-holder, #history-answer .json-node").first.is_visible()
