"""A model folder that cannot load is refused before the loaded model is released (issue 26, item
4), and model names and configs that Python cannot read give sentences (item 7): tiny random
models saved to temporary folders (as under --models-dir), loaded through the real manager.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from steering import api, catalog
from steering.errors import InputError, ModelUnavailableError
from steering.loader import get_manager


@pytest.fixture
def manager(fresh_manager, tiny_qwen_dir, tmp_path_factory):
    """The embedded model loaded; users may load folders from this run's temporary folders."""
    fresh_manager.configure(fallback_model=str(tiny_qwen_dir), models_dirs=[str(tmp_path_factory.getbasetemp())])
    assert get_manager() is fresh_manager
    fresh_manager.load(catalog.EMBEDDED_ID, "fp32")
    return fresh_manager


def _edited(source, target, **change):
    shutil.copytree(source, target)
    config = {**json.loads((target / "config.json").read_text()), **change}
    (target / "config.json").write_text(json.dumps(config))
    return target


def _refused_and_kept(manager, folder, pattern: str, error=ModelUnavailableError) -> str:
    before = (manager.current.identity, manager.events.count)
    with pytest.raises(error) as caught:
        api.load_model(str(folder), "fp32")
    message = str(caught.value)
    assert re.search(pattern, message), message
    assert (manager.current.identity, manager.events.count) == before  # nothing freed, no fallback event
    assert "Error" not in message, message
    return message


def test_a_config_whose_hidden_size_does_not_match_its_weights_keeps_the_loaded_model(
    manager, tmp_path, tiny_llama_dir
):
    folder = _edited(tiny_llama_dir, tmp_path / "wrong-hidden", hidden_size=128)
    message = _refused_and_kept(manager, folder, r"config\.json does not match its weights")
    assert str(folder) in message and "of shape [" in message


def test_an_unknown_model_type_keeps_the_loaded_model(manager, tmp_path, tiny_llama_dir):
    folder = _edited(tiny_llama_dir, tmp_path / "unknown-type", model_type="nosuchmodel")
    message = _refused_and_kept(manager, folder, r"transformers cannot build a causal language model")
    assert str(folder) in message and "nosuchmodel" in message


def test_a_folder_without_a_tokenizer_says_so_in_plain_words(manager, tmp_path, tiny_llama_dir):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llama_dir, folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"):
        (folder / name).unlink(missing_ok=True)
    message = _refused_and_kept(manager, folder, r"it has no tokenizer files\.$")
    assert "no a " not in message


def test_a_deeply_nested_config_is_a_sentence(manager, tmp_path, tiny_llama_dir):
    folder = tmp_path / "nested"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    _refused_and_kept(manager, folder, r"nested too deeply")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("\x00", r"^model: contains a control character \(such as a null byte\)"),
        ("a\x00b", r"^model: contains a control character"),
        ("\ud800", r"^model: contains a character that is not valid Unicode"),
    ],
    ids=["null", "inner-null", "surrogate"],
)
def test_unreadable_model_names_are_sentences(fresh_manager, model, expected):
    with pytest.raises(InputError, match=expected):  # before: "embedded null byte", a codec error
        api.load_model(model, "fp32")
    assert fresh_manager.current is None


def test_a_huge_quant_is_not_echoed_whole(fresh_manager):
    with pytest.raises(InputError) as caught:
        api.load_model(catalog.EMBEDDED_ID, "q" * 1_000_000)
    assert str(caught.value).startswith("quant: must be one of") and len(str(caught.value)) < 200
