"""The prompted row (issue 23): the prompt plus an instruction to bring in the steering text,
unsteered, as a third row of the steer batch; and one score per row (concept, instruction,
fluency, aggregate). Real embedded SmolLM2 in fp32 on the CPU."""

from __future__ import annotations

import threading

import pytest

from steering import api
from steering import generate as G
from steering import quality as Q
from steering.engine import VectorSpec
from steering.errors import InputError

PROMPT = "What should I do this weekend?"
TOKENS = 16
OCEAN = VectorSpec(layer=15, coeff=1.0, text="the ocean")


def _rows(engine, sampling, *, prompted: bool, one_row: bool = False, vectors=(OCEAN,)):
    rows = G.compare_rows(list(vectors), True, prompted)
    instruction = G.prompt_instruction(list(vectors)) if prompted else None
    row_ids = G.compare_row_ids(engine.tokenizer, PROMPT, instruction, len(rows))
    return G.run_rows(engine, PROMPT, rows, sampling, row_ids=row_ids, one_row=one_row)


@pytest.mark.parametrize(
    "sampling",
    [G.Sampling(max_new_tokens=TOKENS), G.Sampling(max_new_tokens=TOKENS, temperature=0.9, top_p=0.95, seed=11)],
    ids=["greedy", "sampled"],
)
def test_the_prompted_row_changes_neither_steered_nor_baseline(smol_engine, sampling):
    two = _rows(smol_engine, sampling, prompted=False)
    three = _rows(smol_engine, sampling, prompted=True)
    assert len(three.token_ids) == 3
    assert three.token_ids[0] == two.token_ids[0]  # steered, token for token
    assert three.token_ids[1] == two.token_ids[1]  # baseline, token for token
    assert three.token_ids[2] != three.token_ids[1]  # the instruction changed the prompted row
    # the prompted row is the unsteered model on the longer prompt, as a run of its own gives it
    alone = G.run_rows(smol_engine, G.prompted_prompt(PROMPT, G.prompt_instruction([OCEAN])), [[]], sampling)
    assert three.token_ids[2] == alone.token_ids[0]


def test_one_row_retry_gives_the_three_rows_of_the_batch(smol_engine):
    sampling = G.Sampling(max_new_tokens=TOKENS)
    batch = _rows(smol_engine, sampling, prompted=True)
    apart = _rows(smol_engine, sampling, prompted=True, one_row=True)
    assert apart.token_ids == batch.token_ids
    assert apart.texts == batch.texts
    assert smol_engine.is_clean()


def test_stop_ends_three_rows_within_a_step(smol_engine):
    stop = threading.Event()
    rows = G.compare_rows([OCEAN], True, True)
    row_ids = G.compare_row_ids(smol_engine.tokenizer, PROMPT, G.prompt_instruction([OCEAN]), 3)
    seen = []
    for update in G.generate_rows(
        smol_engine, PROMPT, rows, G.Sampling(max_new_tokens=200), stop=stop, row_ids=row_ids
    ):
        seen.append([len(ids) for ids in update.token_ids])
        if max(seen[-1]) >= 3:
            stop.set()
    assert update.done and len(update.texts) == 3
    assert max(seen[-1]) <= 4  # ended within one decoding step of the stop
    assert smol_engine.is_clean()


@pytest.mark.parametrize(
    "vectors, expected",
    [
        ([OCEAN], "In your answer, talk about the ocean."),
        ([VectorSpec(layer=3, coeff=-2.0, text="cats")], "In your answer, do not talk about cats."),
        (
            [VectorSpec(layer=3, coeff=1.0, positive="coffee", negative="tea")],
            "In your answer, talk about coffee and do not talk about tea.",
        ),
        (
            [VectorSpec(layer=3, coeff=-1.0, positive="coffee", negative="tea")],
            "In your answer, talk about tea and do not talk about coffee.",
        ),
        (
            [OCEAN, VectorSpec(layer=3, coeff=0.5, text="music"), VectorSpec(layer=3, coeff=1.0, direction=(1.0,))],
            "In your answer, talk about the ocean and music.",
        ),
    ],
    ids=["text", "negative", "pair", "pair-negative", "mixed-with-direction"],
)
def test_instruction_says_what_the_steering_does(vectors, expected):
    assert G.prompt_instruction(vectors) == expected


def test_nothing_to_prompt_with_is_refused_on_prompted():
    for vectors in (
        [VectorSpec(layer=3, coeff=1.0, direction=(1.0, 2.0))],
        [VectorSpec(layer=3, coeff=0.0, text="cats")],
        [VectorSpec(layer=3, coeff=1.0, text="cats", enabled=False)],
        [],
    ):
        with pytest.raises(InputError) as caught:
            G.prompt_instruction(vectors)
        assert caught.value.field == "prompted"


def test_aggregate_is_the_benchmarks_harmonic_mean():
    assert Q.aggregate([2, 2, 2]) == 2.0
    assert Q.aggregate([2, 1, 2]) == pytest.approx(1.5)
    assert Q.aggregate([1, 1, 2]) == pytest.approx(1.2)
    assert Q.aggregate([2, 0, 2]) == 0.0
    assert Q.aggregate([2, None, 2]) is None
    assert Q.fluency_bin(5.0, 0.0, 40) == 2
    assert Q.fluency_bin(45.0, 0.0, 40) == 1  # over 30, within twice it
    assert Q.fluency_bin(5.0, 0.6, 40) == 0  # a loop
    assert Q.fluency_bin(None, 0.0, 0) == 0  # empty
    assert (
        Q.best_row({"steered": {"aggregate": 1.2}, "baseline": {"aggregate": 0.0}, "prompted": {"aggregate": 2.0}})[0]
        == "prompted"
    )
    assert Q.best_row({"steered": {"aggregate": 0.0}, "baseline": {"aggregate": 0.0}})[0] is None


