"""Generation: steered and baseline rows of one batch, coefficient sweeps, streaming, scores.

Every request is a list of batch rows; row b carries its own steering coefficients (the engine's
batch-row masks), so "steered vs unsteered" is two rows of one `generate` call and an 8-point
coefficient sweep is eight rows. All rows share one prompt, so there is no padding and, in fp32
with greedy decoding, each row is token-identical to a separate run. (A chat's two conversations
are rows with prompts of their own, left-padded: `row_ids`; on SmolLM2 in fp32 greedy still
token-identical to separate runs, `tests/test_chat.py`.)

Sampling uses one `torch.Generator` per row, seeded with the request's seed, inside a logits
processor: a row's random draws then depend only on its seed and its own logits, not on which
other rows share the batch, so a steered row sampled beside its baseline matches a separate run.

`stream_rows` runs `generate` on a worker thread and yields the text of every row as tokens
arrive; a stop flag (a `threading.Event`) ends generation within one decoding step.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from steering import lifecycle, limits
from steering.engine import (
    DEFAULT_CAPTURE_MODE,
    DEFAULT_POSITIONS,
    CaptureStopped,
    SteeringEngine,
    VectorSpec,
    check_positions,
)
from steering.errors import InputError
from steering.estimate import SCORE_CHUNK_ELEMENTS
from steering.loaded import decoder_layers
from steering.prefill import shared_prefill

logger = logging.getLogger(__name__)

# The fixed neutral point at which `effect` measures how likely the steering text has become.
NEUTRAL_PROMPT = "Say something."


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one request. temperature 0 means greedy."""

    max_new_tokens: int = limits.LIMITS["max_new_tokens"].default
    temperature: float = limits.LIMITS["temperature"].default
    top_p: float = limits.LIMITS["top_p"].default
    seed: int = limits.LIMITS["seed"].default


def check_sampling(max_new_tokens, temperature, top_p, seed, *, tokens_limit: str = "max_new_tokens") -> Sampling:
    """Validate decoding settings (raises `InputError` naming the field and the range)."""
    tokens = limits.check(tokens_limit, max_new_tokens, "max_new_tokens")
    temperature = limits.check("temperature", temperature)
    if 0 < temperature < limits.MIN_SAMPLING_TEMPERATURE:
        high = limits.LIMITS["temperature"].maximum
        raise InputError(
            "temperature",
            f"must be 0 (greedy decoding) or from {limits.MIN_SAMPLING_TEMPERATURE:g} to {high:g}; got "
            f"{limits.shorten(temperature)} (smaller positive temperatures overflow the sampler)",
        )
    return Sampling(tokens, temperature, limits.check("top_p", top_p), limits.check("seed", seed))


def check_prompt(prompt) -> str:
    return limits.check_text(prompt, "prompt", "prompt_chars")


