"""Every client endpoint through the real `gradio_client` against a real launched server.

One server per module (`build_demo` + `launch` in this process), serving the embedded SmolLM2 on
CPU in fp32 with greedy decoding, so outputs are deterministic and can be compared exactly.
Bad inputs must arrive as Gradio errors whose message names the field, and leave the server
serving. The docs' ```python client examples run in tests/test_docs.py.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
import torch
from _server import TOKENS, client, launched
from gradio_client.exceptions import AppError

from steering import api as steering_api
from steering import catalog, engine, limits
from steering.ui import endpoints as ui_endpoints
from steering.ui import views

PROMPT = "Tell me about your weekend."
LAYER = 15  # the embedded model's middle layer (30 layers)
ENDPOINTS = {f"/{name}" for _, name, _ in ui_endpoints.ENDPOINTS}


@pytest.fixture(scope="module")
def url(embedded_dir):
    with launched() as local_url:
        yield local_url


@pytest.fixture(scope="module")
def api(url):
    return client(url)


def steer(api, vectors, **kwargs):
    kwargs.setdefault("max_new_tokens", TOKENS)
    return api.predict(PROMPT, vectors, api_name="/steer", **kwargs)


@pytest.fixture(scope="module")
def baseline(api):
    """The unsteered text (the baseline row of a request with a zero-coefficient vector)."""
    result = steer(api, [{"text": "dogs", "coeff": 0.0, "layer": LAYER}])
    assert result["baseline"], "the baseline row produced no text"
    return result


def test_named_endpoints_are_exactly_the_public_api(api):
    info = api.view_api(print_info=False, return_format="dict")
    assert set(info["named_endpoints"]) == ENDPOINTS  # UI-only handlers are private
    assert not info["unnamed_endpoints"]
    steer_params = [p["parameter_name"] for p in info["named_endpoints"]["/steer"]["parameters"]]
    assert steer_params == [
        "prompt",
        "vectors",
        "max_new_tokens",
        "temperature",
        "top_p",
        "seed",
        "compare",
        "capture_mode",
        "raw_prompt",
        "prompted",
    ]
    sweep_params = info["named_endpoints"]["/sweep"]["parameters"]
    assert [(p["parameter_name"], p["python_type"]["type"]) for p in sweep_params][:4] == [
        ("prompt", "str"),
        ("text", "str"),
        ("layer", "int"),
        ("coeffs", "list[float]"),
    ]
    assert "steering vectors" in info["named_endpoints"]["/steer"]["description"]  # the docstring
    # The API page: every parameter is labelled by its name and described by its docstring line.
    for endpoint, spec in info["named_endpoints"].items():
        for parameter in spec["parameters"]:
            assert parameter["label"] == parameter["parameter_name"], (endpoint, parameter)
            assert parameter["python_type"]["description"], (endpoint, parameter["parameter_name"])
    (tokens,) = [p for p in info["named_endpoints"]["/steer"]["parameters"] if p["parameter_name"] == "max_new_tokens"]
    assert tokens["python_type"]["description"] == "tokens to generate, 1 to 512."


def test_rest_calls_cannot_skip_the_queue(url):
    import httpx

    response = httpx.post(url + "gradio_api/run/steer", json={"data": [PROMPT, []]}, timeout=10)
    assert response.status_code == 404 and "join the queue" in response.text


def test_status_reports_the_embedded_model(api):
    status = api.predict(api_name="/status")
    assert status["model"] == catalog.EMBEDDED_ID
    assert (status["n_layers"], status["default_layer"], status["device"]) == (30, LAYER, "cpu")
    assert status["memory"]["model_bytes"] > 100 * 2**20  # 135M parameters in fp32
    assert isinstance(status["events"], list)


def test_zero_coefficient_equals_baseline_and_a_strong_vector_differs(api, baseline):
    assert baseline["steered"] == baseline["baseline"]
    assert baseline["layers"] == [LAYER] and baseline["fallback"] is None
    strong = steer(api, [{"text": "dogs", "coeff": 4.0, "layer": LAYER}])
    assert strong["baseline"] == baseline["baseline"]  # the baseline row is untouched by steering
    assert strong["steered"] != strong["baseline"]


def test_compare_false_returns_no_baseline(api, baseline):
    result = steer(api, [{"text": "dogs", "coeff": 0.0, "layer": LAYER}], compare=False)
    assert result["baseline"] is None
    assert result["steered"] == baseline["baseline"]  # same greedy tokens without the second row


def test_two_concurrent_clients_each_get_their_own_serial_result(url, api, baseline):
    recipes = {
        "dogs": [{"text": "dogs", "coeff": 4.0, "layer": LAYER}],
        "bridge": [{"text": "the Golden Gate Bridge", "coeff": -3.0, "layer": 20}],
    }
    serial = {name: steer(api, vectors)["steered"] for name, vectors in recipes.items()}
    assert len({serial["dogs"], serial["bridge"], baseline["baseline"]}) == 3  # three distinct outputs
    clients = {name: client(url) for name in recipes}
    jobs = {name: clients[name].submit(PROMPT, recipes[name], TOKENS, api_name="/steer") for name in recipes}
    results = {name: job.result(timeout=120) for name, job in jobs.items()}
    assert {name: r["steered"] for name, r in results.items()} == serial
    assert all(r["baseline"] == baseline["baseline"] for r in results.values())


def test_sweep_rows_scores_and_zero_row(api, baseline):
    result = api.predict(PROMPT, "dogs", LAYER, [0.0, 4.0], TOKENS, api_name="/sweep")
    rows = result["rows"]
    assert [r["coeff"] for r in rows] == [0.0, 4.0]
    assert rows[0]["text"] == baseline["baseline"]  # coefficient 0 is the unsteered row
    assert rows[0]["effect"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["text"] != rows[0]["text"]
    assert rows[1]["effect"] > 0  # steering towards "dogs" makes the text "dogs" more likely
    assert all(r["perplexity"] > 1.0 for r in rows)
    assert result["positions"] == "prompt"  # the default


def test_sweep_positions_match_steer(api):
    """A sweep row with positions "all" is the /steer output of that vector at every position, and
    differs from the default "prompt" rule."""
    every = api.predict(PROMPT, "dogs", LAYER, [0.5], TOKENS, 0, "all", api_name="/sweep")
    prompt_only = api.predict(PROMPT, "dogs", LAYER, [0.5], TOKENS, api_name="/sweep")
    assert every["positions"] == "all" and every["rows"][0]["text"] != prompt_only["rows"][0]["text"]
    for result, positions in ((every, "all"), (prompt_only, "prompt")):
        vector = {"text": "dogs", "coeff": 0.5, "layer": LAYER, "positions": positions}
        steered = api.predict(PROMPT, [vector], TOKENS, api_name="/steer")["steered"]
        assert result["rows"][0]["text"] == steered, positions


def test_similarity_matrix(api):
    texts = ["dogs", "puppies", "the Golden Gate Bridge"]
    matrix = api.predict(texts, LAYER, api_name="/similarity")["matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert all(matrix[i][i] == pytest.approx(1.0, abs=1e-4) for i in range(3))
    assert matrix[0][1] > matrix[0][2]  # dogs are closer to puppies than to a bridge
    assert api.predict(texts, LAYER, api_name="/similarity")["fallback"] is None


def test_similarity_compares_a_pair_as_its_difference_vector(api, smol_engine):
    pair = {"positive": "happy", "negative": "sad"}
    result = api.predict(["joyful", pair, "sad"], LAYER, api_name="/similarity")
    assert result["texts"] == ["joyful", "happy − sad", "sad"]
    matrix = result["matrix"]
    assert matrix[1][1] == pytest.approx(1.0, abs=1e-4)
    happy, sad, joyful = smol_engine.text_means(LAYER, ["happy", "sad", "joyful"], engine.DEFAULT_CAPTURE_MODE)
    expected = torch.nn.functional.cosine_similarity(happy - sad, joyful, dim=0).item()
    assert matrix[0][1] == pytest.approx(expected, abs=1e-4)
    assert matrix[1][2] < 0 < matrix[0][1]  # the difference points away from "sad", toward "joyful"
    with pytest.raises(AppError, match=r"^texts\[1\]\.extra: unknown key"):
        api.predict(["joyful", {**pair, "extra": 1}], LAYER, api_name="/similarity")
    with pytest.raises(AppError, match=r"^texts\[0\]\.negative: "):
        api.predict([{"positive": "happy"}, "sad"], LAYER, api_name="/similarity")


def test_plan_matches_the_cli_shape(api):
    plan = api.predict(2048, api_name="/plan")
    assert set(plan) >= {"device", "headroom_bytes", "models", "choice"}
    assert plan["device"]["mode"] == "cpu"
    assert {m["id"] for m in plan["models"]} >= {spec.id for spec in catalog.CATALOG}
    assert all(m["verdict"] in ("stable", "fragile", "wont_fit") for m in plan["models"])
    assert plan["choice"]["id"] == catalog.EMBEDDED_ID


def test_load_model_reloads_and_reports_status(api):
    status = api.predict(catalog.EMBEDDED_ID, "auto", False, api_name="/load_model")
    assert status["model"] == catalog.EMBEDDED_ID and status["n_layers"] == 30


@pytest.mark.parametrize(
    ("endpoint", "args", "expected"),
    [
        ("/steer", ("", []), r"^prompt: .*non-empty"),
        (
            "/steer",
            (PROMPT, [{"text": "dogs", "coeff": "nan", "layer": LAYER}]),  # JSON has no NaN: a string
            r"vectors\[0\]\.coeff: must be a number; got 'nan'",
        ),
        (
            "/steer",
            (PROMPT, [{"text": "dogs", "coeff": 1e6, "layer": LAYER}]),
            rf"vectors\[0\]\.coeff: .*{limits.COEFF_CAP:g}",
        ),
        ("/steer", (PROMPT, [{"text": "dogs", "coeff": 1, "layer": 99}]), r"vectors\[0\]\.layer: .*0 to 29"),
        ("/steer", (PROMPT, [{"text": " ", "coeff": 1, "layer": 1}]), r"vectors\[0\]\.text: .*non-empty"),
        ("/steer", (PROMPT, [], 10**6), rf"max_new_tokens: .*1 to {limits.MAX_NEW_TOKENS}"),
        (
            "/steer",
            (PROMPT, [{"text": "x", "coeff": 1, "layer": 1}] * (limits.MAX_VECTORS + 1)),
            rf"^vectors: .*at most {limits.MAX_VECTORS}",
        ),
        ("/steer", (PROMPT, [], 8, 5.0), r"^temperature: .*from 0 to 2"),
        ("/sweep", (PROMPT, "dogs", LAYER, [0.0] * 9), r"^coeffs: .*1 to 8"),
        ("/sweep", (PROMPT, "dogs", -1, [0.0]), r"^layer: .*0 to 29"),
        ("/sweep", (PROMPT, "dogs", LAYER, [0.0], 8, 0, "reply"), r"^positions: must be one of prompt, all"),
        ("/steer", (PROMPT, [{"text": "dogs", "layer": 3, "positions": "reply"}]), r"^vectors\[0\]\.positions: "),
        ("/similarity", (["dogs"], LAYER), r"^texts: .*2 to 8"),
        ("/load_model", ("no-such/model-anywhere",), r"no-such/model-anywhere is not in the catalog"),
        ("/load_model", (catalog.EMBEDDED_ID, "3bit"), r"^quant: .*auto, 4bit"),
        ("/plan", (5,), r"^context: .*128 to 32768"),
        # Strict types: one rule for every endpoint (issue 12).
        (
            "/steer",
            (PROMPT, [{"text": "dogs", "coeff": True, "layer": LAYER}]),
            r"^vectors\[0\]\.coeff: must be a number; got True",
        ),
        ("/steer", (PROMPT, [{"text": "dogs", "layer": "3"}]), r"^vectors\[0\]\.layer: must be a number; got '3'"),
        (
            "/steer",
            (PROMPT, [{"text": "dogs", "layer": 3, "enabled": "false"}]),
            r"^vectors\[0\]\.enabled: must be true or false",
        ),
        (
            "/steer",
            (PROMPT, [{"text": "dogs", "layer": 3, "colour": "red"}]),
            r"^vectors\[0\]\.colour: is not a vector field",
        ),
        (
            "/steer",
            (PROMPT, [{"text": "dogs", "positive": "a", "negative": "b", "layer": 3}]),
            r"^vectors\[0\]: give exactly one of",
        ),
        ("/steer", (PROMPT, [], 8, 0.0, 1.0, 0, "false"), r"^compare: must be true or false; got 'false'"),
        (
            "/steer",
            (PROMPT, [{"direction": [0.1] * 576, "layer": LAYER}], 8, 0.0, 1.0, 0, True, "contexts", False, True),
            r"^prompted: is on, but no vector has words to prompt with",
        ),
        ("/steer", (PROMPT, [], True), r"^max_new_tokens: must be a number; got True"),
        ("/steer", (PROMPT, [], 8, 0.0, 1.0, "7"), r"^seed: must be a number; got '7'"),
        ("/steer", (PROMPT, [], 8, 0.0, 1.0, 10**400), r"^seed: must be a number"),
        ("/sweep", (PROMPT, "dogs", LAYER, [True, False]), r"^coeffs\[0\]: must be a number; got True"),
        ("/load_model", (123,), r"^model: must be a text"),
        ("/load_model", ("x" * 300,), r"^model: is 300 characters; model ids and folders are at most 256"),
    ],
    ids=[
        "empty-prompt",
        "nan-coeff",
        "huge-coeff",
        "layer-range",
        "blank-text",
        "max-tokens",
        "too-many-vectors",
        "temperature",
        "sweep-coeffs",
        "sweep-layer",
        "sweep-positions",
        "steer-positions",
        "similarity-texts",
        "unknown-model",
        "quant",
        "plan-context",
        "bool-coeff",
        "string-layer",
        "string-enabled",
        "unknown-key",
        "text-and-pair",
        "string-compare",
        "prompted-direction",
        "bool-tokens",
        "string-seed",
        "huge-seed",
        "bool-coeffs",
        "int-model",
        "long-model-id",
    ],
)
def test_bad_input_is_an_error_naming_the_field(api, endpoint, args, expected):
    with pytest.raises(AppError) as caught:
        api.predict(*args, api_name=endpoint)
    assert re.search(expected, str(caught.value)), str(caught.value)


def test_server_keeps_serving_after_errors(api, baseline):
    with pytest.raises(AppError):
        steer(api, [{"text": "dogs", "coeff": "inf", "layer": LAYER}])
    again = steer(api, [{"text": "dogs", "coeff": 0.0, "layer": LAYER}])
    assert again["steered"] == again["baseline"] == baseline["baseline"]  # nothing left installed


def test_builtin_examples_steer_the_embedded_model(api, baseline):
    for name, example in views.EXAMPLES.items():
        vectors = [{**v, "layer": LAYER if v["layer"] is None else v["layer"]} for v in example["vectors"]]
        result = api.predict(example["prompt"], vectors, TOKENS, api_name="/steer")
        assert result["steered"] and result["steered"] != result["baseline"], name


def test_stop_ends_generation_within_a_step_and_frees_the_model(api):
    """What the Stop button does: Gradio closes the UI's streaming generator; its `finally` sets
    the stop flag, so generation ends at once instead of running to 200 tokens."""
    from steering.ui.steer import generate_outputs

    rows = [["dogs", "", "", 0.5, LAYER, True]]
    stream = generate_outputs(PROMPT, rows, LAYER, 200, 0.0, 1.0, 0, engine.DEFAULT_CAPTURE_MODE, False)
    steered, baseline, info, *_ = next(stream)
    assert isinstance(steered, str) and "generating" in info
    started = time.perf_counter()
    stream.close()
    assert time.perf_counter() - started < 5.0  # 200 tokens x 2 rows would take far longer on CPU
    short = steer(api, [], max_new_tokens=2)  # the model lock was released: the server generates
    assert short["steered"]


def test_stop_before_the_first_token_ends_the_prefill_too(api):
    """The Stop button before any token: the stream yields while the prompt is still being read,
    so it can be closed, and the layers' stop check ends the prefill itself within a layer."""
    from steering.ui.steer import generate_outputs

    long_prompt = "Tell me everything about the history of the world. " * 200  # ~2,000 tokens of prefill
    stream = generate_outputs(long_prompt[:3990], [], LAYER, 200, 0.0, 1.0, 0, engine.DEFAULT_CAPTURE_MODE, False)
    started = time.perf_counter()
    steered, baseline, info, *_ = next(stream)  # a heartbeat: no token yet
    assert time.perf_counter() - started < 5.0
    started = time.perf_counter()
    stream.close()
    assert time.perf_counter() - started < 3.0  # not the rest of the prefill and 200 tokens x 2 rows
    short = steer(api, [], max_new_tokens=2)  # the model lock was released
    assert short["steered"]


