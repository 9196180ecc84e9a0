"""Vectors from examples and reading (steering/training.py) on the real embedded SmolLM2 (CPU, fp32).

The parity test computes difference-of-means independently with plain transformers: one text at a
time (no padding), the start token as text, `output_hidden_states` of the full causal LM.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from steering import generate as G
from steering import training
from steering.engine import parse_vector
from steering.errors import InputError
from steering.loader import ModelManager, use_manager

OCEAN = [
    "The waves crashed against the rocks all night long.",
    "We sailed past the reef and saw a pod of dolphins.",
    "Salt spray covered the deck of the little fishing boat.",
    "The tide went out and left pools full of crabs.",
    "Deep below the surface, whales sing to each other.",
    "She walked along the shore collecting shells on the beach.",
    "The coral reef is home to thousands of species of fish.",
    "A storm rolled in from the open sea.",
]
OFFICE = [
    "Sort the files and save them to the server.",
    "She updated the spreadsheet before the meeting.",
    "The report needs a short summary and two charts.",
    "Restart the computer before you install the update.",
    "He answered emails while the printer hummed.",
    "The manager's plan calls for two more meetings this quarter.",
    "The clerk checked the invoice and added notes.",
    "Review the contract until it is clear.",
]
LAYER = 15  # the middle of the embedded model's 30 layers


def _cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def reference_states(smol):
    """Plain transformers, written apart from steering/training.py: each text on its own (no
    padding), the start token as text, the full causal LM's `output_hidden_states` at LAYER."""
    model, tokenizer = smol
    states = []
    for text in OCEAN + OFFICE:
        enc = tokenizer("<|endoftext|>" + text, return_tensors="pt")
        with torch.no_grad():
            states.append(model(**enc, output_hidden_states=True).hidden_states[LAYER][0])  # (T, H)
    return states


def _reference_diff(states, pooling) -> np.ndarray:
    pool = {"mean": lambda h: h.mean(0), "mean_skip_first": lambda h: h[1:].mean(0), "last": lambda h: h[-1]}[pooling]
    pooled = torch.stack([pool(h) for h in states]).double().numpy()
    return pooled[: len(OCEAN)].mean(0) - pooled[len(OCEAN) :].mean(0)


@pytest.mark.parametrize("pooling", training.POOLINGS)
def test_mean_diff_equals_a_plain_transformers_reference(smol_engine, reference_states, pooling):
    result = training.train(smol_engine, OCEAN, OFFICE, "mean_diff", LAYER, pooling)
    assert _cosine(result["vector"]["direction"], _reference_diff(reference_states, pooling)) >= 0.999
    assert result["layer"] == result["vector"]["layer"] == LAYER and result["pooling"] == pooling


def test_batches_pad_on_the_right_and_stay_within_the_budget(smol):
    model, tokenizer = smol
    texts = OCEAN + ["Hi."]
    together = training.pooled_states(model, tokenizer, texts, training.POOLINGS)
    apart = training.pooled_states(model, tokenizer, texts, training.POOLINGS, max_rows=1)
    for name in training.POOLINGS:
        assert torch.allclose(together[name], apart[name], rtol=1e-4, atol=1e-3), name
    groups = training.batches([3, 10, 4, 9, 2], budget_tokens=20)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    assert all(len(g) * max([3, 10, 4, 9, 2][i] for i in g) <= 20 for g in groups)


@pytest.mark.parametrize("flip", [False, True])
def test_pca_points_toward_the_positives(flip):
    rng = np.random.default_rng(0)
    axis = rng.normal(size=16)
    neg = rng.normal(size=(12, 16))
    pos = neg + np.outer(rng.uniform(1, 4, size=12), axis) * (-1 if flip else 1)  # varies along +-axis
    direction = training.fit_direction("pca", pos, neg)
    assert _cosine(direction, axis) * (-1 if flip else 1) > 0.9  # PCA's own sign is arbitrary


def test_pca_and_probe_on_the_model_point_toward_the_positives(smol_engine):
    for method in ("pca", "probe"):
        result = training.train(smol_engine, OCEAN, OFFICE, method, LAYER)
        spec = parse_vector(result["vector"], 0, 30)
        scores = training.read(smol_engine, OCEAN + OFFICE, spec)["scores"]
        assert np.mean(scores[:8]) > np.mean(scores[8:]), method


def test_probe_separates_a_trivially_separable_set(smol_engine):
    positives = [f"Bananas, bananas and more bananas number {i}." for i in range(8)]
    negatives = [f"The committee meets on day {i} of the month." for i in range(8)]
    result = training.train(smol_engine, positives, negatives, "probe")
    assert result["auroc"] == 1.0 and result["split"]["held_out"]
    assert result["split"]["test"] == {"positives": 2, "negatives": 2}


