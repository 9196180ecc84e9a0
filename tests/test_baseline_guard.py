"""The baseline never lies and a request cannot hold the model (issue 26, items 2 and 3), on the
real embedded SmolLM2 (and a tiny random Qwen2 in float16): directions beyond what the model's
dtype holds are refused, baseline rows are masked (never 0 x direction), steering texts have a
token budget, a capture pass polls Stop and shutdown between layers, and a tiny positive
temperature is a field-named refusal.
"""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from steering import api, chat, lifecycle
from steering import generate as G
from steering.engine import SteeringEngine, VectorSpec, _LayerSteer, _Part
from steering.errors import InputError

PROMPT = "Tell me about your weekend."
HIDDEN = 576


def test_baseline_rows_are_masked_not_multiplied_by_zero():
    """A part whose direction is infinite adds an exact zero to the rows whose coefficient is 0."""
    direction = torch.full((1, 1, 8), math.inf)
    coeffs = torch.tensor([1.0, 0.0]).view(2, 1, 1)
    for absolute in (False, True):
        element = _LayerSteer(15, [_Part(direction, coeffs, None, absolute)], "inf")
        element.rms = torch.ones(2, 1, 1)
        # A relative part's delta comes from llm-steer's steering_method; a raw (absolute) one is
        # added at its raw magnitude by the pre-hook, from `element.absolute`.
        delta = element.absolute if absolute else element.steering_method(None, 0, 15)
        assert torch.equal(delta[1], torch.zeros(1, 8)), delta[1]  # before: NaN (0 x inf)
        assert torch.isinf(delta[0]).all()


def test_the_issues_steer_request_is_refused_naming_the_number(fresh_manager):
    vectors = [{"direction": [1e39] * HIDDEN, "coeff": 1, "layer": 15}]
    with pytest.raises(InputError, match=r"^vectors\[0\]\.direction\[0\]: is 1e\+39; a direction is float32"):
        api.steer(PROMPT, vectors, max_new_tokens=6)
    big = [{"direction": [3e38] * HIDDEN, "coeff": 20, "layer": 15}]
    with pytest.raises(InputError, match=r"^vectors\[0\]\.direction: times its coefficient reaches 6e\+39"):
        api.steer(PROMPT, big, max_new_tokens=6)
    with pytest.raises(InputError, match=r"^vectors\[0\]\.direction\[0\]: is 1e\+39"):
        chat.chat("Hello!", [], [], vectors, max_new_tokens=6)
    with pytest.raises(InputError, match=r"^vectors\[0\]\.direction: times its coefficient reaches 6e\+39"):
        chat.chat("Hello!", [], [], big, max_new_tokens=6)
    assert fresh_manager.current is None  # refused before any model was needed


def test_the_engine_refuses_what_its_dtype_cannot_hold(smol_engine, tiny_qwen_dir):
    """A spec made without `parse_vector` (infinite in float32) is refused before anything is
    installed; before, its baseline row came back empty (NaN logits)."""
    spec = VectorSpec(layer=15, coeff=1.0, direction=(1e39,) * HIDDEN)
    with pytest.raises(InputError, match=r"directions at layer 15\): times its coefficient reaches inf; .* float32"):
        G.run_rows(smol_engine, PROMPT, G.compare_rows([spec], True), G.Sampling(max_new_tokens=6))
    assert smol_engine.is_clean()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen_dir, dtype=torch.float16).eval()
    engine = SteeringEngine(model, AutoTokenizer.from_pretrained(tiny_qwen_dir), "tiny-fp16")
    spec = VectorSpec(layer=2, coeff=2.0, direction=(4e4,) * 64)  # fine in float32, 8e4 > 65504
    with pytest.raises(InputError, match=r"reaches 8e\+04; a layer input in float16 can take at most 6.55e\+04"):
        with engine.installed([[(spec, 2.0)], []], "contexts"):
            pass
    assert engine.is_clean()


def test_a_huge_but_finite_steered_row_leaves_the_baseline_unsteered(fresh_manager):
    plain = api.steer(PROMPT, [], max_new_tokens=6)["steered"]
    result = api.steer(PROMPT, [{"direction": [1e30] * HIDDEN, "coeff": 1, "layer": 15}], max_new_tokens=6)
    assert result["baseline"] == plain and plain


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 0.001])
def test_a_tiny_positive_temperature_is_refused_by_name(fresh_manager, temperature):
    with pytest.raises(InputError, match=r"^temperature: must be 0 \(greedy decoding\) or from 0\.01 to 2; got"):
        api.steer(PROMPT, [], max_new_tokens=4, temperature=temperature)
    assert fresh_manager.current is None


