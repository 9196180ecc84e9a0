"""Vectors from examples, and reading texts with a vector (issue 22). torch + scikit-learn, no gradio.

Training (`train`): every example runs once through the decoder, in right-padded batches with an
attention mask, after the engine's document-start token, and `output_hidden_states` gives the
hidden state entering every decoder layer (`hidden_states[i]` is the input of layer i, the very
tensor llm-steer adds to). Each example is pooled over its tokens (`POOLINGS`), and per layer a
direction is fitted on positives vs negatives (neutral built-in texts when none are given):

* `mean_diff`: difference of the class means (CAA, Rimsky et al. 2024; DiffMean);
* `pca`: first principal component of the paired differences, sign toward the positives
  (repeng's `pca_diff`: scikit-learn's PCA, which centres the differences, as repeng's does);
* `probe`: logistic regression (scikit-learn) on standardised features; the direction is its
  weight vector mapped back to hidden-state space (w / scale).

The held-out split is deterministic (every 4th example of each side, `split_indices`); each
layer's direction is fitted on the rest and scored by the AUROC of the held-out projections. With
`layer=None` the best layer wins (ties within `AUROC_TIE` go to the layer nearest the middle,
where steering is most often fluent); the final direction is refitted on all examples.

The vector is a raw `direction` row the engine adds as given: a unit direction times the layer's
typical hidden-state RMS (`SteeringEngine.layer_rms`), so its `coeff` is in the lab's RMS units,
like a text vector's; the suggested coeff is `TRAINED_COEFF` (measured). Reading (`read`)
projects each token's hidden state at the vector's layer onto the unit direction; a text's score
is the pooled projection. `train_vector` / `read_texts` are the request functions (validation
first, then the model under the manager's lock).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from steering import engine as eng
from steering import lifecycle, limits
from steering.errors import InputError
from steering.loaded import LoadedModel, decoder_layers, input_device
from steering.loader import Attempt, get_manager
from steering.training_texts import CONTINUATIONS, NEUTRAL_TEXTS, PERSONA_TEMPLATES

logger = logging.getLogger(__name__)

METHODS = ("mean_diff", "pca", "probe")
# "mean": every position, the start token's included; "mean_skip_first": every position but the
# start token (an attention sink whose norm is ~100x the others' at the middle layers of SmolLM2);
# "last": the text's last token. bench/train.py measures them (docs/quality.md, issue 22).
POOLINGS = ("mean_skip_first", "mean", "last")
DEFAULT_POOLING = "mean_skip_first"
HELD_OUT_EVERY = 4  # example i of a side is held out when i % 4 == 3 (the last of 3 when n == 3)
AUROC_TIE = 0.01  # layers this close to the best held-out AUROC count as tied
# The suggested coefficient of a trained vector (its direction has the layer's typical RMS, so this
# is in the lab's RMS units, positions "prompt"). Measured (bench/train.py --stage steer, middle
# layer, 8 examples vs neutral texts, docs/quality.md): coeff 1 loops (ocean, music: 0 of 6 outputs
# good), 0.25 rarely moves the output; 0.75 edged 0.5 on the labelled set (9 vs 8 of 18) but fell
# to 2 of 15 and 3 of 15 on the validation sets, where 0.5 kept 7 and 4. A text vector's is 1.0.
TRAINED_COEFF = 0.5
Progress = Callable[[float, str], None] | None


# -- forward passes --------------------------------------------------------------------------------
def token_rows(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids after the engine's document-start token (as the engine captures)."""
    start = eng.start_ids(tokenizer)
    return [start + tokenizer.encode(text, add_special_tokens=False) for text in texts]


def batches(lengths: Sequence[int], budget_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped into batches whose padded size (rows x longest row) stays within
    `budget_tokens`; sorted by length first so rows of a batch pad little."""
    out: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        width = max([lengths[i] for i in current] + [lengths[index]])
        full = max_rows is not None and len(current) >= max_rows
        if current and (full or (len(current) + 1) * width > budget_tokens):
            out.append(current)
            current = []
        current.append(index)
    return out + [current] if current else out


def _padded(rows: Sequence[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask, (B, T) each: a causal model's positions before
    the padding never see it, and position ids stay 0..n-1 for every row."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    return ids, mask


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) hidden states of right-padded rows of `lengths` tokens -> (B, H) per `pooling`."""
    positions = torch.arange(hidden.shape[1], device=hidden.device).view(1, -1)  # (1, T)
    lengths = lengths.to(hidden.device).view(-1, 1)  # (B, 1)
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0]), lengths.view(-1) - 1]
    first = 1 if pooling == "mean_skip_first" else 0
    keep = ((positions >= first) & (positions < lengths)).unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1)


