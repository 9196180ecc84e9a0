"""Where a model's weights come from, and how transformers is asked to load them.

* `find_weights(spec, model, online)`: a local folder, the Hugging Face cache, or the hub, decided
  up front so that an offline or gated model is refused in a second and nothing is unloaded for
  it. Raises `ModelUnavailableError` with a sentence a user can act on.
* `hub_reachable()` / `NetworkCheck`: whether the hub answers, in ~1.5 s instead of
  huggingface_hub's ~26 s of retries, remembered for a minute.
* `pretrained_kwargs(...)`: the `from_pretrained` arguments for a quantization and a device, as a
  pure function (testable without loading anything).
* `load_pretrained(...)`: the one place that calls `from_pretrained`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from steering import catalog, embedded
from steering.errors import ModelUnavailableError

logger = logging.getLogger(__name__)

NETWORK_TTL_S = 60.0
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def hub_reachable(timeout_s: float = 1.5) -> bool:
    """Whether the model hub answers, decided in ~1.5 s instead of huggingface_hub's ~26 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    # DNS resolution ignores the socket timeout, so the probe runs in a thread we can abandon.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout_s + 0.5)
    return bool(result and result[0])


class NetworkCheck:
    """`hub_reachable()` remembered for `ttl_s` seconds (call the instance)."""

    def __init__(self, ttl_s: float = NETWORK_TTL_S):
        self.ttl_s = ttl_s
        self._last: tuple[float, bool] | None = None

    def __call__(self) -> bool:
        now = time.monotonic()
        if self._last is None or now - self._last[0] > self.ttl_s:
            self._last = (now, hub_reachable())
        return self._last[1]


def is_cached(spec: catalog.ModelSpec) -> bool:
    """Whether `spec` loads without the network: the embedded model, or a config and weights in
    the local Hugging Face cache (HF_HUB_CACHE)."""
    if spec.embedded:
        return True
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(spec.id, name, cache_dir=hub_cache_dir()), str)

    return cached("config.json") and any(cached(name) for name in _WEIGHT_FILES)


def find_weights(spec: catalog.ModelSpec, model: str, online) -> str:
    """The `from_pretrained` source of `model`: a folder, or a hub id (cached or fetchable).

    `online` is a callable answering whether the hub can be reached (only asked when needed).
    Raises `ModelUnavailableError` when the weights cannot be had here.
    """
    if spec.embedded:
        return str(embedded.ensure_converted())
    if Path(model).expanduser().is_dir():
        return str(Path(model).expanduser())
    if is_cached(spec):
        return spec.id
    gated = catalog.gated_message(spec)
    if gated:
        raise ModelUnavailableError(gated)
    if not online():
        raise ModelUnavailableError(
            f"{spec.id} is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline). Download it on a connected machine or pass a local folder."
        )
    return spec.id


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def check_user_source(model: str, allowed_dirs) -> None:
    """Refuse, in one sentence that says nothing about the server's files, a `model` a user asks
    for that is a path outside the allowed folders (`--models-dir`, the Hugging Face cache).
    Catalog ids and hub ids pass; a hub-id-shaped name that is a folder here counts as a path."""
    if catalog.find_in_catalog(model) is not None:
        return
    path = Path(model).expanduser()
    looks_like_hub_id = _HUB_ID.fullmatch(model) is not None and not path.is_absolute()
    if looks_like_hub_id and not path.exists():
        return
    resolved = path.resolve()
    roots = [Path(d).expanduser().resolve() for d in [*allowed_dirs, hub_cache_dir()]]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ModelUnavailableError(catalog.not_found_message(model))


def check_folder(folder: str) -> None:
    """A model folder that cannot load is refused before anything is unloaded for it: a config,
    readable safetensors weights (header and offsets checked) and a tokenizer must be there."""
    path = Path(folder)
    weights = sorted(path.glob("*.safetensors"))
    missing = [
        what
        for what, ok in (
            ("config.json", (path / "config.json").is_file()),
            ("safetensors weights", bool(weights)),
            ("tokenizer files", any((path / name).is_file() for name in _TOKENIZER_FILES)),
        )
        if not ok
    ]
    if missing:
        raise ModelUnavailableError(f"{folder} cannot be loaded: it has no {', no '.join(missing)}.")
    from safetensors import safe_open

    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception:  # a truncated or foreign file fails in many ways
            raise ModelUnavailableError(
                f"{folder} cannot be loaded: {file.name} is not a readable safetensors file (damaged or cut short)."
            ) from None
    check_architecture(folder, weights)


def check_architecture(folder: str, weights: list[Path]) -> None:
    """The config names an architecture transformers can build, and every weight it has a place
    for has that place's shape: a meta-device model from the config (shapes, no memory) against
    the safetensors headers. Refused naming the folder before the loaded model is released."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if getattr(config, "quantization_config", None):
            return  # pre-quantized weights are packed: their shapes are not the config's
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except RecursionError:
        raise ModelUnavailableError(
            f"{folder} cannot be loaded: its config.json is nested too deeply to read."
        ) from None
    except Exception as exc:  # an unknown model_type, a config transformers cannot build
        kind = _model_type(Path(folder))
        raise ModelUnavailableError(
            f"{folder} cannot be loaded: transformers cannot build a causal language model from its config.json "
            f"(model_type {kind[:40]!r}: {str(exc)[:160]})."
        ) from None
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    for file in weights:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                shape = tuple(handle.get_slice(name).get_shape())
                if name in expected and shape != expected[name]:
                    raise ModelUnavailableError(
                        f"{folder} cannot be loaded: its config.json does not match its weights ({file.name} holds "
                        f"{name[:80]} of shape {list(shape)}; the config gives {list(expected[name])})."
                    )


def _model_type(folder: Path) -> str:
    try:
        return str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type"))
    except (OSError, ValueError, RecursionError, AttributeError):
        return "unreadable"


def pretrained_kwargs(
    quant: str,
    *,
    cuda_index: int | None,
    supports_bf16: bool,
    local_files_only: bool,
    device_map: dict | None = None,
) -> dict:
    """`from_pretrained` keyword arguments for `quant` on CUDA device `cuda_index` (None: the CPU).

    The whole model goes on one device (`device_map={"": index}`), so a misfit is an out-of-memory
    error the manager recovers from, not a silent offload to the CPU. Only a `device_map` the plan
    made (`steering.devices`: module -> GPU index or "cpu") splits it, and it is used as given. 4bit is bitsandbytes NF4
    with double quantization, computing in bf16 where the card has it (fp16 below compute
    capability 8.0; bf16 on the CPU).
    """
    import torch
    from transformers import BitsAndBytesConfig

    half = torch.bfloat16 if (cuda_index is None or supports_bf16) else torch.float16
    kwargs: dict[str, Any] = {
        "device_map": dict(device_map) if device_map else {"": cuda_index if cuda_index is not None else "cpu"},
        "local_files_only": local_files_only,
    }
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=half,
        )
        kwargs["dtype"] = half
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = half
    else:
        kwargs["dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[quant]
    return kwargs


def load_pretrained(source: str, kwargs: dict) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer with a pad token) from `source`: the transformers boundary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=kwargs["local_files_only"])
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
