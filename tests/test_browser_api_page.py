"""The "Use via API" page in a real browser (Debian's Chromium, Playwright) against a launched app,
opened by its address /?view=api (Gradio 6.31 alone drew it only after its footer button): a
newcomer calls every endpoint from that page alone, so each parameter's whole description is
there (the shape of `vectors`), each snippet holds a real value where Gradio writes "...", each
endpoint says what its answer holds, and nothing meant for in-process callers shows. Gradio's
untranslated "common.complete" (announced when an event finishes) reads "Complete". Skips like
tests/test_browser.py (a failure under STEERING_REQUIRE_BROWSER=1)."""

from __future__ import annotations

import re

import httpx
import test_browser

from steering.ui import endpoints

browser_page, page = test_browser.browser_page, test_browser.page  # the shared browser fixtures

# Every text the page's status regions announce (they clear themselves after a second).
RECORD_ANNOUNCEMENTS = """
window.__announced = [];
new MutationObserver(() => {
  for (const e of document.querySelectorAll('[role=status]')) {
    const t = e.textContent.trim();
    if (t && !window.__announced.includes(t)) window.__announced.push(t);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def _api_docs_text(page) -> str:
    page.goto(page.url_under_test + "?view=api")  # the address alone opens it (no click)
    docs = page.locator(".api-docs")
    docs.get_by_text("API name: /plan").first.wait_for()
    return docs.inner_text()


def test_api_page_describes_every_parameter_in_full_with_examples_and_answers(browser_page):
    page = browser_page
    text = _api_docs_text(page)
    names = [name for _, name, _ in endpoints.ENDPOINTS]
    assert re.findall(r"API name: /(\w+)", text) == names
    # vectors: its whole description, not its first line: the three shapes and the optional keys
    for shape in ('{"positive", "negative", "coeff", "layer"}', '{"direction": [hidden-size', '"positions" ("prompt"'):
        assert shape in text, shape
    # real values in the snippets, never Gradio's "..."
    assert 'vectors=[{"text": "the ocean", "coeff": 1.0, "layer": 15}]' in text
    assert "handle_file('steering-vectors.gguf')" in text
    assert not re.search(r"=\.\.\.[,)\n]", text), re.findall(r".*=\.\.\..*", text)
    # what each endpoint answers
    assert 'Returns: {"steered", "baseline" (None without compare)' in text
    assert text.count("Returns: ") == len(names)
    assert 'Returns: {"model", "quant", "device" (None before a model is loaded)' in text  # /status in full
    # no internals
    for internal in ("in-process", "In-process", "keyword `stop`", "threading.Event", "common."):
        assert internal not in text, internal


def test_finished_events_are_announced_in_words(browser_page):
    browser_page.add_init_script(RECORD_ANNOUNCEMENTS)
    browser_page.goto(browser_page.url_under_test)
    browser_page.locator("#status-line").get_by_text("SmolLM2-135M-Instruct").first.wait_for()
    browser_page.locator("#new-text textarea").fill("the ocean")
    browser_page.get_by_role("button", name="Add vector").click()
    browser_page.wait_for_function("() => window.__announced.some(t => t !== 'Loading')")
    announced = browser_page.evaluate("window.__announced")
    assert "Complete" in announced and not any("common." in t for t in announced), announced


def test_api_info_gives_every_required_parameter_an_example(browser_page):
    info = httpx.get(browser_page.url_under_test + "gradio_api/info", timeout=30).json()["named_endpoints"]
    for name, endpoint in info.items():
        for parameter in endpoint["parameters"]:
            assert parameter["python_type"]["description"], (name, parameter["parameter_name"])
            if not parameter["parameter_has_default"]:
                assert parameter["example_input"] != "...", (name, parameter["parameter_name"])
            assert "stop" != parameter["parameter_name"], name
        assert "Returns: " in endpoint["description"], name


def test_the_snippets_example_values_are_accepted(browser_page):
    """Each endpoint called with the API page's example values (fewer new tokens, to stay quick):
    the snippets a newcomer copies run. Auto-tune and load_model are left out for time."""
    from _server import TOKENS, client
    from gradio_client import handle_file

    api = client(browser_page.url_under_test)
    quick = {"max_new_tokens": TOKENS}
    for name in ("steer", "chat", "sweep", "similarity", "train_vector", "read", "export_vectors"):
        example = dict(endpoints.EXAMPLES[name])
        if name in ("steer", "chat", "sweep"):
            example.update(quick)
        result = api.predict(**example, api_name=f"/{name}")
        assert result, name
    exported = api.predict(**endpoints.EXAMPLES["export_vectors"], api_name="/export_vectors")
    path = exported["path"] if isinstance(exported, dict) else exported
    imported = api.predict(file=handle_file(path), api_name="/import_vectors")
    assert imported["vectors"][0]["layer"] == 15