def test_layer_none_picks_the_best_held_out_layer(smol_engine):
    result = training.train(smol_engine, OCEAN, OFFICE, "mean_diff", None)
    aurocs = {row["layer"]: row["auroc"] for row in result["layers"]}
    assert sorted(aurocs) == list(range(30))
    assert result["auroc"] == aurocs[result["layer"]] >= max(aurocs.values()) - training.AUROC_TIE
    fixed = training.train(smol_engine, OCEAN, OFFICE, "mean_diff", 3)
    assert fixed["layer"] == 3 and fixed["auroc"] == aurocs[3]  # the same split, the same fits


def test_choose_layer_breaks_ties_toward_the_middle():
    rows = [{"layer": i, "auroc": a} for i, a in enumerate([1.0, 0.9, 0.995, 1.0, 0.5, 0.7])]
    assert training.choose_layer(rows, 6) == 3
    assert training.choose_layer([{"layer": 0, "auroc": 1.0}, {"layer": 1, "auroc": 0.9}], 6) == 0


def test_split_is_deterministic_and_reported():
    assert training.split_indices(8) == ([0, 1, 2, 4, 5, 6], [3, 7])
    assert training.split_indices(3) == ([0, 1], [2])
    assert training.split_indices(2) == ([0, 1], [])


def test_a_trained_vector_steers_through_the_engine(smol_engine):
    result = training.train(smol_engine, OCEAN, [], "mean_diff", LAYER)  # neutral negatives
    assert (
        result["n_neg"] == len(training.NEUTRAL_TEXTS)
        and result["coeff"] == result["vector"]["coeff"] == training.TRAINED_COEFF
    )
    spec = parse_vector(result["vector"], 0, 30)  # the row as the engine takes it
    assert spec.name == result["vector"]["name"] and spec.label.startswith("mean_diff")
    rms = np.sqrt(np.mean(np.square(result["vector"]["direction"])))
    assert rms == pytest.approx(smol_engine.layer_rms(LAYER), rel=1e-3)  # coeff in RMS units
    sampling = G.Sampling(max_new_tokens=12)
    baseline = G.run_rows(smol_engine, "Tell me about your weekend.", [[]], sampling).token_ids[0]
    rows = [[(spec, 0.0)], [(spec, 2.0)]]
    zero, steered = G.run_rows(smol_engine, "Tell me about your weekend.", rows, sampling).token_ids
    assert zero == baseline and steered != baseline
    assert smol_engine.is_clean()


def test_read_scores_positives_higher_and_tokens_cover_the_text(smol_engine):
    result = training.train(smol_engine, OCEAN[:6], OFFICE[:6], "mean_diff", LAYER)
    spec = parse_vector(result["vector"], 0, 30)
    texts = OCEAN[6:] + OFFICE[6:]  # not trained on
    out = training.read(smol_engine, texts, spec)
    assert min(out["scores"][:2]) > max(out["scores"][2:])
    assert all("".join(tok for tok, _ in row) == text for row, text in zip(out["tokens"], texts))
    apart = training.read(smol_engine, texts, spec, max_rows=1)
    assert np.allclose(out["scores"], apart["scores"], atol=1e-2)
    for row, score in zip(out["tokens"], out["scores"]):  # mean_skip_first == the mean of the tokens
        assert np.mean([v for _, v in row]) == pytest.approx(score, abs=1e-2)


def test_read_takes_256_texts_and_a_text_vector(smol_engine):
    texts = [f"Line {i}: the sea is calm today." for i in range(256)]
    out = training.read(smol_engine, texts, parse_vector({"text": "the ocean", "layer": LAYER}, 0, 30), "last")
    assert len(out["scores"]) == 256 and out["pooling"] == "last"


def test_pairs_from_two_words():
    positives, negatives = training.pairs_from_words("happy", "sad")
    assert len(positives) == len(negatives) == len(training.PERSONA_TEMPLATES) * len(training.CONTINUATIONS)
    assert all(p.replace("happy", "sad") == n for p, n in zip(positives, negatives))


# -- requests through the manager ------------------------------------------------------------------
@pytest.fixture(scope="module")
def manager(embedded_dir):
    with use_manager(ModelManager()) as manager:
        manager.load_default()
        yield manager