def pooled_states(
    model,
    tokenizer,
    texts: Sequence[str],
    poolings: Sequence[str] = (DEFAULT_POOLING,),
    *,
    budget_tokens: int = limits.BATCH_TOKENS,
    max_rows: int | None = None,
    progress: Progress = None,
) -> dict[str, torch.Tensor]:
    """Per pooling, (N, L, H) float32 on the CPU: each text's pooled hidden state entering each of
    the model's L decoder layers, from batched forward passes of the decoder (no output head)."""
    rows = token_rows(tokenizer, texts)
    n_layers, pad = len(decoder_layers(model)), tokenizer.pad_token_id or 0
    out: dict[str, torch.Tensor] = {}
    groups = batches([len(r) for r in rows], budget_tokens, max_rows)
    for done, group in enumerate(groups):
        lifecycle.check_running()  # a shutdown ends a long training between passes
        ids, mask = _padded([rows[i] for i in group], pad, input_device(model))
        lengths = mask.sum(dim=1)
        with torch.inference_mode():
            # model.model: the decoder without lm_head, whose (B, T, vocab) logits we do not need
            states = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        for layer, hidden in enumerate(states.hidden_states[:n_layers]):  # the last one is the final norm's
            for name in poolings:
                pooled = pool(hidden.float(), lengths, name).cpu()  # (B, H)
                if name not in out:
                    out[name] = torch.empty(len(texts), n_layers, pooled.shape[-1])
                out[name][group, layer] = pooled
        del states
        if progress is not None:
            progress((done + 1) / len(groups), f"forward pass {done + 1} of {len(groups)}")
    return out


# -- fitting ---------------------------------------------------------------------------------------
def pairs(n_pos: int, n_neg: int) -> list[tuple[int, int]]:
    """Paired indices for `pca`: positive i with negative i, the shorter side cycled."""
    return [(i % n_pos, i % n_neg) for i in range(max(n_pos, n_neg))]


def fit_direction(method: str, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """A unit direction (H,) float64 separating `pos` (n_pos, H) from `neg` (n_neg, H), its sign
    chosen so that positives project higher on average."""
    if method == "mean_diff":
        direction = pos.mean(axis=0) - neg.mean(axis=0)
    elif method == "pca":
        from sklearn.decomposition import PCA

        diffs = np.stack([pos[i] - neg[j] for i, j in pairs(len(pos), len(neg))])
        with warnings.catch_warnings():  # identical differences (no variance): a warning, then AUROC 0.5
            warnings.simplefilter("ignore", RuntimeWarning)
            direction = PCA(n_components=1).fit(diffs).components_[0] if len(diffs) > 1 else diffs[0]
    elif method == "probe":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        features = np.concatenate([pos, neg])
        labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        scaler = StandardScaler().fit(features)
        probe = LogisticRegression(max_iter=2000).fit(scaler.transform(features), labels)
        direction = probe.coef_[0] / scaler.scale_  # w . (x - m) / s == (w / s) . x + const
    else:
        raise InputError("method", f"must be one of {', '.join(METHODS)}; got {limits.shorten(method)}")
    if (pos @ direction).mean() < (neg @ direction).mean():
        direction = -direction
    norm = np.linalg.norm(direction)
    return direction / norm if norm > 0 else direction


def split_indices(n: int) -> tuple[list[int], list[int]]:
    """(fit, held out) indices of one side: every `HELD_OUT_EVERY`th example held out (the last
    one of a side of 3); a side of 2 holds none out (both are needed to fit)."""
    held = [i for i in range(n) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1] or ([n - 1] if n >= 3 else [])
    return [i for i in range(n) if i not in held], held


def auroc(pos_scores: np.ndarray, neg_scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(pos_scores)), np.zeros(len(neg_scores))]
    return float(roc_auc_score(labels, np.r_[pos_scores, neg_scores]))


