"""Issue 9's scores and autotune, on the embedded SmolLM2 (fp32, CPU)."""

from __future__ import annotations

import threading

import pytest
import torch

from steering import generate as G
from steering import limits
from steering import quality as Q

PROMPT = "What should I do this weekend?"
SENTENCE = "Go to the beach, swim in the sea and watch the waves roll in while the sun sets over the water."
LOOP = "dogs(dogs(dogs(dogs(dogs(dogs(dogs(dogs(dogs(dogs(dogs(dogs("


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_repetition_sees_loops_and_not_sentences(smol):
    _, tokenizer = smol
    assert Q.repetition(_ids(tokenizer, LOOP)) > 0.6
    assert Q.repetition(_ids(tokenizer, "ocean-ice-" * 10)) > 0.6
    assert Q.repetition(_ids(tokenizer, SENTENCE)) < 0.1
    assert Q.repetition([]) == 0.0 and Q.repetition([5, 5]) == 0.0


def test_is_fluent_rejects_loops_that_perplexity_calls_fluent(smol_engine):
    tokenizer = smol_engine.tokenizer
    context = G.prompt_ids(tokenizer, PROMPT)
    loop, sentence = _ids(tokenizer, LOOP), _ids(tokenizer, SENTENCE)
    ppl_loop, ppl_sentence = G.context_perplexities(smol_engine, context, [loop, sentence])
    assert ppl_loop < Q.MAX_PERPLEXITY  # perplexity alone would pass the loop ...
    assert not Q.is_fluent(ppl_loop, Q.repetition(loop), len(loop))  # ... the rule does not
    assert Q.is_fluent(ppl_sentence, Q.repetition(sentence), len(sentence))
    assert not Q.is_fluent(None, 0.0, 0)
    assert not Q.is_fluent(ppl_sentence, 0.0, 3)  # a fragment
    assert Q.is_fluent(ppl_sentence, 0.0, 3, max_new_tokens=3)  # ... unless that was the budget


def test_lean_scores_equal_full_logits_and_only_scored_positions_reach_the_head(smol_engine):
    model, tokenizer = smol_engine.model, smol_engine.tokenizer
    context = G.prompt_ids(tokenizer, PROMPT)
    gens = [_ids(tokenizer, SENTENCE), _ids(tokenizer, "Read a book."), _ids(tokenizer, LOOP)]
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        lean, ppl = Q.text_logprob_after(smol_engine, context, gens, "the ocean")
    finally:
        hook.remove()
    bridge, target = _ids(tokenizer, Q.CONNECTOR), _ids(tokenizer, " the ocean")
    scored = sum(len(g) + len(bridge) + len(target) for g in gens)  # output + connector + text, not the prompt
    assert seen == [(scored, model.config.hidden_size)]  # one (positions, H) slice: no (rows, T, vocab)
    assert ppl == pytest.approx(
        G.context_perplexities(smol_engine, G.prompt_ids(smol_engine.tokenizer, PROMPT), gens), rel=1e-4
    )
    for g, value in zip(gens, lean):  # naive: full logits of one unpadded row
        ids = torch.tensor([context + g + bridge + target])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits.float()[0], dim=-1)
        start = ids.shape[1] - len(target)
        naive = torch.stack([logp[p - 1, ids[0, p]] for p in range(start, ids.shape[1])]).mean()
        assert value == pytest.approx(float(naive), abs=1e-4)
    assert G.context_perplexities(smol_engine, context, gens) == pytest.approx(
        G.context_perplexities(smol_engine, G.prompt_ids(smol_engine.tokenizer, PROMPT), gens), rel=1e-4
    )


def test_relevance_prefers_the_output_about_the_text(smol_engine):
    tokenizer = smol_engine.tokenizer
    context = G.prompt_ids(tokenizer, PROMPT)
    sea, home = (
        _ids(tokenizer, SENTENCE),
        _ids(tokenizer, "Stay at home, read a good novel and cook a nice dinner for your family."),
    )
    toward, away = Q.relevance_logprob(smol_engine, context, [sea, home], home, text="the ocean")
    assert toward > 0.5 and away == pytest.approx(0.0, abs=1e-4)  # same text: padding noise only
    pair = Q.relevance_logprob(smol_engine, context, [sea], home, positive="the ocean", negative="a quiet home")
    assert pair[0] > 0.5


def test_autotune_shape_and_choice(smol_engine):
    progress = []
    result = Q.autotune(
        smol_engine,
        PROMPT,
        text="the ocean",
        layers=[15],
        coeffs=[0.2, 0.4],
        max_new_tokens=10,
        samples=0,  # the greedy rule on the prompt alone (probes and samples: the next tests)
        probes=(),
        progress=lambda f, m: progress.append(f),
    )
    assert set(result) == {"layer", "coeff", "decay", "positions", "score", "rows", "reason", "versus_prompted"}
    assert result["versus_prompted"] is None  # the core's default: no prompted comparison
    assert result["positions"] == "prompt"  # the default: candidates steer the prompt only
    default = Q.DECAYS[0]  # the default search's decay
    assert [(r["layer"], r["coeff"], r["decay"]) for r in result["rows"]] == [(15, 0.2, default), (15, 0.4, default)]
    for row in result["rows"]:
        assert set(row) == {
            "layer", "coeff", "decay", "text", "relevance", "perplexity", "repetition", "fluent", "score"
        }  # fmt: skip
        assert row["score"] == (row["relevance"] if row["fluent"] else None)
    chosen = next(r for r in result["rows"] if (r["layer"], r["coeff"]) == (result["layer"], result["coeff"]))
    if any(r["fluent"] and r["relevance"] > 0 for r in result["rows"]):
        assert chosen["fluent"] and result["score"] == max(r["score"] for r in result["rows"] if r["score"] is not None)
    assert progress[-1] == 1.0 and result["reason"]
    assert smol_engine.is_clean()


