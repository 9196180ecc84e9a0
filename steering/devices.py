"""Beyond one card: placing a model across several GPUs, or partly in CPU RAM, planned without weights.

A model that does not fit one card is placed with accelerate's big-model machinery, the same
that `from_pretrained(device_map=...)` uses: a meta-device model built from the catalog numbers
(`AutoConfig.for_model` + `init_empty_weights`: module tree and shapes, no memory),
`get_balanced_memory` to spread the layers over several GPUs, `infer_auto_device_map` to fill
them in order and put what is left in CPU RAM (and, past that, on disk). The budget each device
gets is its headroom minus the margin minus what a request needs there besides weights (CUDA
context, activation peak, load peak, steering capture: one per device that runs layers) and the
KV cache of its layers; the KV cache of layers offloaded to CPU RAM lives on the first GPU, where
accelerate runs them. The placement is then priced exactly with `steering.estimate`'s per-module
bytes, device by device.

Verdicts: `stable` when every device keeps its margin with all layers on GPUs; `offload` when
some layers must stay in CPU RAM (which keeps the margin too); `wont_fit` when RAM is not enough
either, or the quantization cannot be offloaded: bitsandbytes keeps CPU-offloaded layers
unquantized in fp32 (`llm_int8_enable_fp32_cpu_offload`), so 4bit/8bit are only split across GPUs.

The speed of an offloaded model is an estimate, not a measurement: accelerate copies each
offloaded layer's weights to the GPU at every forward pass, so a decoded token costs the CPU
part's bytes over PCIe plus the GPU part's bytes read from VRAM (constants below).

torch, transformers and accelerate are imported lazily (CPU only: no CUDA context is created).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from steering import estimate
from steering.catalog import KNOWN_ARCHS, ModelSpec
from steering.gpu import DeviceReading, format_bytes

logger = logging.getLogger(__name__)

# Host-to-device copies of pageable memory over PCIe 3.0 x16 (the reference card's link): 15.75
# GB/s on paper, ~12 GB/s in practice. VRAM read bandwidth of the reference card: 448 GB/s on
# paper, ~350 GB/s reached by a decoding step. Both are assumptions, stated as such.
PCIE_BYTES_PER_S = 12 * 10**9
GPU_READ_BYTES_PER_S = 350 * 10**9
OFFLOAD_QUANTS = ("fp16", "bf16", "fp32")  # bitsandbytes offloads only unquantized (fp32) layers
_LAYER = re.compile(r"model\.layers\.(\d+)$")


@dataclass
class Placement:
    """Where each part of a model goes and what each device then holds.

    `device_map` is accelerate's (module name -> GPU index, "cpu" or "disk"); `weights` and
    `layers` are per device ("cuda:N", "cpu", "disk"); `bytes` per device includes the KV cache,
    the per-device request overhead and, on the first GPU of an offloaded model, the staging
    copy of the largest offloaded module.
    """

    verdict: str
    device_map: dict = field(default_factory=dict)
    layers: dict[str, int] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    kv_layers: dict[str, int] = field(default_factory=dict)  # layers whose KV cache lives there
    bytes: dict[str, int] = field(default_factory=dict)
    staging_bytes: int = 0  # on the first GPU: the largest offloaded module, copied in to run
    note: str = ""

    @property
    def gpu_names(self) -> list[str]:
        return [d for d in self.bytes if d.startswith("cuda:")]

    def devices(self) -> list[dict]:
        """The plan row's `devices`: [{"device", "layers", "bytes"}], GPUs first, then the CPU."""
        return [{"device": d, "layers": self.layers.get(d, 0), "bytes": self.bytes[d]} for d in self.bytes]

    def offload(self) -> dict | None:
        """The plan row's `offload` (None unless layers stay in CPU RAM)."""
        if self.verdict != "offload":
            return None
        gpu_weights = sum(self.weights.get(d, 0) for d in self.gpu_names)
        seconds = self.weights["cpu"] / PCIE_BYTES_PER_S + gpu_weights / GPU_READ_BYTES_PER_S
        return {
            "gpu_layers": sum(self.layers.get(d, 0) for d in self.gpu_names),
            "cpu_layers": self.layers.get("cpu", 0),
            "gpu_bytes": sum(self.bytes[d] for d in self.gpu_names),
            "cpu_bytes": self.bytes["cpu"],
            "expected_tokens_per_s": round(1 / seconds, 2),
            "basis": (
                f"estimate: the CPU part ({format_bytes(self.weights['cpu'])}) crosses PCIe at "
                f"{PCIE_BYTES_PER_S / 1e9:g} GB/s and the GPU part is read at {GPU_READ_BYTES_PER_S / 1e9:g} GB/s "
                "for every decoded token"
            ),
        }


