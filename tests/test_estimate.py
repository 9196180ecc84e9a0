"""The memory estimate: terms, exact weights against real tiny models, verdicts and the plan."""

from __future__ import annotations

import json
import math

import pytest

from steering import estimate as est
from steering import planning
from steering.catalog import CATALOG, EMBEDDED_ID, FALLBACK_ID, get_spec, spec_from_config
from steering.gpu import GiB, MiB, parse_size, probe, simulate_gpu, use_nvml

MISTRAL = get_spec("mistralai/Mistral-7B-Instruct-v0.3")
QWEN7 = get_spec("Qwen/Qwen2.5-7B-Instruct")
QWEN15 = get_spec(FALLBACK_ID)
LLAMA1 = get_spec("meta-llama/Llama-3.2-1B-Instruct")


@pytest.fixture(autouse=True)
def _all_devices_visible(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # simulated cards obey it like real ones


def read(card):
    with use_nvml(card):
        return probe(0)


@pytest.fixture
def reference_reading():
    return read(simulate_gpu(8 * GiB, parse_size("0.7GiB")))


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.short_name)
@pytest.mark.parametrize("quant", est.QUANTS)
def test_breakdown_sums_to_need(spec, quant):
    e = est.estimate(spec, quant, 2048, 2, compute_capability=(7, 5))
    assert set(e.breakdown) == {"weights", "kv_cache", "activations", "load_extra", "steering_capture", "cuda_context"}
    assert e.need_bytes == sum(e.breakdown.values())
    assert all(isinstance(v, int) and v >= 0 for v in e.breakdown.values())
    assert e.to_dict()["need_bytes"] == e.need_bytes


def test_mistral_4bit_prefill_dequantises_the_112_mib_mlp_weight():
    # The seed error "Tried to allocate 112.00 MiB" is one 16-bit copy of a 14336x4096 MLP weight.
    assert est.largest_linear_16bit_bytes(MISTRAL) == 14336 * 4096 * 2 == 112 * MiB
    # With few tokens the MLP intermediates are small, so the 4-bit activation peak exceeds the
    # 16-bit one by about that copy (minus one (tokens, 14336) intermediate it replaces).
    four = est.estimate(MISTRAL, "4bit", 256, 1).breakdown["activations"]
    sixteen = est.estimate(MISTRAL, "fp16", 256, 1).breakdown["activations"]
    intermediate = 256 * 14336 * 2
    assert 112 * MiB - intermediate <= four - sixteen <= 112 * MiB + 8 * MiB


def test_qwen7b_4bit_keeps_about_2_gib_in_16_bit():
    rest = est.unquantized_bytes(QWEN7, "4bit")
    assert rest == (2 * 152064 * 3584 + 28 * (2 * 3584 + 3584 + 2 * 512) + 3584) * 2
    assert 1.95 * GiB < rest < 2.1 * GiB


def test_4bit_linears_take_about_4_13_bits_per_weight():
    linear_params = MISTRAL.n_params - est.unquantized_bytes(MISTRAL, "4bit") // 2
    linear_bytes = est.weights_bytes(MISTRAL, "4bit") - est.unquantized_bytes(MISTRAL, "4bit") - 4 * 128
    assert 4.12 < linear_bytes * 8 / linear_params < 4.14


def test_kv_cache_formula():
    # 2 (k, v) x 28 layers x 2 rows x 2048 tokens x 4 kv heads x 128 x 2 bytes
    assert est.estimate(QWEN7, "4bit").breakdown["kv_cache"] == 224 * MiB
    assert est.kv_cache_bytes(QWEN7, "fp32", 2048, 2) == 448 * MiB


def test_need_grows_with_context_and_rows():
    needs = [est.estimate(QWEN15, "4bit", ctx, 2).need_bytes for ctx in (256, 1024, 4096)]
    assert needs == sorted(needs) and len(set(needs)) == 3
    assert est.estimate(QWEN15, "4bit", 2048, 4).need_bytes > est.estimate(QWEN15, "4bit", 2048, 2).need_bytes