def layer_aurocs(method: str, pos: np.ndarray, neg: np.ndarray) -> tuple[list[dict], dict]:
    """Per layer, the AUROC of a direction fitted on the fit split and scored on the held-out
    split (both sides must hold some out; else on the fit examples themselves, said in `split`).
    `pos` (n_pos, L, H), `neg` (n_neg, L, H)."""
    (pos_fit, pos_held), (neg_fit, neg_held) = split_indices(len(pos)), split_indices(len(neg))
    held_out = bool(pos_held and neg_held)
    if not held_out:
        pos_fit, neg_fit = pos_held + pos_fit, neg_held + neg_fit
        pos_held, neg_held = pos_fit, neg_fit
    rows = []
    for layer in range(pos.shape[1]):
        direction = fit_direction(method, pos[pos_fit, layer], neg[neg_fit, layer])
        value = auroc(pos[pos_held, layer] @ direction, neg[neg_held, layer] @ direction)
        rows.append({"layer": layer, "auroc": round(value, 4)})
    split = {
        "rule": f"example i of each side is held out when i % {HELD_OUT_EVERY} == {HELD_OUT_EVERY - 1} "
        "(the last of a side of 3; none from a side of 2); the chosen layer's vector is refitted on all",
        "held_out": held_out,
        "fit": {"positives": len(pos_fit), "negatives": len(neg_fit)},
        "test": {"positives": len(pos_held), "negatives": len(neg_held)} if held_out else None,
        "auroc_on": "held-out examples" if held_out else "the fitted examples (too few to hold any out)",
    }
    return rows, split


