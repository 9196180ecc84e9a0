"""The one model manager: plan -> load -> recover from out-of-memory -> release.

Exactly one `ModelManager` exists per process (`get_manager()`). It owns the model, the tokenizer
and whatever steering state hangs off them, behind one lock that every model call takes. The
policy, from the field notes (`shared/seed/vram-and-model-selection.md`):

* `load(model, quant)` plans first (NVML headroom vs the estimate). A model that is not `stable`
  is replaced by the fallback (Qwen2.5-1.5B-Instruct in 4-bit NF4) unless the user forces it.
* Out of memory while loading or generating: leave the `except` block (its traceback pins the
  frames that hold the big tensors), release everything, load the fallback once and retry once.
* If the fallback cannot be had either (offline, gated, out of memory), the embedded SmolLM2 is
  loaded on CPU. Every downgrade is recorded as an event the UI and `/status` show.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steering import catalog, embedded, estimate, gpu
from steering.errors import InputError, ModelLockedError, ModelUnavailableError

logger = logging.getLogger(__name__)

QUANT_CHOICES = ("auto",) + estimate.QUANTS
_NETWORK_TTL_S = 60.0


@dataclass
class LoadedModel:
    """What the manager holds while a model is loaded. Never put this in `gr.State`."""

    model_id: str
    quant: str
    device: str  # "cpu" or "cuda:N"
    model: Any
    tokenizer: Any
    spec: catalog.ModelSpec
    load_seconds: float
    generation: int  # increments on every load: part of cache keys, so old captures never leak
    # Objects attached by higher layers (the steering engine). Each is closed on release.
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.model.model.layers)

    @property
    def default_layer(self) -> int:
        return self.n_layers // 2

    @property
    def identity(self) -> str:
        return f"{self.model_id}|{self.quant}|{self.generation}"


def map_layer(layer: int, from_layers: int, to_layers: int) -> int:
    """Map a layer index to another model by relative depth (layer 16 of 32 -> 14 of 28)."""
    if from_layers == to_layers:
        return layer
    mapped = round((layer + 0.5) * to_layers / from_layers - 0.5)
    return max(0, min(to_layers - 1, mapped))


def is_oom(exc: BaseException) -> bool:
    """True for every shape an out-of-memory error takes on the way up from CUDA."""
    import torch

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc)
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        if isinstance(exc, RuntimeError) and "out of memory" in text.lower():
            return True
        # accelerate refuses a device_map that does not fit instead of raising OOM
        if isinstance(exc, ValueError) and "dispatched on the CPU or the disk" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def hub_reachable(timeout_s: float = 1.5) -> bool:
    """Whether the model hub answers, decided in ~1.5 s instead of huggingface_hub's ~26 s of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    # DNS resolution ignores the socket timeout, so the probe runs in a thread we can abandon.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout_s + 0.5)
    return bool(result and result[0])