def test_steer_prompted_returns_three_scored_rows(fresh_manager):
    vectors = [{"text": "the ocean", "coeff": 1.0, "layer": 15}]
    two = api.steer(PROMPT, vectors, max_new_tokens=TOKENS)
    three = api.steer(PROMPT, vectors, max_new_tokens=TOKENS, prompted=True)
    assert (three["steered"], three["baseline"]) == (two["steered"], two["baseline"])
    assert two["prompted"] is None and two["instruction"] is None and set(two["scores"]) == {"steered", "baseline"}
    assert three["instruction"] == "In your answer, talk about the ocean."
    assert three["prompted"] and three["prompted"] != three["baseline"]
    assert len(three["tokens"]) == 3
    scores = three["scores"]
    assert set(scores) == {"steered", "baseline", "prompted"}
    assert scores["steered"] == two["scores"]["steered"]  # scores do not depend on the third row
    assert scores["baseline"]["concept"] == 0.0 and scores["baseline"]["aggregate"] == 0.0
    assert "ocean" in three["prompted"].lower() or "sea" in three["prompted"].lower()
    assert scores["prompted"]["concept"] > Q.CONCEPT_BINS[0]  # it talks about the ocean: the proxy sees it
    for row in scores.values():
        assert set(row) == {"concept", "instruction", "perplexity", "repetition", "fluent", "bins", "aggregate"}
        assert set(row["bins"].values()) <= {0, 1, 2}
        assert row["aggregate"] == Q.aggregate(list(row["bins"].values()))
    without = api.steer(PROMPT, vectors, max_new_tokens=TOKENS, compare=False)
    assert without["scores"] is None and without["baseline"] is None and without["prompted"] is None


def test_instruction_proxy_prefers_an_answer_to_a_degenerate_output(fresh_manager):
    strong = api.steer(
        PROMPT, [{"text": "the ocean", "coeff": 8.0, "layer": 15, "positions": "all"}], max_new_tokens=24
    )
    scores = strong["scores"]
    assert scores["baseline"]["instruction"] > scores["steered"]["instruction"]
    assert scores["steered"]["aggregate"] == 0.0  # a loop or word salad: fluency 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(vectors=[{"direction": [0.1] * 576, "coeff": 1.0, "layer": 15}], prompted=True), "prompted"),
        (dict(vectors=[{"text": "cats", "coeff": 1.0, "layer": 15}], prompted="yes"), "prompted"),
        (dict(vectors=[{"text": "cats", "coeff": 1.0, "layer": 15}], prompted=True, compare=False), "prompted"),
    ],
    ids=["direction-only", "not-a-bool", "without-compare"],
)
def test_bad_prompted_requests_name_the_field(fresh_manager, kwargs, field):
    with pytest.raises(InputError) as caught:
        api.steer(PROMPT, max_new_tokens=4, **kwargs)
    assert caught.value.field == field
    assert fresh_manager.current is None  # refused before the model was loaded: nothing changed


def test_sweep_prompted_adds_a_scored_reference_row_and_changes_no_row(fresh_manager):
    plain = api.sweep(PROMPT, "the ocean", 15, [0.0, 1.0], 12)
    with_ref = api.sweep(PROMPT, "the ocean", 15, [0.0, 1.0], 12, prompted=True)
    assert plain["prompted"] is None
    assert [r["text"] for r in with_ref["rows"]] == [r["text"] for r in plain["rows"]]
    assert with_ref["rows"] == plain["rows"] and with_ref["recommended"] == plain["recommended"]
    reference = with_ref["prompted"]
    assert reference["instruction"] == "In your answer, talk about the ocean."
    assert reference["text"] and reference["text"] != plain["rows"][0]["text"]
    assert set(reference) == {"text", "instruction", "relevance", "perplexity", "repetition", "fluent"}
    assert reference["relevance"] > 0  # asked to talk about the ocean, it moved toward it
    with pytest.raises(InputError) as caught:
        api.sweep(PROMPT, "the ocean", 15, [0.0, 1.0], 12, prompted=1)
    assert caught.value.field == "prompted"


def test_chat_prompted_continues_a_third_conversation(fresh_manager):
    from steering import chat

    vectors = [{"text": "the ocean", "coeff": 1.0, "layer": 15}]
    plain = chat.chat(PROMPT, [], [], vectors, 12)
    first = chat.chat(PROMPT, [], [], vectors, 12, prompted=True)
    assert plain["prompted"] is None and plain["history_prompted"] is None
    assert (first["steered"], first["baseline"]) == (plain["steered"], plain["baseline"])
    assert first["instruction"] == "In your answer, talk about the ocean."
    assert first["history_prompted"][0] == {"role": "user", "content": PROMPT}  # kept without the instruction
    assert first["history_prompted"][1]["content"] == first["prompted"] != first["baseline"]
    # the prompted row reads the message with the instruction, as /steer's prompted row does
    steered = api.steer(PROMPT, vectors, max_new_tokens=12, prompted=True)
    assert first["prompted"] == steered["prompted"]
    second = chat.chat(
        "And after that?", first["history_steered"], first["history_baseline"], vectors, 8,
        prompted=True, history_prompted=first["history_prompted"],
    )  # fmt: skip
    assert len(second["history_prompted"]) == 4 and second["prompted"]
    wrong = [{"role": "user", "content": "something else"}, first["history_prompted"][1]]
    with pytest.raises(InputError) as caught:
        chat.chat("And?", first["history_steered"], first["history_baseline"], vectors, 8, prompted=True,
                  history_prompted=wrong)  # fmt: skip
    assert caught.value.field == "history_prompted[0].content"
