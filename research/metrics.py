"""Relevance measures tried by research/quality.py and not used by the app: the cosine of an
output's mean hidden state with the steering direction, and of its mean token embedding with the
steering text's. The app scores with `steering.quality.relevance_logprob` (it agreed best with
the word-list labels, docs/quality.md); `relevance_scores` runs any of the four by name."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steering.engine import DEFAULT_CAPTURE_MODE, NEUTRAL_TEXTS, SteeringEngine, VectorSpec
from steering.quality import ROW_CHUNK, _target_ids, relevance_logprob

METHODS = ("logprob", "logprob-plain", "hidden", "embed")


def relevance_hidden(
    engine: SteeringEngine,
    context: Sequence[int],
    generations: Sequence[Sequence[int]],
    baseline: Sequence[int],
    spec: VectorSpec,
    *,
    capture_mode: str = DEFAULT_CAPTURE_MODE,
) -> list[float]:
    """Per output: cosine of its mean hidden state (entering `spec.layer`, unsteered, the neutral
    texts' mean subtracted) with the steering direction, minus the same for the baseline."""
    direction = engine.direction(spec, capture_mode).view(-1)
    neutral = torch.stack(engine.text_means(spec.layer, NEUTRAL_TEXTS, "bos")).mean(dim=0)
    rows = [list(baseline)] + [list(g) for g in generations]
    values = []
    for first in range(0, len(rows), ROW_CHUNK):
        chunk = [list(context) + g for g in rows[first : first + ROW_CHUNK]]
        hidden = engine._capture(spec.layer, chunk)  # (B, T, H) fp32, right-padded
        for b, g in enumerate(rows[first : first + ROW_CHUNK]):
            if not g:
                values.append(0.0)
                continue
            mean = hidden[b, len(context) : len(context) + len(g)].mean(dim=0) - neutral
            values.append(float(torch.nn.functional.cosine_similarity(mean, direction, dim=0)))
    return [v - values[0] for v in values[1:]]


def relevance_embed(
    engine: SteeringEngine,
    generations: Sequence[Sequence[int]],
    baseline: Sequence[int],
    *,
    text: str = "",
    positive: str = "",
    negative: str = "",
) -> list[float]:
    """Per output: cosine of its mean input embedding with the steering text's (positive minus
    negative for a pair), minus the baseline's. No forward pass."""
    table = engine.model.get_input_embeddings().weight

    def mean_of(ids):
        return (
            table[torch.tensor(list(ids), dtype=torch.long, device=table.device)].float().mean(dim=0) if ids else None
        )

    with torch.inference_mode():
        if positive or negative:
            target = mean_of(_target_ids(engine, positive)) - mean_of(_target_ids(engine, negative))
        else:
            target = mean_of(_target_ids(engine, text))
        values = []
        for g in [list(baseline)] + [list(g) for g in generations]:
            mean = mean_of(g)
            values.append(0.0 if mean is None else float(torch.nn.functional.cosine_similarity(mean, target, dim=0)))
    return [v - values[0] for v in values[1:]]


def relevance_scores(
    engine: SteeringEngine,
    context: Sequence[int],
    generations: Sequence[Sequence[int]],
    baseline: Sequence[int],
    spec: VectorSpec,
    *,
    method: str = "logprob",
    capture_mode: str = DEFAULT_CAPTURE_MODE,
) -> list[float]:
    """Relevance of each output by `method` ("logprob", "logprob-plain", "hidden", "embed")."""
    texts = dict(text=spec.text, positive=spec.positive, negative=spec.negative)
    if method == "logprob":
        return relevance_logprob(engine, context, generations, baseline, **texts)
    if method == "logprob-plain":
        return relevance_logprob(engine, context, generations, baseline, connector="", **texts)
    if method == "hidden":
        return relevance_hidden(engine, context, generations, baseline, spec, capture_mode=capture_mode)
    if method == "embed":
        return relevance_embed(engine, generations, baseline, **texts)
    raise ValueError(f"unknown relevance method {method!r}")
