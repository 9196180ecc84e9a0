"""The model manager on real models: plan-based downgrade, OOM recovery, switching, the embedded cache.

No GPU exists here, so only what a GPU would do is simulated, at the boundary: NVML readings
(`gpu.simulate_gpu`) and a real `torch.OutOfMemoryError` raised where transformers loads weights
or where the model runs. Everything between is the code that runs on a real card.
"""

from __future__ import annotations

import gc
import re
import sys
import threading
import time
import weakref

import psutil
import pytest
import torch
import transformers

from steering import api, catalog, embedded, gpu, planning, weights
from steering.engine import engine_for
from steering.errors import InputError, ModelLockedError, ModelUnavailableError
from steering.loaded import is_oom, map_layer
from steering.loader import get_manager

OOM_TEXT = (
    "CUDA out of memory. Tried to allocate 112.00 MiB. GPU 0 has a total capacity of 7.77 GiB "
    "of which 37.19 MiB is free."
)


@pytest.fixture
def manager(fresh_manager, tiny_qwen_dir, tmp_path_factory):
    """A fresh manager (the process's one for this test) whose fallback is the tiny Qwen2; users may
    load model folders from this run's temporary folders (as with --models-dir)."""
    fresh_manager.configure(fallback_model=str(tiny_qwen_dir), models_dirs=[str(tmp_path_factory.getbasetemp())])
    assert get_manager() is fresh_manager  # what the api functions use
    return fresh_manager


