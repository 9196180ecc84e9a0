"""The model matrix: ids, architecture numbers and default quantization, usable offline.

`plan` and the memory estimate need each model's shape (layers, hidden size, heads, vocabulary...)
without downloading anything, so the catalog carries the numbers from each model's `config.json`.
Any other model works too: a local folder or a hub id already in the Hugging Face cache is read from
its `config.json` (never downloaded here); everything else raises `ModelUnavailableError`.

Plain Python: no torch, no network.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from steering.errors import ModelUnavailableError

__all__ = [
    "CATALOG",
    "EMBEDDED_ID",
    "FALLBACK_ID",
    "FALLBACK_QUANT",
    "ModelSpec",
    "count_params",
    "find_in_catalog",
    "gated_message",
    "get_spec",
    "hf_token_available",
    "not_found_message",
    "spec_from_config",
]

logger = logging.getLogger(__name__)

EMBEDDED_ID = "SmolLM2-135M-Instruct"
# The downgrade target's default; the configured one (`--fallback-model`) travels as a parameter.
FALLBACK_ID = "Qwen/Qwen2.5-1.5B-Instruct"
FALLBACK_QUANT = "4bit"

# Decoder families whose parameter layout count_params() knows exactly (llama-style blocks:
# q/k/v/o attention, gated MLP, two RMSNorms per layer). Others are counted as if llama-style.
KNOWN_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelSpec:
    """What the estimate needs to know about one model; numbers are those of its `config.json`.

    `n_params` counts every parameter once (tied input/output embeddings once).
    `checkpoint_dtype` is the dtype the weights are stored in (all catalog models ship bf16).
    """

    id: str
    arch: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    n_params: int
    gated: bool = False
    default_quant: str = "bf16"
    label: str = ""
    embedded: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (qwen2)
    o_bias: bool = False  # bias on the attention output projection (llama attention_bias=True)
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (qwen3)
    checkpoint_dtype: str = "bf16"
    aliases: tuple[str, ...] = ()
    max_positions: int = 32768  # max_position_embeddings: the longest prompt + output per row

    @property
    def default_layer(self) -> int:
        """The layer steering uses unless told otherwise: the middle of the stack."""
        return self.n_layers // 2

    @property
    def short_name(self) -> str:
        return self.label or self.id.rsplit("/", 1)[-1]


def count_params(spec: ModelSpec) -> int:
    """Parameters of a llama-style decoder from its shapes (tied embeddings counted once)."""
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_out, kv_out = spec.n_heads * d, spec.n_kv_heads * d
    per_layer = h * q_out + 2 * h * kv_out + q_out * h  # q, k, v, o weights
    per_layer += 3 * h * i  # gate, up, down
    per_layer += 2 * h  # input and post-attention RMSNorm
    if spec.qkv_bias:
        per_layer += q_out + 2 * kv_out
    if spec.o_bias:
        per_layer += h
    if spec.mlp_bias:
        per_layer += 2 * i + h
    if spec.qk_norm:
        per_layer += 2 * d
    embeddings = spec.vocab_size * h * (1 if spec.tied_embeddings else 2)
    return spec.n_layers * per_layer + embeddings + h  # + final norm


CATALOG: tuple[ModelSpec, ...] = (
    ModelSpec(
        id="mistralai/Mistral-7B-Instruct-v0.3",
        arch="mistral",
        n_layers=32,
        hidden_size=4096,
        intermediate_size=14336,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        vocab_size=32768,
        tied_embeddings=False,
        n_params=7_248_023_552,
        default_quant="4bit",
        label="Mistral-7B-Instruct-v0.3",
    ),
    ModelSpec(
        id="Qwen/Qwen2.5-7B-Instruct",
        arch="qwen2",
        n_layers=28,
        hidden_size=3584,
        intermediate_size=18944,
        n_heads=28,
        n_kv_heads=4,
        head_dim=128,
        vocab_size=152064,
        tied_embeddings=False,
        n_params=7_615_616_512,
        default_quant="4bit",
        label="Qwen2.5-7B-Instruct",
        qkv_bias=True,
    ),
    ModelSpec(
        id=FALLBACK_ID,
        arch="qwen2",
        n_layers=28,
        hidden_size=1536,
        intermediate_size=8960,
        n_heads=12,
        n_kv_heads=2,
        head_dim=128,
        vocab_size=151936,
        tied_embeddings=True,
        n_params=1_543_714_304,
        default_quant="4bit",
        label="Qwen2.5-1.5B-Instruct",
        qkv_bias=True,
    ),
    ModelSpec(
        id="meta-llama/Llama-3.2-1B-Instruct",
        arch="llama",
        n_layers=16,
        hidden_size=2048,
        intermediate_size=8192,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        vocab_size=128256,
        tied_embeddings=True,
        n_params=1_235_814_400,
        gated=True,
        default_quant="bf16",
        label="Llama-3.2-1B-Instruct",
        max_positions=131072,
    ),
    ModelSpec(
        id=EMBEDDED_ID,
        arch="llama",
        n_layers=30,
        hidden_size=576,
        intermediate_size=1536,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        vocab_size=49152,
        tied_embeddings=True,
        n_params=134_515_008,
        default_quant="fp32",
        label="SmolLM2-135M-Instruct (embedded)",
        embedded=True,
        checkpoint_dtype="fp32",  # the GGUF is converted once and cached as fp32 safetensors
        max_positions=8192,
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
    ),
)


def find_in_catalog(model: str) -> ModelSpec | None:
    """The catalog entry whose id or alias equals `model`, ignoring case; None if there is none."""
    wanted = model.strip().lower()
    for spec in CATALOG:
        if wanted == spec.id.lower() or wanted in (a.lower() for a in spec.aliases):
            return spec
    return None


def get_spec(model: str) -> ModelSpec:
    """Architecture numbers for a catalog id, a local model folder, or a hub id already cached.

    Nothing is downloaded. Raises `ModelUnavailableError` with a sentence a user can act on.
    """
    spec = find_in_catalog(model)
    if spec is not None:
        return spec
    path = Path(model).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ModelUnavailableError(f"{model} is a folder without a config.json, so it is not a model folder.")
        return spec_from_config(_read_json(config_path), model_id=str(path))
    if model.count("/") == 1 and not model.startswith(("/", ".")):
        cached = _cached_config_path(model)
        if cached is not None:
            return spec_from_config(_read_json(cached), model_id=model)
    raise ModelUnavailableError(not_found_message(model))


def not_found_message(model: str) -> str:
    """One sentence for every model that cannot be found, whatever the reason: it says nothing
    about whether a path exists on the server."""
    known = ", ".join(s.id for s in CATALOG)
    return (
        f"{model} is not in the catalog ({known}), not in the Hugging Face cache, and not a model "
        "folder the server allows (--models-dir); nothing is downloaded here: fetch it once with "
        f"`hf download {model}` or put its folder under a --models-dir."
    )


def _cached_config_path(repo_id: str) -> Path | None:
    """Path of `config.json` for `repo_id` in the local Hugging Face cache, without any network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # huggingface_hub comes with transformers; without it nothing is cached
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError as exc:  # a malformed repo id
        logger.debug("not a hub id: %s (%s)", repo_id, exc)
        return None
    return Path(found) if isinstance(found, str) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:  # a crafted config: Python's parser gives up
        raise ModelUnavailableError(f"cannot read {path}: its JSON is nested too deeply.") from None
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot read {path}: {exc}") from exc


