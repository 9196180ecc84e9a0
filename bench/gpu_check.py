"""GPU check of the 8 GB reference-card scenario, for a CUDA machine without internet (e.g. an H200).

In one process, in this order, each step's numbers going into one JSON file, a short table last:

1. The CUDA context (device memory in use beyond the allocator's, after CUDA starts) and the
   device's copy bandwidth.
2. Random-weight models with the real architectures of the catalog (`steering.catalog`), built
   from the ModelSpec numbers (nothing is downloaded) and saved to local folders with a byte-level
   tokenizer made in code. Qwen2.5-1.5B (the fallback) and Llama-3.2-1B are built whole; the 7B
   models at 2 and 4 layers, extrapolated per layer to full depth (whole, each is ~15 GB of
   files to write and load; `--full` builds them whole anyway).
3. The reference card: the manager's VRAM limit of 8 GiB (`torch.cuda.set_per_process_memory_
   fraction`, as `--vram-limit 8GiB` does) and a 0.7 GiB ballast tensor standing in for the desktop.
4. For each model in 4bit and bf16, through the real loader (`manager.load(folder, quant,
   force=True)`): load, capture a steering vector, one steered compare generation (steered +
   baseline rows) at a 2048-token context. Estimated (`steering.estimate`) vs measured bytes per
   term, measured with `torch.cuda.max_memory_allocated/reserved` and the CUDA context.
5. A real out-of-memory error: Qwen2.5-7B's full architecture in bf16 forced onto the card. The
   manager must downgrade to the fallback (a random Qwen2.5-1.5B saved locally, set through
   `manager.configure(fallback_model=...)`) and record the event. The plan's own refusal (no
   force) is shown too.
6. Expandable segments active; five model switches without memory growth; decode tokens/s of the
   fallback vs the bound set by memory bandwidth (model bytes read per token / copy bandwidth).

`--dry-run` runs all of it on CPU at toy sizes (hidden 64, 2 layers) against a simulated NVML
reference card (`steering.gpu.simulate_gpu`), in well under a minute, so CI keeps the script
working. Its memory readings are process RSS: the structure counts there, not the ratios, and the
out-of-memory step can only be the plan's refusal (there is no CUDA allocator to run out of).

Usage: `python bench/gpu_check.py [--dry-run] [--out FILE] [--budget-s 480] [--full]`. The JSON
goes to `--out`, else `$OUT/gpu_check.json` when `OUT` is set, else `bench/results/`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import steering  # noqa: E402  (sets the allocator variables before torch is imported)

logger = logging.getLogger("bench.gpu_check")

MiB, GiB = 1024**2, 1024**3
CARD_BYTES = 8 * GiB  # the reference RTX 2070 SUPER
DESKTOP_BYTES = int(0.7 * GiB)  # Xorg + gnome-shell + a browser (field notes: 0.5-0.8 GB)
STEER_TEXT = "the lighthouse keeper"
QUANTS = ("4bit", "bf16")


@dataclass
class Scale:
    """Sizes of one run: the real check or the CPU dry run."""

    context_tokens: int
    new_tokens: int
    decode_tokens: int
    ballast_bytes: int
    copy_bytes: int
    partial_depths: tuple[int, int]  # depths built for the 7B models, extrapolated to full depth
    unit: tuple[int, str]  # how the printed tables count bytes


REAL = Scale(2048, 8, 64, DESKTOP_BYTES, 1 * GiB, (2, 4), (MiB, "MiB"))
DRY = Scale(64, 4, 8, 1 * MiB, 16 * MiB, (1, 2), (1024, "KiB"))


def resized(spec, **changes):
    """`spec` with other numbers, its parameter count recomputed from the new shapes."""
    from steering.catalog import count_params

    changed = replace(spec, **changes)
    return replace(changed, n_params=count_params(changed))


def toy(spec):
    """The same family (biases, tying, grouped KV heads) at toy size, for the dry run."""
    return resized(
        spec, n_layers=2, hidden_size=64, intermediate_size=128, n_heads=4,
        n_kv_heads=2 if spec.n_kv_heads < spec.n_heads else 4, head_dim=16, vocab_size=512,
    )  # fmt: skip


# --- memory readings ----------------------------------------------------------------------------
class Meter:
    """Bytes in use and their peak: the CUDA caching allocator on a GPU; process RSS on CPU,
    sampled every 2 ms by a thread (rough, but the dry run only needs the plumbing)."""

    def __init__(self, cuda: bool):
        import psutil

        self.cuda = cuda
        self._proc = psutil.Process()
        self._peak = 0
        if not cuda:
            threading.Thread(target=self._sample, daemon=True, name="rss-sampler").start()

    def _sample(self) -> None:
        while True:
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def allocated(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.cuda else self._proc.memory_info().rss

    def reserved(self) -> int:
        import torch

        return torch.cuda.memory_reserved() if self.cuda else self._proc.memory_info().rss

    def reset_peak(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._peak = self._proc.memory_info().rss

    def peaks(self) -> tuple[int, int]:
        """(peak allocated, peak reserved) since `reset_peak`."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        peak = max(self._peak, self._proc.memory_info().rss)
        return peak, peak

    def settle(self) -> None:
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def device_used(self) -> tuple[int, str]:
        """Device memory in use by every process, and where the figure comes from.

        NVML first: it creates no CUDA context, so it can be read before CUDA starts. Without
        NVML, CUDA's own reading, but only once CUDA runs (it would start the context it measures).
        """
        import torch

        from steering import gpu

        if not self.cuda:
            return 0, "cpu"
        reading = gpu.probe(torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
        if reading.mode == "cuda":
            return reading.used_bytes, "nvml"
        if not torch.cuda.is_initialized():
            return 0, "none"
        free, total = torch.cuda.mem_get_info()
        return total - free, "cuda"

    def context_bytes(self, used_before_cuda: int) -> int:
        """The CUDA context, kernels and libraries: device memory in use beyond the allocator's."""
        return max(0, self.device_used()[0] - used_before_cuda - self.reserved()) if self.cuda else 0


def copy_bandwidth(meter: Meter, n_bytes: int) -> float:
    """Bytes/s read + written by a device-to-device (or RAM) copy: what a decode step can stream."""
    import torch

    device = "cuda" if meter.cuda else "cpu"
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        if meter.cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(4):
            dst.copy_(src)
        if meter.cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) / 4)
    del src, dst
    meter.settle()
    return 2 * n_bytes / statistics.median(times)


