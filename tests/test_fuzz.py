"""Hostile input through the real `gradio_client` (issue 12): every endpoint gets arguments drawn
by hypothesis — wrong types, huge and tiny numbers, nested junk, odd Unicode — and must answer
with a valid result or an error whose sentence names the field; afterwards the server still
serves, nothing is left installed, and the loaded model and the event log are unchanged.
Bounded: a fixed number of examples per endpoint, ~1 minute in all on 2 cores."""

from __future__ import annotations

import re

import pytest
from _server import client, launched
from gradio_client.exceptions import AppError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steering import catalog

FIELD_SENTENCE = re.compile(r"^[\w.\[\]]+: \S")  # "vectors[0].coeff: must be ...", never a raw error
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
small_tokens = st.integers(min_value=1, max_value=2) | junk
texts = st.text(min_size=1, max_size=12) | junk
vector = st.fixed_dictionaries(
    {},
    optional={
        "text": texts,
        "positive": texts,
        "negative": texts,
        "coeff": st.floats(min_value=-25, max_value=25) | junk,
        "layer": st.integers(min_value=-2, max_value=40) | junk,
        "enabled": st.booleans() | junk,
        "decay": junk,
        "positions": st.sampled_from(["prompt", "all", "reply", ""]) | junk,
        "direction": st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=4) | junk,
    },
)
vectors = st.lists(vector, max_size=3) | junk


@pytest.fixture(scope="module")
def api(embedded_dir):
    with launched() as url:
        yield client(url)


def _call(api, *args, endpoint: str):
    try:
        return api.predict(*args, api_name=endpoint)
    except AppError as err:
        assert FIELD_SENTENCE.match(str(err)), f"{endpoint} {args!r:.300} -> {err}"
        return None


@pytest.fixture(scope="module")
def before(api):
    status = api.predict(api_name="/status")
    return status["model"], status["quant"], status["event_count"]


def _unchanged(api, before) -> None:
    """The server serves, the same model and event log, with nothing left installed."""
    status = api.predict(api_name="/status")
    assert (status["model"], status["quant"], status["event_count"]) == before
    result = api.predict("Hi", [{"text": "dogs", "coeff": 0.0, "layer": 15}], 3, api_name="/steer")
    assert result["steered"] == result["baseline"]  # a zero vector: no earlier vector still installed


def test_fuzz_steer(api, before):
    @SETTINGS
    @given(prompt=texts, vecs=vectors, tokens=small_tokens, temperature=junk | st.floats(0, 2), seed=junk, compare=junk)
    def run(prompt, vecs, tokens, temperature, seed, compare):
        _call(api, prompt, vecs, tokens, temperature, 1.0, seed, compare, endpoint="/steer")

    run()
    _unchanged(api, before)


def test_fuzz_sweep(api, before):
    @SETTINGS
    @given(
        prompt=texts,
        text=texts,
        layer=junk | st.integers(0, 29),
        coeffs=junk | st.lists(junk, max_size=3),
        tokens=small_tokens,
    )
    def run(prompt, text, layer, coeffs, tokens):
        _call(api, prompt, text, layer, coeffs, tokens, 0, endpoint="/sweep")

    run()
    _unchanged(api, before)


def test_fuzz_similarity_plan_and_export(api, before):
    @SETTINGS
    @given(items=junk | st.lists(texts, max_size=4), layer=junk | st.integers(0, 29))
    def run(items, layer):
        _call(api, items, layer, endpoint="/similarity")
        _call(api, items, endpoint="/plan")
        _call(api, items, "gguf", endpoint="/export_vectors")

    run()
    _unchanged(api, before)


def test_fuzz_load_model(api, before):
    @SETTINGS
    @given(model=junk.filter(lambda m: not (isinstance(m, str) and catalog.find_in_catalog(m))), quant=junk, force=junk)
    def run(model, quant, force):
        _call(api, model, quant, force, endpoint="/load_model")

    run()
    _unchanged(api, before)


messages = st.lists(
    st.fixed_dictionaries(
        {}, optional={"role": st.sampled_from(["user", "assistant", "system"]) | junk, "content": texts}
    ),
    max_size=3,
)
histories = messages | junk


def test_fuzz_chat(api, before):
    @SETTINGS
    @given(message=texts, steered=histories, baseline=histories, vecs=vectors, tokens=small_tokens, mode=junk)
    def run(message, steered, baseline, vecs, tokens, mode):
        _call(api, message, steered, baseline, vecs, tokens, 0.0, 1.0, 0, endpoint="/chat")
        _call(api, message, [], [], vecs, tokens, 0.0, 1.0, 0, mode, endpoint="/chat")

    run()
    _unchanged(api, before)
