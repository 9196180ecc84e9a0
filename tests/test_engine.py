"""The steering engine and batched generation on the real embedded SmolLM2 (CPU, fp32, greedy)."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from llm_steer import DecaySchedule, Steer

from steering import generate as G
from steering import limits
from steering.engine import CAPTURE_MODES, DEFAULT_CAPTURE_MODE, VectorSpec, parse_vector
from steering.errors import InputError

PROMPT = "Tell me about your weekend."
TOKENS = 12
GREEDY = G.Sampling(max_new_tokens=TOKENS)
FOUR = ["logical", "Taylor Swift", "worm", "the Golden Gate Bridge"]


def _ids(engine, rows, sampling=GREEDY, **kwargs):
    return G.run_rows(engine, PROMPT, rows, sampling, **kwargs).token_ids


@pytest.fixture(scope="module")
def baseline(smol_engine):
    return _ids(smol_engine, [[]])[0]


def _vec(text="dogs", coeff=1.0, layer=15, positions="all", **kw):
    """A text vector; positions "all" (llm-steer's rule) unless a test is about "prompt"."""
    return VectorSpec(layer=layer, coeff=coeff, text=text, positions=positions, **kw)


def test_zero_coefficient_is_unsteered_and_removal_restores(smol_engine, baseline):
    assert len(baseline) == TOKENS
    zero = _ids(smol_engine, [[(_vec(), 0.0)]])[0]
    assert zero == baseline
    strong = _ids(smol_engine, [[(_vec(), 2.0)]])[0]
    assert strong != baseline
    assert smol_engine.is_clean()  # nothing left installed after the request
    assert _ids(smol_engine, [[]])[0] == baseline  # removing the vector restores the output exactly


def test_compare_rows_equal_separate_runs(smol_engine, baseline):
    vec = _vec(coeff=0.75)
    steered_alone = _ids(smol_engine, [[(vec, 0.75)]])[0]
    both = _ids(smol_engine, G.compare_rows([vec], compare=True))
    assert both[0] == steered_alone
    assert both[1] == baseline
    assert both[0] != both[1]


def test_sweep_rows_equal_separate_runs(smol_engine):
    coeffs = [0.0, 0.5, 1.5]
    batch = _ids(smol_engine, G.sweep_rows("the ocean", 15, coeffs))
    separate = [_ids(smol_engine, G.sweep_rows("the ocean", 15, [c]))[0] for c in coeffs]
    assert batch == separate
    assert len({tuple(r) for r in batch}) > 1  # the coefficients really differ in effect


def test_mixed_vectors_batched_equal_separate_runs(smol_engine, baseline):
    """The grouping code: a pair, a vector at another layer and a decayed vector, with different
    coefficients per row (and a row sharing none of them), batched == each row alone."""
    pair = VectorSpec(layer=12, coeff=1.0, positive="happy and joyful", negative="sad and miserable")
    other = _vec("the ocean", layer=20)
    decayed = _vec("dogs", layer=15, decay=DecaySchedule(rate=0.8))
    rows = [
        [(pair, 0.8), (other, 0.5), (decayed, 1.0)],
        [],
        [(pair, -0.5), (decayed, 0.7)],
        [(other, 1.2)],
    ]
    batch = _ids(smol_engine, rows)
    separate = [_ids(smol_engine, [row])[0] for row in rows]
    assert batch == separate
    assert batch[1] == baseline
    assert len({tuple(r) for r in batch}) == 4  # every row's steering shows


def test_sampling_reproducible_per_row(smol_engine):
    sampled = G.Sampling(max_new_tokens=TOKENS, temperature=0.9, top_p=0.95, seed=7)
    vec = _vec(coeff=0.5)
    pair = _ids(smol_engine, G.compare_rows([vec], True), sampled)
    alone = _ids(smol_engine, [[(vec, 0.5)]], sampled)[0]
    again = _ids(smol_engine, G.compare_rows([vec], True), sampled)
    assert pair == again  # same seed, same result
    assert pair[0] == alone  # a row's draws do not depend on the other rows of its batch
    other_seed = _ids(smol_engine, [[]], G.Sampling(max_new_tokens=TOKENS, temperature=0.9, seed=8))[0]
    assert other_seed != pair[1]


def _mean_offdiag(matrix):
    n = len(matrix)
    values = [matrix[i][j] for i in range(n) for j in range(i + 1, n)]
    return sum(values) / len(values)


def test_vectors_mean_their_text(smol_engine):
    n = smol_engine.n_layers
    for layer in (n // 4, n // 2, 3 * n // 4):
        ours = _mean_offdiag(smol_engine.similarity(FOUR, layer))
        stock = _mean_offdiag(smol_engine.similarity(FOUR, layer, "stock"))
        assert ours <= 0.8, (layer, ours)
        assert stock >= 0.9, (layer, stock)  # llm-steer's capture: every text looks the same


def test_stock_mode_reproduces_llm_steer(smol, smol_engine):
    model, tokenizer = smol
    layer, coeff, text = 10, 0.6, "Taylor Swift"
    stock = Steer(model, tokenizer)
    try:
        stock.add(layer, coeff, text)
        reference_dir = stock._normalize_direction(
            stock.steers[layer].steer_vectors[0].tensor.mean(dim=1, keepdim=True)
        )
        ids = torch.tensor([G.prompt_ids(tokenizer, PROMPT)])
        with torch.inference_mode():
            reference = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False
            )[0, ids.shape[1] :].tolist()
    finally:
        stock.reset_all()
    ours_dir = smol_engine.direction(_vec(text, coeff, layer), "stock")
    assert torch.allclose(ours_dir, reference_dir.float(), atol=1e-4)
    ours = _ids(smol_engine, [[(_vec(text, coeff, layer), coeff)]], capture_mode="stock")[0]
    eos = tokenizer.eos_token_id
    assert ours == [t for t in reference if t != eos][: len(ours)]


def test_contrastive_direction_is_difference_of_means(smol_engine):
    pair = VectorSpec(layer=12, coeff=1.0, positive="happy", negative="sad")
    pos, neg = smol_engine.text_means(12, ["happy", "sad"], "bos-neutral")
    expected = smol_engine.steer._normalize_direction((pos - neg).view(1, 1, -1))
    assert torch.allclose(smol_engine.direction(pair, "bos-neutral"), expected)


def test_decay_schedule_applies_and_steps_reset(smol_engine, baseline):
    plain = _ids(smol_engine, [[(_vec(coeff=1.5), 1.5)]])[0]
    decayed_vec = _vec(coeff=1.5, decay=DecaySchedule(rate=0.5))
    decayed = _ids(smol_engine, [[(decayed_vec, 1.5)]])[0]
    assert decayed != plain
    # Step counters restart with each generation, so the same request gives the same tokens.
    assert _ids(smol_engine, [[(decayed_vec, 1.5)]])[0] == decayed


def test_cache_hits_skip_the_capture_pass(smol_engine):
    smol_engine.cache.clear()
    before = smol_engine.capture_passes
    _ids(smol_engine, [[(_vec("volcanoes", 1.0, 9), 1.0)]])
    first = smol_engine.capture_passes - before
    assert first >= 1
    _ids(smol_engine, [[(_vec("volcanoes", 1.0, 9), 1.0)]])
    assert smol_engine.capture_passes - before == first  # second request: no forward pass to capture


def test_streaming_yields_increments_and_stop_ends_within_a_step(smol_engine):
    updates = list(G.stream_rows(smol_engine, PROMPT, [[], []], G.Sampling(max_new_tokens=10)))
    assert len(updates) >= 5 and updates[-1].done
    assert updates[-1].texts[0] == "".join(u.deltas[0] for u in updates)
    stop = threading.Event()
    seen = []
    for update in G.stream_rows(smol_engine, PROMPT, [[]], G.Sampling(max_new_tokens=200), stop=stop):
        seen.append(update)
        if len(seen) == 3:
            stop.set()
    assert len(seen[-1].token_ids[0]) <= 5  # stopped within a step of the flag, not after 200 tokens
    assert smol_engine.is_clean()


def test_abandoned_stream_cleans_up(smol_engine, baseline):
    stream = G.stream_rows(smol_engine, PROMPT, [[(_vec(), 2.0)]], G.Sampling(max_new_tokens=100))
    next(stream)
    stream.close()  # a client that goes away
    assert smol_engine.is_clean()
    assert _ids(smol_engine, [[]])[0] == baseline


def test_scores(smol_engine):
    rows = G.sweep_rows("dogs", 15, [0.0, 1.0])
    effects = G.effect_scores(smol_engine, rows, "dogs")
    assert effects[0] == pytest.approx(0.0, abs=1e-5)
    assert effects[1] > 0.5  # steering towards "dogs" makes "dogs" more likely
    gens = _ids(smol_engine, rows)
    ppl = G.context_perplexities(smol_engine, G.prompt_ids(smol_engine.tokenizer, PROMPT), gens)
    assert all(p is not None and p >= 1.0 for p in ppl)


def test_chat_template_and_raw_prompt(smol):
    _, tokenizer = smol
    templated = tokenizer.decode(G.prompt_ids(tokenizer, "hello"))
    raw = tokenizer.decode(G.prompt_ids(tokenizer, "hello", raw=True))
    assert "<|im_start|>user" in templated and "hello" in templated
    assert "<|im_start|>" not in raw


def test_threads_get_their_own_vectors(fresh_manager):
    """Concurrent requests through the manager's lock each see only their own vectors."""
    from steering.engine import engine_for

    manager = fresh_manager
    manager.load("SmolLM2-135M-Instruct", "fp32", user=False)
    recipes = [[(_vec("dogs", 1.0, 15), 1.0)], [(_vec("the ocean", 1.5, 8), 1.5)], []]

    def one(recipe):
        return manager.run(lambda attempt: _ids(engine_for(attempt.loaded), [recipe])[0])

    serial = [one(r) for r in recipes]
    results: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, one(recipes[i % 3]))) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(6)] == serial + serial
    assert len({tuple(s) for s in serial}) == 3


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"text": "", "coeff": 1, "layer": 3}, "vectors[0].text"),
        ({"text": "   ", "coeff": 1, "layer": 3}, "vectors[0].text"),
        ({"text": "x" * 1001, "coeff": 1, "layer": 3}, "vectors[0].text"),
        ({"text": "dogs", "coeff": float("nan"), "layer": 3}, "vectors[0].coeff"),
        ({"text": "dogs", "coeff": float("inf"), "layer": 3}, "vectors[0].coeff"),
        ({"text": "dogs", "coeff": 1e6, "layer": 3}, "vectors[0].coeff"),
        ({"text": "dogs", "coeff": 1, "layer": 30}, "vectors[0].layer"),
        ({"text": "dogs", "coeff": 1, "layer": -1}, "vectors[0].layer"),
        ({"text": "dogs", "coeff": 1, "layer": 2.5}, "vectors[0].layer"),
        ({"positive": "happy", "negative": "", "coeff": 1, "layer": 3}, "vectors[0].negative"),
        ({"text": "dogs", "coeff": 1, "layer": 3, "decay": 1.5}, "vectors[0].decay"),
        ({"text": "dogs", "coeff": 1, "layer": 3, "positions": "reply"}, "vectors[0].positions"),
        ({"text": "dogs", "coeff": 1, "layer": 3, "positions": ["all"]}, "vectors[0].positions"),
        ({"text": "dogs", "coeff": 1, "layer": 3, "decay": 0.9, "positions": "prompt"}, "vectors[0].decay"),
        ({"text": "dogs", "coeff": 1, "layer": 3, "decay": 0.9}, "vectors[0].decay"),  # "prompt" is the default
        ("dogs", "vectors[0]"),
    ],
)
def test_bad_vectors_name_the_field_and_install_nothing(smol_engine, raw, field):
    with pytest.raises(InputError) as info:
        parse_vector(raw, 0, smol_engine.n_layers)
    assert str(info.value).startswith(field)
    assert info.value.field == field


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_new_tokens=100000, temperature=0, top_p=1, seed=0), "max_new_tokens"),
        (dict(max_new_tokens=0, temperature=0, top_p=1, seed=0), "max_new_tokens"),
        (dict(max_new_tokens=8, temperature=float("nan"), top_p=1, seed=0), "temperature"),
        (dict(max_new_tokens=8, temperature=5, top_p=1, seed=0), "temperature"),
        (dict(max_new_tokens=8, temperature=0, top_p=0, seed=0), "top_p"),
        (dict(max_new_tokens=8, temperature=0, top_p=1, seed=-3), "seed"),
    ],
)
def test_bad_sampling_names_the_field(kwargs, field):
    with pytest.raises(InputError, match=f"^{field}"):
        G.check_sampling(**kwargs)