def spec_from_config(config: dict, model_id: str) -> ModelSpec:
    """A `ModelSpec` from the fields of a transformers `config.json` (params counted from shapes)."""
    if "hidden_size" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # multimodal wrappers keep the decoder numbers here
    arch = str(config.get("model_type", "unknown"))
    try:
        hidden = int(config["hidden_size"])
        n_heads = int(config["num_attention_heads"])
        spec = ModelSpec(
            id=model_id,
            arch=arch,
            n_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=int(config.get("head_dim") or hidden // n_heads),
            vocab_size=int(config["vocab_size"]),
            # transformers' own default is tied, but llama/mistral/qwen configs default to untied
            tied_embeddings=bool(config.get("tie_word_embeddings", arch not in KNOWN_ARCHS)),
            n_params=0,
            qkv_bias=arch == "qwen2" or bool(config.get("attention_bias", False)),
            o_bias=arch != "qwen2" and bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=arch == "qwen3",
            checkpoint_dtype=_dtype_name(config.get("dtype") or config.get("torch_dtype")),
            default_quant="bf16",
            max_positions=int(config.get("max_position_embeddings") or 32768),
        )
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:  # ZeroDivision, Overflow
        raise ModelUnavailableError(
            f"{model_id}: its config.json lacks the decoder numbers the estimate needs "
            f"({f'no {exc.args[0]}' if isinstance(exc, KeyError) else str(exc)[:80]})."
        ) from None
    for name, value, high in _CONFIG_BOUNDS(spec):
        if not 1 <= value <= high:
            raise ModelUnavailableError(f"{model_id}: its config.json has {name} = {value}; expected 1 to {high}.")
    if spec.n_heads * spec.head_dim <= 0 or spec.n_heads % spec.n_kv_heads:
        raise ModelUnavailableError(f"{model_id}: its config.json has inconsistent attention heads.")
    if arch not in KNOWN_ARCHS:
        logger.warning("%s has model_type %r; its memory is estimated as a llama-style decoder", model_id, arch)
    return replace(spec, n_params=count_params(spec))


def _CONFIG_BOUNDS(spec: ModelSpec) -> list[tuple[str, int, int]]:  # noqa: N802 - a table
    """Sane ranges of a decoder's numbers (the largest open models are well inside them)."""
    return [
        ("num_hidden_layers", spec.n_layers, 1024),
        ("hidden_size", spec.hidden_size, 65536),
        ("intermediate_size", spec.intermediate_size, 1 << 20),
        ("num_attention_heads", spec.n_heads, 1024),
        ("num_key_value_heads", spec.n_kv_heads, 1024),
        ("head_dim", spec.head_dim, 4096),
        ("vocab_size", spec.vocab_size, 1 << 22),
        ("max_position_embeddings", spec.max_positions, 1 << 24),
    ]


def _dtype_name(value: object) -> str:
    names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
    return names.get(str(value).removeprefix("torch."), "bf16")


def hf_token_available() -> bool:
    """True when a Hugging Face token is set (HF_TOKEN) or saved by `hf auth login`; no network."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    try:
        from huggingface_hub import get_token
    except ImportError:
        return False
    return bool(get_token())


def gated_message(spec: ModelSpec) -> str | None:
    """A sentence saying the model is gated and no token is set; None when that is not a problem."""
    if not spec.gated or hf_token_available():
        return None
    return (
        f"{spec.id} is gated: set HF_TOKEN to a Hugging Face token whose account accepted the "
        f"licence at https://huggingface.co/{spec.id} (or run `hf auth login`)."
    )
