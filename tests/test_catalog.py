"""The catalog: real architecture numbers, offline lookups, and the gated-model message."""

from __future__ import annotations

import json

import pytest

from steering import catalog
from steering.catalog import CATALOG, EMBEDDED_ID, FALLBACK_ID, count_params, get_spec, spec_from_config
from steering.errors import ModelUnavailableError

QWEN2_TINY_CONFIG = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "tie_word_embeddings": True,
    "dtype": "bfloat16",
}


def test_catalog_holds_the_field_notes_matrix():
    ids = {spec.id for spec in CATALOG}
    assert len(ids) == len(CATALOG)  # no id twice
    assert ids >= {
        "mistralai/Mistral-7B-Instruct-v0.3",
        "Qwen/Qwen2.5-7B-Instruct",
        "Qwen/Qwen2.5-1.5B-Instruct",
        "meta-llama/Llama-3.2-1B-Instruct",
        EMBEDDED_ID,
    }
    assert FALLBACK_ID in ids
    assert get_spec("meta-llama/Llama-3.2-1B-Instruct").gated and not get_spec(FALLBACK_ID).gated
    assert [s.id for s in CATALOG if s.embedded] == [EMBEDDED_ID]  # exactly one offline model


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.short_name)
def test_stated_parameter_count_matches_the_shapes(spec):
    # The published sizes (7.25B, 7.62B, 1.54B, 1.24B, 134.5M) follow from the config numbers.
    assert count_params(spec) == spec.n_params


def test_published_sizes():
    sizes = {s.id: round(s.n_params / 1e9, 2) for s in CATALOG}
    assert sizes["mistralai/Mistral-7B-Instruct-v0.3"] == 7.25
    assert sizes["Qwen/Qwen2.5-7B-Instruct"] == 7.62
    assert sizes[FALLBACK_ID] == 1.54
    assert sizes["meta-llama/Llama-3.2-1B-Instruct"] == 1.24
    assert round(get_spec(EMBEDDED_ID).n_params / 1e6, 1) == 134.5


def test_layers_and_default_layer():
    assert get_spec("mistralai/Mistral-7B-Instruct-v0.3").n_layers == 32
    assert get_spec(FALLBACK_ID).n_layers == 28
    assert get_spec(FALLBACK_ID).default_layer == 14


def test_lookup_ignores_case_and_knows_the_hub_name_of_the_embedded_model():
    assert get_spec("qwen/qwen2.5-1.5b-instruct").id == FALLBACK_ID
    assert get_spec("HuggingFaceTB/SmolLM2-135M-Instruct").id == EMBEDDED_ID


def test_local_folder_is_read_from_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_TINY_CONFIG))
    spec = get_spec(str(tmp_path))
    assert spec.id == str(tmp_path)
    assert (spec.arch, spec.n_layers, spec.head_dim, spec.n_kv_heads) == ("qwen2", 2, 16, 2)
    assert spec.qkv_bias and spec.tied_embeddings
    # 2 layers x (q 64x64+64, k/v 64x32+32 each, o 64x64, MLP 3x64x192, norms 2x64) + embed + norm
    assert spec.n_params == 2 * (4096 + 64 + 2 * (2048 + 32) + 4096 + 3 * 64 * 192 + 128) + 64000 + 64


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelUnavailableError, match="config.json"):
        get_spec(str(tmp_path))


def test_cached_hub_model_is_read_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    repo = tmp_path / "models--someone--tiny-qwen"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (snapshot / "config.json").write_text(json.dumps(QWEN2_TINY_CONFIG))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    spec = get_spec("someone/tiny-qwen")
    assert spec.id == "someone/tiny-qwen"
    assert spec.hidden_size == 64


def test_unknown_model_gets_an_actionable_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailableError) as info:
        get_spec("nobody/no-such-model")
    message = str(info.value)
    assert "nobody/no-such-model" in message and "not in the catalog" in message
    assert "\n" not in message


def test_config_without_decoder_numbers_is_refused():
    with pytest.raises(ModelUnavailableError, match="lacks the decoder numbers"):
        spec_from_config({"model_type": "bert"}, "x")


def test_multimodal_config_uses_its_text_config():
    spec = spec_from_config({"model_type": "wrapper", "text_config": QWEN2_TINY_CONFIG}, "mm")
    assert spec.arch == "qwen2" and spec.n_layers == 2


def test_gated_message_only_without_a_token(monkeypatch):
    llama = get_spec("meta-llama/Llama-3.2-1B-Instruct")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert not catalog.hf_token_available()
    message = catalog.gated_message(llama)
    assert message.startswith("meta-llama/Llama-3.2-1B-Instruct is gated: set HF_TOKEN")
    assert catalog.gated_message(get_spec(FALLBACK_ID)) is None  # not gated
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert catalog.hf_token_available()
    assert catalog.gated_message(llama) is None