def model_bytes(model) -> int:
    """Bytes a loaded model holds, bitsandbytes' quantization state included (the estimate's own
    measuring function when it has one; else parameters and buffers)."""
    from steering import estimate

    measured = getattr(estimate, "measured_weights_bytes", None)
    if measured is not None:
        return measured(model)
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


# --- random-weight models -----------------------------------------------------------------------
def make_tokenizer():
    """A byte-level tokenizer built in code (no download): one token per byte, plus chat markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )  # fmt: skip


def hf_config(spec, n_layers: int, tokenizer):
    import transformers

    kwargs = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.n_kv_heads,
        tie_word_embeddings=spec.tied_embeddings, max_position_embeddings=32768, dtype="bfloat16",
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    if spec.arch == "qwen2":
        return transformers.Qwen2Config(**kwargs)  # head_dim = hidden / heads, q/k/v biases built in
    if spec.arch == "mistral":
        return transformers.MistralConfig(head_dim=spec.head_dim, sliding_window=None, **kwargs)
    return transformers.LlamaConfig(head_dim=spec.head_dim, attention_bias=spec.o_bias, **kwargs)


def build_model(spec, n_layers: int, folder: Path, tokenizer, *, weights_of: Path | None = None) -> Path:
    """Save a random-weight bf16 model of `spec` at `n_layers` depth (config, weights, tokenizer).

    `weights_of`: link another build's weights instead (a shallower config ignores the extra
    layers; a deeper one gets its missing layers created at load, on the device).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(spec, n_layers, tokenizer)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if weights_of is not None:
        (folder / "model.safetensors").symlink_to(weights_of / "model.safetensors")
        return folder
    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config).state_dict()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are much faster there
    generator = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, meta in shapes.items():
        if spec.tied_embeddings and name == "lm_head.weight":
            continue  # tied: transformers points lm_head at the embedding on load
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(meta.shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(meta.shape, dtype=torch.bfloat16)
        else:
            values = torch.randn(meta.shape, generator=generator, device=device, dtype=torch.bfloat16)
            tensors[name] = values.mul_(0.02).cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@dataclass
class Target:
    """One architecture of the matrix and the depths it is built at."""

    spec: object  # steering.catalog.ModelSpec (full size; toy size in a dry run)
    depths: tuple[int, ...]
    folders: dict[int, Path] = field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return max(self.depths) < self.spec.n_layers


def build_targets(scale: Scale, work: Path, tokenizer, *, dry: bool, full: bool) -> tuple[dict, Path]:
    """Build every model folder; returns the targets by short name and the oversized folder."""
    from steering import catalog

    targets = {}
    for spec in catalog.CATALOG:
        if spec.embedded:
            continue
        big = spec.n_params > 3_000_000_000  # the 7B models: built shallow unless --full
        sized = resized(toy(spec), n_layers=4 if big else 2) if dry else spec
        depths = scale.partial_depths if big and not full else (sized.n_layers,)
        target = Target(sized, depths)
        deepest = max(depths)
        started = time.perf_counter()
        base = build_model(sized, deepest, work / f"{spec.short_name}-L{deepest}", tokenizer)
        target.folders[deepest] = base
        for depth in depths:
            if depth != deepest:
                target.folders[depth] = build_model(
                    sized, depth, work / f"{spec.short_name}-L{depth}", tokenizer, weights_of=base
                )
        logger.info("built %s at depths %s in %.1f s", spec.short_name, depths, time.perf_counter() - started)
        targets[spec.short_name] = target
    # The oversized model: Qwen2.5-7B's full architecture. On a GPU it is forced and runs out of
    # memory for real; the weights are a link to the shallow build (the rest is created on load).
    qwen7 = targets["Qwen2.5-7B-Instruct"]
    real_qwen7 = catalog.get_spec("Qwen/Qwen2.5-7B-Instruct")
    shallow = qwen7.folders[min(qwen7.depths)]
    oversized = build_model(real_qwen7, real_qwen7.n_layers, work / "Qwen2.5-7B-full-config", tokenizer,
                            weights_of=shallow)  # fmt: skip
    return targets, oversized


# --- one model: load, capture, generate, compare with the estimate ------------------------------
def prompt_text(tokenizer, n_tokens: int) -> str:
    text = ("The keeper climbs the stairs and reads the message again. " * (n_tokens // 40 + 2))[:n_tokens]
    assert len(tokenizer.encode(text)) == n_tokens  # one token per byte
    return text


def kv_bytes(model, ids) -> int:
    """Bytes of the KV cache a prefill of `ids` (rows, tokens) leaves behind, read off the cache."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    total = 0
    for layer in getattr(out.past_key_values, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def measure(
    manager, meter: Meter, folder: Path, quant: str, scale: Scale, ctx0: int, ballast_bytes: int, tokenizer
) -> dict:
    """Load `folder` in `quant` through the manager and measure every term of the estimate."""
    import torch

    from steering import catalog, estimate
    from steering.engine import VectorSpec, engine_for
    from steering.generate import Sampling, compare_rows, run_rows
    from steering.loaded import is_oom

    spec = catalog.get_spec(str(folder))
    reading = manager.probe()
    est = estimate.estimate(spec, quant, scale.context_tokens, 2, on_gpu=meter.cuda,
                            compute_capability=reading.compute_capability)  # fmt: skip
    row = {"folder": folder.name, "layers": spec.n_layers, "quant": quant, "estimate": est.breakdown,
           "estimate_need_bytes": est.need_bytes}  # fmt: skip
    manager.release()
    meter.settle()
    base_alloc, base_res = meter.allocated(), meter.reserved()
    events = manager.events.count
    meter.reset_peak()
    started = time.perf_counter()
    manager.load(str(folder), quant, force=True)
    row["load_s"] = time.perf_counter() - started
    if manager.events.since(events):
        row["error"] = f"downgraded while loading: {manager.events.since(events)[-1]['reason']}"
        return row
    load_alloc, load_res = meter.peaks()
    failure = None
    try:
        with manager.exclusive() as loaded:
            weights = meter.allocated() - base_alloc if meter.cuda else model_bytes(loaded.model)
            row["model_bytes"] = model_bytes(loaded.model)
            engine = engine_for(loaded)
            vector = VectorSpec(layer=loaded.default_layer, coeff=4.0, text=STEER_TEXT)
            before_capture = meter.allocated()
            meter.reset_peak()
            engine.direction(vector, "bos-neutral")
            cap_alloc, cap_res = meter.peaks()
            cached = sum(t.numel() * t.element_size() for t in engine.cache.values())
            prompt = prompt_text(tokenizer, scale.context_tokens - scale.new_tokens)
            before_generation = meter.allocated()
            meter.reset_peak()
            result = run_rows(engine, prompt, compare_rows([vector], True), Sampling(max_new_tokens=scale.new_tokens),
                              raw_prompt=True)  # fmt: skip
            gen_alloc, gen_res = meter.peaks()
            row["generated_tokens"] = [len(t) for t in result.token_ids]
            ids = torch.tensor([tokenizer.encode(prompt_text(tokenizer, scale.context_tokens))] * 2,
                               device=engine.device)  # fmt: skip
            kv = kv_bytes(loaded.model, ids)
            context = meter.context_bytes(ctx0)
    except Exception as exc:
        if not is_oom(exc):
            raise
        failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if failure:  # outside the except block, so the traceback's tensors are gone
        manager.release()
        meter.settle()
        row["error"] = failure
        return row
    transient = max(0, load_alloc - base_alloc - weights)
    generation = max(0, gen_alloc - before_generation)
    capture = max(0, cap_alloc - before_capture)
    measured = {
        "weights": weights,
        "kv_cache": kv,
        "activations": max(0, generation - kv),
        "load_extra": max(0, transient - generation),
        "steering_capture": cached + max(0, capture - max(generation, transient)),
        "cuda_context": context,
    }
    # On a GPU everything the process holds counts, persistent workspaces too, less the desktop's
    # ballast; on CPU, RSS also holds Python and torch themselves, so the baseline is taken off.
    total = max(load_res, cap_res, gen_res) - (ballast_bytes if meter.cuda else base_res) + context
    row.update(measured=measured, measured_total_bytes=total, ratio=total / est.need_bytes)
    return row


def extrapolate(target: Target, rows: list[dict], quant: str, context_tokens: int, on_gpu: bool) -> dict | None:
    """Measured total at full depth from two shallow builds: per-layer slope x missing layers.

    Everything but weights and KV cache is per layer-at-a-time, so the total is linear in depth.
    """
    from steering import estimate

    by_depth = {r["layers"]: r for r in rows if r["quant"] == quant and "measured_total_bytes" in r}
    d1, d2 = min(target.depths), max(target.depths)
    if not target.partial or d1 == d2 or d1 not in by_depth or d2 not in by_depth:
        return None
    m1, m2 = by_depth[d1]["measured_total_bytes"], by_depth[d2]["measured_total_bytes"]
    per_layer = (m2 - m1) / (d2 - d1)
    measured = m2 + per_layer * (target.spec.n_layers - d2)
    est = estimate.estimate(target.spec, quant, context_tokens, 2, on_gpu=on_gpu).need_bytes
    return {
        "model": target.spec.short_name, "layers": target.spec.n_layers, "quant": quant, "extrapolated": True,
        "per_layer_bytes": per_layer, "measured_total_bytes": measured, "estimate_need_bytes": est,
        "ratio": measured / est,
    }  # fmt: skip


# --- the scenario steps -------------------------------------------------------------------------
def provoke_downgrade(manager, oversized: Path, *, force: bool) -> dict:
    """Ask for Qwen2.5-7B's full architecture in bf16 (~15 GiB) on the 8 GiB card.

    Without force the plan refuses it before any weight is read; with force (GPU only) loading
    runs out of memory for real. Either way the manager must end on the fallback, with an event.
    """
    from steering import catalog, estimate

    reading = manager.probe()
    need = estimate.estimate(catalog.get_spec(str(oversized)), "bf16", manager.context_tokens, 2,
                             on_gpu=reading.is_gpu).need_bytes  # fmt: skip
    verdict = estimate.verdict(need, reading.headroom_bytes, manager.margin_bytes)
    if not force and verdict == "stable":  # it would really be loaded: ~15 GiB, on the CPU in a dry run
        return {
            "forced": False, "plan_verdict": verdict, "need_bytes": need, "event": None, "downgraded": False,
            "error": f"the plan calls it stable on {reading.name} ({reading.mode})",
            "loaded": {"model": None, "quant": None, "device": None},
        }  # fmt: skip
    events = manager.events.count
    started = time.perf_counter()
    status = manager.load(str(oversized), "bf16", force=force)
    new = manager.events.since(events)
    return {
        "forced": force,
        "plan_verdict": verdict,
        "need_bytes": need,
        "seconds": time.perf_counter() - started,
        "loaded": {"model": status["model"], "quant": status["quant"], "device": status["device"]},
        "event": new[-1] if new else None,
        "downgraded": bool(new) and status["model"] != str(oversized),
    }


def expandable_status(meter: Meter) -> dict:
    """Whether the CUDA allocator really uses expandable segments (after the first allocation)."""
    import torch

    settings = None
    with contextlib.suppress(Exception):  # the settings reader moved between torch versions
        settings = torch._C._accelerator_getAllocatorSettings()
    return {
        "active": steering.log_expandable_segments_status() if meter.cuda else None,
        "allocator_settings": settings,
        "env": {name: os.environ.get(name) for name in steering.ALLOC_CONF_NAMES},
    }


def switches(manager, meter: Meter, plan: list[tuple[Path, str]]) -> dict:
    """Load the plan's models in turn; memory after each load of a model must not grow."""
    loads, first = [], {}
    for folder, quant in plan:
        manager.load(str(folder), quant, force=True)
        meter.settle()
        key = f"{folder.name} {quant}"
        loads.append({"model": key, "allocated_bytes": meter.allocated(), "reserved_bytes": meter.reserved()})
        first.setdefault(key, loads[-1]["allocated_bytes"])
    growth = max(entry["allocated_bytes"] - first[entry["model"]] for entry in loads)
    tolerance = max(64 * MiB, max(first.values()) // 50)  # 2 %: RSS and allocator rounding
    return {"switches": len(plan) - 1, "loads": loads, "growth_bytes": growth, "tolerance_bytes": tolerance,
            "ok": growth <= tolerance}  # fmt: skip


class _StepClock:
    """A generate() streamer stamping each call (the prompt first, then each new token)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        if hasattr(value, "cpu"):
            value.cpu()  # waits for the GPU, so the stamp is when the token exists
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def decode_speed(manager, meter: Meter, folder: Path, quant: str, tokens: int, bandwidth: float) -> dict:
    """Decode tokens/s (batch 1, greedy) vs memory bandwidth / bytes read per token."""
    import torch

    manager.load(str(folder), quant, force=True)
    with manager.exclusive() as loaded:
        model, tok = loaded.model, loaded.tokenizer
        ids = torch.tensor([tok.encode("The keeper reads the message. " * 2)], device=next(model.parameters()).device)
        rates = []
        for _ in range(3):
            clock = _StepClock()
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                               streamer=clock)  # fmt: skip
            steps = [b - a for a, b in zip(clock.stamps[1:], clock.stamps[2:])]
            rates.append(1.0 / statistics.median(steps))
        per_token = model_bytes(model)
        embedding = model.get_input_embeddings().weight
        if not loaded.spec.tied_embeddings:  # an untied input embedding is read one row per token
            per_token -= embedding.numel() * embedding.element_size()
    bound = bandwidth / per_token
    rate = statistics.median(rates[1:])  # the first run warms up kernels
    return {"model": folder.name, "quant": quant, "tokens_per_s": rate, "bytes_per_token": per_token,
            "bound_tokens_per_s": bound, "fraction_of_bound": rate / bound}  # fmt: skip


def sweep_at_fit(manager, meter: Meter, folder: Path, tokenizer, new_tokens: int) -> dict:
    """An 8-row sweep at the sweep limit the manager fitted after loading (estimated vs measured
    peak); then, on a GPU, a real out-of-memory error that the retry with rows apart survives:
    ballast leaves room for one row's request but not for eight."""
    import torch

    from steering import api, estimate, limits

    status = manager.load(str(folder), "4bit", force=True)
    loaded, fit = manager.current, status["fit"]
    per_row = min(fit["sweep_max_tokens"], limits.MAX_PROMPT_CHARS + new_tokens)  # prompts are <= 4000 chars
    prompt = prompt_text(tokenizer, per_row - new_tokens - 1)
    coeffs = [0.0, 0.5, 1.0, 2.0, 4.0, -1.0, -2.0, 8.0]
    device = dict(on_gpu=True, compute_capability=manager.probe().compute_capability)
    meter.settle()
    before = meter.allocated()
    meter.reset_peak()
    result = api.sweep(prompt, STEER_TEXT, loaded.default_layer, coeffs, max_new_tokens=new_tokens)
    peak, _ = meter.peaks()
    out = {
        "model": folder.name,
        "fit": fit,
        "tokens_per_row": per_row,
        "rows": len(result["rows"]),
        "estimated_request_bytes": estimate.request_need_bytes(loaded.spec, "4bit", 8, per_row, **device)
        - estimate.weights_bytes(loaded.spec, "4bit"),
        "measured_request_bytes": peak - before,
        "fallback": result["fallback"],
    }
    if not meter.cuda:
        out["oom_retry"] = "skipped: a real out-of-memory error needs the CUDA allocator"
        return out
    one_row = estimate.request_need_bytes(loaded.spec, "4bit", 1, per_row, **device)
    room = (one_row + estimate.request_need_bytes(loaded.spec, "4bit", 8, per_row, **device)) // 2
    room -= estimate.weights_bytes(loaded.spec, "4bit")
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(max(0, free - room), dtype=torch.uint8, device="cuda").fill_(0)
    try:
        retried = api.sweep(prompt, STEER_TEXT, loaded.default_layer, coeffs, max_new_tokens=new_tokens)
        out["oom_retry"] = {
            "fallback": retried["fallback"],  # recovery "rows one at a time" expected: the model stays
            "model": retried["model"],
            "ballast_bytes": ballast.numel(),
        }
    finally:
        del ballast
        meter.settle()
    return out


# --- output -------------------------------------------------------------------------------------
def _size(n, unit: tuple[int, str]) -> str:
    return "-" if n is None else f"{n / unit[0]:,.0f}"


def print_terms(row: dict, unit: tuple[int, str]) -> None:
    """Estimated vs measured bytes per term for one model (the long form, before the table)."""
    head = f"{row['model']} {row['quant']}, {row['layers']} layers"
    if "error" in row:
        print(f"\n{head}: {row['error']}")
        return
    print(f"\n{head}: loaded in {row['load_s']:.1f} s")
    print(f"  {'term':<18}{'estimated ' + unit[1]:>15}{'measured ' + unit[1]:>15}{'ratio':>8}")
    for term, est in row["estimate"].items():
        got = row["measured"].get(term)
        ratio = f"{got / est:.2f}" if est and got is not None else "-"
        print(f"  {term:<18}{_size(est, unit):>15}{_size(got, unit):>15}{ratio:>8}")
    print(f"  {'total (peak)':<18}{_size(row['estimate_need_bytes'], unit):>15}"
          f"{_size(row['measured_total_bytes'], unit):>15}{row['ratio']:>8.2f}")  # fmt: skip


def summary(result: dict) -> str:
    """The short table printed last."""
    unit = tuple(result["unit"])
    lines = [f"{'model':<30}{'quant':<6}{'layers':>7}{'est ' + unit[1]:>11}{'meas ' + unit[1]:>11}{'ratio':>7}"]
    for row in result["models"] + result["extrapolated"]:
        name = row["model"].removesuffix("-Instruct").removesuffix("-Instruct-v0.3")
        name += " (extrapolated)" if row.get("extrapolated") else ""
        if "error" in row:
            lines.append(f"{name:<30}{row['quant']:<6}{row['layers']:>7}  {row['error'][:60]}")
            continue
        lines.append(f"{name:<30}{row['quant']:<6}{row['layers']:>7}{_size(row['estimate_need_bytes'], unit):>11}"
                     f"{_size(row['measured_total_bytes'], unit):>11}{row['ratio']:>7.2f}")  # fmt: skip
    for down in result["downgrades"]:
        event = down["event"] or {}
        lines.append(f"downgrade ({'forced: real OOM' if down['forced'] else 'plan'}): asked "
                     f"{event.get('asked', {}).get('quant', '?')} 7B, loaded {Path(down['loaded']['model']).name} "
                     f"{down['loaded']['quant']} at stage {event.get('stage', '-')}: "
                     f"{'ok' if down['downgraded'] else 'NO DOWNGRADE'}")  # fmt: skip
    exp = result["expandable_segments"]
    lines.append(f"expandable segments: {exp['active']} ({exp['env'].get('PYTORCH_ALLOC_CONF')})")
    sw = result["switches"]
    if sw:
        lines.append(f"model switches: {sw['switches']}, growth {_size(sw['growth_bytes'], unit)} {unit[1]} "
                     f"(tolerance {_size(sw['tolerance_bytes'], unit)}): {'ok' if sw['ok'] else 'GREW'}")  # fmt: skip
    for dec in result["decode"]:
        lines.append(f"decode {dec['model']} {dec['quant']}: {dec['tokens_per_s']:.1f} tok/s, bandwidth bound "
                     f"{dec['bound_tokens_per_s']:.0f} tok/s ({100 * dec['fraction_of_bound']:.1f} %)")  # fmt: skip
    if result["skipped"]:
        lines.append(f"skipped (time budget): {', '.join(result['skipped'])}")
    lines.append(f"{result['mode']} run on {result['device']['name']}: {result['elapsed_s']:.0f} s")
    return "\n".join(lines)


# --- the run ------------------------------------------------------------------------------------
def run(args) -> dict:
    import torch
    import transformers

    from steering import gpu
    from steering.loader import get_manager

    dry = args.dry_run
    scale = DRY if dry else REAL
    started = time.perf_counter()
    skipped: list[str] = []

    def time_left(step: str, needs_s: float) -> bool:
        if time.perf_counter() - started + needs_s <= args.budget_s:
            return True
        skipped.append(step)
        logger.warning("skipping %s: the %d s budget is nearly spent", step, args.budget_s)
        return False

    if dry:
        gpu.use_nvml(gpu.simulate_gpu(CARD_BYTES, DESKTOP_BYTES))  # the reference card, simulated
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry-run for the CPU version")
    meter = Meter(cuda=not dry)
    used_before_cuda, used_source = meter.device_used()  # before CUDA starts (NVML)
    device = "cuda" if meter.cuda else "cpu"
    if meter.cuda:
        torch.ones(256, 256, device=device) @ torch.ones(256, 256, device=device)  # context + cuBLAS
        torch.cuda.synchronize()
    result: dict = {"mode": "dry-run" if dry else "gpu", "unit": scale.unit, "skipped": skipped}
    result["cuda_context_bytes"] = meter.context_bytes(used_before_cuda)
    result["cuda_context_source"] = used_source
    result["copy_bandwidth_bytes_per_s"] = copy_bandwidth(meter, scale.copy_bytes)

    work = Path(args.work or tempfile.mkdtemp(prefix="steering-gpu-check-"))
    tokenizer = make_tokenizer()
    build_started = time.perf_counter()
    targets, oversized = build_targets(scale, work, tokenizer, dry=dry, full=args.full)
    result["build_s"] = time.perf_counter() - build_started
    meter.settle()
    fallback = targets["Qwen2.5-1.5B-Instruct"].folders[targets["Qwen2.5-1.5B-Instruct"].spec.n_layers]
    llama = targets["Llama-3.2-1B-Instruct"].folders[targets["Llama-3.2-1B-Instruct"].spec.n_layers]

    # The reference card: the app's own VRAM cap, then the desktop's share as a ballast tensor.
    manager = get_manager()
    manager.configure(
        fallback_model=str(fallback),
        vram_limit_bytes=CARD_BYTES,
        context_tokens=scale.context_tokens,
        models_dirs=[str(work)],  # the toy models are loaded as a user would, from an allowed folder
    )
    ballast = torch.empty(scale.ballast_bytes, dtype=torch.uint8, device=device).fill_(0)  # fill: really held
    result["card"] = {"vram_limit_bytes": CARD_BYTES, "ballast_bytes": ballast.numel(),
                      "allocator_room_bytes": CARD_BYTES - ballast.numel()}  # fmt: skip
    result["device"] = manager.probe().to_dict()
    result["expandable_segments"] = expandable_status(meter)

    result["downgrades"] = [provoke_downgrade(manager, oversized, force=False)]
    if meter.cuda:  # a real CUDA out-of-memory error needs a real CUDA allocator
        result["downgrades"].append(provoke_downgrade(manager, oversized, force=True))

    # Warm-up, discarded: the first 4-bit load, capture and generation load libraries and kernels
    # once (RSS on CPU, the context on a GPU), which would otherwise land on the first row.
    first = next(iter(targets.values()))
    measure(manager, meter, first.folders[min(first.depths)], "4bit", scale, used_before_cuda, ballast.numel(),
            tokenizer)  # fmt: skip
    rows = []
    for name, target in targets.items():
        for depth in sorted(target.depths):
            for quant in QUANTS:
                if not time_left(f"{name} {quant} L{depth}", 30 if meter.cuda else 2):
                    continue
                row = {"model": name, **measure(manager, meter, target.folders[depth], quant, scale,
                                                used_before_cuda, ballast.numel(), tokenizer)}  # fmt: skip
                rows.append(row)
                print_terms(row, scale.unit)
    result["models"] = rows
    result["extrapolated"] = [
        ext for name, target in targets.items() for quant in QUANTS
        if (ext := extrapolate(target, [r for r in rows if r["model"] == name], quant, scale.context_tokens,
                               meter.cuda)) is not None
    ]  # fmt: skip

    plan = [(fallback, "4bit"), (llama, "bf16")] * 3  # six loads: five switches
    result["switches"] = switches(manager, meter, plan) if time_left("switches", 60 if meter.cuda else 5) else None
    result["decode"] = []
    for quant in ("4bit", "bf16"):
        if time_left(f"decode {quant}", 30 if meter.cuda else 3):
            bandwidth = result["copy_bandwidth_bytes_per_s"]
            result["decode"].append(decode_speed(manager, meter, fallback, quant, scale.decode_tokens, bandwidth))
    if time_left("sweep at the fitted limit", 60 if meter.cuda else 5):
        result["sweep_at_fit"] = sweep_at_fit(manager, meter, fallback, tokenizer, scale.decode_tokens)
    manager.release()
    del ballast
    meter.settle()
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "cuda": torch.version.cuda}  # fmt: skip
    result["elapsed_s"] = time.perf_counter() - started
    return result


def output_path(args) -> Path:
    if args.out:
        return args.out
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    return ROOT / "bench" / "results" / ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, simulated NVML card")
    parser.add_argument("--full", action="store_true", help="build the 7B models at full depth")
    parser.add_argument("--budget-s", type=int, default=480, help="skip remaining steps past this (default 480)")
    parser.add_argument("--out", type=Path, help="JSON output file")
    parser.add_argument("--work", help="folder for the built models (default: a temp dir, removed after)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.dry_run:
        # The dry run is the CPU path even on a GPU machine: show CUDA only the simulated card's
        # UUID, which no real device has (NVML's simulation matches it; CUDA then sees nothing).
        from steering.gpu import SimulatedGpu

        os.environ["CUDA_VISIBLE_DEVICES"] = SimulatedGpu.uuid
    result = run(args)
    out = output_path(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    logger.info("wrote %s", out)
    print()
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
