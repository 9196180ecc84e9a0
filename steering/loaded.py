"""What the model manager holds while a model is loaded, and the questions every layer asks of it.

`decoder_layers(model)` is the one accessor for a causal LM's decoder layers (llm-steer patches
the same `model.model.layers`); `map_layer` moves a layer index to another model by relative
depth (a request validated on a 32-layer model and answered by the 28-layer fallback);
`is_oom` recognises an out-of-memory error in every shape it takes on the way up from CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from steering import catalog


def decoder_layers(model: Any) -> Any:
    """The decoder layers (a `ModuleList`) of a transformers causal LM: `model.model.layers`."""
    return model.model.layers


def execution_device(module: Any) -> Any:
    """The device `module` computes on: where accelerate's hook moves it for a forward pass when
    the model is dispatched (its weights may sit in CPU RAM or on disk, shown as "meta"), else
    the device of its first parameter."""
    import torch

    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return next(module.parameters()).device


def input_device(model: Any) -> Any:
    """Where a model's input ids go: the device its input embeddings compute on."""
    return execution_device(model.get_input_embeddings())


@dataclass
class LoadedModel:
    """What the manager holds while a model is loaded. Never put this in `gr.State`."""

    model_id: str
    quant: str
    device: str  # "cpu" or "cuda:N" (a split model: where its inputs go; `placement` has the rest)
    model: Any
    tokenizer: Any
    spec: catalog.ModelSpec
    load_seconds: float
    generation: int  # increments on every load: part of cache keys, so old captures never leak
    # Objects attached by higher layers (the steering engine). Each is closed on release.
    extras: dict[str, Any] = field(default_factory=dict)
    # The fitted limits measured after loading (ModelManager): the longest prompt + new tokens
    # per row of a compare and of a sweep on this machine, and what they were measured on.
    fit: dict[str, Any] = field(default_factory=dict)
    # Where the model runs when it is not on one device: the plan row's `devices` list and, for
    # an offloaded model, its `offload` split (None: the whole model on `device`).
    placement: dict[str, Any] | None = None

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def default_layer(self) -> int:
        return self.n_layers // 2

    @property
    def identity(self) -> str:
        return f"{self.model_id}|{self.quant}|{self.generation}"


def map_layer(layer: int, from_layers: int, to_layers: int) -> int:
    """Map a layer index to another model by relative depth (layer 16 of 32 -> 14 of 28)."""
    if from_layers == to_layers:
        return layer
    mapped = round((layer + 0.5) * to_layers / from_layers - 0.5)
    return max(0, min(to_layers - 1, mapped))


def is_oom(exc: BaseException) -> bool:
    """True for every shape an out-of-memory error takes on the way up from CUDA."""
    import torch

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        if isinstance(exc, RuntimeError) and "out of memory" in text.lower():
            return True
        # accelerate refuses a device_map that does not fit instead of raising OOM
        if isinstance(exc, ValueError) and "dispatched on the CPU or the disk" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe(exc: BaseException) -> str:
    """`Type: first line of the message`, at most 300 characters (for events and logs)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]