def choose_layer(rows: Sequence[dict], n_layers: int) -> int:
    """The best layer by AUROC; near-ties (within AUROC_TIE) go to the layer nearest the middle."""
    best = max(row["auroc"] for row in rows)
    tied = [row["layer"] for row in rows if row["auroc"] >= best - AUROC_TIE]
    return min(tied, key=lambda layer: (abs(layer - n_layers // 2), layer))


def train(
    engine: eng.SteeringEngine,
    positives: Sequence[str],
    negatives: Sequence[str] = (),
    method: str = "mean_diff",
    layer: int | None = None,
    pooling: str = DEFAULT_POOLING,
    *,
    name: str = "",
    max_rows: int | None = None,
    progress: Progress = None,
) -> dict:
    """Train a steering/reading direction from examples on the engine's model (inputs already
    validated: see `train_vector`). Returns the answer described in `train_vector`."""
    negatives = list(negatives) or list(NEUTRAL_TEXTS)
    start = time.perf_counter()
    states = (
        pooled_states(
            engine.model,
            engine.tokenizer,
            list(positives) + negatives,
            (pooling,),
            max_rows=max_rows,
            progress=progress,
        )[pooling]
        .double()
        .numpy()
    )  # (N, L, H)
    forward_s = time.perf_counter() - start
    pos, neg = states[: len(positives)], states[len(positives) :]
    rows, split = layer_aurocs(method, pos, neg)
    chosen = choose_layer(rows, pos.shape[1]) if layer is None else layer
    unit = fit_direction(method, pos[:, chosen], neg[:, chosen])
    fit_s = time.perf_counter() - start - forward_s
    # Unit L2 norm x sqrt(H) has RMS 1; x the layer's typical RMS: coeff 1 adds a vector as large
    # as a typical hidden state there, the unit a text vector's coeff is in.
    scale = float(np.sqrt(unit.size)) * engine.layer_rms(chosen)
    coeff = TRAINED_COEFF
    label = name or _default_name(method, positives, negatives if negatives != list(NEUTRAL_TEXTS) else None)
    vector = {
        "direction": [round(float(v), 6) for v in unit * scale],
        "coeff": coeff,
        "layer": chosen,
        "positions": eng.DEFAULT_POSITIONS,
        "name": label,
    }
    return {
        "vector": vector,
        "layer": chosen,
        "method": method,
        "pooling": pooling,
        "auroc": rows[chosen]["auroc"],
        "layers": rows,
        "n_pos": len(positives),
        "n_neg": len(negatives),
        "negatives": "given" if negatives != list(NEUTRAL_TEXTS) else "neutral (built in)",
        "coeff": coeff,
        "split": split,
        "seconds": {"forward": round(forward_s, 3), "fit": round(fit_s, 3)},
    }


def _default_name(method: str, positives: Sequence[str], negatives: Sequence[str] | None) -> str:
    def head(texts):
        return (texts[0][:24] + "…" if len(texts[0]) > 24 else texts[0]) + f" (+{len(texts) - 1})"

    versus = head(negatives) if negatives else "neutral"
    return f"{method}: {head(positives)} vs {versus}"[: int(limits.LIMITS["name_chars"].maximum)]


def pairs_from_words(positive: str, negative: str) -> tuple[list[str], list[str]]:
    """repeng-style paired examples from two words: each persona template with the word, then each
    built-in neutral continuation (the same continuation on both sides of a pair)."""
    positive = limits.check_text(positive, "positive", "word_chars").strip()
    negative = limits.check_text(negative, "negative", "word_chars").strip()
    if positive.lower() == negative.lower():
        raise InputError("negative", "must differ from positive")

    def expand(word: str) -> list[str]:
        return [f"{t.format(word)} {c}" for t in PERSONA_TEMPLATES for c in CONTINUATIONS]

    return expand(positive), expand(negative)


# -- reading ---------------------------------------------------------------------------------------
def read(
    engine: eng.SteeringEngine,
    texts: Sequence[str],
    spec: eng.VectorSpec,
    pooling: str = DEFAULT_POOLING,
    *,
    capture_mode: str = eng.DEFAULT_CAPTURE_MODE,
    max_rows: int | None = None,
    budget_tokens: int = limits.BATCH_TOKENS,
) -> dict:
    """Project each text's hidden states at `spec.layer` onto the vector's unit direction.

    Returns {"scores": one pooled projection per text, "tokens": per text [[token text, projection],
    ...] (the start token left out; the token texts concatenate to the text), "layer", "pooling"}.
    Projections are in hidden-state units (a dot product with a unit vector).
    """
    direction = engine.direction(spec, capture_mode).view(-1).float()  # (H,)
    unit = direction / direction.norm().clamp_min(1e-12)
    rows = token_rows(engine.tokenizer, texts)
    scores: list[float] = [0.0] * len(texts)
    projections: list[list[float]] = [[] for _ in texts]
    for group in batches([len(r) for r in rows], budget_tokens, max_rows):
        hidden = engine.layer_inputs(spec.layer, [rows[i] for i in group])  # (B, T, H) fp32
        lengths = torch.tensor([len(rows[i]) for i in group])
        values = hidden @ unit.to(hidden.device)  # (B, T)
        pooled = pool(values.unsqueeze(-1), lengths, pooling).view(-1).cpu()  # pooling is linear
        for b, index in enumerate(group):
            scores[index] = round(float(pooled[b]), 4)
            projections[index] = [round(float(v), 4) for v in values[b, 1 : lengths[b]].cpu()]
    tokens = [list(zip(token_texts(engine.tokenizer, t), p)) for t, p in zip(texts, projections)]
    return {"scores": scores, "tokens": [[list(pair) for pair in row] for row in tokens], "layer": spec.layer,
            "pooling": pooling}  # fmt: skip


def token_texts(tokenizer, text: str) -> list[str]:
    """The pieces of `text` its tokens cover, in order, concatenating to the text (offsets of a
    fast tokenizer; else each token decoded on its own)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not getattr(tokenizer, "is_fast", False):
        return [tokenizer.decode([i]) for i in ids]
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    pieces, previous = [], 0
    for _, end in offsets:
        end = max(end, previous)
        pieces.append(text[previous:end])
        previous = end
    if pieces:
        pieces[-1] += text[previous:]
    return pieces


# -- requests (validation first, then the model under the manager's lock) ---------------------------
def check_examples(values, field: str, *, allow_empty: bool = False) -> list[str]:
    """A list of 2 to 256 non-empty texts of at most 1000 characters (or [] when `allow_empty`)."""
    if values is None or (allow_empty and isinstance(values, (list, tuple)) and not values):
        if allow_empty:
            return []
        raise InputError(field, "give at least 2 example texts")
    limit = limits.LIMITS["train_examples"]
    if not isinstance(values, (list, tuple)):
        raise InputError(field, f"must be a list of {limit.minimum:g} to {limit.maximum:g} texts")
    if not limit.minimum <= len(values) <= limit.maximum:
        raise InputError(field, f"give {limit.minimum:g} to {limit.maximum:g} examples; got {len(values)}")
    return [limits.check_text(v, f"{field}[{i}]", "example_chars") for i, v in enumerate(values)]


def check_read_texts(values, field: str = "texts") -> list[str]:
    limits.check_count("read_texts", values, field)
    return [limits.check_text(v, f"{field}[{i}]", "example_chars") for i, v in enumerate(values)]


def _check_choice(value, field: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InputError(field, f"must be one of {', '.join(choices)}; got {limits.shorten(value)}")
    return value


def _token_limit(loaded: LoadedModel) -> int:
    """Tokens one text may have: the model's positions, the fitted sweep limit (memory) and the
    tokens of one forward pass, whichever is least."""
    fitted = (loaded.fit or {}).get("sweep_max_tokens") or loaded.spec.max_positions
    return min(loaded.spec.max_positions, fitted, limits.BATCH_TOKENS)


def _token_check(named: Sequence[tuple[str, str]]) -> Callable[[LoadedModel], None]:
    def check(loaded: LoadedModel) -> None:
        limit = _token_limit(loaded)
        for field, text in named:
            count = len(loaded.tokenizer.encode(text, add_special_tokens=False)) + 1  # + the start token
            if count > limit:
                raise InputError(field, f"is {count} tokens, over the limit of {limit} on {loaded.model_id}")

    return check


def _run(what: str, fits: Callable[[LoadedModel], None], work: Callable[[Attempt], dict]) -> dict:
    """`fits` now on the loaded model (refused before waiting), then `work` under the model lock
    (fits again on the model that answers); the answer gains "model" and its own "fallback"."""
    current = get_manager().current
    if current is not None and current.tokenizer is not None:
        fits(current)

    def attempt(a: Attempt) -> dict:
        fits(a.loaded)
        result = {**work(a), "model": a.loaded.model_id, "fallback": a.event}
        lifecycle.check_running()  # work cut short by a shutdown is not an answer
        return result

    return get_manager().run(attempt, what=what)


def train_vector(
    positives: list[str] | None = None,
    negatives: list[str] | None = None,
    method: str = "mean_diff",
    layer: int | None = None,
    pooling: str = DEFAULT_POOLING,
    positive: str = "",
    negative: str = "",
    name: str = "",
    *,
    progress: Progress = None,
) -> dict:
    """Train a steering vector from examples (one batched pass over every layer, no generation).

    Args:
        positives: 2 to 256 example texts of the concept (each 1 to 1000 characters).
        negatives: 2 to 256 contrasting texts, or [] to contrast with built-in neutral sentences.
        method: "mean_diff" (difference of means), "pca" (first principal component of paired
            differences, sign toward the positives) or "probe" (logistic regression).
        layer: the layer to train at, 0 .. n_layers-1; None: the layer with the best held-out AUROC.
        pooling: how a text's tokens become one vector: "mean_skip_first" (mean over the text's
            tokens, the start token left out; the default), "mean" (start token included), "last".
        positive: instead of examples, a word ("happy"): with `negative` ("sad") it expands into
            64 paired persona examples, repeng-style.
        negative: the contrasting word of `positive`.
        name: the vector's name in tables and history (default: made from the examples).

    Returns:
        {"vector": a {"direction", "coeff", "layer", "positions", "name"} row that /steer and /read
        accept as it is, "layer", "method", "pooling", "auroc" (held out, at the layer), "layers":
        [{"layer", "auroc"}, ...], "n_pos", "n_neg", "negatives", "coeff", "split", "seconds":
        {"forward", "fit"}, "model", "fallback"}.
    """
    words = bool(positive or negative)
    if words and (positives or negatives):
        raise InputError("positive", "give example texts (positives, negatives) or two words, not both")
    if words:
        positives, negatives = pairs_from_words(positive, negative)
        name = name or " − ".join(w.strip() for w in (positive, negative) if w and w.strip())
    positives = check_examples(positives, "positives")
    negatives = check_examples(negatives, "negatives", allow_empty=True)
    method = _check_choice(method, "method", METHODS)
    pooling = _check_choice(pooling, "pooling", POOLINGS)
    if layer is not None:
        layer = limits.check_layer(layer, "layer", _known_layers())
    if name:
        name = limits.check_text(name, "name", "name_chars")
    named = [(f"positives[{i}]", t) for i, t in enumerate(positives)]
    named += [(f"negatives[{i}]", t) for i, t in enumerate(negatives)]

    def work(attempt: Attempt) -> dict:
        engine = eng.engine_for(attempt.loaded)
        if layer is not None:
            limits.check_layer(layer, "layer", attempt.validated_layers)
        at = None if layer is None else attempt.layer(layer)
        return train(engine, positives, negatives, method, at, pooling, name=name,
                     max_rows=1 if attempt.one_row else None, progress=progress)  # fmt: skip

    return _run("train", _token_check(named), work)


def read_texts(
    texts: list[str], vector: dict, pooling: str = DEFAULT_POOLING, capture_mode: str = eng.DEFAULT_CAPTURE_MODE
) -> dict:
    """Read texts with a vector: each token's projection onto its direction, and a score per text.

    Args:
        texts: 1 to 512 texts, each 1 to 1000 characters.
        vector: any vector row: {"text"}, {"positive", "negative"}, {"direction"} (a trained one
            as /train_vector returns it), with its "layer".
        pooling: how a text's token projections become its score: "mean_skip_first" (default),
            "mean" or "last" (give the pooling the vector was trained with).
        capture_mode: how a text or pair vector is captured (as in /steer).

    Returns:
        {"scores": [one number per text], "tokens": [[[token, projection], ...] per text], "layer",
        "pooling", "model", "fallback"}. Projections are dot products with the unit direction.
    """
    texts = check_read_texts(texts)
    pooling = _check_choice(pooling, "pooling", POOLINGS)
    capture_mode = _check_choice(capture_mode, "capture_mode", eng.CAPTURE_MODES)
    try:
        spec = eng.parse_vector(vector, 0, _known_layers())
    except InputError as exc:  # the request has one vector: name its field "vector.…"
        raise InputError(exc.field.replace("vectors[0]", "vector", 1), str(exc).split(": ", 1)[1]) from None
    named = [(f"texts[{i}]", t) for i, t in enumerate(texts)]
    named += [(f"vector.{k}", getattr(spec, k)) for k in ("text", "positive", "negative") if getattr(spec, k)]

    def work(attempt: Attempt) -> dict:
        hidden = attempt.loaded.spec.hidden_size
        if spec.direction and len(spec.direction) != hidden:
            raise InputError(
                "vector.direction", f"has {len(spec.direction)} numbers; {attempt.loaded.model_id} needs {hidden}"
            )
        limits.check_layer(spec.layer, "vector.layer", attempt.validated_layers)
        mapped = replace(spec, layer=attempt.layer(spec.layer))
        engine = eng.engine_for(attempt.loaded)
        return read(engine, texts, mapped, pooling, capture_mode=capture_mode, max_rows=1 if attempt.one_row else None)

    return _run("read", _token_check(named), work)


def _known_layers() -> int | None:
    loaded = get_manager().current  # a snapshot without the lock; checked again under it
    return loaded.n_layers if loaded is not None and loaded.model is not None else None


# -- uploads ---------------------------------------------------------------------------------------
UPLOAD_FORMATS = ("jsonl", "csv")
_POSITIVE_LABELS = {"1", "true", "positive", "pos", "yes"}
_NEGATIVE_LABELS = {"0", "false", "negative", "neg", "no"}


def parse_examples(content: str | bytes, filename: str = "", positive_label: str | None = None) -> dict:
    """Examples from an uploaded JSONL or CSV file, as {"positives", "negatives", "format"}.

    Rows are {"text", "label"} (two classes: 1/0, true/false, positive/negative, or any two labels
    with `positive_label` naming the positive one) or {"positive", "negative"} (either may be empty).
    The format comes from the file name (.jsonl/.json/.csv), else from the first character.
    Raises InputError naming "file" (or "positive_label") with what is wrong and where.
    """
    if isinstance(content, bytes):
        if len(content) > limits.MAX_UPLOAD_BYTES:
            raise InputError("file", f"is {len(content)} bytes; the limit is {limits.MAX_UPLOAD_BYTES}")
        try:
            content = content.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InputError("file", "is not UTF-8 text (give a JSONL or CSV file)") from None
    if not isinstance(content, str) or not content.strip():
        raise InputError("file", "is empty; give a JSONL or CSV file with text,label or positive,negative columns")
    if len(content) > limits.MAX_UPLOAD_BYTES:
        raise InputError("file", f"is {len(content)} characters; the limit is {limits.MAX_UPLOAD_BYTES}")
    kind = _upload_format(content, filename)
    records = _jsonl_records(content) if kind == "jsonl" else _csv_records(content)
    if not records:
        raise InputError("file", "holds no rows")
    columns = set(records[0][1])
    if {"text", "label"} <= columns:
        positives, negatives = _labelled(records, positive_label)
    elif {"positive", "negative"} & columns:
        positives, negatives = _paired(records)
    else:
        raise InputError("file", f"has columns {sorted(columns)[:6]}; give text,label or positive,negative columns")
    return {"positives": positives, "negatives": negatives, "format": kind}


def _upload_format(content: str, filename: str) -> str:
    suffix = filename.lower().rsplit(".", 1)[-1] if "." in filename else ""
    if suffix in ("jsonl", "json", "ndjson"):
        return "jsonl"
    if suffix in ("csv", "tsv"):
        return "csv"
    if suffix and suffix not in ("txt",):
        raise InputError("file", f"is a .{suffix[:10]} file; give a JSONL (.jsonl) or CSV (.csv) file")
    return "jsonl" if content.lstrip().startswith(("{", "[")) else "csv"


def _jsonl_records(content: str) -> list[tuple[int, dict]]:
    stripped = content.strip()
    if stripped.startswith("["):  # a JSON array of objects is accepted too
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InputError("file", f"is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        lines = list(enumerate(items, start=1))
    else:
        lines = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((number, json.loads(line)))
            except json.JSONDecodeError:
                raise InputError("file", f"line {number} is not a JSON object (JSONL: one object per line)") from None
    for number, item in lines:
        if not isinstance(item, dict):
            raise InputError("file", f"line {number} is not a JSON object (JSONL: one object per line)")
    return lines


def _csv_records(content: str) -> list[tuple[int, dict]]:
    try:
        dialect = csv.Sniffer().sniff(content[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    try:
        reader = csv.DictReader(io.StringIO(content), dialect=dialect)
        rows = [(number, row) for number, row in enumerate(reader, start=2)]
    except csv.Error as exc:
        raise InputError("file", f"is not a readable CSV file ({exc})") from None
    if reader.fieldnames is None:
        raise InputError("file", "has no header row; give text,label or positive,negative columns")
    return [(n, {str(k).strip().lower(): v for k, v in row.items() if k is not None}) for n, row in rows]


def _labelled(records: list[tuple[int, dict]], positive_label: str | None) -> tuple[list[str], list[str]]:
    rows = []
    for number, row in records:
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or label is None or (isinstance(label, str) and not label.strip()):
            raise InputError("file", f"line {number} needs a text and a label")
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        rows.append((text, str(label).strip().lower()))
    classes = sorted({label for _, label in rows})
    if len(classes) != 2:
        shown = ", ".join(repr(c) for c in classes[:5])
        raise InputError("file", f"labels must be two classes; found {len(classes)}: {shown}")
    if positive_label is not None:
        wanted = str(positive_label).strip().lower()
        if wanted not in classes:
            raise InputError("positive_label", f"is not one of the file's labels ({classes[0]!r}, {classes[1]!r})")
    elif set(classes) <= _POSITIVE_LABELS | _NEGATIVE_LABELS and len(set(classes) & _POSITIVE_LABELS) == 1:
        wanted = next(c for c in classes if c in _POSITIVE_LABELS)
    else:
        raise InputError(
            "positive_label", f"say which label is positive: the file has {classes[0]!r} and {classes[1]!r}"
        )
    return [t for t, c in rows if c == wanted], [t for t, c in rows if c != wanted]


def _paired(records: list[tuple[int, dict]]) -> tuple[list[str], list[str]]:
    positives, negatives = [], []
    for number, row in records:
        for key, side in (("positive", positives), ("negative", negatives)):
            value = row.get(key)
            if value is not None and not isinstance(value, str):
                raise InputError("file", f"line {number}: {key} must be a text")
            if value and value.strip():
                side.append(value)
    return positives, negatives
