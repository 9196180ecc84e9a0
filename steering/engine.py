"""The steering engine: llm-steer as the mechanism, with per-request state, meaningful vectors,
a direction cache and batch-row masks.

llm-steer 2.0.1 (`llm_steer.Steer`) patches `model.model.layers[i].forward` so that every call
adds `delta * rms(h[:, -1:])` to the layer's input hidden states `h` (B, T, H), where `delta` is
`coeff * normalise(mean(captured))` (or whatever a `steering_method` returns). So `coeff` is in
units of the hidden state's RMS at the last position: coeff 1 adds a vector as large as that
hidden state. We keep that patching and fix what a shared server cannot live with:

* state: `Steer.steers` is a class attribute shared by every instance; `_InstanceSteer` shadows
  it per instance. Step counters are reset before each generation; vectors are installed in
  descending layer order and removed in `finally`; `close()` drops every reference to the model.
* meaning: llm-steer averages the layer input over the text's tokens *without* a BOS token, and
  the first position's huge activation (an attention sink) dominates the mean, so every text
  gives nearly the same vector. Mode "bos" prepends BOS and drops position 0; "bos-neutral"
  also subtracts the mean vector of a few neutral texts. "contexts" (the default) reads the text
  inside a few short sentences ("Tell me about {text}.") and subtracts the same sentences around
  neutral words ("Tell me about something."), so what is left is what the text adds to a
  sentence: on the labelled set of docs/quality.md it steers on topic and fluent far more often
  than "bos-neutral". "stock" keeps llm-steer's capture.
* speed: the normalised direction is computed once per (model, layer, text, mode) and cached;
  `steering_method` hands llm-steer a precomputed (B, 1, H) delta instead of re-deriving it at
  every decoding step.
* batching: each installed vector carries one coefficient per batch row, so steered and
  baseline rows (coefficient 0), or a sweep of coefficients, run as rows of one batch.
* positions: llm-steer adds a vector at every forward pass, to the prompt and to each generated
  token ("all"). The default, "prompt", adds it in the first forward pass of a generation only
  (llm-steer's step 0: the prefill, all prompt positions), as ActAdd does; the reply is then
  written by unsteered layers that read the steered prompt through attention. On the labelled
  set and two validation sets of docs/quality.md it is on topic and fluent more often.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from llm_steer import ActivationMode, DecaySchedule, Steer, SteerElement

from steering import estimate, lifecycle, limits
from steering.errors import InputError, SteeringError
from steering.limits import check_layer, check_text
from steering.loaded import decoder_layers, input_device
from steering.vocab import CAPTURE_MODES, DEFAULT_CAPTURE_MODE, DEFAULT_POSITIONS, check_positions

logger = logging.getLogger(__name__)

# "contexts": a text is read inside each of these sentences ("{}" is the text) ...
CONTEXT_TEMPLATES = ("{}", "This is about {}.", "I love {}.", "Tell me about {}.", "Let's talk about {}.")
# ... and the same sentences around these topic-free words are subtracted.
CONTEXT_FILLERS = ("something", "a thing", "this and that", "stuff", "anything")
# The neutral texts whose mean vector "bos-neutral" subtracts: plain, topic-free sentences.
NEUTRAL_TEXTS = (
    "The",
    "It is a thing.",
    "Here is some text.",
    "This is a sentence about something.",
    "Okay, let me see.",
)

# Neutral chat exchanges whose reply tokens give a layer's typical RMS (`layer_rms`, export).
RMS_CHATS = (
    ("Tell me about your day.", "It was a normal day. I did some work, had lunch and then went home."),
    ("What is a good way to spend an evening?", "A quiet evening at home with a book and a cup of tea."),
    ("Write a few sentences about anything.", "Here are a few sentences. The morning was calm and quiet."),
)

CACHE_ENTRIES = 256

DECAY_NEEDS_ALL = 'a decay multiplies the coefficient per generated token: it needs positions "all"'


@dataclass(frozen=True)
class VectorSpec:
    """One steering vector of a request: a text, a contrastive pair (positive - negative), or a
    raw direction (an absolute vector of the model's hidden size, e.g. an imported control vector)."""

    layer: int
    coeff: float
    text: str = ""
    positive: str = ""
    negative: str = ""
    enabled: bool = True
    decay: DecaySchedule | None = None
    direction: tuple[float, ...] = ()
    positions: str = DEFAULT_POSITIONS
    name: str = ""  # what the vector is, for tables and history (a trained direction's examples)

    @property
    def contrastive(self) -> bool:
        return bool(self.positive or self.negative)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.direction:
            return f"direction[{len(self.direction)}]"
        return f"{self.positive} - {self.negative}" if self.contrastive else self.text

    def to_dict(self) -> dict:
        """The request form of this vector (what `parse_vector` reads back to an equal spec)."""
        if self.direction:
            out: dict = {"direction": list(self.direction)}
        elif self.contrastive:
            out = {"positive": self.positive, "negative": self.negative}
        else:
            out = {"text": self.text}
        out.update(coeff=self.coeff, layer=self.layer, enabled=self.enabled, positions=self.positions)
        if self.decay is not None:
            out.update(decay=self.decay.rate, decay_min=self.decay.min_multiplier)
        if self.name:
            out["name"] = self.name
        return out


_KINDS = ({"text"}, {"positive", "negative"}, {"direction"})
_VECTOR_KEYS = {
    "text", "positive", "negative", "direction", "coeff", "layer", "enabled", "decay", "decay_min", "positions", "name",
}  # fmt: skip


def parse_vector(raw: dict, index: int, n_layers: int | None) -> VectorSpec:
    """Turn a request's vector dict into a validated `VectorSpec` (raises `InputError`).

    With `n_layers` None the layer is only checked to be a non-negative integer: the api checks
    its range again, under the model lock, against the model that will answer.
    """
    name = f"vectors[{index}]"
    if not isinstance(raw, dict):
        raise InputError(
            name, "each vector must be an object with text (or positive/negative, or direction), coeff, layer"
        )
    unknown = sorted(str(k) for k in raw.keys() - _VECTOR_KEYS)
    if unknown:
        raise InputError(f"{name}.{unknown[0][:40]}", f"is not a vector field; use {', '.join(sorted(_VECTOR_KEYS))}")
    kinds = [kind for kind in _KINDS if kind & raw.keys()]
    if len(kinds) != 1:
        raise InputError(name, "give exactly one of: text, a positive/negative pair, or a direction")
    texts: dict = {}
    if kinds[0] == {"direction"}:
        texts["direction"] = check_direction(raw["direction"], f"{name}.direction")
    for key in sorted(kinds[0] - {"direction"}, reverse=True):  # text, or positive then negative
        texts[key] = check_text(raw.get(key), f"{name}.{key}")
    coeff = limits.check("coeff", raw.get("coeff", limits.DEFAULT_COEFF), f"{name}.coeff")
    layer = check_layer(raw.get("layer"), f"{name}.layer", n_layers)
    decay = None
    if raw.get("decay") not in (None, "", 0, 1, 1.0):
        rate = limits.check("decay", raw["decay"], f"{name}.decay")
        floor = limits.check("decay_min", raw.get("decay_min", 0.0) or 0.0, f"{name}.decay_min")
        decay = DecaySchedule(rate=rate, min_multiplier=floor)
    enabled = limits.check_bool(raw.get("enabled", True), f"{name}.enabled")
    positions = check_positions(raw.get("positions", DEFAULT_POSITIONS), f"{name}.positions")
    if decay is not None and positions == "prompt":
        raise InputError(f"{name}.decay", DECAY_NEEDS_ALL)
    label = check_text(raw["name"], f"{name}.name", "name_chars") if raw.get("name") else ""
    spec = VectorSpec(layer=layer, coeff=coeff, enabled=enabled, decay=decay, positions=positions, name=label, **texts)
    check_scale(spec, f"{name}.direction")
    return spec


def check_direction(value, field: str) -> tuple[float, ...]:
    """A raw direction: a list of finite numbers (its length is checked against the model later)."""
    size = limits.LIMITS["direction_values"]
    if not isinstance(value, (list, tuple)) or not size.minimum <= len(value) <= size.maximum:
        raise InputError(field, f"must be a list of 1 to {size.maximum:g} numbers (the model's hidden size)")
    numbers = tuple(limits.check_finite(v, f"{field}[{i}]") for i, v in enumerate(value))
    for i, number in enumerate(numbers):
        if abs(number) > limits.FLOAT32_MAX:  # 1e39 is finite in Python, infinite in float32
            raise InputError(
                f"{field}[{i}]",
                f"is {number:.3g}; a direction is float32, which holds at most {limits.FLOAT32_MAX:.3g}",
            )
    return numbers


def check_scale(spec: VectorSpec, field: str) -> None:
    """A raw direction times its coefficient within what a float32 delta holds (`scale_cap`)."""
    if spec.direction:
        _check_reach(max(abs(v) for v in spec.direction) * abs(spec.coeff), field, torch.float32)


def scale_cap(dtype: torch.dtype) -> tuple[float, str]:
    """(largest number a raw direction times its coefficient may reach, the dtype that bounds it):
    float32 while the delta is computed (divided by the hidden state's RMS, which can be as small
    as 1e-3, and multiplied back), and the model's `dtype` once it is added to the hidden state."""
    cap, name = limits.DIRECTION_SCALE_CAP, "float32"
    if dtype.is_floating_point and torch.finfo(dtype).max < cap:
        cap, name = float(torch.finfo(dtype).max), str(dtype).removeprefix("torch.")
    return cap, name


def _check_reach(largest: float, field: str, dtype: torch.dtype) -> None:
    cap, name = scale_cap(dtype)
    if not largest <= cap:  # NaN too
        raise InputError(
            field,
            f"times its coefficient reaches {largest:.3g}; a layer input in {name} can take at most {cap:.3g} "
            "(more would turn the hidden state into infinities)",
        )


def start_ids(tokenizer) -> list[int]:
    """The document-start token the engine (and steering/training.py) puts before a text:
    `<|endoftext|>` when the vocabulary has it, else BOS, else EOS (see `SteeringEngine._bos_ids`)."""
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() else None
    for candidate in (endoftext, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return [candidate]
    return []


class _InstanceSteer(Steer):
    """llm-steer's `Steer` with per-instance state and an early-stopping capture."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.steers = {}  # shadows the class attribute: this instance's layers only

    def _store_activations_forward(self, layer_idx: int):
        stock = super()._store_activations_forward(layer_idx)

        def capture_then_stop(*args, **kwargs):
            if not self.stop_after_capture:
                return stock(*args, **kwargs)
            self.captured_tensor = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            raise _CaptureDone  # the layers above cannot change this layer's input

        return capture_then_stop

    stop_after_capture = False


class _CaptureDone(Exception):
    pass


class CaptureStopped(SteeringError):
    """The request's stop flag was set while its steering texts were read (`SteeringEngine.stop`)."""

    def __init__(self) -> None:
        super().__init__("stopped while the steering texts were read: nothing was generated")


@dataclass
class _Part:
    """One vector of a batch at one layer: a direction and its coefficient per batch row."""

    direction: torch.Tensor  # (1, 1, H) float32: unit RMS (text, pair) or absolute (raw direction)
    coeffs: torch.Tensor  # (B, 1, 1) float32
    decay: DecaySchedule | None
    absolute: bool
    prompt_only: bool = False  # positions "prompt": added in the prefill (step 0) only


class _LayerSteer:
    """Everything a batch adds at one layer, installed as ONE llm-steer element.

    llm-steer multiplies each element's delta by the RMS of the hidden state the element sees,
    and a second element at the same layer would see the state after the first was added (so
    two texts would compound and their order would matter). As one element, every vector's scale
    comes from the same unsteered hidden state: order does not matter and the same text twice is
    the sum of its coefficients.

    Absolute (raw direction) vectors are added at their raw magnitude, not in RMS units: the
    forward pre-hook `read_input` adds `coeff * direction` to the hidden state itself, at every
    position, before llm-steer runs, which is bit for bit what repeng's `ControlModel` and
    llama.cpp do to the output of the block below (h + v). (Dividing by the RMS and letting
    llm-steer multiply it back, (v / r) * r, is v only up to float rounding.) Relative vectors at
    the same layer still scale with the unsteered state: their delta is multiplied by
    rms(unsteered) / rms(with the raw vectors), which llm-steer's own multiplication by the latter
    turns back into rms(unsteered).
    """

    def __init__(self, layer: int, parts: list[_Part], label: str):
        self.layer = layer
        self.label = label
        zero = torch.zeros(1, 1, 1, device=parts[0].direction.device)
        relative = [p for p in parts if not p.absolute]
        always = [p for p in relative if not p.prompt_only]
        self.fixed = sum((self._rows(p) for p in always if p.decay is None), zero)
        self.decayed = [(self._rows(p), p.decay) for p in always if p.decay is not None]
        # positions "prompt": added in the prefill only (llm-steer's step 0 after `reset_steps`)
        self.prompt = sum((self._rows(p) for p in relative if p.prompt_only), zero)
        self.absolute = self._sum([p for p in parts if p.absolute and not p.prompt_only])  # (B, 1, H)
        self.absolute_prompt = self._sum([p for p in parts if p.absolute and p.prompt_only])
        self.has_relative = bool(relative)
        self.ratio: torch.Tensor | None = None  # (B, 1, 1) rms(unsteered) / rms(+ raw), by `read_input`
        self.step = lambda: 0  # llm-steer's step counter of this layer (set by `installed`)
        self.device = self.fixed.device

    @staticmethod
    def _rows(part: _Part) -> torch.Tensor:
        """The part's delta (B, 1, H), computed for the rows with a nonzero coefficient only: every
        other row (a baseline) gets an exact zero, never 0 x direction (0 x inf is NaN)."""
        steered = part.coeffs.view(-1) != 0
        delta = torch.zeros(part.coeffs.shape[0], 1, part.direction.shape[-1], device=part.direction.device)
        delta[steered] = part.coeffs[steered] * part.direction
        return delta

    @classmethod
    def _sum(cls, parts: list[_Part]) -> torch.Tensor | None:
        deltas = [cls._rows(p) for p in parts]
        return sum(deltas[1:], deltas[0]) if deltas else None

    def read_input(self, module, args, kwargs) -> tuple | None:
        """Forward pre-hook: keep the deltas where the hidden state arrives (on a model dispatched
        across devices, that is the previous layer's device: llm-steer adds before accelerate's
        hook moves the input), and add the raw (absolute) vectors: returns the steered arguments."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hidden.device != self.device:  # once per device: later forwards find them there
            self.device = hidden.device
            self.fixed = self.fixed.to(self.device)
            self.prompt = self.prompt.to(self.device)
            self.decayed = [(part.to(self.device), decay) for part, decay in self.decayed]
            self.absolute = self.absolute.to(self.device) if self.absolute is not None else None
            self.absolute_prompt = self.absolute_prompt.to(self.device) if self.absolute_prompt is not None else None
        raw = self.absolute
        if self.absolute_prompt is not None and self.step() == 0:  # the prefill: the prompt's positions
            raw = self.absolute_prompt if raw is None else raw + self.absolute_prompt
        if raw is None:
            self.ratio = None
            return None
        steered = hidden + raw.to(hidden.dtype)  # (B, T, H): every position, raw magnitude
        if self.has_relative:
            self.ratio = Steer._rms(hidden[:, -1:, :]) / Steer._rms(steered[:, -1:, :])
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": steered}
        return (steered, *args[1:]), kwargs

    def steering_method(self, elem: SteerElement, step: int, layer_idx: int) -> torch.Tensor:
        delta = self.fixed  # (B, 1, H), or a (1, 1, 1) zero when every vector here decays
        for part, decay in self.decayed:
            delta = delta + part * decay(step)
        if step == 0:  # the prefill: the prompt's positions
            delta = delta + self.prompt
        if self.ratio is not None:  # raw vectors were added below: scale by the unsteered state
            delta = delta * self.ratio
        return delta


class SteeringEngine:
    """Per-model steering: capture (cached), install for one request, remove, score."""

    def __init__(self, model, tokenizer, identity: str):
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity
        self.n_layers = len(decoder_layers(model))
        self.device = input_device(model)  # a dispatched model's first parameters may be on "meta"
        self.dtype = model.get_input_embeddings().weight.dtype  # the hidden states' (a 4-bit model's compute dtype)
        # Each layer's own forward: None, or accelerate's hook wrapper on a dispatched model.
        self._own_forwards = [layer.__dict__.get("forward") for layer in decoder_layers(model)]
        self.steer = _InstanceSteer(model, tokenizer)
        self.cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.capture_passes = 0  # forward passes spent capturing (tests and benchmarks read it)
        self.max_capture_rows = estimate.SWEEP_ROWS  # texts per capture pass (1 in an out-of-memory retry)
        self._guard = threading.Lock()  # backstop: the manager's lock already serialises requests
        # The stop flag of the request now reading texts (`capture_for`): every capture pass polls
        # it, and the process's shutdown flag, before each decoder layer it runs.
        self.stop: threading.Event | None = None

    # -- capture -------------------------------------------------------------------------------
    @functools.cached_property
    def _bos_ids(self) -> list[int]:
        """The document-start token prepended before a text.

        `<|endoftext|>` (the pretraining document separator of SmolLM2 and Qwen) when the
        vocabulary has it, else the tokenizer's BOS, else EOS. Measured on SmolLM2: after its BOS
        `<|im_start|>` (a chat marker) the first text token becomes a second attention sink at
        layer 7 (norm ~750 vs ~100) and "logical", "worm" and "Taylor Swift" get cosine 1.00;
        after `<|endoftext|>` it does not.
        """
        return start_ids(self.tokenizer)  # cached: get_vocab() builds a 49k-entry dict (~33 ms)

    def _capture(self, layer: int, ids: list[list[int]], *, early_stop: bool = True) -> torch.Tensor:
        """Run texts (right-padded) to `layer` and return its input hidden states (B, T, H) in fp32."""
        width = max(len(row) for row in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids], device=self.device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], device=self.device)
        steer = self.steer
        self._poll()
        run = decoder_layers(self.model)[: layer + 1 if early_stop else None]  # the layers this pass runs
        polls = [module.register_forward_pre_hook(self._poll, with_kwargs=True) for module in run]
        steer.stop_after_capture = early_stop
        steer._set_forward_fn(ActivationMode.CAPTURE, layer)
        try:
            with torch.inference_mode():
                self.capture_passes += 1
                try:
                    self.model.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
                except _CaptureDone:
                    pass
            return steer.captured_tensor.float()
        finally:
            for hook in polls:
                hook.remove()
            steer.stop_after_capture = False
            steer.reset(layer)
            steer.captured_tensor = None

    def _poll(self, *_hook_args) -> None:
        """Between the layers of a capture pass: end it on shutdown or on the request's stop."""
        lifecycle.check_running()
        if (self.stop is not None and self.stop.is_set()) or lifecycle.request_stopped():  # Stop, or the client left
            raise CaptureStopped()

    def capture_for(self, rows: Sequence[Sequence[tuple[VectorSpec, float]]], mode: str, stop=None) -> None:
        """Read (and cache) every text of `rows` before anything is installed, polling `stop` (a
        threading.Event) and shutdown between layers: raises `CaptureStopped` / `ShuttingDownError`."""
        self.stop = stop
        try:
            for spec in dict.fromkeys(spec for row in rows for spec, _ in row if spec.enabled and not spec.direction):
                self.direction(spec, mode)
        finally:
            self.stop = None

    def layer_inputs(self, layer: int, ids: list[list[int]]) -> torch.Tensor:
        """The hidden states (B, T, H) fp32 entering `layer` for token rows `ids` (right-padded;
        the pass stops at `layer`): what steering/training.py's read projects onto a direction."""
        return self._capture(layer, ids)

    def text_means(self, layer: int, texts: Sequence[str], mode: str) -> list[torch.Tensor]:
        """Mean layer-input vector (H,) of each text, from the cache where possible."""
        if mode not in CAPTURE_MODES:
            raise InputError("capture_mode", f"must be one of {', '.join(CAPTURE_MODES)}; got {limits.shorten(mode)}")
        keys = [(self.identity, layer, text, mode) for text in texts]
        missing = list(dict.fromkeys(text for key, text in zip(keys, texts) if key not in self.cache))
        if missing:
            for text, vector in zip(missing, self._capture_means(layer, missing, mode)):
                self.cache[(self.identity, layer, text, mode)] = vector
        out = []
        for key in keys:
            self.cache.move_to_end(key)
            out.append(self.cache[key])
        while len(self.cache) > CACHE_ENTRIES:
            self.cache.popitem(last=False)
        return out

    def _capture_means(self, layer: int, texts: list[str], mode: str) -> list[torch.Tensor]:
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        if mode == "stock":
            # Exactly llm-steer's Steer.add: no special tokens, mean over every position, full pass.
            return [self._capture(layer, [encode(t)], early_stop=False)[0].mean(dim=0) for t in texts]
        if mode == "contexts":
            means = self._context_means(layer, texts)
            neutral_key = (self.identity, layer, "\x00fillers", mode)
            if neutral_key not in self.cache:
                self.cache[neutral_key] = torch.stack(self._context_means(layer, CONTEXT_FILLERS)).mean(dim=0)
            self.cache.move_to_end(neutral_key)  # used by every text at this layer: keep it in the LRU
            return [m - self.cache[neutral_key] for m in means]
        rows = [self._bos_ids + encode(t) for t in texts]
        means = []
        for start in range(0, len(rows), self.max_capture_rows):  # the batch shape the plan prices
            chunk = rows[start : start + self.max_capture_rows]
            hidden = self._capture(layer, chunk)  # (B, T, H)
            for index, row in enumerate(chunk):
                # Position 0 (BOS) is the attention sink whose activation dwarfs the rest: drop it.
                means.append(hidden[index, 1 : len(row)].mean(dim=0))
        if mode == "bos-neutral":
            neutral = torch.stack(self.text_means(layer, NEUTRAL_TEXTS, "bos")).mean(dim=0)
            means = [m - neutral for m in means]
        return means

    def _context_means(self, layer: int, texts: Sequence[str]) -> list[torch.Tensor]:
        """Per text: the mean over `CONTEXT_TEMPLATES` of the sentence's mean layer input (BOS
        dropped), every sentence of every text as rows of a few capture passes."""
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        rows = [self._bos_ids + encode(t.format(text)) for text in texts for t in CONTEXT_TEMPLATES]
        sentence_means = []
        for start in range(0, len(rows), self.max_capture_rows):
            chunk = rows[start : start + self.max_capture_rows]
            hidden = self._capture(layer, chunk)  # (B, T, H)
            sentence_means += [hidden[i, 1 : len(row)].mean(dim=0) for i, row in enumerate(chunk)]
        per_text = len(CONTEXT_TEMPLATES)
        return [torch.stack(sentence_means[i * per_text : (i + 1) * per_text]).mean(dim=0) for i in range(len(texts))]

    def layer_rms(self, layer: int) -> float:
        """Typical RMS of one token's hidden state entering `layer` while the model writes a reply:
        the scale that turns a relative coefficient into an absolute vector (control vector
        export). llm-steer multiplies by the RMS at the last position, which in a generation is
        the reply's newest token, so it is measured at the reply tokens of a few neutral chat
        exchanges (`RMS_CHATS`, teacher-forced: the same states decoding computes). Measured on
        SmolLM2-135M: layer 15 gives 6.51 here, 6.27 on its own greedy replies, 6.85 on bare
        neutral texts (the rule before issue 24, which made llama.cpp outputs loop more often
        than ours: bench/interop.py). Cached per model and layer."""
        key = (self.identity, layer, "rms")
        if key not in self.cache:
            rows, starts = [], []
            for user, reply in RMS_CHATS:
                prompt = self._chat_prompt_ids(user)
                starts.append(len(prompt))
                rows.append(prompt + self.tokenizer.encode(reply, add_special_tokens=False))
            hidden = self._capture(layer, rows)  # (B, T, H) fp32
            per_token = torch.cat(
                [Steer._rms(hidden[i, start : len(row)]).view(-1) for i, (row, start) in enumerate(zip(rows, starts))]
            )
            self.cache[key] = per_token.mean()
        self.cache.move_to_end(key)
        return float(self.cache[key])

    def _chat_prompt_ids(self, user: str) -> list[int]:
        """A user turn ready for the assistant's reply (as `generate.prompt_ids`, which sits above us)."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return tok.encode(f"user: {user}\nassistant:")
        ids = tok.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return list(ids[0] if ids and isinstance(ids[0], list) else ids)

    def direction(self, spec: VectorSpec, mode: str) -> torch.Tensor:
        """The unit-RMS direction (1, 1, H) of a vector, as llm-steer normalises it."""
        if spec.direction:  # absolute: added as given (times its coefficient)
            return torch.tensor(spec.direction, dtype=torch.float32, device=self.device).view(1, 1, -1)
        if spec.contrastive:
            pos, neg = self.text_means(spec.layer, [spec.positive, spec.negative], mode)
            raw = pos - neg
        else:
            raw = self.text_means(spec.layer, [spec.text], mode)[0]
        # captured where the layer's input arrives; built here beside the batch-row coefficients
        return self.steer._normalize_direction(raw.view(1, 1, -1)).float().to(self.device)

    def similarity(
        self, items: Sequence[str | tuple[str, str]], layer: int, mode: str = DEFAULT_CAPTURE_MODE
    ) -> list[list[float]]:
        """Cosine matrix of the items' vectors at `layer` (the Vectors heatmap): a text's vector, or
        for a (positive, negative) pair the difference vector that steers."""
        texts = list(dict.fromkeys(t for item in items for t in ((item,) if isinstance(item, str) else item)))
        means = dict(zip(texts, self.text_means(layer, texts, mode), strict=True))
        vectors = torch.stack([means[i] if isinstance(i, str) else means[i[0]] - means[i[1]] for i in items])
        unit = torch.nn.functional.normalize(vectors, dim=-1)
        return (unit @ unit.T).clamp(-1, 1).tolist()

    # -- installation --------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self, rows: Sequence[Sequence[tuple[VectorSpec, float]]], mode: str) -> Iterator[list[int]]:
        """Install the vectors of each batch row for the duration of the block.

        `rows[b]` lists (vector, coefficient) pairs active in row b; a row with none is unsteered.
        Yields the sorted layers used. Everything is removed in `finally`, whatever happens.
        """
        n_rows = len(rows)
        grouped: dict[tuple, tuple[VectorSpec, torch.Tensor]] = {}
        for b, row in enumerate(rows):
            for spec, coeff in row:
                if not spec.enabled:
                    continue
                key = (spec.layer, spec.text, spec.positive, spec.negative, spec.direction, spec.decay, spec.positions)
                if key not in grouped:
                    grouped[key] = (spec, torch.zeros(n_rows, 1, 1, device=self.device))
                grouped[key][1][b] += coeff
        with self._guard:
            # Capture everything before installing anything: no capture runs through a steered layer.
            by_layer: dict[int, list[tuple[VectorSpec, _Part]]] = {}
            for spec, coeffs in grouped.values():
                part = _Part(
                    self.direction(spec, mode), coeffs, spec.decay, bool(spec.direction), spec.positions == "prompt"
                )
                by_layer.setdefault(spec.layer, []).append((spec, part))
            for layer, items in by_layer.items():
                self._check_reach(layer, [p for _, p in items])
            elements = [
                _LayerSteer(layer, [p for _, p in items], " + ".join(s.label for s, _ in items))
                for layer, items in by_layer.items()
            ]
            hooks = []
            try:
                for element in sorted(elements, key=lambda e: -e.layer):
                    layer_module = decoder_layers(self.model)[element.layer]
                    hooks.append(layer_module.register_forward_pre_hook(element.read_input, with_kwargs=True))
                    element.step = functools.partial(lambda layer: self.steer.steers[layer].step, element.layer)
                    self.steer._add_steer_vector(
                        element.layer,
                        SteerElement(
                            text=element.label,
                            tensor=torch.zeros(1),
                            coeff=0.0,
                            steering_method=element.steering_method,
                        ),
                    )
                self.reset_steps()
                yield sorted(by_layer)
            finally:
                for hook in hooks:
                    hook.remove()
                self.steer.reset_all()

    def _check_reach(self, layer: int, parts: list[_Part]) -> None:
        """The raw directions one batch row adds at `layer`, times their coefficients, within what
        the model's dtype holds (each vector was checked against float32 when it was parsed)."""
        absolute = [p for p in parts if p.absolute]
        if absolute:
            peaks = [float(p.direction.abs().max()) for p in absolute]
            per_part = [
                [abs(c) * peak if c else 0.0 for c in p.coeffs.view(-1).tolist()] for p, peak in zip(absolute, peaks)
            ]
            largest = max(sum(row) for row in zip(*per_part))  # a row with coefficient 0 adds nothing (masked)
            _check_reach(largest, f"vectors (the directions at layer {layer})", self.dtype)

    def reset_steps(self) -> None:
        """Zero llm-steer's per-layer step counters (decay schedules count from each generation)."""
        for data in self.steer.steers.values():
            data.step = 0

    def is_clean(self) -> bool:
        """True when nothing is installed: every layer runs its own forward (on a dispatched
        model, accelerate's hook wrapper it had before any steering)."""

        def own(layer, original) -> bool:
            forward = layer.__dict__.get("forward")
            if forward is None or forward is original:
                return True
            return getattr(forward, "__self__", None) is layer and forward.__func__ is type(layer).forward

        return not self.steer.steers and all(
            own(layer, original) for layer, original in zip(decoder_layers(self.model), self._own_forwards)
        )

    def close(self) -> None:
        """Forget the model: called by the manager before it drops a model."""
        with contextlib.suppress(Exception):
            self.steer.reset_all()
        self.cache.clear()
        self.steer.model = None
        self.steer.tokenizer = None
        self.model = None
        self.tokenizer = None


def engine_for(loaded) -> SteeringEngine:
    """The engine attached to a loaded model (created on first use, closed by the manager)."""
    engine = loaded.extras.get("engine")
    if engine is None:
        engine = SteeringEngine(loaded.model, loaded.tokenizer, loaded.identity)
        loaded.extras["engine"] = engine
    return engine