@pytest.fixture
def oom_on_load(monkeypatch):
    """Make transformers' loader raise a real CUDA-style OOM for the given sources."""
    doomed: set[str] = set()
    original = transformers.AutoModelForCausalLM.from_pretrained

    def from_pretrained(source, *args, **kwargs):
        if str(source) in doomed:
            raise torch.OutOfMemoryError(OOM_TEXT)
        return original(source, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    return doomed


def _oom_in_forward(model, times: int = 2):
    """The next `times` forward passes of `model` raise OOM (as a too-long prefill would on a real
    card). Two: the batched request and its retry with rows one at a time both fail."""
    left = [times]

    def forward(*args, **kwargs):
        left[0] -= 1
        if left[0] == 0:
            del model.forward  # back to the class's forward
        raise torch.OutOfMemoryError(OOM_TEXT)

    model.forward = forward


def test_default_on_cpu_is_the_embedded_model(manager):
    status = manager.load_default()
    assert status["model"] == catalog.EMBEDDED_ID
    assert status["device"] == "cpu"
    assert status["n_layers"] == 30 and status["default_layer"] == 15
    assert status["memory"]["model_bytes"] > 100 * 2**20


def test_map_layer_by_relative_depth():
    assert map_layer(16, 32, 28) == 14
    assert map_layer(15, 30, 4) == 2
    assert map_layer(0, 32, 28) == 0 and map_layer(31, 32, 28) == 27
    assert map_layer(7, 28, 28) == 7


def test_is_oom_recognises_every_shape():
    assert is_oom(torch.OutOfMemoryError(OOM_TEXT))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(ValueError("Some modules are dispatched on the CPU or the disk. Make sure you have enough GPU RAM"))
    try:
        try:
            raise torch.OutOfMemoryError(OOM_TEXT)
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("while loading") from inner
    except RuntimeError as outer:
        assert is_oom(outer)
    assert not is_oom(ValueError("bad config"))
    assert not is_oom(RuntimeError("shape mismatch"))


def test_refusals_change_nothing(manager, monkeypatch):
    manager.load(catalog.EMBEDDED_ID, "fp32")
    before = manager.current.identity
    with pytest.raises(ModelUnavailableError):
        manager.load("no-such-org/no-such-model")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(ModelUnavailableError, match="gated"):
        manager.load("meta-llama/Llama-3.2-1B-Instruct", "bf16")
    started = time.monotonic()
    with pytest.raises(ModelUnavailableError, match="offline"):
        manager.load("Qwen/Qwen2.5-1.5B-Instruct", "fp32", force=True)
    assert time.monotonic() - started < 5  # noticed offline at once, not after 26 s of retries
    with pytest.raises(InputError, match="^quant"):
        manager.load(catalog.EMBEDDED_ID, "3bit")
    with pytest.raises(InputError, match="^model"):
        manager.load("   ")
    assert manager.current.identity == before and manager.events.all() == []


def test_lock_model_refuses_user_switches(manager, tiny_qwen_dir):
    manager.load(catalog.EMBEDDED_ID, "fp32")
    manager.configure(lock_model=True)
    with pytest.raises(ModelLockedError):
        manager.load(str(tiny_qwen_dir), "fp32")
    assert manager.current.model_id == catalog.EMBEDDED_ID


def test_plan_downgrades_a_7b_model_on_the_reference_card(manager, tiny_qwen_dir):
    with gpu.use_nvml(gpu.simulate_gpu(8 * gpu.GiB, int(0.7 * gpu.GiB))):
        status = manager.load("Qwen/Qwen2.5-7B-Instruct", "4bit")
    fallback = catalog.get_spec(str(tiny_qwen_dir)).id
    assert status["model"] == fallback and status["quant"] == "4bit"
    [event] = status["events"]
    assert event["stage"] == "plan"
    assert event["asked"] == {"model": "Qwen/Qwen2.5-7B-Instruct", "quant": "4bit"}
    assert event["loaded"]["model"] == fallback
    assert "Qwen/Qwen2.5-7B-Instruct" in event["reason"] and "verdict" in event["reason"]
    # The 4-bit fallback really is bitsandbytes NF4 with double quantization, and it answers.
    linear = manager.current.model.model.layers[0].mlp.down_proj
    assert type(linear).__name__ == "Linear4bit"
    assert linear.weight.quant_state.nested
    result = api.steer("Hello", [{"text": "dogs", "coeff": 0.5, "layer": 1}], max_new_tokens=4)
    assert result["model"] == fallback and isinstance(result["steered"], str)


def test_oom_while_loading_ends_on_the_fallback(manager, oom_on_load, tiny_llama_dir, tiny_qwen_dir):
    oom_on_load.add(str(tiny_llama_dir))
    status = manager.load(str(tiny_llama_dir), "fp32")
    assert status["model"] == catalog.get_spec(str(tiny_qwen_dir)).id
    [event] = status["events"]
    assert event["stage"] == "load" and "out of memory" in event["reason"]
    assert event["free_before_bytes"] > 0 and event["free_after_bytes"] > 0
    assert api.steer("Hi", [{"text": "cats", "coeff": 0.5, "layer": 2}], max_new_tokens=3)["steered"] is not None


def test_oom_during_generation_downgrades_remaps_layers_and_retries_once(manager, tiny_llama_dir, tiny_qwen_dir):
    manager.load(str(tiny_llama_dir), "fp32")
    asked = manager.current.model_id
    assert manager.current.n_layers == 6
    _oom_in_forward(manager.current.model)
    result = api.steer("Hi", [{"text": "dogs", "coeff": 0.5, "layer": 5}], max_new_tokens=4)
    fallback = catalog.get_spec(str(tiny_qwen_dir)).id
    assert result["model"] == fallback
    assert result["layers"] == [3] == [map_layer(5, 6, 4)]  # same relative depth on the 4-layer fallback
    assert result["fallback"]["stage"] == "generation"
    assert result["fallback"]["asked"]["model"] == asked and result["fallback"]["recovery"] == "fallback"
    # Two events: the retry with rows apart on the same model, then the downgrade.
    assert [e["recovery"] for e in manager.events.all()] == ["rows one at a time", "fallback"]


def test_oom_on_the_embedded_model_reloads_it_on_cpu_not_the_bigger_fallback(manager):
    manager.load(catalog.EMBEDDED_ID, "fp32")
    _oom_in_forward(manager.current.model)
    result = api.steer("Hi", [{"text": "dogs", "coeff": 0.5, "layer": 15}], max_new_tokens=4)
    assert result["model"] == catalog.EMBEDDED_ID and result["device"] == "cpu"
    assert "last step down" in result["fallback"]["reason"]


def test_failing_fallback_ends_on_the_embedded_model(manager, oom_on_load, tiny_llama_dir, tiny_qwen_dir):
    oom_on_load.update({str(tiny_llama_dir), str(tiny_qwen_dir)})
    status = manager.load(str(tiny_llama_dir), "fp32")
    assert status["model"] == catalog.EMBEDDED_ID and status["device"] == "cpu"
    [event] = status["events"]
    assert "could not be loaded either" in event["reason"]
    assert api.steer("Hi", [{"text": "dogs", "coeff": 0.5, "layer": 15}], max_new_tokens=3)["model"] == (
        catalog.EMBEDDED_ID
    )


def _rss_after_gc() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_switching_frees_the_old_model_and_its_steering_state(manager, tiny_qwen_dir):
    manager.load(catalog.EMBEDDED_ID, "fp32")
    loaded = manager.current
    engine = engine_for(loaded)
    engine.text_means(10, ["dogs"], "bos")
    assert engine.cache
    model_ref, engine_ref = weakref.ref(loaded.model), weakref.ref(engine)
    del loaded, engine
    first_rss = _rss_after_gc()
    for _ in range(5):
        manager.load(str(tiny_qwen_dir), "fp32")
        manager.load(catalog.EMBEDDED_ID, "fp32")
    gc.collect()
    assert model_ref() is None and engine_ref() is None  # llm-steer holds no reference to the old model
    assert not engine_for(manager.current).cache  # a new model starts with an empty direction cache
    growth = _rss_after_gc() - first_rss
    assert growth < 150 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB over five switches"


def test_hub_probe_is_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    assert weights.hub_reachable() is False
    assert time.monotonic() - started < 0.5


def test_damaged_cache_is_detected_and_rebuilt(corrupt_copy, monkeypatch):
    assert not embedded.cache_is_valid(corrupt_copy)
    monkeypatch.setenv("STEERING_CACHE_DIR", str(corrupt_copy.parent))
    assert embedded.embedded_dir() == corrupt_copy
    rebuilt = embedded.ensure_converted()
    assert rebuilt == corrupt_copy and embedded.cache_is_valid(rebuilt)
    assert not [p for p in rebuilt.parent.iterdir() if p.name.startswith(".convert-")]  # no staging left
    model = transformers.AutoModelForCausalLM.from_pretrained(rebuilt)
    assert model.config.num_hidden_layers == 30


@pytest.mark.parametrize("quant", ["fp32", "bf16", "4bit"])
def test_weights_estimate_matches_the_loaded_embedded_model(manager, quant):
    from steering import estimate

    status = manager.load(catalog.EMBEDDED_ID, quant)
    assert status["quant"] == quant
    measured = estimate.measured_weights_bytes(manager.current.model)
    estimated = estimate.weights_bytes(catalog.get_spec(catalog.EMBEDDED_ID), quant)
    assert abs(estimated - measured) <= 0.05 * measured, (quant, estimated, measured)
    assert status["memory"]["model_bytes"] > 0


def test_default_load_never_replaces_a_loaded_model(manager, tiny_qwen_dir):
    manager.load(str(tiny_qwen_dir), "fp32")
    assert manager.load_default()["model"] == catalog.get_spec(str(tiny_qwen_dir)).id


def test_too_big_model_with_unavailable_fallback_keeps_the_current_one(manager):
    manager.load(catalog.EMBEDDED_ID, "fp32")
    before = manager.events.count
    manager.configure(fallback_model=catalog.FALLBACK_ID)  # not cached here, and offline
    with gpu.use_nvml(gpu.simulate_gpu(8 * gpu.GiB, int(0.7 * gpu.GiB))):
        with pytest.raises(ModelUnavailableError, match="stays loaded"):
            manager.load("Qwen/Qwen2.5-7B-Instruct", "4bit")
    assert manager.current.model_id == catalog.EMBEDDED_ID
    assert manager.events.count == before


def test_a_folder_that_cannot_load_is_refused_before_anything_is_unloaded(manager, tmp_path, tiny_llama_dir):
    import shutil

    manager.load(catalog.EMBEDDED_ID, "fp32")
    before = (manager.current.identity, manager.events.count)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelUnavailableError, match="model.safetensors is not a readable safetensors file"):
        manager.load(str(broken), "fp32")
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelUnavailableError, match="it has no safetensors weights"):
        manager.load(str(broken), "fp32")
    assert (manager.current.identity, manager.events.count) == before


