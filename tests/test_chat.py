"""The Chat tab's endpoint, /chat, through the real `gradio_client` against a real launched server
(the embedded SmolLM2 on CPU, fp32, greedy: outputs are deterministic and compared exactly), and
the tab's streaming handler with its Stop.

The parity spine: with a zero coefficient the steered conversation is the baseline, turn after
turn; and a conversation's reply does not depend on the other row of its batch, even when the
two histories differ in length and the shorter row is left-padded.
"""

from __future__ import annotations

import time

import gradio as gr
import pytest
from _server import TOKENS, client, launched
from gradio_client.exceptions import AppError

from steering import engine
from steering.ui import chat as ui_chat

LAYER = 15  # the embedded model's middle layer (30 layers)
ZERO = [{"text": "dogs", "coeff": 0.0, "layer": LAYER}]
DOGS = [{"text": "dogs", "coeff": 0.6, "layer": LAYER}]  # strong enough to change the reply


@pytest.fixture(scope="module")
def api(embedded_dir):
    with launched() as url:
        yield client(url)


def chat(api, message, steered, baseline, vectors, **kwargs):
    kwargs.setdefault("max_new_tokens", TOKENS)
    return api.predict(message, steered, baseline, vectors, api_name="/chat", **kwargs)


def _turn(message: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]


@pytest.fixture(scope="module")
def unsteered(api):
    """Two turns with a zero-coefficient vector."""
    first = chat(api, "Tell me about your weekend.", [], [], ZERO)
    second = chat(api, "And then?", first["history_steered"], first["history_baseline"], ZERO)
    return first, second


def test_zero_coefficient_gives_the_baseline_turn_after_turn(unsteered):
    for result in unsteered:
        assert result["steered"] and result["steered"] == result["baseline"]
        assert result["history_steered"] == result["history_baseline"]
        assert result["layers"] == [LAYER] and result["fallback"] is None and result["tokens"] == [TOKENS, TOKENS]


def test_two_turns_keep_two_histories(api, unsteered):
    first = chat(api, "Tell me about your weekend.", [], [], DOGS)
    assert first["steered"] != first["baseline"]  # the vector steers
    assert first["baseline"] == unsteered[0]["baseline"]  # the baseline row is unsteered
    second = chat(api, "And then?", first["history_steered"], first["history_baseline"], DOGS)
    assert second["history_steered"] == [
        *_turn("Tell me about your weekend.", first["steered"]),
        *_turn("And then?", second["steered"]),
    ]
    assert second["history_baseline"] == [
        *_turn("Tell me about your weekend.", first["baseline"]),
        *_turn("And then?", second["baseline"]),
    ]
    assert second["steered"] != second["baseline"]
    # The baseline conversation is the unsteered chat's, whatever the steered row beside it did.
    assert second["history_baseline"] == unsteered[1]["history_baseline"]


def test_a_reply_does_not_depend_on_the_other_row_even_left_padded(api):
    long = _turn(
        "Tell me about your weekend.", "I walked my dog in the park, read a long book about the sea and cooked."
    )
    short = _turn("Tell me about your weekend.", "Fine.")
    padded = chat(api, "What else?", long, short, [])  # rows of different lengths: the short one padded
    assert padded["steered"] == chat(api, "What else?", long, long, [])["steered"]
    assert padded["baseline"] == chat(api, "What else?", short, short, [])["baseline"]


MESSAGE = {"role": "user", "content": "Hi"}
REPLY = {"role": "assistant", "content": "Hello!"}


@pytest.mark.parametrize(
    ("message", "steered", "baseline", "expected"),
    [
        ("", [], [], "message: must be a non-empty text"),
        ("Hi", "[]", [], "history_steered: must be a list of"),
        ("Hi", ["Hi", "Hello!"], ["Hi", "Hello!"], "history_steered[0]: must be a {"),
        ("Hi", [{**MESSAGE, "name": "x"}, REPLY], [MESSAGE, REPLY], "history_steered[0]: has an unknown key 'name'"),
        ("Hi", [{"role": "system", "content": "Be brief."}], [], "history_steered[0].role: must be 'user'"),
        ("Hi", [MESSAGE, MESSAGE], [MESSAGE, MESSAGE], "history_steered[1].role: must be 'assistant'"),
        ("Hi", [MESSAGE], [MESSAGE], "history_steered: ends with a user message"),
        ("Hi", [MESSAGE, {**REPLY, "content": 5}], [], "history_steered[1].content: must be a text"),
        (
            "Hi",
            [MESSAGE, REPLY] * 16,
            [MESSAGE, REPLY] * 16,
            "history_steered: holds 16 exchanges; with the new message that is 17, and a chat holds 16",
        ),
        ("Hi", [MESSAGE, {**REPLY, "content": "x" * 24000}], [], "history_steered: with the new message holds 24004"),
        ("Hi", [MESSAGE, REPLY], [], "history_baseline: holds 0 messages and history_steered 2"),
        ("Hi", [MESSAGE, REPLY], [{**MESSAGE, "content": "Hey"}, REPLY], "history_baseline[0].content: differs"),
    ],
    ids=[
        "empty-message",
        "not-a-list",
        "not-a-message",
        "unknown-key",
        "system-role",
        "two-users",
        "no-reply",
        "reply-not-text",
        "too-many-turns",
        "too-many-chars",
        "different-lengths",
        "different-user-messages",
    ],
)
def test_bad_inputs_are_refused_naming_the_field(api, message, steered, baseline, expected):
    with pytest.raises(AppError) as caught:
        chat(api, message, steered, baseline, DOGS)
    assert str(caught.value).startswith(expected), caught.value