def test_train_vector_and_read_texts_answer_through_the_manager(manager):
    result = training.train_vector(positive="happy", negative="sad", layer=LAYER)
    assert result["model"] == manager.current.model_id and result["fallback"] is None
    assert result["n_pos"] == result["n_neg"] == 64 and result["negatives"] == "given"
    read = training.read_texts(["I am so glad!", "I am so miserable."], result["vector"])
    assert read["scores"][0] > read["scores"][1] and read["layer"] == LAYER


TOO_MANY = ["x"] * 257


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        (dict(positives=["one"], negatives=OFFICE), "positives", "2 to 256"),
        (dict(positives=OCEAN, negatives=["one"]), "negatives", "2 to 256"),
        (dict(positives=None), "positives", "at least 2"),
        (dict(positives=TOO_MANY), "positives", "got 257"),
        (dict(positives=OCEAN[:2] + [""]), r"positives\[2\]", "non-empty"),
        (dict(positives=OCEAN[:2] + ["x" * 1001]), r"positives\[2\]", "1001 characters"),
        (dict(positives="the sea", negatives=OFFICE), "positives", "list"),
        (dict(positives=OCEAN, method="lda"), "method", "mean_diff"),
        (dict(positives=OCEAN, pooling="max"), "pooling", "mean_skip_first"),
        (dict(positives=OCEAN, layer=30), "layer", "0 to 29"),
        (dict(positives=OCEAN, layer=-1), "layer", "0 to 29|non-negative"),
        (dict(positives=OCEAN, positive="happy", negative="sad"), "positive", "not both"),
        (dict(positive="happy", negative="Happy"), "negative", "differ"),
        (dict(positive="happy"), "negative", "non-empty"),
    ],
)
def test_train_vector_refuses_bad_input_naming_the_field(manager, kwargs, field, words):
    with pytest.raises(InputError, match=rf"^{field}: .*({words})"):
        training.train_vector(**kwargs)


@pytest.mark.parametrize(
    ("texts", "vector", "field", "words"),
    [
        ([], {"text": "sea", "layer": LAYER}, "texts", "1 to 512"),
        (["a"] * 513, {"text": "sea", "layer": LAYER}, "texts", "1 to 512"),
        (["ok", "  "], {"text": "sea", "layer": LAYER}, r"texts\[1\]", "non-empty"),
        (["ok"], {"direction": [0.1] * 7, "layer": LAYER}, r"vector\.direction", "has 7 numbers.*576"),
        (["ok"], {"text": "sea", "layer": 30}, r"vector\.layer", "0 to 29"),
        (["ok"], {"text": "sea", "layer": 3, "colour": 1}, r"vector\.colour", "not a vector field"),
    ],
)
def test_read_texts_refuses_bad_input_naming_the_field(manager, texts, vector, field, words):
    with pytest.raises(InputError, match=rf"^{field}: .*{words}"):
        training.read_texts(texts, vector)


# -- uploads ---------------------------------------------------------------------------------------
def test_parse_examples_reads_jsonl_and_csv():
    jsonl = '{"text": "sea", "label": 1}\n\n{"text": "desk", "label": 0}\n{"text": "wave", "label": 1}\n'
    assert training.parse_examples(jsonl, "set.jsonl") == {
        "positives": ["sea", "wave"], "negatives": ["desk"], "format": "jsonl",
    }  # fmt: skip
    pairs = "positive,negative\nsea,desk\nwave,\n"
    assert training.parse_examples(pairs.encode(), "pairs.csv")["negatives"] == ["desk"]
    named = "text,label\nsea,ocean\ndesk,office\n"
    assert training.parse_examples(named, "x.csv", positive_label="ocean")["positives"] == ["sea"]


@pytest.mark.parametrize(
    ("content", "filename", "field", "words"),
    [
        ("", "a.csv", "file", "empty"),
        ("%PDF-1.4 binary", "a.pdf", "file", "JSONL"),
        (b"\xff\xfe\x00bad", "a.csv", "file", "UTF-8"),
        ('{"text": "sea", "label": 1}\nnot json\n', "a.jsonl", "file", "line 2"),
        ("name,colour\nsea,blue\n", "a.csv", "file", "text,label or positive,negative"),
        ("text,label\na,1\nb,2\nc,3\n", "a.csv", "file", "two classes; found 3"),
        ("text,label\na,1\nb,1\n", "a.csv", "file", "two classes; found 1"),
        ("text,label\na,ocean\nb,office\n", "a.csv", "positive_label", "which label is positive"),
    ],
)
def test_parse_examples_refuses_bad_files_naming_the_field(content, filename, field, words):
    with pytest.raises(InputError, match=rf"^{field}: .*{words}"):
        training.parse_examples(content, filename)