def test_sweep_scores_relevance_and_fluency_and_recommends_a_row(api):
    result = api.predict(PROMPT, "the ocean", LAYER, [0.0, 0.4, 3.0], 16, api_name="/sweep")
    rows = {r["coeff"]: r for r in result["rows"]}
    assert set(rows[0.4]) == {"coeff", "text", "relevance", "perplexity", "repetition", "fluent", "effect"}
    assert rows[0.0]["relevance"] == pytest.approx(0.0, abs=1e-6)  # the baseline is the zero row itself
    assert rows[3.0]["fluent"] is False  # far past where SmolLM2's outputs loop
    if result["recommended"] is not None:
        best = rows[result["recommended"]]
        assert best["fluent"] and best["relevance"] > 0
        assert all(best["relevance"] >= r["relevance"] for r in rows.values() if r["fluent"])


def test_autotune_returns_the_documented_setting(api):
    result = api.predict(PROMPT, "the ocean", "", "", [LAYER], 12, 0, api_name="/autotune")
    assert set(result) >= {"layer", "coeff", "positions", "score", "rows", "reason", "model", "fallback"}
    assert result["positions"] == "prompt"
    assert result["rows"] and all(
        set(r) == {"layer", "coeff", "text", "relevance", "perplexity", "repetition", "fluent", "score"}
        for r in result["rows"]
    )
    assert {r["layer"] for r in result["rows"]} == {LAYER}
    assert all((r["score"] is None) == (not r["fluent"]) for r in result["rows"])
    assert isinstance(result["reason"], str) and result["reason"]
    chosen = [r for r in result["rows"] if (r["layer"], r["coeff"]) == (result["layer"], result["coeff"])]
    assert chosen, "the chosen setting is one of the rows"
    versus = result["versus_prompted"]  # on by default: the chosen setting against asking in words
    assert versus["instruction"] == "In your answer, talk about the ocean."
    assert versus["outputs"] == 5 and [r["prompt"] for r in versus["per_prompt"]][0] == PROMPT
    assert versus["steered_wins"] + versus["prompted_wins"] + versus["ties"] == 5
    for side in ("steered", "prompted"):
        assert versus[side] == pytest.approx(sum(r[side] for r in versus["per_prompt"]) / 5, abs=1e-3)
    wins = sum(r["steered"] > r["prompted"] for r in versus["per_prompt"])
    assert versus["steered_wins"] == wins and f"steering higher on {wins}," in versus["verdict"]
    head = {1: "The chosen setting beat prompting", -1: "Prompting beat the chosen setting"}
    sign = (versus["steered"] > versus["prompted"]) - (versus["steered"] < versus["prompted"])
    assert versus["verdict"].startswith(head.get(sign, "The chosen setting and prompting tied"))
    # The same rows and the same scores /steer gives: the chosen setting and its prompted row on the prompt.
    vector = {"text": "the ocean", "coeff": result["coeff"], "layer": result["layer"], "positions": "prompt"}
    same = api.predict(PROMPT, [vector], 12, 0.0, 1.0, 0, api_name="/steer", prompted=True)
    assert same["steered"] == chosen[0]["text"] and same["prompted"] == versus["text"]
    assert same["scores"]["steered"]["aggregate"] == versus["per_prompt"][0]["steered"]
    assert same["scores"]["prompted"]["aggregate"] == versus["per_prompt"][0]["prompted"]
    # Without it: no prompted batch, and the search's rows and choice are the same.
    plain = api.predict(PROMPT, "the ocean", "", "", [LAYER], 12, 0, "prompt", False, api_name="/autotune")
    assert plain["versus_prompted"] is None and plain["rows"] == result["rows"] and plain["coeff"] == result["coeff"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((PROMPT, "dogs", "happy", "sad"), r"^text: give a steering text, or a positive and a negative text"),
        ((PROMPT, "", "", ""), r"^text: give a steering text"),
        ((PROMPT, "dogs", "", "", [1, 2, 3, 4, 5]), r"^layers: give 1 to 4 layers; got 5"),
        ((PROMPT, "dogs", "", "", [99]), r"^layers\[0\]: must be an integer from 0 to 29; got 99"),
        ((PROMPT, "dogs", "", "", None, 0), r"^max_new_tokens: must be an integer from 1 to 512"),
        ((PROMPT, "dogs", "", "", None, 8, 0, "reply"), r"^positions: must be one of prompt, all"),
    ],
    ids=["text-and-pair", "nothing", "too-many-layers", "layer-range", "tokens", "positions"],
)
def test_autotune_refuses_bad_input(api, args, expected):
    with pytest.raises(AppError) as caught:
        api.predict(*args, api_name="/autotune")
    assert re.search(expected, str(caught.value)), str(caught.value)


