"""Generation: steered and baseline rows of one batch, coefficient sweeps, streaming, scores.

Every request is a list of batch rows; row b carries its own steering coefficients (the engine's
batch-row masks), so "steered vs unsteered" is two rows of one `generate` call and an 8-point
coefficient sweep is eight rows. All rows share one prompt, so there is no padding and, in fp32
with greedy decoding, each row is token-identical to a separate run.

Sampling uses one `torch.Generator` per row, seeded with the request's seed, inside a logits
processor: a row's random draws then depend only on its seed and its own logits, not on which
other rows share the batch, so a steered row sampled beside its baseline matches a separate run.

`stream_rows` runs `generate` on a worker thread and yields the text of every row as tokens
arrive; a stop flag (a `threading.Event`) ends generation within one decoding step.
"""

from __future__ import annotations

import collections
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

from steering import limits
from steering.engine import DEFAULT_CAPTURE_MODE, SteeringEngine, VectorSpec

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
    return Sampling(
        limits.check(tokens_limit, max_new_tokens, "max_new_tokens"),
        limits.check("temperature", temperature),
        limits.check("top_p", top_p),
        limits.check("seed", seed),
    )


def check_prompt(prompt) -> str:
    return limits.check_text(prompt, "prompt", "prompt_chars")


def prompt_ids(tokenizer, prompt: str, *, raw: bool = False) -> list[int]:
    """Token ids of the prompt, through the chat template when the tokenizer has one."""
    if not raw and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return list(ids)
    return tokenizer.encode(prompt)


# The generation loop's own import (kept apart from the module's imports above).
from steering.cpu import small_batch_linears  # noqa: E402


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
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


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
) -> Iterator[RowsUpdate]:
    """Generate every row of `rows` in one batch and yield the texts as tokens arrive.

    The caller must hold the model manager's lock for the whole iteration.
    """
    tokenizer, model = engine.tokenizer, engine.model
    ids = prompt_ids(tokenizer, prompt, raw=raw_prompt)
    n_rows = len(rows)
    input_ids = torch.tensor([ids] * n_rows, device=engine.device)  # (B, T): same prompt, no padding
    stop = stop or threading.Event()
    eos = _eos_ids(model, tokenizer)
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
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
    )
    sink: queue.Queue = queue.Queue()
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    finished = [False] * n_rows
    texts = [""] * n_rows

    with engine.installed(rows, capture_mode):

        def work():
            try:
                with torch.inference_mode(), small_batch_linears(model):
                    model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        generation_config=config,
                        logits_processor=processors,
                        stopping_criteria=StoppingCriteriaList([_StopFlag(stop)]),
                        streamer=_QueueStreamer(sink),
                    )
                sink.put(("done", None))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                sink.put(("error", exc))

        worker = threading.Thread(target=work, name="generate", daemon=True)
        worker.start()
        try:
            while True:
                kind, payload = sink.get()
                if kind == "error":
                    raise payload
                if kind == "done":
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
            stop.set()
            worker.join()
    yield RowsUpdate(list(texts), [""] * n_rows, [list(g) for g in generated], done=True)


def run_rows(engine, prompt, rows, sampling, **kwargs) -> RowsUpdate:
    """`stream_rows` to the end; returns the final update."""
    return collections.deque(stream_rows(engine, prompt, rows, sampling, **kwargs), maxlen=1)[0]


def compare_rows(vectors: Sequence[VectorSpec], compare: bool) -> list[list[tuple[VectorSpec, float]]]:
    """Row 0 steered with every enabled vector; row 1 (when comparing) the unsteered baseline."""
    steered = [(v, v.coeff) for v in vectors if v.enabled]
    return [steered, []] if compare else [steered]


def sweep_rows(text: str, layer: int, coeffs: Sequence[float]) -> list[list[tuple[VectorSpec, float]]]:
    """One row per coefficient of one vector."""
    limits.check_text(text, "text")
    limits.check_count("sweep_coeffs", coeffs, "coeffs")
    values = [limits.check("coeff", c, f"coeffs[{i}]") for i, c in enumerate(coeffs)]
    spec = VectorSpec(layer=layer, coeff=1.0, text=text)
    return [[(spec, c)] for c in values]


def effect_scores(engine: SteeringEngine, rows, text: str, capture_mode: str = DEFAULT_CAPTURE_MODE) -> list[float]:
    """Per row: mean log-prob per token of `text` after the neutral prompt, steered minus unsteered.

    One batched forward: row 0 is unsteered, rows 1.. are `rows`.
    """
    context = prompt_ids(engine.tokenizer, NEUTRAL_PROMPT)
    target = engine.tokenizer.encode(text, add_special_tokens=False)
    ids = torch.tensor([context + target] * (len(rows) + 1), device=engine.device)  # (R+1, T)
    with engine.installed([[]] + list(rows), capture_mode), torch.inference_mode():
        logits = engine.model(input_ids=ids).logits.float()  # (R+1, T, V)
    logprobs = torch.log_softmax(logits[:, len(context) - 1 : -1], dim=-1)  # predicts each target token
    picked = logprobs.gather(-1, ids[:, len(context) :, None]).squeeze(-1).mean(dim=-1)  # (R+1,)
    return (picked[1:] - picked[0]).tolist()


def perplexities(engine: SteeringEngine, prompt: str, generations: Sequence[Sequence[int]]) -> list[float | None]:
    """Perplexity of each generated continuation under the unsteered model (fluency), batched."""
    context = prompt_ids(engine.tokenizer, prompt)
    rows = [list(g) for g in generations]
    width = len(context) + max((len(g) for g in rows), default=0)
    pad = engine.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), width), pad, device=engine.device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=engine.device)
    for b, g in enumerate(rows):
        seq = context + g
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
    with torch.inference_mode():
        logits = engine.model(input_ids=ids, attention_mask=mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, W-1)
    out: list[float | None] = []
    for b, g in enumerate(rows):
        if not g:
            out.append(None)
            continue
        nll = -logprobs[b, len(context) - 1 : len(context) - 1 + len(g)].mean().item()
        out.append(math.exp(nll))
    return out


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return [e for e in eos if e is not None]