def single_card(spec: ModelSpec, est: estimate.Estimate, reading: DeviceReading) -> Placement:
    """The whole model on one device (what a stable single-card row is)."""
    where = f"cuda:{reading.cuda_index or 0}" if reading.is_gpu else "cpu"
    return Placement(
        verdict="stable",
        device_map={"": reading.cuda_index or 0} if reading.is_gpu else {"": "cpu"},
        layers={where: spec.n_layers},
        weights={where: est.breakdown["weights"]},
        kv_layers={where: spec.n_layers},
        bytes={where: est.need_bytes},
    )


# -- the meta-device model ----------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def meta_model(spec: ModelSpec):
    """A transformers causal LM of `spec`'s architecture on the meta device (shapes, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = spec.arch if spec.arch in KNOWN_ARCHS else "llama"
    options = {"attention_bias": spec.o_bias, "mlp_bias": spec.mlp_bias} if arch in ("llama", "mistral") else {}
    config = AutoConfig.for_model(
        arch,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.n_layers,
        num_attention_heads=spec.n_heads,
        num_key_value_heads=spec.n_kv_heads,
        head_dim=spec.head_dim,
        tie_word_embeddings=spec.tied_embeddings,
        max_position_embeddings=spec.max_positions,
        **options,
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied lm_head is the embedding: placed with it, counted once
    return model


def _accelerate_dtypes(model, quant: str) -> tuple[object, dict]:
    """(dtype, special_dtypes) for accelerate's module sizes: the linear layers of a decoder
    layer quantized in 4bit/8bit, everything else (embeddings, lm_head, norms, biases) 16-bit."""
    import torch
    from accelerate.utils import CustomDtype

    if quant in OFFLOAD_QUANTS:
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[quant], {}
    kept = {
        name: torch.float16
        for name, _ in model.named_parameters()
        if not (_LAYER.match(name.rsplit(".", 2)[0].rsplit(".", 1)[0]) and name.endswith("proj.weight"))
    }
    return (CustomDtype.INT4 if quant == "4bit" else torch.int8), kept


@contextlib.contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """accelerate warns for every GPU index this process cannot see (a plan for another machine)."""
    noisy = logging.getLogger("accelerate.utils.modeling")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # and about buffers of offloaded layers (a few bytes of rotary)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        noisy.setLevel(level)


# -- exact bytes of each module -----------------------------------------------------------------
def module_bytes(spec: ModelSpec, quant: str) -> dict[str, int]:
    """Exact bytes of the top-level modules accelerate places (the sum is `weights_bytes`)."""
    kept = 4 if quant == "fp32" else 2  # embeddings, lm_head and norms stay 16-bit in 4bit/8bit
    embed = spec.vocab_size * spec.hidden_size * kept
    head = 0 if spec.tied_embeddings else embed
    norm = spec.hidden_size * kept
    rotary = 2 * (spec.head_dim // 2) * 4
    layer = (estimate.weights_bytes(spec, quant) - embed - head - norm - rotary) // spec.n_layers
    sizes = {"model.embed_tokens": embed, "model.norm": norm, "model.rotary_emb": rotary, "lm_head": head}
    sizes.update({f"model.layers.{i}": layer for i in range(spec.n_layers)})
    return sizes


def device_of(name: str, device_map: dict) -> object:
    """The device accelerate's `device_map` gives module `name` (its longest matching prefix)."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in device_map:
            return device_map[prefix]
    raise KeyError(name)


def _device_name(device: object) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


