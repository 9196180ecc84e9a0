"""Every request limit and default, declared once, and the one checker for numbers.

The engine, generation, the API, the UI's sliders and boxes, and the error messages all read
these declarations, so "1 to 512" is written in exactly one place. Plain Python: no torch, no
gradio. A limit whose range depends on the loaded model (a layer index) is declared here with
`maximum=None` and checked with `check_layer`, which takes the model's layer count.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from steering.errors import InputError


@dataclass(frozen=True)
class Limit:
    """One numeric request field: its default, allowed range, unit and a one-line help."""

    name: str
    default: float | int | None
    minimum: float
    maximum: float | None
    unit: str
    help: str
    integer: bool = False
    min_exclusive: bool = False  # (0, 1] rather than [0, 1]

    def range_text(self, maximum: float | None = None) -> str:
        high = self.maximum if maximum is None else maximum
        if self.integer:
            return f"an integer from {int(self.minimum)} to {int(high)}"  # never 2.14748e+09
        if self.min_exclusive:
            return f"a number in ({self.minimum:g}, {high:g}]"
        return f"a number from {self.minimum:g} to {high:g}"


def _limits(*items: Limit) -> dict[str, Limit]:
    return {item.name: item for item in items}


LIMITS: dict[str, Limit] = _limits(
    Limit("max_new_tokens", 64, 1, 512, "tokens", "tokens to generate per row", integer=True),
    Limit("sweep_max_new_tokens", 32, 1, 512, "tokens", "tokens to generate per sweep row", integer=True),
    Limit("temperature", 0.0, 0.0, 2.0, "", "0 for greedy decoding"),
    Limit("top_p", 1.0, 0.0, 1.0, "", "nucleus sampling threshold", min_exclusive=True),
    Limit("seed", 0, 0, 2**31 - 1, "", "random seed; each batch row samples with its own generator", integer=True),
    # 1.0 with positions "prompt" (the default): the best on-topic-and-fluent rate at the middle
    # layer on the labelled set (docs/quality.md); with positions "all" about 0.45 is.
    Limit("coeff", 1.0, -20.0, 20.0, "× hidden-state RMS", "steering strength; negative steers away"),
    Limit("layer", None, 0, None, "", "decoder layer whose input is steered", integer=True),
    Limit("decay", 1.0, 0.0, 1.0, "", "coefficient multiplier per decoding step", min_exclusive=True),
    Limit("decay_min", 0.0, 0.0, 1.0, "", "floor of the decay multiplier"),
    # 64: a control vector imported from llama.cpp or repeng may hold one direction per layer.
    Limit("vectors", 64, 0, 64, "vectors", "steering vectors per request", integer=True),
    Limit("direction_values", 16384, 1, 16384, "numbers", "length of a raw direction vector", integer=True),
    Limit("text_chars", 1000, 1, 1000, "characters", "length of one steering text", integer=True),
    Limit("prompt_chars", 4000, 1, 4000, "characters", "length of the prompt", integer=True),
    # Reading a text costs about 5 forward passes of its length ("contexts"), under the model lock.
    # Measured on the embedded model, 2 CPU cores: 221 tokens (1,000 characters of English) 2.8 s
    # at layer 15; 3,000 tokens (1,000 emoji) 26 s at layer 15; 1,024 tokens 41 s at layer 29 on
    # a machine loaded 4x. So one text may be 512 tokens and a request's texts 2048 together, each
    # counted once per layer it is read at (issue 26: 64 emoji texts held the model for close to
    # an hour); 64 short texts or pairs of ~16 tokens still fit.
    Limit("text_tokens", 512, 1, 512, "tokens", "tokens of one steering text", integer=True),
    Limit("steering_tokens", 2048, 1, 2048, "tokens", "steering text tokens of one request, per layer", integer=True),
    Limit("sweep_coeffs", 8, 1, 8, "coefficients", "coefficients (rows) of one sweep", integer=True),
    Limit("similarity_texts", 8, 2, 8, "texts", "texts compared in one similarity matrix", integer=True),
    Limit("autotune_layers", 4, 1, 4, "layers", "layers one auto-tune searches", integer=True),
    # A chat (steering/chat.py): each of its two histories, the new exchange included.
    Limit("chat_turns", 16, 1, 16, "exchanges", "exchanges (a message and its reply) one chat holds", integer=True),
    Limit("chat_chars", 24000, 1, 24000, "characters", "characters of all messages of one chat history", integer=True),
    Limit("context", 2048, 128, 32768, "tokens", "context length per row the memory plan prices", integer=True),
    # Training a vector from examples and reading texts with one (steering/training.py).
    Limit("train_examples", 16, 2, 256, "examples", "examples on one side of a training set", integer=True),
    Limit("example_chars", 1000, 1, 1000, "characters", "length of one training example or read text", integer=True),
    Limit("word_chars", 60, 1, 60, "characters", "length of one word of a two-word training request", integer=True),
    Limit("name_chars", 120, 1, 120, "characters", "length of a vector's name", integer=True),
    Limit("read_texts", 256, 1, 512, "texts", "texts one read scores", integer=True),
)

# Names the rest of the code uses for the common bounds (read from the table above).
MAX_NEW_TOKENS = int(LIMITS["max_new_tokens"].maximum)
MAX_SEED = int(LIMITS["seed"].maximum)
COEFF_CAP = float(LIMITS["coeff"].maximum)
DEFAULT_COEFF = float(LIMITS["coeff"].default)
MAX_VECTORS = int(LIMITS["vectors"].maximum)
MAX_TEXT_CHARS = int(LIMITS["text_chars"].maximum)
MAX_PROMPT_CHARS = int(LIMITS["prompt_chars"].maximum)
MAX_SWEEP_ROWS = int(LIMITS["sweep_coeffs"].maximum)
# A raw direction is float32 (numbers beyond this are infinite there). Its delta is divided by the
# hidden state's RMS, at least 1e-3 (llm-steer's eps), and multiplied back: the largest number a
# direction times its coefficient may reach is float32's largest / 1e3 (and, added to the hidden
# state, what the model's dtype holds: 65504 in float16; engine.check_scale).
# Sampling divides the logits by the temperature: at 1e-300 they overflow to infinity and torch
# refuses to sample ("probability tensor contains inf, nan"). Below 0.01 sampling is greedy in all
# but name (the top token's probability rounds to 1), so a positive temperature starts there.
MIN_SAMPLING_TEMPERATURE = 0.01
FLOAT32_MAX = 3.4028234663852886e38
DIRECTION_SCALE_CAP = FLOAT32_MAX / 1e3
# Padded tokens (rows x longest row) of one forward pass of a training or read batch. A training
# pass keeps every layer's hidden states, (layers + 1) x 4096 x hidden floats: 0.29 GB in fp32 on
# SmolLM2-135M, 0.37 GB in fp16 on a 1.5B model; below the sweep's fitted budget on such a card.
BATCH_TOKENS = 4096
# An uploaded examples file (JSONL or CSV): 2 x 256 examples of 1,000 characters fit with room.
MAX_UPLOAD_BYTES = 2_000_000


def check_finite(value, field: str) -> float:
    """A finite number, or `InputError` naming `field`. One rule for every endpoint: booleans
    and numeric strings are not numbers (JSON has numbers; the UI converts what people type)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(field, f"must be a number; got {shorten(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise InputError(field, f"must be a number; got {shorten(value)}") from None
    if not math.isfinite(number):
        raise InputError(field, f"must be a finite number; got {shorten(value)}")
    return number


def check(name: str, value, field: str | None = None, *, maximum: float | None = None) -> float | int:
    """Validate `value` against the limit `name` (an int for integer limits), or raise `InputError`.

    `field` is the name the error shows (default: the limit's name), e.g. "vectors[2].coeff";
    `maximum` overrides a model-dependent upper bound (a layer's is n_layers - 1).
    """
    limit = LIMITS[name]
    field = field or name
    high = limit.maximum if maximum is None else maximum
    number = check_finite(value, field)
    low_ok = number > limit.minimum if limit.min_exclusive else number >= limit.minimum
    if not low_ok or (high is not None and number > high) or (limit.integer and not number.is_integer()):
        raise InputError(field, f"must be {limit.range_text(high)}; got {shorten(value)}")
    return int(number) if limit.integer else number


def check_layer(value, field: str, n_layers: int | None) -> int:
    """A layer index of a model with `n_layers` layers (None: only "a non-negative integer")."""
    if n_layers is None:
        number = check_finite(value, field)
        if not number.is_integer() or number < 0:
            raise InputError(field, f"must be a non-negative integer (a layer index); got {shorten(value)}")
        return int(number)
    return int(check("layer", value, field, maximum=n_layers - 1))


def check_count(name: str, items, field: str) -> list:
    """A list whose length is within the limit `name` (e.g. 1 to 8 sweep coefficients)."""
    limit = LIMITS[name]
    span = f"at most {limit.maximum:g}" if limit.minimum == 0 else f"{limit.minimum:g} to {limit.maximum:g}"
    if not isinstance(items, (list, tuple)):  # JSON gives lists; Python callers may pass tuples
        raise InputError(field, f"must be a list of {span} {limit.unit}")
    if not limit.minimum <= len(items) <= limit.maximum:
        raise InputError(field, f"give {span} {limit.unit}; got {len(items)}")
    return items


def check_text(value, field: str, name: str = "text_chars") -> str:
    """A non-empty text within the character limit `name`."""
    limit = int(LIMITS[name].maximum)
    if not isinstance(value, str) or not value.strip():
        raise InputError(field, f"must be a non-empty text of at most {limit} characters")
    if len(value) > limit:
        raise InputError(field, f"is {len(value)} characters; the limit is {limit}")
    return check_unicode(value, field)


def check_unicode(value: str, field: str) -> str:
    """`value` when it can be written as UTF-8 (no lone surrogate: no tokenizer or file system
    can read one), else `InputError` naming `field`."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(field, "contains a character that is not valid Unicode (a lone surrogate)") from None
    return value


def check_bool(value, field: str) -> bool:
    """A JSON boolean: "false", 0 or None are refused rather than guessed."""
    if not isinstance(value, bool):
        raise InputError(field, f"must be true or false; got {shorten(value)}")
    return value


def shorten(value) -> str:
    """`repr(value)` cut to 60 characters: errors never echo a huge input back."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- vector files (steering/vector_io.py) ---------------------------------------------------------
# Checked before a byte is parsed: every count and size a header claims is held against these and
# against the file's own size, so a 1 KB file cannot make the reader walk 2**40 values (issue 26).
# 64 MiB: our own export of 64 raw directions of 16384 numbers (tensors plus their JSON copy in
# the metadata) is about 30 MiB; a llama.cpp control vector of a 70B model (80 x 8192) is 2.5 MiB.
VECTOR_FILE_BYTES = 64 * 2**20
VECTOR_FILE_TENSORS = 1024  # tensors in one file (a control vector holds one per layer)
VECTOR_FILE_KEYS = 1024  # metadata entries in one file
VECTOR_FILE_ARRAY_VALUES = 65536  # values in all metadata arrays of one file together
VECTOR_FILE_NESTING = 2  # a metadata array may hold arrays, which may not
VECTOR_FILE_NAME_BYTES = 4096  # one metadata key or tensor name
VECTOR_FILE_DIMS = 4  # dimensions of one tensor


def loads_json(text: str, field: str, what: str):
    """`json.loads(text)`, or `InputError` naming `field`: `what` is damaged (not JSON) or nested
    too deeply to read (a crafted file; Python's parser gives up with a recursion error)."""
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise InputError(field, f"has {what} nested too deeply to read") from None
    except ValueError:
        raise InputError(field, f"has {what} that is not valid JSON") from None
