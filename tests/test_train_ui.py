"""The Train tab and the /train_vector and /read endpoints, end to end on the embedded SmolLM2:
the tab's handlers called as the page calls them, and a launched server called with the real
gradio_client (a trained row goes back into /steer, /chat, /export_vectors and /read as it is)."""

from __future__ import annotations

import json

import pytest
from _server import client, ensure_embedded_loaded, launched
from gradio_client.exceptions import AppError
from test_training import OCEAN, OFFICE

from steering.ui import steer as ui_steer
from steering.ui import train as ui_train

LAYER = 15


def _refusal(outputs) -> str:
    return next(o for o in outputs if isinstance(o, str) and o.startswith("⚠️")).removeprefix("⚠️ ")


@pytest.fixture(scope="module")
def trained(embedded_dir):
    ensure_embedded_loaded()
    state, summary, plot, message = ui_train.train_from_form(
        "\n".join(OCEAN), "\n".join(OFFICE), "", "", "mean_diff", True, LAYER, "mean_skip_first", "ocean", progress=None
    )
    return state, summary, plot, message


def test_train_fills_the_summary_and_the_auroc_plot(trained):
    state, summary, plot, message = trained
    assert message == "" and state["vector"]["name"] == "ocean" and state["n_pos"] == len(OCEAN)
    assert f"layer {state['layer']}" in summary and "AUROC" in summary and "held-out" in summary
    assert plot.startswith("<svg") and plot.count("<circle") == len(state["layers"])  # a marker per layer
    assert f"layer {state['layer']}: AUROC" in plot and 'stroke="#d62728"' in plot  # the chosen layer ringed


def test_add_to_table_puts_the_direction_in_the_steer_table(trained):
    state = trained[0]
    rows, directions, note = ui_train.add_trained(state, [["dogs", "", "", 1.0, LAYER, True, "prompt"]], {})
    assert len(rows) == 2 and rows[0][0] == "dogs" and rows[1][0] in directions and "row 2" in note
    assert directions[rows[1][0]] == state["vector"]["direction"] and rows[1][4] == state["layer"]
    # ... and Generate steers with it; the prompted row takes its words from the vector's name.
    stream = ui_steer.generate_outputs("Tell me about your weekend.", rows[1:], LAYER, 8, 0.0, 1.0, 0, "contexts",
                                       False, directions, prompted=True)  # fmt: skip
    steered, baseline, line, prompted, *badges, best = list(stream)[-1]
    assert steered and baseline and steered != baseline and prompted
    assert "talk about ocean" in best, best


def test_read_highlights_tokens_and_draws_the_two_groups(trained):
    state = trained[0]
    tokens, table, picture, note = ui_train.read_from_form(
        "\n".join(OCEAN[:3]), "\n".join(OFFICE[:3]), "trained vector", state, [], {}, LAYER
    )
    assert [row[1] for row in table] == ["positive"] * 3 + ["negative"] * 3
    assert min(r[0] for r in table[:3]) > max(r[0] for r in table[3:])  # the ocean reads higher
    assert sum(1 for token, value in tokens if token == "\n") == 5  # six texts, one scale
    assert all(value is None or -1 <= value <= 1 for _, value in tokens) and picture.startswith("<svg")
    assert f"layer {state['layer']}" in note


def test_the_tabs_refusals_name_the_field(trained):
    assert _refusal(ui_train.train_from_form("", "", "", "", "mean_diff", True, LAYER, "mean", "")).startswith(
        "positives: "
    )
    assert _refusal(ui_train.train_from_form("one", "", "", "", "mean_diff", True, LAYER, "mean", "")).startswith(
        "positives"
    )
    assert _refusal(ui_train.add_trained(None, [], {})).startswith("vector: train a vector first")
    assert _refusal(ui_train.read_from_form("", "", "trained vector", trained[0], [], {}, LAYER)).startswith("texts: ")
    assert _refusal(ui_train.read_from_form("a text", "", "table's first vector", None, [], {}, LAYER)).startswith(
        "vector: "
    )


def test_examples_load_from_a_file_and_a_bad_file_is_refused(tmp_path):
    good = tmp_path / "examples.jsonl"
    good.write_text("\n".join(json.dumps({"text": t, "label": int(i < 2)}) for i, t in enumerate(OCEAN[:4])))
    positives, negatives, note = ui_train.load_examples(str(good), "", "")
    assert positives.splitlines() == OCEAN[:2] and negatives.splitlines() == OCEAN[2:4] and "2 positives" in note
    bad = tmp_path / "examples.csv"
    bad.write_text("colour,size\nred,3\n")
    assert _refusal(ui_train.load_examples(str(bad), "kept", "kept")).startswith("file: ")


@pytest.fixture(scope="module")
def api(embedded_dir):
    with launched() as url:
        yield client(url)


def test_endpoints_train_read_and_the_row_steers_as_it_is(api):
    result = api.predict(OCEAN, OFFICE, "mean_diff", LAYER, api_name="/train_vector")
    vector = result["vector"]
    assert result["layer"] == vector["layer"] == LAYER and result["auroc"] > 0.9 and len(result["layers"]) == 30
    read = api.predict(OCEAN[:2] + OFFICE[:2], vector, api_name="/read")
    assert read["layer"] == LAYER and len(read["scores"]) == 4 and read["scores"][0] > read["scores"][3]
    assert all(isinstance(token, str) and isinstance(value, float) for token, value in read["tokens"][0])
    steered = api.predict("Tell me about your weekend.", [vector], 8, api_name="/steer")
    assert steered["steered"] != steered["baseline"]
    chat = api.predict("Hi!", [], [], [vector], 6, api_name="/chat")
    assert chat["steered"] and chat["baseline"]
    exported = api.predict([vector], "safetensors", api_name="/export_vectors")
    assert exported  # a file for download


def test_endpoints_refuse_bad_input_and_keep_serving(api):
    for args, field in (
        (([OCEAN[0]], OFFICE), "positives"),
        ((OCEAN, OFFICE, "magic"), "method"),
        ((OCEAN, OFFICE, "mean_diff", 99), "layer"),
    ):
        with pytest.raises(AppError, match=f"^{field}"):
            api.predict(*args, api_name="/train_vector")
    with pytest.raises(AppError, match="^vector.direction"):
        api.predict(["a text"], {"direction": [1.0] * 8, "coeff": 1, "layer": LAYER}, api_name="/read")
    assert api.predict(["The sea."], {"text": "the ocean", "layer": LAYER}, api_name="/read")["scores"]