# -- placing ------------------------------------------------------------------------------------
def place(
    spec: ModelSpec,
    quant: str,
    est: estimate.Estimate,
    gpus: Sequence[DeviceReading],
    ram: DeviceReading | None,
    *,
    margin_bytes: int,
) -> Placement:
    """Place `spec` in `quant` for the workload `est`: across `gpus` alone if it fits them, else
    (16-bit and fp32 only) with what is left in `ram`."""
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map

    model = meta_model(spec)
    dtype, special = _accelerate_dtypes(model, quant)
    no_split = list(model._no_split_modules)
    sizes = module_bytes(spec, quant)
    kv_layer = est.breakdown["kv_cache"] // spec.n_layers
    fixed = est.need_bytes - est.breakdown["weights"] - est.breakdown["kv_cache"]  # per GPU that runs layers
    with _quiet_accelerate():
        accelerate_sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special)
    scale = accelerate_sizes["model.layers.0"] / sizes["model.layers.0"]  # ours -> accelerate's (4bit: no scales)
    headroom = {f"cuda:{r.cuda_index}": r.headroom_bytes for r in gpus}

    def fill(offload: bool, balanced: bool = True) -> Placement:
        # accelerate sizes weights only: each GPU's budget leaves room for the KV cache of the layers
        # that run there. Start as if every layer did (too little room), then use the layers the last
        # map gave it, and shrink a GPU that still overflows, until the map holds still. accelerate
        # also keeps room on the first GPU for the largest module in case it is offloaded: without
        # an offload that room is given back.
        bonus = 0 if offload else max(accelerate_sizes[name] for name in sizes if name in accelerate_sizes)
        kv_on = {where: spec.n_layers for where in headroom}
        shrink = dict.fromkeys(headroom, 0)
        placed = best = None
        for _ in range(8):
            max_memory: dict = {}
            for reading in gpus:
                where = f"cuda:{reading.cuda_index}"
                budget = reading.headroom_bytes - margin_bytes - fixed - kv_on[where] * kv_layer - shrink[where]
                budget = int(budget * scale) + (bonus if reading is gpus[0] else 0)
                max_memory[reading.cuda_index] = max(0, budget)
            if offload:
                max_memory["cpu"] = max(0, ram.headroom_bytes - margin_bytes)
            with _quiet_accelerate():
                if len(gpus) > 1 and balanced:  # device_map="auto"; else "sequential"
                    max_memory = get_balanced_memory(
                        model, max_memory, no_split_module_classes=no_split, dtype=dtype, special_dtypes=special
                    )
                device_map = dict(
                    infer_auto_device_map(
                        model, max_memory, no_split_module_classes=no_split, dtype=dtype, special_dtypes=special
                    )
                )
            placed = _priced(spec, quant, device_map, sizes, kv_layer, fixed, gpus, ram, margin_bytes)
            over = {w: placed.bytes[w] + margin_bytes - headroom[w] for w in placed.gpu_names}
            if all(v <= 0 for v in over.values()):
                best = best if best is not None and _gpu_layers(best) >= _gpu_layers(placed) else placed
            kv = {w: placed.kv_layers.get(w, 0) for w in headroom}
            if kv == kv_on and all(v <= 0 for v in over.values()):
                break
            for where, overflow in over.items():  # at least the overflow, doubling while it persists
                if overflow > 0:
                    shrink[where] = max(2 * shrink[where], shrink[where] + overflow)
            kv_on = kv
        return best or placed

    # transformers' device_map="auto" balances the GPUs; where that misses (a model whose embedding
    # outweighs its layers), "sequential" fills them in order.
    on_gpus = fill(offload=False)
    if on_gpus.verdict != "stable" and len(gpus) > 1:
        on_gpus = fill(offload=False, balanced=False)
    if on_gpus.verdict == "stable" or ram is None or quant not in OFFLOAD_QUANTS:
        return on_gpus
    return fill(offload=True)


def _gpu_layers(placement: Placement) -> int:
    return sum(placement.layers.get(w, 0) for w in placement.gpu_names)