def test_steering_texts_have_a_token_budget(fresh_manager):
    one_long = [{"text": "😀" * 1000, "coeff": 0.5, "layer": 15}]  # 3,000 tokens
    with pytest.raises(InputError, match=r"^vectors\[0\]\.text: is 3001 tokens; a steering text may be 512"):
        api.steer(PROMPT, one_long, max_new_tokens=4)
    # 150 emoji are 451 tokens with the start token: the fifth reaches 2255 > 2048. The same text
    # at another layer is read again and counts again; repeated at one layer it counts once.
    many = [{"text": "😀" * 150, "coeff": 0.5, "layer": layer} for layer in (3, 3, 5, 7, 9, 11)]
    with pytest.raises(InputError, match=r"^vectors\[5\]\.text: brings the request's steering texts to 2255 tokens"):
        api.steer(PROMPT, many, max_new_tokens=4)
    start = time.perf_counter()
    with pytest.raises(InputError, match="steering texts to"):  # the model is loaded now: refused at once
        api.steer(PROMPT, many, max_new_tokens=4)
    assert time.perf_counter() - start < 1.0
    fits = [{"text": "😀" * 150, "coeff": 0.0, "layer": 3}, {"text": "dogs", "coeff": 0.0, "layer": 3}]
    assert api.steer(PROMPT, fits, max_new_tokens=2)["steered"]  # within the budget: runs


def _long_capture(engine: SteeringEngine, stop: threading.Event) -> tuple[list, float]:
    """A stream whose text (a fresh one, 600 emoji: seconds to read) is read at the last layer."""
    spec = VectorSpec(layer=29, coeff=0.5, text="🦔" * 600)
    start = time.perf_counter()
    updates = list(G.stream_rows(engine, PROMPT, G.compare_rows([spec], True), G.Sampling(max_new_tokens=4), stop=stop))
    return updates, time.perf_counter() - start


def test_stop_ends_a_capture_between_layers(smol_engine):
    stop = threading.Event()
    stop.set()
    passes = smol_engine.capture_passes
    updates, _ = _long_capture(smol_engine, stop)
    assert updates[-1].done and updates[-1].texts == ["", ""]
    assert smol_engine.capture_passes == passes and smol_engine.is_clean()  # before: the capture ran first
    stop.clear()
    threading.Timer(0.5, stop.set).start()
    updates, elapsed = _long_capture(smol_engine, stop)
    assert updates[-1].done and updates[-1].texts == ["", ""] and elapsed < 3.0, elapsed  # 0.5 s + one layer
    assert smol_engine.is_clean()


def test_shutdown_ends_a_capture_between_layers(smol_engine):
    threading.Timer(0.5, lifecycle.begin_shutdown).start()
    try:
        start = time.perf_counter()
        with pytest.raises(lifecycle.ShuttingDownError):
            _long_capture(smol_engine, threading.Event())
        assert time.perf_counter() - start < 3.0  # 0.5 s + one layer
    finally:
        time.sleep(0.6)
        lifecycle.SHUTTING_DOWN.clear()
    assert smol_engine.is_clean()


def test_a_full_chat_says_how_many_exchanges_the_new_message_makes():
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}] * 16
    with pytest.raises(InputError) as caught:
        chat.check_history(history, "history_steered", "One more")
    assert str(caught.value).startswith(
        "history_steered: holds 16 exchanges; with the new message that is 17, and a chat holds 16 at most"
    )


def test_refusals_echo_only_a_short_prefix_of_a_huge_value(fresh_manager):
    huge = "x" * 1_000_000
    calls = [
        lambda: api.steer(PROMPT, [], max_new_tokens=4, capture_mode=huge),
        lambda: api.export_vectors([{"text": "dogs", "coeff": 0.5, "layer": 15}], huge),
        lambda: api.steer(PROMPT, [{"text": "dogs", "coeff": 0.5, "layer": 15, "positions": huge}], max_new_tokens=4),
        lambda: api.load_model("SmolLM2-135M-Instruct", huge),
    ]
    for call in calls:
        with pytest.raises(InputError) as caught:
            call()
        assert len(str(caught.value)) < 200, str(caught.value)[:300]
    assert fresh_manager.current is None
