"""Shared prefill (steering/prefill.py): rows with one prompt compute the layers below the lowest
steered layer once, with one row, and stay token-identical to separate runs."""

from __future__ import annotations

import contextlib

import pytest

from steering.generate import Sampling, conversation_ids, run_rows, stream_rows, sweep_rows
from steering.loaded import decoder_layers

PROMPT = "Describe a quiet morning in a small town."
TOKENS = 4


@contextlib.contextmanager
def attention_batches(engine, layers):
    """Record the batch size of every attention call at the given layers (stand-ins skip attention)."""
    seen = {layer: [] for layer in layers}
    hooks = [
        decoder_layers(engine.model)[layer].self_attn.register_forward_hook(
            lambda module, args, kwargs, out, layer=layer: seen[layer].append(kwargs["hidden_states"].shape[:2]),
            with_kwargs=True,
        )
        for layer in layers
    ]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def test_a_sweep_runs_the_layers_below_its_layer_once_and_matches_separate_runs(smol_engine):
    rows = sweep_rows("the ocean", 15, [0.0, 0.3, 0.6, 0.9])
    run_rows(smol_engine, PROMPT, rows[:1], Sampling(max_new_tokens=1))  # the text's capture, cached
    # llm-steer leaves a layer it steered with its bound forward as an instance attribute: still shared
    run_rows(smol_engine, PROMPT, sweep_rows("the ocean", 0, [0.5]), Sampling(max_new_tokens=1))
    assert "forward" in decoder_layers(smol_engine.model)[0].__dict__
    with attention_batches(smol_engine, (0, 14, 15)) as seen:
        batched = run_rows(smol_engine, PROMPT, rows, Sampling(max_new_tokens=TOKENS))
    prompt_len = seen[15][0][1]
    assert prompt_len > 1
    # prefill: one row below layer 15, every row from 15 up; then one decoding step per new token
    assert seen[0][0] == (1, prompt_len) and seen[14][0] == (1, prompt_len)
    assert seen[15][0] == (4, prompt_len)
    assert all(shape == (4, 1) for layer in (0, 14, 15) for shape in seen[layer][1:])
    assert len(seen[0]) == len(seen[15])
    for row, expected in zip(rows, batched.token_ids):
        alone = run_rows(smol_engine, PROMPT, [row], Sampling(max_new_tokens=TOKENS))
        assert alone.token_ids[0] == expected


@pytest.mark.parametrize("layer", [0, 1])
def test_steering_at_the_bottom_layers_does_not_share(smol_engine, layer):
    with attention_batches(smol_engine, (0,)) as seen:
        run_rows(smol_engine, PROMPT, sweep_rows("the ocean", layer, [0.0, 0.5]), Sampling(max_new_tokens=1))
    assert seen[0][-1][0] == 2  # the prefill (after the text's capture, one row)


def test_rows_with_different_prompts_do_not_share(smol_engine):
    tokenizer = smol_engine.tokenizer
    first = conversation_ids(tokenizer, [{"role": "user", "content": "Hi."}])
    second = conversation_ids(tokenizer, [{"role": "user", "content": "Tell me about rivers, please."}])
    rows = sweep_rows("the ocean", 15, [0.0, 0.5])
    with attention_batches(smol_engine, (0,)) as seen:
        updates = list(stream_rows(smol_engine, "", rows, Sampling(max_new_tokens=1), row_ids=[first, second]))
    assert updates[-1].done and seen[0][-1][0] == 2
    assert not any(
        hasattr(layer.forward, "previous") for layer in decoder_layers(smol_engine.model)
    )  # no stand-in left