def test_other_limits(smol_engine):
    with pytest.raises(InputError, match="^prompt"):
        G.check_prompt("x" * (limits.MAX_PROMPT_CHARS + 1))
    with pytest.raises(InputError, match="^coeffs"):
        G.sweep_rows("dogs", 3, [0.1] * (limits.MAX_SWEEP_ROWS + 1))
    with pytest.raises(InputError, match=r"^coeffs\[1\]"):
        G.sweep_rows("dogs", 3, [0.1, math.inf])
    with pytest.raises(InputError, match="^capture_mode"):
        smol_engine.text_means(3, ["dogs"], "nope")
    assert set(CAPTURE_MODES) == {"contexts", "bos", "bos-neutral", "stock"}


def test_contexts_capture_is_the_text_in_sentences_minus_the_fillers(smol_engine):
    """The default capture, recomputed independently with transformers' `output_hidden_states`
    (hidden_states[L] is the input of layer L): the mean over CONTEXT_TEMPLATES of each sentence's
    mean layer input (start token dropped), minus the same for CONTEXT_FILLERS. And it carries
    meaning: "the ocean" is nearer "the sea" than "music"."""
    from steering.engine import CONTEXT_FILLERS, CONTEXT_TEMPLATES

    assert DEFAULT_CAPTURE_MODE == "contexts"
    tok, model, layer = smol_engine.tokenizer, smol_engine.model, 15

    def by_hand(text: str) -> torch.Tensor:
        means = []
        for template in CONTEXT_TEMPLATES:
            ids = torch.tensor([smol_engine._bos_ids + tok.encode(template.format(text), add_special_tokens=False)])
            with torch.inference_mode():
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
            means.append(hidden[0, 1:].mean(dim=0))
        return torch.stack(means).mean(dim=0)

    fillers = torch.stack([by_hand(f) for f in CONTEXT_FILLERS]).mean(dim=0)
    got = smol_engine.text_means(layer, ["the ocean", "the sea", "music"], "contexts")
    for text, vector in zip(["the ocean", "the sea", "music"], got):
        torch.testing.assert_close(vector, by_hand(text) - fillers, rtol=1e-3, atol=1e-3)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=0).item()  # noqa: E731
    assert cos(got[0], got[1]) > cos(got[0], got[2]) + 0.1
    # not the old default: the sentences change the vector
    assert cos(got[0], smol_engine.text_means(layer, ["the ocean"], "bos-neutral")[0]) < 0.99