def prompt_ids(tokenizer, prompt: str, *, raw: bool = False) -> list[int]:
    """Token ids of the prompt, through the chat template when the tokenizer has one."""
    if not raw and getattr(tokenizer, "chat_template", None):
        return conversation_ids(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


def conversation_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation ({"role", "content"} messages) ready for the assistant's next
    reply: the chat template with its generation prompt, or, for a tokenizer without a template,
    a plain "role: content" transcript ending in "assistant:"."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


class _PerRowSampler(LogitsProcessor):
    """Draw each row's token with that row's own generator, then leave only it for argmax."""

    def __init__(self, seed: int, n_rows: int, device):
        self.generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(n_rows)]

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores, dim=-1)  # (B, V)
        chosen = torch.stack([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen, 0.0)


class _StopFlag(StoppingCriteria):
    """Ends generation at the next decoding step once the request's stop flag or the process's
    shutdown flag is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        stop = self.event.is_set() or lifecycle.SHUTTING_DOWN.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _QueueStreamer(BaseStreamer):
    """Hands each decoding step's tokens (B,) to the consuming generator."""

    def __init__(self, sink: queue.Queue):
        self.sink = sink
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # the first put is the prompt itself
            self.prompt_seen = True
            return
        self.sink.put(("tokens", value.view(-1).tolist()))

    def end(self):
        pass


@dataclass
class RowsUpdate:
    """One streaming step: the full text so far and the newest increment of every row."""

    texts: list[str]
    deltas: list[str]
    token_ids: list[list[int]]
    done: bool = False


def stream_rows(
    engine: SteeringEngine,
    prompt: str,
    rows: Sequence[Sequence[tuple[VectorSpec, float]]],
    sampling: Sampling,
    *,
    stop: threading.Event | None = None,
    raw_prompt: bool = False,
    capture_mode: str = DEFAULT_CAPTURE_MODE,
    row_ids: Sequence[Sequence[int]] | None = None,
) -> Iterator[RowsUpdate]:
    """Generate every row of `rows` in one batch and yield the texts as tokens arrive.

    `row_ids` gives each row a prompt of its own (token ids; e.g. the steered and the baseline
    conversation of a chat), left-padded to one length; `prompt` is then not used.
    The caller must hold the model manager's lock for the whole iteration.
    """
    tokenizer, model = engine.tokenizer, engine.model
    n_rows = len(rows)
    row_ids = row_ids or [prompt_ids(tokenizer, prompt, raw=raw_prompt)] * n_rows
    stop = lifecycle.stop_flag(stop)  # the caller's, the request's (a client that left) or a new one
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    input_ids, attention_mask = _left_padded(row_ids, pad, engine.device)  # (B, T); one prompt: no padding
    processors = LogitsProcessorList()
    if sampling.temperature > 0:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
        processors.append(_PerRowSampler(sampling.seed, n_rows, engine.device))
    config = GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    sink: queue.Queue = queue.Queue()
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    finished = [False] * n_rows
    texts = [""] * n_rows

    try:  # the texts first, stoppable between layers (a long text takes seconds per layer)
        engine.capture_for(rows, capture_mode, stop)
    except CaptureStopped:
        yield RowsUpdate(list(texts), [""] * n_rows, [list(g) for g in generated], done=True)
        return
    with engine.installed(rows, capture_mode) as layers, _stoppable(model, stop):

        def work():
            try:
                with (
                    torch.inference_mode(),
                    shared_prefill(model, input_ids, attention_mask, layers),
                ):
                    model.generate(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        generation_config=config,
                        logits_processor=processors,
                        stopping_criteria=StoppingCriteriaList([_StopFlag(stop)]),
                        streamer=_QueueStreamer(sink),
                    )
                sink.put(("done", None))
            except _Stopped:  # stopped inside a forward pass (a long prefill): what exists is the answer
                sink.put(("done", None))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                sink.put(("error", exc))

        worker = threading.Thread(target=work, name="generate", daemon=True)
        worker.start()
        finished_generation = False
        try:
            while True:
                try:
                    kind, payload = sink.get(timeout=HEARTBEAT_S)
                except queue.Empty:  # no token yet (a long prefill): hand control back to the consumer,
                    yield RowsUpdate(list(texts), [""] * n_rows, [list(g) for g in generated])  # who may stop
                    continue
                if kind == "error":
                    raise payload
                if kind == "done":
                    finished_generation = True
                    break
                deltas = [""] * n_rows
                for b, token in enumerate(payload):
                    if finished[b]:
                        continue
                    if token in eos:
                        finished[b] = True
                        continue
                    generated[b].append(token)
                    text = tokenizer.decode(generated[b], skip_special_tokens=True)
                    deltas[b], texts[b] = text[len(texts[b]) :], text
                yield RowsUpdate(list(texts), deltas, [list(g) for g in generated])
        finally:
            # A consumer that stops iterating (Stop button, closed connection) ends generation.
            # (A generation that finished leaves the flag alone: the caller may run another.)
            if not finished_generation:
                stop.set()
            worker.join()
    yield RowsUpdate(list(texts), [""] * n_rows, [list(g) for g in generated], done=True)


HEARTBEAT_S = 0.25  # a stream yields at least this often, tokens or not, so a consumer can stop it


def _left_padded(row_ids: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask of rows padded on the left, so that every row's last token
    is where generation continues (masked pads do not change a row's tokens: checked in fp32 greedy)."""
    width = max(len(ids) for ids in row_ids)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in row_ids], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in row_ids], device=device)
    return ids, mask