def test_load_extra_is_the_load_peak_beyond_the_generation_peak():
    # 2 tokens: bitsandbytes' fused 4-bit kernel runs without de-quantising, so loading peaks higher
    small = est.estimate(MISTRAL, "4bit", 2, 1)
    staging = 2 * 14336 * 4096 + 2 * 4 * math.ceil(14336 * 4096 / 64)
    generation = small.breakdown["kv_cache"] + small.breakdown["activations"]
    assert small.breakdown["load_extra"] == staging - generation > 0
    assert est.estimate(MISTRAL, "4bit", 2048, 2).breakdown["load_extra"] == 0  # generation dominates
    assert est.estimate(MISTRAL, "bf16", 8, 1).breakdown["load_extra"] == 0  # no on-the-fly quantization


def test_bf16_without_native_support_pays_for_math_attention():
    turing = est.estimate(QWEN15, "bf16", 2048, 2, compute_capability=(7, 5)).breakdown["activations"]
    ampere = est.estimate(QWEN15, "bf16", 2048, 2, compute_capability=(8, 6)).breakdown["activations"]
    fp16_turing = est.estimate(QWEN15, "fp16", 2048, 2, compute_capability=(7, 5)).breakdown["activations"]
    scores = 2 * 2 * 12 * 2048 * 2048 * 4  # (rows, heads, T, T) fp32 scores and softmax
    assert turing >= scores > ampere
    assert ampere == fp16_turing


def test_cpu_estimate_has_no_cuda_context():
    assert est.estimate(QWEN15, "4bit", on_gpu=False).breakdown["cuda_context"] == 0
    assert est.estimate(QWEN15, "4bit").breakdown["cuda_context"] == est.CUDA_CONTEXT_BYTES


def test_bad_arguments():
    with pytest.raises(ValueError, match="quantization"):
        est.estimate(QWEN15, "3bit")
    with pytest.raises(ValueError):
        est.estimate(QWEN15, "4bit", 0)


@pytest.mark.parametrize(
    ("need", "headroom", "expected"),
    [(5, 7, "stable"), (6, 7, "stable"), (6.5, 7, "fragile"), (7, 7, "fragile"), (7.01, 7, "wont_fit")],
)
def test_verdict_boundaries(need, headroom, expected):
    assert est.verdict(int(need * GiB), int(headroom * GiB), 1 * GiB) == expected


def _verdicts(result: dict) -> dict[tuple[str, str], str]:
    return {(row["id"], row["quant"]): row["verdict"] for row in result["models"]}


def test_reference_card_verdicts(reference_reading, no_token):
    result = planning.plan(reference_reading, context_tokens=2048)
    verdicts = _verdicts(result)
    assert verdicts[(FALLBACK_ID, "4bit")] == "stable"
    assert verdicts[(FALLBACK_ID, "bf16")] == "stable"
    assert verdicts[(LLAMA1.id, "bf16")] == "stable"
    assert verdicts[(QWEN7.id, "4bit")] != "stable"
    assert result["headroom_bytes"] == reference_reading.headroom_bytes
    assert {"device", "gpus", "headroom_bytes", "margin_bytes", "models", "choice"} <= set(result)
    for row in result["models"]:
        keys = {"id", "quant", "need_bytes", "breakdown", "verdict", "workload", "fit", "devices", "offload"}
        assert keys <= set(row) <= keys | {"note"}
        assert row["need_bytes"] == sum(row["breakdown"].values())
    json.dumps(result)  # JSON-ready


def test_reference_card_lists_fp16_because_turing_lacks_native_bf16(reference_reading):
    assert planning.sensible_quants(QWEN7, reference_reading) == ["fp16", "bf16", "8bit", "4bit"]
    assert planning.sensible_quants(get_spec(EMBEDDED_ID), reference_reading)[0] == "fp32"