def test_autotune_counts_good_outputs_over_the_probes_and_ties_go_to_the_default(smol_engine):
    """The default search: every candidate on the user's prompt and on the four probe prompts; the
    setting fluent and relevant on the most of those five outputs wins, ties going to the
    coefficient nearest the default. Recomputed here from per-prompt runs of the greedy rule."""
    texts = {"text": "the desert"}
    result = Q.autotune(smol_engine, PROMPT, max_new_tokens=12, **texts)
    assert result["positions"] == "prompt" and len(result["rows"]) == len(Q.COEFFS)  # the prompt's own rows
    assert "of 5 outputs (your prompt's and 4 neutral probes)" in result["reason"]
    prompts = (PROMPT, *Q.PROBE_PROMPTS)
    alone = [Q.autotune(smol_engine, p, max_new_tokens=12, probes=(), **texts)["rows"] for p in prompts]
    assert [r["text"] for r in alone[0]] == [r["text"] for r in result["rows"]]
    good = {
        c: sum(r["fluent"] and r["relevance"] > 0 for rows in alone for r in rows if r["coeff"] == c) for c in Q.COEFFS
    }
    most = max(good.values())
    assert most > 0, good  # "the desert" steers the embedded model on some output at these settings
    winners = [c for c in Q.COEFFS if good[c] == most]
    expected = min(winners, key=lambda c: (abs(c - limits.DEFAULT_COEFF), c))
    assert result["coeff"] == expected, (good, result["reason"])
    assert smol_engine.is_clean()


def test_autotune_searches_decays_and_samples(smol_engine):
    from dataclasses import replace

    from llm_steer import DecaySchedule

    runs = []
    result = Q.autotune(
        smol_engine,
        PROMPT,
        text="the ocean",
        layers=[15],
        coeffs=[0.6],
        decays=[1.0, 0.5],
        max_new_tokens=8,
        samples=1,
        probes=(),
        progress=lambda f, m: runs.append(m),
        positions="all",  # a decay multiplies the coefficient per generated token
    )
    rows = {r["decay"]: r for r in result["rows"]}
    assert sorted(rows) == [0.5, 1.0] and result["decay"] in rows
    assert "1 sampled output each" in result["reason"] and "decays [0.5, 1.0]" in result["reason"]
    spec = Q.VectorSpec(layer=15, coeff=1.0, text="the ocean", positions="all")
    decayed = G.run_rows(
        smol_engine, PROMPT, [[(replace(spec, decay=DecaySchedule(rate=0.5)), 0.6)]], G.Sampling(max_new_tokens=8)
    )
    assert rows[0.5]["text"] == decayed.texts[0]  # the candidate ran with that schedule ...
    assert rows[0.5]["text"] != rows[1.0]["text"]  # ... which changes the output
    assert sum("batch 1 of 1" in m for m in runs) == 2  # the greedy run and one sampled run
    assert smol_engine.is_clean()


def test_autotune_stops_between_batches(smol_engine):
    stop = threading.Event()
    # baseline + 2 layers x 4 coefficients = 9 rows: a batch of 8, then one of 1, which never runs.
    result = Q.autotune(
        smol_engine,
        PROMPT,
        text="the ocean",
        layers=[12, 15],
        coeffs=[0.2, 0.3, 0.4, 0.5],
        max_new_tokens=4,
        stop=stop,
        progress=lambda f, m: stop.set(),
    )
    assert len(result["rows"]) == 7 and result["reason"].startswith("stopped")
    stop.clear()
    stop.set()
    nothing = Q.autotune(smol_engine, PROMPT, text="the ocean", layers=[15], max_new_tokens=4, stop=stop)
    assert nothing["rows"] == [] and nothing["layer"] is None
    assert smol_engine.is_clean()


def test_autotune_rejects_bad_requests(smol_engine):
    from steering.errors import InputError

    with pytest.raises(InputError):
        Q.autotune(smol_engine, PROMPT)  # no text
    with pytest.raises(InputError):
        Q.autotune(smol_engine, PROMPT, text="x", layers=[99])
    with pytest.raises(InputError):
        Q.autotune(smol_engine, PROMPT, text="x", coeffs=[0.0, 0.5])
    for bad in ([0.0], [1.5]):
        with pytest.raises(InputError, match=r"decays\[0\]"):
            Q.autotune(smol_engine, PROMPT, text="x", decays=bad)
    with pytest.raises(InputError, match='^decays: .*positions "all"'):  # the default positions "prompt"
        Q.autotune(smol_engine, PROMPT, text="x", decays=[0.5])
    with pytest.raises(InputError, match="^positions: "):
        Q.autotune(smol_engine, PROMPT, text="x", positions="reply")
    for bad in (-1, 9, 1.5, True):
        with pytest.raises(InputError, match="samples"):
            Q.autotune(smol_engine, PROMPT, text="x", samples=bad)