def _priced(
    spec: ModelSpec,
    quant: str,
    device_map: dict,
    sizes: dict[str, int],
    kv_layer: int,
    fixed: int,
    gpus: Sequence[DeviceReading],
    ram: DeviceReading | None,
    margin_bytes: int,
) -> Placement:
    """Bytes per device of accelerate's `device_map`, and the verdict they give."""
    placement = Placement(verdict="stable", device_map=device_map)
    first_gpu = f"cuda:{gpus[0].cuda_index}"  # accelerate's main device: runs what is offloaded
    for name, size in sizes.items():
        where = _device_name(device_of(name, device_map))
        placement.weights[where] = placement.weights.get(where, 0) + size
        if _LAYER.match(name):
            placement.layers[where] = placement.layers.get(where, 0) + 1
            runs_on = first_gpu if where in ("cpu", "disk") else where
            placement.kv_layers[runs_on] = placement.kv_layers.get(runs_on, 0) + 1
    offloaded = [size for name, size in sizes.items() if _device_name(device_of(name, device_map)) in ("cpu", "disk")]
    ordered = [f"cuda:{reading.cuda_index}" for reading in gpus] + ["cpu", "disk"]
    for where in ordered:
        if where not in placement.weights and where not in placement.kv_layers:
            continue
        total = placement.weights.get(where, 0)
        if where.startswith("cuda:"):
            total += placement.kv_layers.get(where, 0) * kv_layer + fixed
            if where == first_gpu and offloaded:
                placement.staging_bytes = max(offloaded)  # the offloaded module being copied in
                total += placement.staging_bytes
        placement.bytes[where] = total
    placement.verdict, placement.note = _verdict(placement, quant, gpus, ram, margin_bytes)
    return placement


def _verdict(
    placement: Placement, quant: str, gpus: Sequence[DeviceReading], ram: DeviceReading | None, margin: int
) -> tuple[str, str]:
    headroom = {f"cuda:{reading.cuda_index}": reading.headroom_bytes for reading in gpus}
    short = [
        f"{where} needs {format_bytes(placement.bytes[where])} + {format_bytes(margin)} margin, headroom "
        f"{format_bytes(headroom[where])}"
        for where in placement.gpu_names
        if placement.bytes[where] + margin > headroom[where]
    ]
    if placement.layers.get("disk") or placement.weights.get("disk"):
        if quant not in OFFLOAD_QUANTS:
            return "wont_fit", (
                f"does not fit the GPUs, and bitsandbytes cannot keep {quant} layers in CPU RAM (it would keep "
                "them unquantized in fp32): offload the fp16/bf16 row instead"
            )
        return "wont_fit", "does not fit the GPUs and CPU RAM together"
    if short:
        return "wont_fit", "; ".join(short)
    if "cpu" not in placement.bytes:
        return "stable", f"split across {len(placement.gpu_names)} GPUs"
    if ram is None or placement.bytes["cpu"] + margin > ram.headroom_bytes:
        return "wont_fit", "its CPU part does not fit the available RAM with the margin"
    return "offload", f"{placement.layers.get('cpu', 0)} of its layers stay in CPU RAM"


# -- fitted limits of a split model -------------------------------------------------------------
def split_fit(
    spec: ModelSpec,
    quant: str,
    placement: Placement,
    gpus: Sequence[DeviceReading],
    *,
    margin_bytes: int,
    loaded: bool,
) -> dict:
    """`{"compare_max_tokens", "prompted_max_tokens", "sweep_max_tokens"}` of a split model: the longest prompt + new
    tokens per row with which every GPU keeps its margin. `loaded`: the readings are live and
    already hold the model's weights (and CUDA contexts)."""
    headroom = {f"cuda:{reading.cuda_index}": reading.headroom_bytes for reading in gpus}
    first_gpu = f"cuda:{gpus[0].cuda_index}"
    out = {}
    for key, rows in ((f"{kind}_max_tokens", rows) for kind, rows in estimate.ROWS_BY_KIND.items()):

        def fits(tokens: int, rows: int = rows) -> bool:
            request = estimate.request_estimate(
                spec, quant, rows, tokens, compute_capability=gpus[0].compute_capability
            )
            kv_layer = request.breakdown["kv_cache"] // spec.n_layers
            extra = request.need_bytes - request.breakdown["weights"] - request.breakdown["kv_cache"]
            for where in placement.gpu_names:
                resident = placement.weights.get(where, 0) + estimate.CUDA_CONTEXT_BYTES
                need = extra + placement.kv_layers.get(where, 0) * kv_layer + placement.weights.get(where, 0)
                need += placement.staging_bytes if where == first_gpu else 0
                if loaded:
                    need -= resident
                if need > headroom[where] - margin_bytes:
                    return False
            return True

        out[key] = estimate.largest_fitting(fits, spec.max_positions)
    return out