def test_24gb_card_chooses_the_largest_model_in_bf16():
    reading = read(simulate_gpu(24 * GiB, 1 * GiB, compute_capability=(8, 6)))
    result = planning.plan(reading)
    assert result["choice"]["id"] == QWEN7.id  # 7.62B > Mistral's 7.25B
    assert result["choice"]["quant"] == "bf16"
    assert "largest stable" in result["choice"]["reason"]


def test_4gb_card_ends_on_the_fallback_in_4bit():
    reading = read(simulate_gpu(4 * GiB, 512 * MiB))
    result = planning.plan(reading)
    verdicts = _verdicts(result)
    assert verdicts[(MISTRAL.id, "4bit")] == "wont_fit" and verdicts[(QWEN7.id, "4bit")] == "wont_fit"
    assert result["choice"] == {"id": FALLBACK_ID, "quant": "4bit", "reason": result["choice"]["reason"]}


def test_requested_model_gets_its_best_stable_quant(reference_reading):
    choice = planning.plan(reference_reading, model="qwen/qwen2.5-1.5b-instruct")["choice"]
    assert (choice["id"], choice["quant"]) == (FALLBACK_ID, "fp16")  # highest precision, native on Turing
    assert planning.choose_quant(QWEN15, reference_reading) == "fp16"
    assert planning.resolve_quant(QWEN15, "8bit", reference_reading) == "8bit"


def test_requested_model_that_is_not_stable_falls_back(reference_reading):
    choice = planning.plan(reference_reading, model=QWEN7.id)["choice"]
    assert (choice["id"], choice["quant"]) == (FALLBACK_ID, "4bit")
    assert "Qwen/Qwen2.5-7B-Instruct is not stable" in choice["reason"]
    assert planning.choose_quant(QWEN7, reference_reading) is None
    assert planning.resolve_quant(QWEN7, "auto", reference_reading) == "4bit"


def test_nothing_fits_ends_on_the_embedded_model(reference_reading):
    reference_reading.vram_limit_bytes = 2 * GiB
    choice = planning.plan(reference_reading, model=QWEN7.id)["choice"]
    assert (choice["id"], choice["quant"]) == (EMBEDDED_ID, "fp32")
    assert "embedded model runs on the CPU" in choice["reason"]


def test_gated_model_without_token_is_not_chosen(reference_reading, no_token):
    choice = planning.plan(reference_reading, model=LLAMA1.id)["choice"]
    assert choice["id"] == FALLBACK_ID
    assert "is gated: set HF_TOKEN" in choice["reason"]


def test_cpu_mode_plans_the_embedded_model_against_ram(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)
    reading = probe(0)
    result = planning.plan(reading)
    assert result["device"]["mode"] == "cpu"
    assert result["choice"]["id"] == EMBEDDED_ID and result["choice"]["quant"] == "fp32"
    assert all(row["breakdown"]["cuda_context"] == 0 for row in result["models"])
    assert result["headroom_bytes"] == reading.free_bytes  # available system RAM


# --- weights_bytes against real tiny models (built in memory, CPU, no network) ---------------


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny_saved(request, tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256,
    )  # fmt: skip
    if request.param == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    else:  # untied: lm_head stays a separate 16-bit matrix in 4-bit
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    target = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.to(torch.bfloat16).save_pretrained(target)
    return target, spec_from_config(model.config.to_dict(), str(target))


@pytest.mark.parametrize("quant", ["fp32", "bf16", "4bit", "8bit"])
def test_weights_bytes_match_a_loaded_tiny_model(tiny_saved, quant):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder, spec = tiny_saved
    kwargs: dict = {"dtype": torch.float32 if quant == "fp32" else torch.bfloat16}
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": "cpu"}
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    measured = est.measured_weights_bytes(model)
    estimated = est.weights_bytes(spec, quant)
    # Exact today on CPU; the issue asks for 5 %, we hold it to 1 % so a drift is noticed early.
    assert abs(estimated - measured) <= 0.01 * measured, (quant, estimated, measured)
    if quant == "4bit":  # get_memory_footprint() misses the absmax and code tables bitsandbytes keeps
        assert model.get_memory_footprint() < measured