def test_autotune_stops_at_once_and_its_stop_flag_is_not_an_endpoint_parameter(api):
    stop = threading.Event()
    stop.set()
    result = steering_api.autotune("Tell me about your day.", text="the ocean", stop=stop)
    assert result["rows"] == [] and result["reason"].startswith("stopped after 0 of 3 candidates on your prompt;")
    info = api.view_api(print_info=False, return_format="dict")
    params = [p["parameter_name"] for p in info["named_endpoints"]["/autotune"]["parameters"]]
    assert params == [
        "prompt", "text", "positive", "negative", "layers", "max_new_tokens", "seed", "positions", "prompted"
    ]  # fmt: skip


def test_steer_prompted_through_the_client_adds_a_row_and_scores(api, baseline):
    zero = [{"text": "dogs", "coeff": 0.0, "layer": LAYER}, {"text": "the ocean", "coeff": 1.0, "layer": LAYER}]
    plain = steer(api, zero)
    result = steer(api, zero, prompted=True)
    assert result["baseline"] == baseline["baseline"] and result["steered"] == plain["steered"]
    assert result["instruction"] == "In your answer, talk about the ocean."  # coefficient 0: not mentioned
    assert result["prompted"] and len(result["tokens"]) == 3
    assert set(result["scores"]) == {"steered", "baseline", "prompted"}