def test_several_vectors_at_one_layer_follow_one_rule(smol_engine):
    """Every vector's scale comes from the same unsteered hidden state: the order of two texts
    does not matter, and the same text twice steers exactly like once with the summed coefficient."""
    dogs, ocean = _vec("dogs", layer=15), _vec("the ocean", layer=15)
    forward = _ids(smol_engine, [[(dogs, 0.4), (ocean, 0.5)]])[0]
    backward = _ids(smol_engine, [[(ocean, 0.5), (dogs, 0.4)]])[0]
    assert forward == backward
    twice = _ids(smol_engine, [[(dogs, 0.3), (dogs, 0.3)]])[0]
    once = _ids(smol_engine, [[(dogs, 0.6)]])[0]
    assert twice == once


def _layer_input_after_steering(engine, rows, layer: int, mode="bos-neutral") -> torch.Tensor:
    """The hidden states layer `layer` really computes with (after steering), one forward pass."""
    from steering.loaded import decoder_layers

    seen = []
    norm = decoder_layers(engine.model)[layer].input_layernorm
    hook = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    ids = torch.tensor([G.prompt_ids(engine.tokenizer, PROMPT)] * len(rows))
    try:
        with engine.installed(rows, mode), torch.inference_mode():
            engine.model(input_ids=ids)
    finally:
        hook.remove()
    return seen[0]  # (B, T, H)


