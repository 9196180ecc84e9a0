"""Steered, baseline and prompted side by side in a real browser (Debian's Chromium, Playwright),
on a desktop window and on a phone-sized one: the Prompted box appears with the option, every
box gets its score badges, and one line names the best row. Skips like tests/test_browser.py (a
failure under STEERING_REQUIRE_BROWSER=1); the screenshots go where its screenshots go."""

from __future__ import annotations

import pytest
import test_browser
from test_browser import ASSETS, _set_tokens, _text, _value, _wait_run_ended

browser_page, page = test_browser.browser_page, test_browser.page  # the shared browser fixtures


@pytest.mark.parametrize(("width", "height", "name"), [(1366, 900, "desktop"), (390, 844, "phone")])
def test_prompted_row_beside_steered_and_baseline_with_scores(page, width, height, name):
    page.set_viewport_size({"width": width, "height": height})
    page.reload()
    # (on a phone the model panel starts folded: the status line is in the page, not shown)
    page.locator("#status-line").get_by_text("SmolLM2-135M-Instruct").first.wait_for(state="attached")
    assert not page.locator("#prompted-output").is_visible()  # off by default: two boxes
    page.locator("#new-text textarea").fill("the ocean")
    _set_tokens(page, 16)
    page.locator("#prompted input[type=checkbox]").check()
    page.locator("#prompted-output").wait_for(state="visible")
    page.locator("#generate").click()
    line = _wait_run_ended(page)
    assert "tokens/s" in line, line
    page.wait_for_function("() => document.querySelector('#best-row').innerText.trim().length > 0")
    steered, baseline, prompted = (_value(page, f"{row}-output") for row in ("steered", "baseline", "prompted"))
    assert steered and baseline and prompted and len({steered, baseline, prompted}) == 3
    for row in ("steered", "baseline", "prompted"):
        assert "concept" in _text(page, f"{row}-scores").lower(), row  # its badges
    assert "the ocean" in _text(page, "best-row")  # the line quotes the instruction
    boxes = [page.locator(f"#{row}-output").bounding_box() for row in ("steered", "baseline", "prompted")]
    if name == "desktop":  # side by side: one row of three boxes
        assert len({round(b["y"]) for b in boxes}) == 1 and boxes[0]["x"] < boxes[1]["x"] < boxes[2]["x"]
    else:  # a phone stacks them, each the page's width
        assert all(b["width"] <= width for b in boxes)
    ASSETS.mkdir(exist_ok=True)
    page.screenshot(path=str(ASSETS / f"screenshot-prompted-{name}.png"), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})  # as the shared page was
