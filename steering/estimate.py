"""Memory need of (model, quantization, context tokens, batch rows), as a breakdown that sums up.

Each term counts tensors that transformers 5.23 / bitsandbytes 0.50 / torch 2.13 allocate (as
read from their code), computed from the architecture numbers in `steering.catalog.ModelSpec`.
`weights` is verified on real models; the other terms are not yet measured on CUDA.

- `weights`: parameters and buffers as loaded. bf16/fp16/fp32: 2/2/4 bytes per parameter. 4bit
  (NF4, double quantization): each linear layer keeps 4-bit codes (n/2 bytes), one uint8 absmax
  per 64-weight block, one fp32 absmax per 256 blocks, an fp32 offset and two small code tables;
  that is ~4.13 bits per weight. Embeddings, an untied `lm_head`, norms and biases stay 16-bit.
  8bit: int8 codes plus one fp32 scale per output row. The rotary `inv_freq` buffers stay fp32.
  Checked exactly against tiny random Qwen2/Llama models on CPU (tests/test_estimate.py).
- `kv_cache`: keys and values of every layer for `rows x context` tokens in the compute dtype.
- `activations`: the largest set of tensors alive at once while prefilling `rows x context`
  tokens through one decoder layer (prefill of the whole context is the worst case; decoding one
  token per row needs far less). For the gated MLP that is three (tokens, intermediate) tensors,
  or two plus the temporary of the running linear layer: in a 4-bit prefill of more than 4 token
  rows bitsandbytes de-quantises the layer's weight to a 16-bit copy (Mistral-7B's 14336x4096 MLP weight: exactly
  112 MiB, the allocation in the field notes' error); in 8-bit it keeps an int32 accumulator.
  Attention on a GPU without a fused kernel for the dtype (bf16 below compute capability 8.0)
  falls back to torch's math SDPA, which holds (rows, heads, T, T) scores and softmax in fp32.
- `load_extra`: how far the load-time peak exceeds the generation peak (usually 0).
  transformers' `caching_allocator_warmup` reserves the weights' own byte count up front and the
  weights are then placed inside it, so it adds nothing beyond `weights`; on-the-fly
  quantization adds the 16-bit staging copy of the largest linear layer (and, in 8-bit, the
  fp16 copy bitsandbytes makes of it) while it is being quantized, one layer at a time.
- `steering_capture`: captured hidden states that stay resident for cached steering vectors,
  plus whatever the 1-row capture pass (full logits over the steering text) needs beyond the
  generation peak (usually 0: it runs between generations, under the model lock).
- `cuda_context`: the CUDA context, kernels and cuBLAS workspace (~450 MiB; 0 on CPU).

The margin (default 1 GiB) is kept out of the sum: `verdict()` compares need + margin with the
headroom. Which model and quantization to load, and where, is steering/planning.py's. What this
says about Mistral-7B 4-bit on the reference card: docs/mistral-note.md. Plain Python: no torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field

from steering.catalog import ModelSpec
from steering.gpu import DeviceReading

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "MARGIN_DEFAULT_BYTES",
    "QUANTS",
    "Estimate",
    "activation_dtype_bytes",
    "estimate",
    "kv_cache_bytes",
    "largest_linear_16bit_bytes",
    "measured_weights_bytes",
    "unquantized_bytes",
    "verdict",
    "weights_bytes",
]

logger = logging.getLogger(__name__)

MiB = 1024**2
GiB = 1024**3

QUANTS = ("4bit", "8bit", "bf16", "fp16", "fp32")
MARGIN_DEFAULT_BYTES = 1 * GiB
CUDA_CONTEXT_BYTES = 450 * MiB

_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
NF4_BLOCK = 64  # weights per absmax (transformers' BitsAndBytesConfig default)
NESTED_BLOCK = 256  # absmax values per fp32 scale in double quantization
NF4_CODE_BYTES = 16 * 4  # the NF4 code table (16 fp32), one per linear layer
NESTED_CODE_BYTES = 256 * 4  # the dynamic map used for the nested absmax (256 fp32), per layer
NF4_OFFSET_BYTES = 4  # fp32 mean of absmax subtracted before nesting, per layer

# Assumptions about the steering workload (steering/engine.py caches captured vectors).
STEERING_TEXT_TOKENS = 64
STEERING_CACHED_VECTORS = 16
# bitsandbytes' CUDA gemm_4bit uses its fused kernel only for a few token rows; above that it
# de-quantises the weight (always above 1536 rows, `_gemm_4bit_custom_max_m`).
BNB_FUSED_MAX_ROWS = 4


def check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTS)}; got {str(quant)[:40]!r}")


def activation_dtype_bytes(quant: str) -> int:
    """Bytes per activation element: fp32 runs in fp32; everything else computes in 16-bit."""
    return 4 if quant == "fp32" else 2


def _layer_linears(spec: ModelSpec) -> list[tuple[int, int]]:
    """(out_features, in_features) of the seven linear layers of one decoder layer."""
    h, i = spec.hidden_size, spec.intermediate_size
    q_out, kv_out = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    return [(q_out, h), (kv_out, h), (kv_out, h), (h, q_out), (i, h), (i, h), (h, i)]


def _linear_params(spec: ModelSpec) -> int:
    return spec.n_layers * sum(o * i for o, i in _layer_linears(spec))


def _buffers_bytes(spec: ModelSpec) -> int:
    # rotary `inv_freq` and `original_inv_freq`: head_dim/2 fp32 each, whatever the model dtype
    return 2 * (spec.head_dim // 2) * 4


def _nf4_linear_bytes(n: int) -> int:
    blocks = math.ceil(n / NF4_BLOCK)
    nested_scales = math.ceil(blocks / NESTED_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * nested_scales + NF4_OFFSET_BYTES + NF4_CODE_BYTES + NESTED_CODE_BYTES


def unquantized_bytes(spec: ModelSpec, quant: str) -> int:
    """Bytes of what 4bit/8bit leave in 16-bit: embeddings, untied lm_head, norms, biases."""
    check_quant(quant)
    if quant not in ("4bit", "8bit"):
        return spec.n_params * _DTYPE_BYTES[quant]
    return (spec.n_params - _linear_params(spec)) * 2


def weights_bytes(spec: ModelSpec, quant: str) -> int:
    """Bytes the loaded weights occupy (parameters, quantization state and buffers)."""
    check_quant(quant)
    if quant in _DTYPE_BYTES:
        return spec.n_params * _DTYPE_BYTES[quant] + _buffers_bytes(spec)
    linears = [o * i for o, i in _layer_linears(spec)]
    if quant == "4bit":
        quantized = sum(_nf4_linear_bytes(n) for n in linears)
    else:  # 8bit: int8 codes + one fp32 scale per output row
        quantized = sum(o * i + 4 * o for o, i in _layer_linears(spec))
    return spec.n_layers * quantized + unquantized_bytes(spec, quant) + _buffers_bytes(spec)


def measured_weights_bytes(model: object) -> int:
    """Bytes a loaded transformers model really holds: every distinct tensor storage among its
    parameters and buffers, plus bitsandbytes' quantization state (absmax, nested absmax, code
    tables, int8 row scales), which `get_memory_footprint()` leaves out. Imports torch lazily."""
    import torch

    storages: dict[int, int] = {}

    def add(tensor: object) -> None:
        if isinstance(tensor, torch.Tensor):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()

    for param in model.parameters():
        add(param)
        add(getattr(param, "SCB", None))
        state = getattr(param, "quant_state", None)
        if state is not None:
            for tensor in (state.absmax, state.code, state.offset):
                add(tensor)
            # bitsandbytes' CPU kernels repack a state on its first forward pass (the nested
            # absmax is expanded and `state2` deleted), so the attribute may be gone.
            nested = getattr(state, "state2", None)
            if nested is not None:
                add(nested.absmax)
                add(nested.code)
    for buffer in model.buffers():
        add(buffer)
    return sum(storages.values())


def kv_cache_bytes(spec: ModelSpec, quant: str, tokens: int, rows: int) -> int:
    """Keys and values of all layers: 2 x layers x rows x tokens x kv_heads x head_dim x dtype."""
    per_token = 2 * spec.n_kv_heads * spec.head_dim * activation_dtype_bytes(quant)
    return spec.n_layers * rows * tokens * per_token


def largest_linear_16bit_bytes(spec: ModelSpec) -> int:
    """A 16-bit copy of the model's largest linear weight: what a 4-bit prefill de-quantises and
    what 4-bit loading stages on the device (Mistral-7B: 14336 x 4096 x 2 bytes = 112 MiB)."""
    return max(o * i for o, i in _layer_linears(spec)) * 2


def _linear_temp_bytes(quant: str, tokens: int, out_f: int, in_f: int, act: int) -> int:
    """Temporary bytes a linear layer holds beyond its output while `tokens` rows go through it."""
    if quant == "4bit" and tokens > BNB_FUSED_MAX_ROWS:
        # de-quantised weight in the compute dtype + the fp32 absmax rebuilt from the nested one
        return out_f * in_f * act + 2 * 4 * math.ceil(out_f * in_f / NF4_BLOCK)
    if quant == "8bit":
        # int8 copy of the input, its fp16 cast, and the int32 accumulator of the output
        return tokens * in_f * 3 + tokens * out_f * 4
    return 0


def _prefill_peak_bytes(spec: ModelSpec, quant: str, tokens_per_row: int, rows: int, *, math_attention: bool) -> int:
    """Largest set of activation tensors alive at once in a prefill of rows x tokens_per_row."""
    a = activation_dtype_bytes(quant)
    n = rows * tokens_per_row
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    nh = n * h * a  # one (tokens, hidden) tensor
    ni = n * i * a  # one (tokens, intermediate) tensor
    nq = n * spec.n_heads * d * a  # queries (tokens, heads, head_dim)
    nkv = n * spec.n_kv_heads * d * a

    def temp(out_f: int, in_f: int) -> int:
        return _linear_temp_bytes(quant, n, out_f, in_f, a)

    # Attention: the layer input and its normed copy stay alive (2 nh). Rotary embedding of q
    # holds q, q*cos, rotate_half(q)*sin and the result (4 nq); SDPA with a padding mask gets
    # keys/values repeated to every query head (2 nq) next to q and the output.
    attention = 2 * nh + max(
        nq + 2 * nkv + temp(spec.n_heads * d, h),
        4 * nq + 3 * nkv,
        4 * nq,
        2 * nq + nh + temp(h, spec.n_heads * d),
    )
    if math_attention:
        # torch's math SDPA: (rows, heads, T, T) scores and softmax in fp32, fp32 q/k/v copies
        attention += 2 * rows * spec.n_heads * tokens_per_row**2 * 4 + 3 * n * spec.n_heads * d * 4
    # MLP: layer input, residual and normed input alive (3 nh); then gate -> act -> up -> mul -> down
    mlp = 3 * nh + max(
        ni + temp(i, h),  # gate_proj running
        2 * ni + temp(i, h),  # up_proj running next to act(gate)
        3 * ni,  # act(gate) * up: both inputs and the product
        ni + nh + temp(h, i),  # down_proj running
    )
    # RMSNorm in fp32: the fp32 copy and its square / normalised product (2 x n*h*4)
    norm = 3 * nh + 2 * n * h * 4
    # Alive across all layers: rotary cos/sin and the boolean padding mask (rows, 1, T, T)
    shared = 2 * n * d * a + rows * tokens_per_row**2
    return max(attention, mlp, norm) + shared


def _sampling_bytes(spec: ModelSpec, quant: str, rows: int) -> int:
    # generate() keeps the last position's logits and an fp32 copy; processors add one more
    return rows * spec.vocab_size * (activation_dtype_bytes(quant) + 2 * 4)


@dataclass
class Estimate:
    """Bytes a (model, quant, context, rows) needs; `need_bytes == sum(breakdown.values())`."""

    model_id: str
    quant: str
    context_tokens: int
    batch_rows: int
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def need_bytes(self) -> int:
        return sum(self.breakdown.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "need_bytes": self.need_bytes}


def estimate(
    spec: ModelSpec,
    quant: str,
    context_tokens: int = 2048,
    batch_rows: int = 2,
    *,
    on_gpu: bool = True,
    compute_capability: tuple[int, int] | None = None,
) -> Estimate:
    """The memory a generation of `batch_rows` rows x `context_tokens` tokens needs.

    Args:
        spec: architecture numbers (from `steering.catalog.get_spec`).
        quant: one of QUANTS.
        context_tokens: prompt + new tokens per row; the prefill is assumed to cover all of it.
        batch_rows: rows generated together (2: the steered and the baseline row of a compare).
        on_gpu: False for a CPU run (no CUDA context; compared with system RAM).
        compute_capability: of the GPU, to know whether bf16 gets a fused attention kernel
            (needs 8.0+); None assumes it does.
    """
    check_quant(quant)
    if context_tokens < 1 or batch_rows < 1:
        raise ValueError("context_tokens and batch_rows must be at least 1")
    math_attention = bool(
        on_gpu and quant == "bf16" and compute_capability is not None and tuple(compute_capability) < (8, 0)
    )
    weights = weights_bytes(spec, quant)
    kv = kv_cache_bytes(spec, quant, context_tokens, batch_rows)
    activations = _prefill_peak_bytes(spec, quant, context_tokens, batch_rows, math_attention=math_attention)
    activations = max(activations, _sampling_bytes(spec, quant, batch_rows))
    generation_peak = kv + activations

    load_transient = _load_transient_bytes(spec, quant)
    load_extra = max(0, load_transient - generation_peak)

    act = activation_dtype_bytes(quant)
    captured = STEERING_CACHED_VECTORS * STEERING_TEXT_TOKENS * spec.hidden_size * act
    capture_pass = (
        kv_cache_bytes(spec, quant, STEERING_TEXT_TOKENS, 1)
        + _prefill_peak_bytes(spec, quant, STEERING_TEXT_TOKENS, 1, math_attention=math_attention)
        + STEERING_TEXT_TOKENS * spec.vocab_size * act  # llm-steer calls model(tokens): all logits
    )
    capture_extra = max(0, capture_pass - max(generation_peak, load_transient))

    breakdown = {
        "weights": weights,
        "kv_cache": kv,
        "activations": activations,
        "load_extra": load_extra,
        "steering_capture": captured + capture_extra,
        "cuda_context": CUDA_CONTEXT_BYTES if on_gpu else 0,
    }
    return Estimate(spec.id, quant, context_tokens, batch_rows, breakdown)


# -- pricing a request ----------------------------------------------------------------------------
# Rows per batch of each request kind: a compare is the steered and the baseline row (and the
# prompted row with prompted=True: 3), a sweep (and an auto-tune batch) up to 8 coefficient rows.
# The plan's standard workload: a compare at the planned context and a sweep of SWEEP_PLAN_TOKENS
# tokens per row.
COMPARE_ROWS = 2
PROMPTED_ROWS = 3  # a compare with the prompted row (/steer or /chat with prompted=True)
SWEEP_ROWS = 8
ROWS_BY_KIND = {"compare": COMPARE_ROWS, "prompted": PROMPTED_ROWS, "sweep": SWEEP_ROWS}
KIND_WORDS = {"compare": "compare", "prompted": "prompted compare (3 rows)", "sweep": "sweep"}
SWEEP_PLAN_TOKENS = 256
# Lean scoring (steering/generate.py) turns at most this many logits into log-probs at once.
SCORE_CHUNK_ELEMENTS = 2**22


def scoring_chunk_bytes(quant: str) -> int:
    """One chunk of lean scoring: logits in the compute dtype, their fp32 copy and log-softmax."""
    return SCORE_CHUNK_ELEMENTS * (activation_dtype_bytes(quant) + 4 + 4)


def request_estimate(
    spec: ModelSpec,
    quant: str,
    rows: int,
    tokens_per_row: int,
    *,
    on_gpu: bool = True,
    compute_capability: tuple[int, int] | None = None,
) -> Estimate:
    """Everything one request of `rows` x `tokens_per_row` (prompt + new tokens) needs, weights
    included: a compare (2 rows), a sweep or auto-tune batch (up to 8: then with the scoring passes
    after it, the same rows and tokens with logits in chunks: the `scoring` term), a capture or
    similarity pass (texts as rows, at most 8 per pass)."""
    est = estimate(spec, quant, tokens_per_row, rows, on_gpu=on_gpu, compute_capability=compute_capability)
    if rows > COMPARE_ROWS:
        est.breakdown["scoring"] = scoring_chunk_bytes(quant)
    return est


def request_need_bytes(spec: ModelSpec, quant: str, rows: int, tokens_per_row: int, **device) -> int:
    """`request_estimate(...).need_bytes`."""
    return request_estimate(spec, quant, rows, tokens_per_row, **device).need_bytes


def fitted_tokens(
    spec: ModelSpec,
    quant: str,
    rows: int,
    budget_bytes: int,
    *,
    resident_bytes: int = 0,
    on_gpu: bool = True,
    compute_capability: tuple[int, int] | None = None,
) -> int:
    """The largest prompt + new tokens per row whose request fits `budget_bytes`, capped by the
    model's positions; 0 when not even one token fits.

    `resident_bytes` is what `budget_bytes` no longer contains because it is already in use
    (the loaded weights and CUDA context, when the budget is live free memory)."""

    def fits(tokens: int) -> bool:
        need = request_need_bytes(spec, quant, rows, tokens, on_gpu=on_gpu, compute_capability=compute_capability)
        return need - resident_bytes <= budget_bytes

    return largest_fitting(fits, spec.max_positions)


def largest_fitting(fits, high: int) -> int:
    """The largest n in 0..high with fits(n) (fits must be monotone); 0 when not even 1 fits."""
    low = 0  # fits(low) holds (or low == 0); find the last that fits
    if fits(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def fit_limits(spec: ModelSpec, quant: str, reading: DeviceReading, *, margin_bytes: int, loaded: bool) -> dict:
    """`{"compare_max_tokens", "prompted_max_tokens", "sweep_max_tokens"}` of `spec` in `quant` on `reading`, keeping
    `margin_bytes` free. `loaded`: the reading is live and already holds this model (its weights,
    and on CUDA the context), so only what a request adds must fit."""
    resident = 0
    if loaded:
        resident = weights_bytes(spec, quant) + (CUDA_CONTEXT_BYTES if reading.mode == "cuda" else 0)
    budget = reading.headroom_bytes - margin_bytes
    common = dict(resident_bytes=resident, on_gpu=reading.is_gpu, compute_capability=reading.compute_capability)
    return {  # every request kind's limit: compare_max_tokens, prompted_max_tokens, sweep_max_tokens
        f"{kind}_max_tokens": fitted_tokens(spec, quant, rows, budget, **common) for kind, rows in ROWS_BY_KIND.items()
    }


def _load_transient_bytes(spec: ModelSpec, quant: str) -> int:
    """Bytes held beyond the final weights while the largest linear layer is being loaded."""
    if quant not in ("4bit", "8bit"):
        return 0  # tensors land in their final storage; dtype casts happen on the CPU side
    n = max(o * i for o, i in _layer_linears(spec))
    if quant == "4bit":
        # the 16-bit tensor on the device, the fp32 absmax and its offset-subtracted copy
        return 2 * n + 2 * 4 * math.ceil(n / NF4_BLOCK)
    # transformers keeps the 16-bit tensor on the device while bitsandbytes quantizes an fp16 copy
    return 2 * n + 2 * n


def verdict(need_bytes: int, headroom_bytes: int, margin_bytes: int = MARGIN_DEFAULT_BYTES) -> str:
    """'stable' when need + margin fits the headroom, 'fragile' when only need fits, else 'wont_fit'."""
    if need_bytes + margin_bytes <= headroom_bytes:
        return "stable"
    if need_bytes <= headroom_bytes:
        return "fragile"
    return "wont_fit"