def _release_host_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):  # glibc only: hand freed heap pages back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelManager:
    """Owner of the one loaded model. Use `get_manager()`; do not construct a second one."""

    _instance: ModelManager | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        if ModelManager._instance is not None:
            raise RuntimeError("ModelManager is a singleton: use steering.loader.get_manager()")
        # A plain Lock, not an RLock: a streaming generator may be resumed on another thread and
        # must still be able to release it.
        self._lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._generation = 0
        self._network: tuple[float, bool] | None = None
        self.events: list[dict] = []
        self.event_count = 0  # grows forever, while `events` keeps only the last 50
        self.fallback_model = catalog.FALLBACK_ID
        self.fallback_quant = "4bit"
        self.vram_limit_bytes: int | None = None
        self.margin_bytes = estimate.MARGIN_DEFAULT_BYTES
        self.context_tokens = 2048
        self.locked = False
        self.cuda_index = 0

    # -- configuration -------------------------------------------------------------------------
    def configure(
        self,
        *,
        fallback_model: str | None = None,
        vram_limit_bytes: int | None = None,
        margin_bytes: int | None = None,
        context_tokens: int | None = None,
        lock_model: bool | None = None,
    ) -> None:
        """Set the policy knobs (`--fallback-model`, `--vram-limit`, `--lock-model`, ...)."""
        if fallback_model is not None:
            self.fallback_model = fallback_model
        if vram_limit_bytes is not None:
            self.vram_limit_bytes = vram_limit_bytes
            if self._cuda_available():
                gpu.apply_vram_limit(vram_limit_bytes, self.cuda_index)
        if margin_bytes is not None:
            self.margin_bytes = margin_bytes
        if context_tokens is not None:
            self.context_tokens = context_tokens
        if lock_model is not None:
            self.locked = lock_model

    # -- reading state -------------------------------------------------------------------------
    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def probe(self) -> gpu.DeviceReading:
        return gpu.probe(self.cuda_index, vram_limit_bytes=self.vram_limit_bytes)

    def status(self) -> dict:
        """The JSON-ready status the UI's status line and the `/status` endpoint show."""
        # No lock: status must answer while a load holds it. Take one reference to the model, so
        # a concurrent release cannot pull it away half-way; a released model reads as "loading".
        loaded = self._current
        model = loaded.model if loaded is not None else None
        if model is None:
            loaded = None
        reading = self.probe()
        import psutil

        memory = {
            "device": reading.to_dict(),
            "process_rss_bytes": psutil.Process().memory_info().rss,
            "model_bytes": estimate.measured_weights_bytes(model) if model is not None else 0,
        }
        if loaded and loaded.device.startswith("cuda"):
            import torch

            memory["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.cuda_index)
            memory["cuda_reserved_bytes"] = torch.cuda.memory_reserved(self.cuda_index)
        return {
            "model": loaded.model_id if loaded else None,
            "quant": loaded.quant if loaded else None,
            "device": loaded.device if loaded else None,
            "n_layers": len(model.model.layers) if loaded else None,
            "default_layer": len(model.model.layers) // 2 if loaded else None,
            "locked": self.locked,
            "fallback_model": self.fallback_model,
            "memory": memory,
            "events": list(self.events),
            "event_count": self.event_count,
        }

    # -- the lock ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[LoadedModel]:
        """Hold the model lock and yield the loaded model (loading the default one if none is)."""
        with self._lock:
            if self._current is None:
                self._load_default_locked()
            yield self._current

    def run(self, fn: Callable[[LoadedModel], Any], *, what: str = "request") -> Any:
        """Call `fn(loaded)` under the lock; on out-of-memory, downgrade once and retry once."""
        with self.session() as loaded:
            failure = None
            try:
                return fn(loaded)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                failure = _describe(exc)
            # Outside the except block: the traceback (and the tensors its frames hold) is gone.
            self._recover_locked(failure, stage=what)
            return fn(self._current)

    def stream(self, fn: Callable[[LoadedModel], Iterator[Any]], *, what: str = "request") -> Iterator[Any]:
        """Like `run` for generators: a stream that runs out of memory restarts once on the fallback."""
        with self.session() as loaded:
            failure = None
            try:
                yield from fn(loaded)
                return
            except Exception as exc:
                if not is_oom(exc):
                    raise
                failure = _describe(exc)
            self._recover_locked(failure, stage=what)
            yield from fn(self._current)

    # -- loading -------------------------------------------------------------------------------
    def load(self, model: str, quant: str = "auto", force: bool = False, *, user: bool = True) -> dict:
        """Load `model` (catalog id, hub id in the local cache, or local folder) and return the status.

        Args:
            model: what to load; `SmolLM2-135M-Instruct` is the embedded offline model.
            quant: auto, 4bit, 8bit, bf16, fp16 or fp32.
            force: load even when the plan says the model is not `stable`.
            user: False for the start-up load, which may not be refused by `--lock-model`.
        """
        if user and self.locked:
            raise ModelLockedError("Model switching is disabled on this server (--lock-model).")
        model = (model or "").strip()
        if not model:
            raise InputError("model", "give a model id from the list, a Hugging Face id or a local folder")
        if quant not in QUANT_CHOICES:
            raise InputError("quant", f"must be one of {', '.join(QUANT_CHOICES)}; got {quant!r}")
        with self._lock:
            self._load_locked(model, quant, force, startup=not user)
        return self.status()

    def load_default(self) -> dict:
        """Start-up choice: on a GPU the largest stable model of the matrix, elsewhere the embedded."""
        with self._lock:
            if self._current is None:  # a load that finished while we waited is not replaced
                self._load_default_locked()
        return self.status()

    def release(self) -> None:
        """Free the model and its steering state (used on shutdown and by tests)."""
        with self._lock:
            self._release_locked()

    def _load_default_locked(self) -> None:
        reading = self.probe()
        if reading.mode == "cuda":
            choice = estimate.plan(reading, context_tokens=self.context_tokens, margin_bytes=self.margin_bytes)[
                "choice"
            ]
            self._load_locked(choice["id"], choice["quant"], False, startup=True)
        else:
            self._load_locked(catalog.EMBEDDED_ID, "auto", False, startup=True)

    def _load_locked(self, model: str, quant: str, force: bool, *, startup: bool) -> None:
        reading = self.probe()
        spec = catalog.get_spec(model)  # unknown ids raise here, before anything changes
        quant = self._resolve_quant(spec, quant, reading)
        # Plan first: a model that will not fit is replaced without needing its weights at all.
        verdict, need_bytes = self._verdict(spec, quant, reading)
        if verdict != "stable" and not force and not spec.embedded:
            reason = (
                f"{spec.id} in {quant} needs about {gpu.format_bytes(need_bytes)} but "
                f"{gpu.format_bytes(reading.headroom_bytes)} is free; verdict '{verdict}' "
                f"(a {gpu.format_bytes(self.margin_bytes)} safety margin is kept). Use force to try anyway."
            )
            if not startup and self._current is not None:
                # Keep what is loaded unless the replacement can really be had.
                fallback = self._weights_source(catalog.get_spec(self.fallback_model), self.fallback_model)
                if isinstance(fallback, ModelUnavailableError):
                    raise ModelUnavailableError(
                        f"{reason} The fallback cannot be loaded either ({fallback}); "
                        f"{self._current.model_id} stays loaded."
                    )
            self._fallback_chain_locked(asked=(model, quant), reason=reason, stage="plan", reading=reading)
            return
        source = self._weights_source(spec, model)  # offline / gated: refused, nothing changed
        if isinstance(source, ModelUnavailableError):
            if not startup:
                raise source
            self._fallback_chain_locked(asked=(model, quant), reason=str(source), stage="start-up", reading=reading)
            return
        self._release_locked()
        failure = None
        try:
            self._materialize(spec, source, quant)
            return
        except Exception as exc:  # the old model is gone already: never end with none loaded
            failure = ("out of memory while loading: " if is_oom(exc) else "could not load it: ") + _describe(exc)
        self._release_locked()
        self._fallback_chain_locked(asked=(model, quant), reason=failure, stage="load", reading=reading)

    def _recover_locked(self, failure: str, *, stage: str) -> None:
        asked = (self._current.model_id, self._current.quant) if self._current else ("?", "?")
        on_last_resort = self._current is not None and (
            self._current.spec.embedded
            or (self._current.model_id, self._current.quant)
            == (catalog.get_spec(self.fallback_model).id, self.fallback_quant)
        )
        reading = self.probe()
        self._release_locked()
        if on_last_resort:
            # Already on the fallback: the next step down is the embedded model on CPU.
            self._load_embedded_cpu(
                asked,
                f"out of memory during {stage} on {asked[0]}, already the last step down: {failure}; "
                "the embedded model now runs on CPU",
                reading,
                stage=stage,
            )
            return
        self._fallback_chain_locked(
            asked=asked, reason=f"out of memory during {stage}: {failure}", stage=stage, reading=reading
        )

    def _fallback_chain_locked(
        self, *, asked: tuple[str, str], reason: str, stage: str, reading: gpu.DeviceReading
    ) -> None:
        """Load the fallback once; if it cannot be had, the embedded model on CPU. Never loops."""
        self._release_locked()
        failure = None
        try:
            spec = catalog.get_spec(self.fallback_model)
            source = self._weights_source(spec, self.fallback_model)
            if isinstance(source, ModelUnavailableError):
                raise source
            self._materialize(spec, source, self.fallback_quant)
            self._record(asked, reason, stage, reading)
            return
        except Exception as exc:  # OOM, unavailable, a broken cache, a bitsandbytes error...
            logger.warning("fallback %s failed: %s", self.fallback_model, _describe(exc))
            failure = _describe(exc)
        self._release_locked()
        self._load_embedded_cpu(
            asked,
            f"{reason}; the fallback {self.fallback_model} could not be loaded either ({failure})",
            reading,
            stage=stage,
        )

    def _load_embedded_cpu(
        self, asked: tuple[str, str], reason: str, reading: gpu.DeviceReading, stage: str = "fallback"
    ) -> None:
        spec = catalog.get_spec(catalog.EMBEDDED_ID)
        self._materialize(spec, str(embedded.ensure_converted()), "fp32", device="cpu")
        self._record(asked, reason, stage, reading)

    def _record(self, asked: tuple[str, str], reason: str, stage: str, before: gpu.DeviceReading) -> None:
        loaded = self._current
        after = self.probe()
        event = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": stage,
            "asked": {"model": asked[0], "quant": asked[1]},
            "loaded": {"model": loaded.model_id, "quant": loaded.quant, "device": loaded.device},
            "reason": reason,
            "free_before_bytes": before.headroom_bytes,
            "free_after_bytes": after.headroom_bytes,
        }
        self.events.append(event)
        self.event_count += 1
        del self.events[:-50]  # a bounded log
        logger.warning(
            "downgraded: asked %s %s, loaded %s %s on %s: %s",
            asked[0],
            asked[1],
            loaded.model_id,
            loaded.quant,
            loaded.device,
            reason,
        )

    # -- helpers -------------------------------------------------------------------------------
    def _cuda_available(self) -> bool:
        import torch

        return torch.cuda.is_available()

    def _verdict(self, spec: catalog.ModelSpec, quant: str, reading: gpu.DeviceReading) -> tuple[str, int]:
        need = estimate.estimate_for(spec, quant, reading, self.context_tokens).need_bytes
        return estimate.verdict(need, reading.headroom_bytes, self.margin_bytes), need

    def _resolve_quant(self, spec: catalog.ModelSpec, quant: str, reading: gpu.DeviceReading) -> str:
        if quant == "auto" and spec.embedded:
            # fp32 wherever it really runs on the CPU (a simulated card plans, but runs on CPU too).
            if not self._cuda_available():
                return "fp32"
            return "bf16" if reading.supports_bf16 else "fp16"
        return estimate.resolve_quant(
            spec, quant, reading, context_tokens=self.context_tokens, margin_bytes=self.margin_bytes
        )

    def _network_ok(self) -> bool:
        now = time.monotonic()
        if self._network is None or now - self._network[0] > _NETWORK_TTL_S:
            self._network = (now, hub_reachable())
        return self._network[1]

    def _weights_source(self, spec: catalog.ModelSpec, model: str) -> str | ModelUnavailableError:
        """Where the weights come from: a local folder, the hub cache, or the hub. Decided up front
        so that an offline or gated model is refused in a second and nothing is unloaded for it."""
        if spec.embedded:
            return str(embedded.ensure_converted())
        if Path(model).expanduser().is_dir():
            return str(Path(model).expanduser())
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec.id, "config.json")
        if isinstance(cached, str):
            weights = [
                name
                for name in ("model.safetensors", "model.safetensors.index.json")
                if isinstance(try_to_load_from_cache(spec.id, name), str)
            ]
            if weights:
                return spec.id
        if spec.gated and not catalog.hf_token_available():
            return ModelUnavailableError(
                f"{spec.id} is gated: accept its licence on Hugging Face and set HF_TOKEN (or run "
                "`huggingface-cli login`) before loading it."
            )
        if not self._network_ok():
            return ModelUnavailableError(
                f"{spec.id} is not in the local Hugging Face cache and the hub cannot be reached "
                "(offline). Download it on a connected machine or pass a local folder."
            )
        return spec.id

    def _materialize(self, spec: catalog.ModelSpec, source: str, quant: str, device: str | None = None) -> None:
        """The transformers boundary: the one place that calls `from_pretrained`."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        on_cuda = device != "cpu" and self._cuda_available()
        device = f"cuda:{self.cuda_index}" if on_cuda else "cpu"
        reading = self.probe()
        half = torch.bfloat16 if (not on_cuda or reading.supports_bf16) else torch.float16
        kwargs: dict[str, Any] = {
            # {"": 0}: the whole model on one card, so a misfit is an OOM, not silent CPU offload.
            "device_map": {"": self.cuda_index} if on_cuda else {"": "cpu"},
            "local_files_only": not self._network_ok() and not spec.embedded,
        }
        if quant == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=half,
            )
            kwargs["dtype"] = half
        elif quant == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            kwargs["dtype"] = half
        else:
            kwargs["dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[quant]
        started = time.perf_counter()
        logger.info("loading %s (%s) on %s", spec.id, quant, device)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=kwargs["local_files_only"])
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._generation += 1
        self._current = LoadedModel(
            model_id=spec.id,
            quant=quant,
            device=device,
            model=model,
            tokenizer=tokenizer,
            spec=spec,
            load_seconds=time.perf_counter() - started,
            generation=self._generation,
        )
        if on_cuda:
            from steering import log_expandable_segments_status

            log_expandable_segments_status()
        logger.info(
            "loaded %s (%s) on %s in %.1f s, %d layers",
            spec.id,
            quant,
            device,
            self._current.load_seconds,
            self._current.n_layers,
        )

    def _release_locked(self) -> None:
        loaded, self._current = self._current, None
        if loaded is None:
            return
        for extra in loaded.extras.values():
            close = getattr(extra, "close", None)
            if close is not None:
                close()
        loaded.extras.clear()
        loaded.model = None
        loaded.tokenizer = None
        del loaded
        _release_host_memory()
        if self._cuda_available():
            import torch

            torch.cuda.empty_cache()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300]


def get_manager() -> ModelManager:
    """The process's one model manager."""
    with ModelManager._instance_lock:
        if ModelManager._instance is None:
            ModelManager._instance = ModelManager()
        return ModelManager._instance