def test_a_config_that_does_not_fit_its_weights_is_refused_before_anything_is_freed(
    manager, tmp_path, tiny_llama_dir, tiny_qwen_dir
):
    """Issue 26: this folder used to free the loaded model, fail inside transformers and end on
    the fallback with a normal status; its shapes are now checked on a meta-device model first."""
    import json
    import shutil

    manager.load(catalog.EMBEDDED_ID, "fp32")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_llama_dir, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["intermediate_size"] *= 2  # the weights no longer fit the config
    (mismatched / "config.json").write_text(json.dumps(config))
    before = (manager.current.identity, manager.events.count)
    with pytest.raises(ModelUnavailableError, match=rf"^{re.escape(str(mismatched))} cannot be loaded: its config"):
        manager.load(str(mismatched), "fp32")
    assert (manager.current.identity, manager.events.count) == before


@pytest.mark.parametrize("where", ["outside", "parent", "relative"])
def test_paths_outside_the_allowed_folders_get_the_unknown_model_sentence(manager, tmp_path, where, monkeypatch):
    """A user cannot load, or learn about, folders the operator did not allow (--models-dir)."""
    manager.load(catalog.EMBEDDED_ID, "fp32")
    before = (manager.current.identity, manager.events.count)
    manager.configure(models_dirs=[str(tmp_path / "allowed")])
    outside = tmp_path / "elsewhere" / "model"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    model = {"outside": str(outside), "parent": "../../etc", "relative": "elsewhere/model"}[where]
    with pytest.raises(ModelUnavailableError) as caught:
        manager.load(model, "fp32")
    assert str(caught.value) == catalog.not_found_message(model)  # the same words as for a missing id
    with pytest.raises(ModelUnavailableError) as missing:
        manager.load("no-such-org/no-such-model", "fp32")
    assert str(missing.value) == catalog.not_found_message("no-such-org/no-such-model")
    assert (manager.current.identity, manager.events.count) == before


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads = 0"),
        ({"hidden_size": 1e300}, "hidden_size = 1"),
        ({"num_key_value_heads": 3}, "inconsistent attention heads"),
        ({"vocab_size": "many"}, "lacks the decoder numbers"),
    ],
)
def test_absurd_configs_are_refused_in_a_sentence(manager, tmp_path, tiny_llama_dir, change, expected):
    import json
    import shutil

    manager.load(catalog.EMBEDDED_ID, "fp32")
    before = (manager.current.identity, manager.events.count)
    folder = tmp_path / "absurd"
    shutil.copytree(tiny_llama_dir, folder)
    config = {**json.loads((folder / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelUnavailableError, match=expected):
        manager.load(str(folder), "fp32")
    assert (manager.current.identity, manager.events.count) == before


def _oom_in_embeddings(model, gate: threading.Event | None = None, times: int = 2, entered=None):
    """The next `times` passes through `model`'s token embeddings (every forward: generation,
    capture, scoring) raise OOM, the first after waiting for `gate` when one is given (setting
    `entered`, when given, as it starts waiting)."""
    embed = model.model.embed_tokens
    left = [times]

    def forward(*args, **kwargs):
        if gate is not None and left[0] == times:
            if entered is not None:
                entered.set()
            gate.wait(30)
        left[0] -= 1
        if left[0] == 0:
            del embed.forward  # back to the class's forward
        raise torch.OutOfMemoryError(OOM_TEXT)

    embed.forward = forward


@pytest.mark.parametrize(
    ("what", "call"),
    [
        (
            "generation",
            lambda layer: api.steer("Hi", [{"text": "dogs", "coeff": 0.5, "layer": layer}], max_new_tokens=3),
        ),
        ("sweep", lambda layer: api.sweep("Hi", "dogs", layer, [0.0, 1.0], max_new_tokens=3)),
        ("similarity", lambda layer: api.similarity(["dogs", "cats"], layer)),
    ],
)
def test_every_model_endpoint_reports_its_own_fallback(manager, tiny_llama_dir, tiny_qwen_dir, what, call):
    manager.load(str(tiny_llama_dir), "fp32")
    _oom_in_embeddings(manager.current.model)
    result = call(5)
    assert result["fallback"]["stage"] == what
    assert result["fallback"]["loaded"]["model"] == catalog.get_spec(str(tiny_qwen_dir)).id
    assert result["layer" if "layer" in result else "layers"] in (3, [3])  # layer 5 of 6 -> 3 of 4
    assert call(3)["fallback"] is None  # the next request (on the 4-layer fallback) caused no downgrade


def _waits_for_the_model_lock(thread: threading.Thread, timeout_s: float = 60) -> bool:
    """Whether `thread` reaches the manager's lock (its stack shows `ModelManager.exclusive`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        frame = sys._current_frames().get(thread.ident)
        while frame is not None:
            if frame.f_code.co_name == "exclusive":
                return True
            frame = frame.f_back
        time.sleep(0.01)
    return False


def test_a_waiting_request_is_not_told_about_anothers_downgrade(manager, tiny_llama_dir):
    manager.load(str(tiny_llama_dir), "fp32")
    gate, entered = threading.Event(), threading.Event()
    _oom_in_embeddings(manager.current.model, gate, times=1, entered=entered)  # the retry with rows apart succeeds
    results: dict[str, dict] = {}

    def request(name: str) -> None:
        results[name] = api.steer("Hi", [{"text": "dogs", "coeff": 0.5, "layer": 1}], max_new_tokens=2)

    first = threading.Thread(target=request, args=("first",))
    first.start()
    assert entered.wait(60)  # the first request holds the model lock, blocked inside its forward pass
    second = threading.Thread(target=request, args=("second",))
    second.start()
    assert _waits_for_the_model_lock(second)
    gate.set()
    first.join(60)
    second.join(60)
    assert results["first"]["fallback"]["stage"] == "generation"
    assert results["first"]["fallback"]["recovery"] == "rows one at a time"
    assert results["second"]["fallback"] is None
    assert manager.events.count == 1


def test_event_log_since_and_bound():
    from steering.events import EventLog

    log = EventLog(keep=3)
    mark = log.count
    for i in range(5):
        event = log.record(stage="plan", asked=(f"m{i}", "4bit"), loaded={"model": "f"}, reason="r")
        assert event["asked"] == {"model": f"m{i}", "quant": "4bit"}
    assert log.count == mark + 5
    assert [e["asked"]["model"] for e in log.all()] == ["m2", "m3", "m4"]  # the newest 3 are kept
    assert [e["asked"]["model"] for e in log.since(mark + 3)] == ["m3", "m4"]
    assert log.since(log.count) == []


@pytest.mark.parametrize(
    ("quant", "cuda_index", "bf16", "expected_dtype", "bnb"),
    [
        ("4bit", 0, False, torch.float16, "nf4"),  # Turing: fp16 compute
        ("4bit", 0, True, torch.bfloat16, "nf4"),
        ("4bit", None, False, torch.bfloat16, "nf4"),  # CPU: bf16 compute
        ("8bit", 1, True, torch.bfloat16, "int8"),
        ("fp16", 0, True, torch.float16, None),
        ("fp32", None, False, torch.float32, None),
    ],
)
def test_pretrained_kwargs(quant, cuda_index, bf16, expected_dtype, bnb):
    kwargs = weights.pretrained_kwargs(quant, cuda_index=cuda_index, supports_bf16=bf16, local_files_only=True)
    assert kwargs["device_map"] == {"": cuda_index if cuda_index is not None else "cpu"}
    assert kwargs["dtype"] == expected_dtype and kwargs["local_files_only"] is True
    config = kwargs.get("quantization_config")
    if bnb is None:
        assert config is None
    elif bnb == "nf4":
        assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
        assert config.bnb_4bit_compute_dtype == expected_dtype
    else:
        assert config.load_in_8bit and not config.load_in_4bit


def test_gated_message_is_one_sentence_everywhere(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    spec = catalog.get_spec("meta-llama/Llama-3.2-1B-Instruct")
    with pytest.raises(ModelUnavailableError) as caught:
        weights.find_weights(spec, spec.id, online=lambda: False)
    assert str(caught.value) == catalog.gated_message(spec)


@pytest.mark.parametrize(
    ("what", "call"),
    [
        ("generation", lambda: api.steer("Hi", [{"text": "dogs", "coeff": 0.7, "layer": 3}], max_new_tokens=5)),
        ("sweep", lambda: api.sweep("Hi", "dogs", 3, [0.0, 0.7, 1.5], max_new_tokens=5)),
        ("similarity", lambda: api.similarity(["dogs", "cats", "rain"], 3)),
    ],
)
def test_one_out_of_memory_error_is_survived_on_the_same_model_rows_apart(manager, tiny_llama_dir, what, call):
    """The first retry keeps the model and runs every row (and every captured text) on its own:
    the same answer as the batched request, the model and its quantization unchanged."""
    manager.load(str(tiny_llama_dir), "fp32")
    before = manager.current.identity
    expected = call()
    engine_for(manager.current).cache.clear()  # capture again: the similarity is all capture passes
    _oom_in_embeddings(manager.current.model, times=1)
    result = call()
    assert manager.current.identity == before  # nothing was reloaded
    event = result["fallback"]
    assert event["recovery"] == "rows one at a time" and event["stage"] == what
    assert event["loaded"]["model"] == event["asked"]["model"] == manager.current.model_id
    result.pop("fallback")
    expected.pop("fallback")
    assert _close(result, expected), (result, expected)


def _close(a, b) -> bool:
    """Equal, with floats to 1e-4 relative (nested dicts and lists)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return b == pytest.approx(a, rel=1e-4, abs=1e-6)
    return a == b


EMOJI = "🦄"  # 3 tokens each in SmolLM2's vocabulary


def test_fitted_limits_on_a_simulated_card_refuse_oversized_requests_up_front(fresh_manager):
    """Issue 10's scenario: --simulate-gpu 3GiB --gui-overhead 0.2GiB --margin 256MiB."""
    with gpu.use_nvml(gpu.simulate_gpu(3 * gpu.GiB, int(0.2 * gpu.GiB))):
        fresh_manager.configure(margin_bytes=256 * 2**20)
        fit = fresh_manager.load(catalog.EMBEDDED_ID, "auto")["fit"]
        assert fit["basis"] == "simulated" and fit["max_positions"] == 8192
        assert 0 < fit["sweep_max_tokens"] < fit["compare_max_tokens"] <= 8192
        before = (fresh_manager.current.identity, fresh_manager.events.count)
        long_prompt = EMOJI * (fit["sweep_max_tokens"] // 3 + 10)  # over the sweep limit, under the compare one
        started = time.monotonic()
        with pytest.raises(InputError) as caught:
            api.sweep(long_prompt, "dogs", 15, [0.0, 0.5], max_new_tokens=4)
        assert time.monotonic() - started < 5
        message = str(caught.value)
        assert (
            message.startswith("prompt: is ") and f"over the limit of {fit['sweep_max_tokens']} for a sweep" in message
        )
        assert "fewer rows" in message and "--margin" in message
        assert (fresh_manager.current.identity, fresh_manager.events.count) == before  # nothing changed
        with pytest.raises(InputError, match=r"^texts\[0\]: is 2998 tokens, over the limit of \d+ "):
            api.similarity([EMOJI * 999, "dogs"], 15)  # a capture pass of up to 8 texts is sweep-sized
        small = api.sweep("Hi", "dogs", 15, [0.0, 0.5], max_new_tokens=3)
        assert len(small["rows"]) == 2 and small["fallback"] is None


def test_a_prompted_compare_is_priced_as_three_rows(fresh_manager):
    """/steer and /chat with prompted=True run 3 rows: their prompt is held to the 3-row limit,
    which lies between the 2-row compare's and the 8-row sweep's on a simulated card."""
    from steering import chat, estimate
    from steering.ui import views

    with gpu.use_nvml(gpu.simulate_gpu(3 * gpu.GiB, int(0.2 * gpu.GiB))):
        fresh_manager.configure(margin_bytes=256 * 2**20)
        fit = fresh_manager.load(catalog.EMBEDDED_ID, "fp32")["fit"]
        spec, reading = catalog.get_spec(catalog.EMBEDDED_ID), gpu.probe()
        budget = reading.headroom_bytes - 256 * 2**20
        assert fit["prompted_max_tokens"] == estimate.fitted_tokens(spec, "fp32", 3, budget, on_gpu=True)
        assert 0 < fit["sweep_max_tokens"] < fit["prompted_max_tokens"] < fit["compare_max_tokens"]
        assert f"({fit['prompted_max_tokens']} with the prompted row)" in views.status_line(api.status())
        before = (fresh_manager.current.identity, fresh_manager.events.count)
        long_prompt = EMOJI * (fit["prompted_max_tokens"] // 3 + 10)  # over the 3-row limit, under the 2-row one
        vectors = [{"text": "dogs", "coeff": 1.0, "layer": 15}]
        api._token_fits("compare", prompt=long_prompt, new_tokens=4)(fresh_manager.current)  # a compare fits
        started = time.monotonic()
        with pytest.raises(InputError) as caught:
            api.steer(long_prompt, vectors, max_new_tokens=4, prompted=True)
        assert time.monotonic() - started < 5
        limit = f"over the limit of {fit['prompted_max_tokens']} for a prompted compare (3 rows)"
        assert str(caught.value).startswith("prompt: is ") and limit in str(caught.value), str(caught.value)
        assert "3 rows, basis: simulated" in str(caught.value)
        with pytest.raises(InputError, match=re.escape(limit)):
            chat.chat(long_prompt, [], [], vectors, max_new_tokens=4, prompted=True)
        assert (fresh_manager.current.identity, fresh_manager.events.count) == before  # nothing changed


def test_a_prompt_longer_than_the_models_positions_is_refused_at_once(fresh_manager):
    fresh_manager.load(catalog.EMBEDDED_ID, "fp32")
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        api.steer(EMOJI * 4000, [], max_new_tokens=8)  # 4,000 characters, ~12,000 tokens
    assert time.monotonic() - started < 1.0
    assert re.match(
        r"^prompt: is 1\d{4} tokens .* over the limit of 8192 .*the model has 8192 positions", str(caught.value)
    )


def test_pretrained_kwargs_take_the_plans_device_map_as_given():
    planned = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
    kwargs = weights.pretrained_kwargs(
        "8bit", cuda_index=0, supports_bf16=True, local_files_only=True, device_map=planned
    )
    assert kwargs["device_map"] == planned and kwargs["device_map"] is not planned


def test_a_model_too_big_for_one_simulated_card_loads_split_across_two(fresh_manager, embedded_dir, tmp_path):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from steering import devices, estimate

    # A random Qwen2 whose 8 decoder layers weigh about what its embedding does (the tiny test
    # models are nearly all embedding, which no split can spread).
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=49152, hidden_size=64, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=2,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "layered")
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(tmp_path / "layered")
    fresh_manager.configure(margin_bytes=0, models_dirs=[str(tmp_path)])
    spec = catalog.get_spec(str(tmp_path / "layered"))
    with gpu.use_nvml(gpu.simulate_gpu(80 * gpu.GiB)):
        need = planning.estimate_for(spec, "fp32", gpu.probe(0), 2048).need_bytes
    layer = devices.module_bytes(spec, "fp32")["model.layers.0"] + estimate.kv_cache_bytes(spec, "fp32", 2048, 2) // 8
    headroom = need - layer  # one decoder layer short of the whole model
    with gpu.use_nvml(gpu.simulate_gpu([headroom + gpu.SIMULATED_DRIVER_RESERVED_BYTES] * 2)):
        status = api.load_model(str(tmp_path / "layered"), "fp32")
        assert [g["headroom_bytes"] for g in fresh_manager.plan()["gpus"]] == [headroom, headroom]
    assert status["model"] == spec.id and status["event_count"] == 0  # no downgrade: split, not replaced
    split = status["placement"]
    assert [d["device"] for d in split["devices"]] == ["cuda:0", "cuda:1"] and split["offload"] is None
    assert sum(d["layers"] for d in split["devices"]) == spec.n_layers
    assert all(d["bytes"] <= headroom for d in split["devices"])
    assert status["fit"]["compare_max_tokens"] == spec.max_positions and status["fit"]["basis"] == "simulated"