def test_stable_means_the_standard_workload_fits(reference_reading):
    """Every stable (or offloaded) row has room for a 2-row compare at the planned context and an
    8-row sweep of 256 tokens per row (with the margin); every other row lacks room for one of them."""
    result = planning.plan(reference_reading, context_tokens=2048)
    for row in result["models"]:
        fit = row["fit"]
        workload_fits = fit["compare_max_tokens"] >= 2048 and fit["sweep_max_tokens"] >= est.SWEEP_PLAN_TOKENS
        assert (row["verdict"] in ("stable", "offload")) == workload_fits, row
        assert fit["sweep_max_tokens"] <= fit["compare_max_tokens"]


def test_a_sweep_can_be_what_does_not_fit(reference_reading):
    # At a 256-token context the compare is small; 8 rows of 256 tokens are what the plan prices.
    est_row, workload = planning.workload_estimate(QWEN15, "bf16", reference_reading, context_tokens=256)
    assert workload == "sweep" and "scoring" in est_row.breakdown
    compare = planning.estimate_for(QWEN15, "bf16", reference_reading, 256, 2)
    assert est_row.need_bytes > compare.need_bytes


def test_fitted_tokens_is_the_largest_that_fits(reference_reading):
    budget = reference_reading.headroom_bytes - est.MARGIN_DEFAULT_BYTES
    device = dict(on_gpu=True, compute_capability=reference_reading.compute_capability)
    tokens = est.fitted_tokens(QWEN7, "4bit", 8, budget, **device)
    assert 0 < tokens < QWEN7.max_positions
    assert est.request_need_bytes(QWEN7, "4bit", 8, tokens, **device) <= budget
    assert est.request_need_bytes(QWEN7, "4bit", 8, tokens + 1, **device) > budget
    assert est.fitted_tokens(QWEN15, "4bit", 2, 10**15, **device) == QWEN15.max_positions  # capped by positions
    assert est.fitted_tokens(QWEN7, "bf16", 2, budget, **device) == 0  # the weights alone do not fit
    # A live reading already holds the weights: only what the request adds must fit.
    loaded = est.fitted_tokens(QWEN7, "4bit", 8, budget - est.weights_bytes(QWEN7, "4bit"), **device,
                               resident_bytes=est.weights_bytes(QWEN7, "4bit"))  # fmt: skip
    assert loaded == tokens


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.short_name)
def test_the_meta_model_accelerate_places_is_the_catalog_model(spec):
    """The placement's meta-device model, built from the catalog numbers alone, has exactly the
    catalog's parameter count, and the per-module bytes it is priced with add up to the weights."""
    from steering import devices

    model = devices.meta_model(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.n_params
    assert all(p.device.type == "meta" for p in model.parameters())  # no memory behind it
    for quant in ("4bit", "8bit", "bf16", "fp32"):
        assert sum(devices.module_bytes(spec, quant).values()) == est.weights_bytes(spec, quant)


def test_a_card_too_small_even_for_the_embeddings_is_wont_fit_not_offload():
    tiny_card = read(simulate_gpu(1 * GiB))  # 788 MiB headroom: the 1 GiB margin alone is more
    ram = read(simulate_gpu(80 * GiB))  # stands in for plenty of RAM
    estimate_, _ = planning.workload_estimate(QWEN7, "fp16", tiny_card)
    placed = planning.placement(QWEN7, "fp16", estimate_, [tiny_card], ram)
    assert placed.verdict == "wont_fit" and placed.devices() == [] and placed.offload() is None