class _Stopped(Exception):
    pass


@contextlib.contextmanager
def _stoppable(model, stop: threading.Event) -> Iterator[None]:
    """For the block, every decoder layer checks the stop and shutdown flags before it runs, so a
    Stop ends even a long prefill within one layer (the stopping criteria run only between tokens)."""

    def check(module, args, kwargs):
        if stop.is_set() or lifecycle.SHUTTING_DOWN.is_set():
            raise _Stopped

    hooks = [layer.register_forward_pre_hook(check, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def generate_rows(engine, prompt, rows, sampling, *, one_row: bool = False, **kwargs) -> Iterator[RowsUpdate]:
    """The one entry for generating rows: `stream_rows` (all rows in one batch) or, with
    `one_row` (the manager's retry after an out-of-memory error), `stream_rows_apart`."""
    return (stream_rows_apart if one_row else stream_rows)(engine, prompt, rows, sampling, **kwargs)


def run_rows(engine, prompt, rows, sampling, *, one_row: bool = False, **kwargs) -> RowsUpdate:
    """`generate_rows` to the end; the final update."""
    return collections.deque(generate_rows(engine, prompt, rows, sampling, one_row=one_row, **kwargs), maxlen=1)[0]


def stream_rows_apart(engine, prompt, rows, sampling, **kwargs) -> Iterator[RowsUpdate]:
    """`stream_rows` with each row in a batch of its own, one after the other: the retry after an
    out-of-memory error (one row's peak memory). Each row's tokens are those it gets in the batch:
    its sampler is seeded alone, and steering is per row. Yields every row's text so far."""
    stop = lifecycle.stop_flag(kwargs.get("stop"))
    kwargs["stop"] = stop
    texts, ids = [""] * len(rows), [[] for _ in rows]
    row_ids = kwargs.pop("row_ids", None)
    for b, row in enumerate(rows):
        if stop.is_set() or lifecycle.SHUTTING_DOWN.is_set():
            break
        own = {"row_ids": [row_ids[b]]} if row_ids else {}
        for update in stream_rows(engine, prompt, [row], sampling, **kwargs, **own):
            deltas = [""] * len(rows)
            deltas[b], texts[b], ids[b] = update.deltas[0], update.texts[0], update.token_ids[0]
            if not update.done:
                yield RowsUpdate(list(texts), deltas, [list(i) for i in ids])
    yield RowsUpdate(list(texts), [""] * len(rows), [list(i) for i in ids], done=True)


def compare_rows(
    vectors: Sequence[VectorSpec], compare: bool, prompted: bool = False
) -> list[list[tuple[VectorSpec, float]]]:
    """Row 0 steered with every enabled vector; row 1 (when comparing) the unsteered baseline;
    row 2 (with `prompted`) unsteered too: the prompted row, whose prompt is `prompted_prompt`."""
    steered = [(v, v.coeff) for v in vectors if v.enabled]
    return [steered, []] + [[]] * bool(prompted) if compare else [steered]


NO_PROMPT_TEXT = (
    "is on, but no vector has words to prompt with: a raw direction carries none, and a disabled vector "
    "or coefficient 0 does not steer; give a text or a positive/negative pair, or turn prompted off"
)


def prompt_instruction(vectors: Sequence[VectorSpec]) -> str:
    """The instruction the prompted row adds to the prompt: bring in what the steering does, in words.

    A text with a positive coefficient: "talk about {text}"; a negative one: "do not talk about
    {text}"; a pair: toward the positive and away from the negative (swapped when the coefficient is
    negative). A raw direction has words only when it was named by them (a trained vector's name:
    "ocean", or "happy − sad" for two words); directions without a name (or with the name made
    from examples), disabled vectors and coefficient 0 add nothing; when nothing is left,
    InputError on "prompted". Each text once, in the order of the vectors."""
    toward: list[str] = []
    away: list[str] = []
    for v in vectors:
        named = _named_words(v.name) if v.direction else None
        if not v.enabled or v.coeff == 0 or (v.direction and named is None):
            continue
        if named is not None or v.contrastive:
            pos, neg = named or (v.positive, v.negative)
            pos, neg = (pos, neg) if v.coeff > 0 else (neg, pos)
            toward += [pos] if pos else []
            away += [neg] if neg else []
        else:
            (toward if v.coeff > 0 else away).append(v.text)
    toward, away = list(dict.fromkeys(toward)), [t for t in dict.fromkeys(away) if t not in toward]
    if not toward and not away:
        raise InputError("prompted", NO_PROMPT_TEXT)
    parts = []
    if toward:
        parts.append("talk about " + _listed(toward))
    if away:
        parts.append(("and do not talk about " if toward else "do not talk about ") + _listed(away))
    return "In your answer, " + " ".join(parts) + "."


def _named_words(name: str) -> tuple[str, str] | None:
    """(toward, away) words of a direction's name ("happy − sad" -> ("happy", "sad"), "ocean" ->
    ("ocean", "")); None for no name or one made from examples ("mean_diff: The waves… vs …")."""
    if not name or name.split(":", 1)[0] in ("mean_diff", "pca", "probe"):
        return None
    positive, _, negative = (part.strip() for part in name.partition(" − "))
    return positive, negative


def _listed(texts: Sequence[str]) -> str:
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]


def prompted_prompt(prompt: str, instruction: str) -> str:
    """The prompted row's prompt: the user's prompt, then the instruction, in one user message."""
    return f"{prompt}\n\n{instruction}"


def compare_row_ids(
    tokenizer, prompt: str, instruction: str | None, n_rows: int, *, raw: bool = False
) -> list[list[int]] | None:
    """`row_ids` of a compare: None (one prompt for every row) without an instruction, else the
    prompt for every row but the last, which gets `prompted_prompt` (rows left-padded)."""
    if instruction is None:
        return None
    ids = prompt_ids(tokenizer, prompt, raw=raw)
    return [ids] * (n_rows - 1) + [prompt_ids(tokenizer, prompted_prompt(prompt, instruction), raw=raw)]


def sweep_rows(
    text: str, layer: int, coeffs: Sequence[float], positions: str = DEFAULT_POSITIONS
) -> list[list[tuple[VectorSpec, float]]]:
    """One row per coefficient of one vector (added at `positions`: "prompt" or "all")."""
    limits.check_text(text, "text")
    limits.check_count("sweep_coeffs", coeffs, "coeffs")
    values = [limits.check("coeff", c, f"coeffs[{i}]") for i, c in enumerate(coeffs)]
    spec = VectorSpec(layer=layer, coeff=1.0, text=text, positions=check_positions(positions))
    return [[(spec, c)] for c in values]


SCORE_ROW_CHUNK = 8  # rows per scoring forward pass (the sweep's batch: what the plan prices)


def token_logprobs(
    engine: SteeringEngine,
    seqs: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int]],
    *,
    row_chunk: int = SCORE_ROW_CHUNK,
) -> list[torch.Tensor]:
    """Log-prob of the tokens seqs[b][start:end] given everything before them, per row (fp32).

    Lean: rows are right-padded and run `row_chunk` at a time through the decoder body; only the
    hidden states of the positions that predict a scored token go through the output head,
    SCORE_CHUNK_ELEMENTS logits at a time, so no (rows, T, V) tensor of full-vocabulary logits ever
    exists (V is 49k-152k: 8-10 bytes per element after the fp32 log-softmax). Whatever steering is
    installed applies; installed per-row steering needs `row_chunk` >= the number of rows.
    """
    head = engine.model.get_output_embeddings()
    pad = engine.tokenizer.pad_token_id or 0
    step = max(1, SCORE_CHUNK_ELEMENTS // head.weight.shape[0])  # positions per head call
    out: list[torch.Tensor] = []
    for first in range(0, len(seqs), row_chunk):
        chunk, chunk_spans = seqs[first : first + row_chunk], spans[first : first + row_chunk]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=engine.device)
        mask = torch.zeros((len(chunk), width), dtype=torch.long, device=engine.device)
        for b, seq in enumerate(chunk):
            ids[b, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
            mask[b, : len(seq)] = 1
        # Position p predicts token p + 1: the predicting positions of every span, row by row.
        where = [(b, p) for b, (start, end) in enumerate(chunk_spans) for p in range(start - 1, end - 1)]
        index_b = torch.tensor([b for b, _ in where], dtype=torch.long, device=engine.device)
        index_p = torch.tensor([p for _, p in where], dtype=torch.long, device=engine.device)
        picked = torch.empty(len(where), dtype=torch.float32, device=engine.device)
        with torch.inference_mode():
            hidden = engine.model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            # a model dispatched across devices ends on its last layer's device, and its head may be elsewhere
            at = hidden.device
            scoring, targets = hidden[index_b.to(at), index_p.to(at)], ids[index_b, index_p + 1]  # (n, H), (n,)
            for start in range(0, len(where), step):
                logits = head(scoring[start : start + step]).float()  # (<= step, V)
                chosen = torch.log_softmax(logits, dim=-1).gather(
                    -1, targets[start : start + step, None].to(logits.device)
                )
                picked[start : start + step] = chosen.squeeze(-1).to(picked.device)
        offset = 0
        for start, end in chunk_spans:
            out.append(picked[offset : offset + max(end - start, 0)].cpu())
            offset += max(end - start, 0)
    return out


def effect_scores(
    engine: SteeringEngine, rows, text: str, capture_mode: str = DEFAULT_CAPTURE_MODE, *, one_row: bool = False
) -> list[float]:
    """Per row: mean log-prob per token of `text` after the neutral prompt, steered minus unsteered.

    One batched forward: row 0 is unsteered, rows 1.. are `rows` (with `one_row`, a forward each).
    """
    context = prompt_ids(engine.tokenizer, NEUTRAL_PROMPT)
    seq = context + engine.tokenizer.encode(text, add_special_tokens=False)
    batches = [[[]] + list(rows)] if not one_row else [[row] for row in [[]] + list(rows)]
    scores = []
    for batch in batches:
        with engine.installed(batch, capture_mode):  # one steering row per batch row: no row chunks
            logps = token_logprobs(
                engine, [seq] * len(batch), [(len(context), len(seq))] * len(batch), row_chunk=len(batch)
            )
        scores += [float(lp.mean()) for lp in logps]
    return [s - scores[0] for s in scores[1:]]


def context_perplexities(
    engine: SteeringEngine,
    context: Sequence[int],
    generations: Sequence[Sequence[int]],
    *,
    row_chunk: int = SCORE_ROW_CHUNK,
) -> list[float | None]:
    """Perplexity of each generated continuation after `context` under the model as it is."""
    seqs = [list(context) + list(g) for g in generations]
    spans = [(len(context), len(context) + len(g)) for g in generations]
    logps = token_logprobs(engine, seqs, spans, row_chunk=row_chunk)
    return [math.exp(-float(lp.mean())) if len(lp) else None for lp in logps]


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return [e for e in eos if e is not None]