def test_a_raw_direction_is_added_as_given_beside_a_relative_vector(smol_engine):
    hidden = smol_engine.model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(hidden, generator=generator)
    direction = VectorSpec(layer=12, coeff=0.5, direction=tuple(raw.tolist()))
    text = _vec("dogs", layer=12)
    plain = _layer_input_after_steering(smol_engine, [[]], 12)
    added = _layer_input_after_steering(smol_engine, [[(direction, 0.5)]], 12)
    error = (added - plain - 0.5 * raw).abs().max().item()
    assert error < 1e-3, error  # at every position (float32 rounding of activations up to ~1e3)
    # Beside a text vector at the same layer: the text part scales with the unsteered RMS.
    both = _layer_input_after_steering(smol_engine, [[(direction, 0.5), (text, 0.7)]], 12)
    rms = Steer._rms(plain[:, -1:, :])  # (1, 1, 1): the unsteered state at the last position
    expected = 0.5 * raw + 0.7 * smol_engine.direction(text, "bos-neutral").view(-1) * rms.view(-1)
    assert torch.allclose(both - plain, expected.expand_as(plain), atol=1e-3)
    assert smol_engine.is_clean()


def test_prompt_positions_steer_the_prefill_only(smol, smol_engine, baseline):
    """positions "prompt" (the default): the vector is added to the prompt's hidden states in the
    prefill and to nothing after it. Recomputed independently: plain transformers `generate` with
    a pre-hook that adds coeff * direction * RMS(last position) only to a multi-token forward."""
    model, _ = smol
    vec = VectorSpec(layer=15, coeff=1.0, text="the desert")
    assert vec.positions == "prompt" and parse_vector(vec.to_dict(), 0, 30) == vec
    direction = smol_engine.direction(vec, DEFAULT_CAPTURE_MODE)
    ours = _ids(smol_engine, [[(vec, 1.0)]])[0]
    assert _ids(smol_engine, [[(vec, 0.0)]])[0] == baseline  # zero steering == baseline

    def add_in_prefill(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hidden.shape[1] > 1:
            hidden += 1.0 * direction * Steer._rms(hidden[:, -1:, :])

    ids = torch.tensor([G.prompt_ids(smol_engine.tokenizer, PROMPT)])
    hook = model.model.layers[15].register_forward_pre_hook(add_in_prefill, with_kwargs=True)
    try:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    assert out[0, ids.shape[1] :].tolist() == ours
    every = _ids(smol_engine, [[(_vec("the desert", positions="all"), 1.0)]])[0]
    assert len({tuple(ours), tuple(every), tuple(baseline)}) == 3  # another rule than "all", and it steers
    # Rows of one batch (prompt-only, all-positions, unsteered) equal separate runs.
    rows = [[(vec, 1.0)], [(_vec("the desert", positions="all"), 1.0)], []]
    assert _ids(smol_engine, rows) == [ours, every, baseline]
    assert smol_engine.is_clean()


def test_vector_kinds_are_exclusive_and_directions_validated():
    both = {"text": "dogs", "positive": "a", "negative": "b", "coeff": 1, "layer": 3}
    with pytest.raises(InputError, match=r"^vectors\[0\]: give exactly one of"):
        parse_vector(both, 0, 30)
    with pytest.raises(InputError, match=r"^vectors\[0\]\.direction\[1\]: must be a finite number"):
        parse_vector({"direction": [0.1, float("nan")], "layer": 3}, 0, 30)
    with pytest.raises(InputError, match=r"^vectors\[0\]\.direction: must be a list of 1 to 16384 numbers"):
        parse_vector({"direction": "0.1 0.2", "layer": 3}, 0, 30)
    spec = parse_vector({"direction": [0.5, -1], "coeff": 2, "layer": 3}, 0, 30)
    assert spec.direction == (0.5, -1.0) and spec.label == "direction[2]"
    assert parse_vector(spec.to_dict(), 0, 30) == spec


def _naive_perplexities(engine, prompt, generations):
    """The scoring before issue 10: full-vocabulary logits for every position of every row."""
    context = G.prompt_ids(engine.tokenizer, prompt)
    width = len(context) + max(len(g) for g in generations)
    ids = torch.full((len(generations), width), engine.tokenizer.pad_token_id or 0)
    mask = torch.zeros_like(ids)
    for b, g in enumerate(generations):
        ids[b, : len(context) + len(g)] = torch.tensor(context + list(g))
        mask[b, : len(context) + len(g)] = 1
    with torch.inference_mode():
        logits = engine.model(input_ids=ids, attention_mask=mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return [
        math.exp(-logprobs[b, len(context) - 1 : len(context) - 1 + len(g)].mean().item())
        for b, g in enumerate(generations)
    ]


def _naive_effects(engine, rows, text):
    context = G.prompt_ids(engine.tokenizer, G.NEUTRAL_PROMPT)
    target = engine.tokenizer.encode(text, add_special_tokens=False)
    ids = torch.tensor([context + target] * (len(rows) + 1))
    with engine.installed([[]] + list(rows), DEFAULT_CAPTURE_MODE), torch.inference_mode():
        logits = engine.model(input_ids=ids).logits.float()
    logprobs = torch.log_softmax(logits[:, len(context) - 1 : -1], dim=-1)
    picked = logprobs.gather(-1, ids[:, len(context) :, None]).squeeze(-1).mean(dim=-1)
    return (picked[1:] - picked[0]).tolist()


def test_lean_scoring_sends_only_scored_positions_through_the_head(smol_engine, monkeypatch):
    monkeypatch.setattr(G, "SCORE_CHUNK_ELEMENTS", 49152 * 5)  # 5 positions per chunk: chunking shows
    rows = G.sweep_rows("dogs", 15, [0.0, 1.0, 2.0])
    generations = _ids(smol_engine, rows)
    shapes = []
    head = smol_engine.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    try:
        lean_ppl = G.context_perplexities(smol_engine, G.prompt_ids(smol_engine.tokenizer, PROMPT), generations)
        lean_effects = G.effect_scores(smol_engine, rows, "dogs")
    finally:
        hook.remove()
    hidden = smol_engine.model.config.hidden_size
    assert shapes and all(len(s) == 2 and s[0] <= 5 and s[1] == hidden for s in shapes), shapes
    assert sum(s[0] for s in shapes) == sum(len(g) for g in generations) + 4 * len(
        smol_engine.tokenizer.encode("dogs", add_special_tokens=False)
    )  # exactly the scored positions: every generated token, and "dogs" after the neutral prompt in 4 rows
    assert lean_ppl == pytest.approx(_naive_perplexities(smol_engine, PROMPT, generations), rel=1e-4)
    assert lean_effects == pytest.approx(_naive_effects(smol_engine, rows, "dogs"), abs=1e-4)