def test_a_refusal_leaves_nothing_behind(api, unsteered):
    with pytest.raises(AppError, match=r"^vectors\[0\]\.layer: must be an integer from 0 to 29"):
        chat(api, "Tell me about your weekend.", [], [], [{"text": "dogs", "coeff": 0.6, "layer": 99}])
    with pytest.raises(AppError, match=r"^history_steered\[1\]\.role"):
        chat(api, "Tell me about your weekend.", [MESSAGE, MESSAGE], [MESSAGE, MESSAGE], DOGS)
    again = chat(api, "Tell me about your weekend.", [], [], ZERO)
    assert again == unsteered[0]  # same model, same replies, no vector left installed


def test_the_tab_streams_a_turn_and_stop_keeps_what_was_said(api):
    """The Chat tab's handler: it streams both conversations and empties the message box; Stop
    (this session's flag, as the Stop button sets it) ends a 200-token turn within a step, and the
    stopped turn keeps its partial replies."""
    rows = [["dogs", "", "", 0.6, LAYER, True]]
    settings = (200, 0.0, 1.0, 0, engine.DEFAULT_CAPTURE_MODE)
    stream = ui_chat.send_message("Tell me a long story.", [], [], rows, LAYER, *settings)
    for update in stream:
        if update[2][1]["content"]:  # the first tokens have come
            break
    steered_chat, baseline_chat, steered, baseline, box, line, message_line = update
    assert steered_chat == steered and baseline_chat == baseline and box == "" and message_line == ""
    assert steered[0] == {"role": "user", "content": "Tell me a long story."} and "generating" in line
    started = time.monotonic()
    ui_chat.stop_turn(None)  # the Stop button of the session (no session in a direct call)
    updates = list(stream)
    assert time.monotonic() - started < 10
    *_, steered, baseline, box, line, _ = updates[-1]
    assert "stopped after" in line, line
    tokens = int(line.split("stopped after ")[1].split()[0])
    assert 0 < tokens < 200 and steered[1]["role"] == "assistant" and steered[1]["content"]
    assert [m["content"] for m in baseline[::2]] == ["Tell me a long story."]
    refused = list(ui_chat.send_message("Hi", [MESSAGE], [MESSAGE], rows, LAYER, *settings))
    assert refused[-1][-1].startswith("⚠️ history_steered: ends with a user message")  # inline, at the field
    far = [["", "", "", None, None, None], ["dogs", "", "", 0.6, 99, True]]  # the vector is the table's row 2
    refused = list(ui_chat.send_message("Hi", [], [], far, LAYER, *settings))
    assert refused[-1][-1].startswith("⚠️ row 2, layer: must be an integer from 0 to 29"), refused[-1][-1]
    assert ui_chat.clear_chat(None)[:6] == ([], [], [], [], "", "")


def test_stop_reaches_a_turn_still_waiting_for_the_model(api):
    """Send registers the turn before it queues; Stop then sets its flag, and when the queue
    reaches it the turn ends at once without touching the model (no Gradio `cancels`)."""
    rows = [["dogs", "", "", 0.6, LAYER, True]]
    settings = (200, 0.0, 1.0, 0, engine.DEFAULT_CAPTURE_MODE)
    *buttons, message_line, run_id = ui_chat.begin_turn("Hi", None)
    assert run_id and message_line == "" and buttons[1].interactive
    assert ui_chat.begin_turn("  ", None)[-1] == ""  # an empty message is refused before it queues
    send, stop = ui_chat.stop_turn(None)
    assert send.interactive and not stop.interactive
    started = time.monotonic()
    updates = list(ui_chat.send_turn("Hi", [], [], rows, LAYER, *settings, None, run_id))
    assert time.monotonic() - started < 1  # 200 tokens were not generated
    assert all(isinstance(value, type(gr.skip())) for value in updates[0])


def test_chat_is_documented_like_the_other_endpoints(api):
    info = api.view_api(print_info=False, return_format="dict")["named_endpoints"]["/chat"]
    names = [p["parameter_name"] for p in info["parameters"]]
    assert names == [
        "message",
        "history_steered",
        "history_baseline",
        "vectors",
        "max_new_tokens",
        "temperature",
        "top_p",
        "seed",
        "capture_mode",
        "prompted",
        "history_prompted",
    ]
    for parameter in info["parameters"]:
        assert parameter["label"] == parameter["parameter_name"] and parameter["python_type"]["description"]
    assert "side by side" in info["description"] and '"role"' in info["description"]
