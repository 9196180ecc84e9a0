"""One prompt, many rows: the layers below the first steered layer run once, not once per row.

A compare (steered + baseline) or a sweep (8 coefficients) gives every batch row the same prompt,
and steering is added at the input of its layer (llm-steer adds the vector to the hidden state a
layer receives). So below the lowest steered layer L every row computes exactly the same thing:
the same hidden states and the same keys and values. `shared_prefill` runs the prompt through
layers 0..L-1 once, with one row (a forward pass stopped at layer L's input), and during the
batch's own prefill (the first forward of `model.generate`) those layers are stand-ins: layers
0..L-2 pass the embeddings through untouched, layer L-1 hands over the one row's hidden state
repeated for every row, and each writes the one row's keys and values, repeated, into the batch's
cache. From layer L up, and for every decoding step after the prefill, the real layers run.

The prefill of 8 rows at layer 15 of 30 thus costs about 1 + 8/2 row-prefills instead of 8; the
decoding steps are unchanged. Each row's lower layers are computed as a separate one-row run
computes them, so rows stay token-identical to separate runs (`tests/test_engine.py`).

Used only where it is exact and simple: two or more rows with one unpadded prompt, a model in one
piece (no accelerate dispatch hooks) whose cache layers are plain `DynamicLayer`s, and L >= 2.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from steering.loaded import decoder_layers

MIN_SHARED_LAYERS = 2  # below this the extra one-row pass saves too little to be worth it


class _ReachedLayer(Exception):
    pass


def _one_row_below(model, input_ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, DynamicCache] | None:
    """Row 0 of `input_ids` through layers 0..layer-1: (hidden state entering `layer`, the cache)."""
    captured: dict[str, torch.Tensor] = {}

    def stop_here(module, args, kwargs):
        captured["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        raise _ReachedLayer

    cache = DynamicCache()
    hook = decoder_layers(model)[layer].register_forward_pre_hook(stop_here, with_kwargs=True, prepend=True)
    try:
        model.model(input_ids=input_ids[:1], past_key_values=cache, use_cache=True)
    except _ReachedLayer:
        pass
    finally:
        hook.remove()
    if "hidden" not in captured or len(cache.layers) < layer:
        return None
    if any(type(cache_layer) is not DynamicLayer for cache_layer in cache.layers[:layer]):
        return None  # sliding-window or quantized cache layers: let the model fill them itself
    return captured["hidden"], cache


def _plain_forward(module) -> bool:
    """The layer runs its class's own forward (llm-steer leaves that bound method behind as an
    instance attribute after it un-steers a layer; anything else, e.g. accelerate's hook, is not plain)."""
    own = module.__dict__.get("forward")
    return own is None or (getattr(own, "__func__", None) is type(module).forward and own.__self__ is module)


def _restore(module, previous) -> None:
    if previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous


def _stand_in(index: int, module, rows: int, keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor | None):
    """A one-shot `forward` for lower layer `index`: write the shared keys/values, pass on the state."""
    previous = module.__dict__.get("forward")

    def forward(hidden_states, *args, past_key_values=None, **kwargs):
        _restore(module, previous)  # one shot: decoding steps run the real layer
        if past_key_values is not None:
            past_key_values.update(keys.repeat(rows, 1, 1, 1), values.repeat(rows, 1, 1, 1), index)
        if hidden is None:
            return hidden_states
        return hidden.expand(rows, -1, -1).to(hidden_states.dtype).contiguous()

    forward.previous = previous
    return forward


def _applies(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]) -> int | None:
    """The number of shared layers, or None where sharing does not apply."""
    if input_ids.shape[0] < 2 or not layers or min(layers) < MIN_SHARED_LAYERS:
        return None
    if not bool(attention_mask.all()) or not bool((input_ids == input_ids[:1]).all()):
        return None  # padded or different prompts (a chat's two conversations)
    lower = decoder_layers(model)[: min(layers)]
    if any(not _plain_forward(module) or getattr(module, "_hf_hook", None) is not None for module in lower):
        return None  # wrapped (dispatch hooks, a steering element): leave it alone
    return min(layers)


@contextlib.contextmanager
def shared_prefill(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int]
) -> Iterator[bool]:
    """Around one `model.generate(input_ids, attention_mask)` of rows steered only at `layers`:
    the rows' common lower layers are computed once. Yields whether sharing is in place."""
    shared = _applies(model, input_ids, attention_mask, layers)
    below = _one_row_below(model, input_ids, shared) if shared else None
    if below is None:
        yield False
        return
    hidden, cache = below
    rows = input_ids.shape[0]
    modules = decoder_layers(model)[:shared]
    for index, module in enumerate(modules):
        own = cache.layers[index]
        last = hidden if index == shared - 1 else None
        module.forward = _stand_in(index, module, rows, own.keys, own.values, last)
    try:
        yield True
    finally:
        for module in modules:  # a generation that never ran its prefill (stopped at once)
            stand_in = module.__dict__.get("forward")
            if hasattr(stand_in, "previous"):
                _restore(module, stand_in.previous)
