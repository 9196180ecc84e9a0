"""The one model manager: plan -> load -> recover from out-of-memory -> release.

The process has one `ModelManager` (`get_manager()`; tests swap in fresh ones with
`use_manager`). It owns the model, the tokenizer and whatever steering state hangs off them,
behind one lock that every model call takes, and it is the one owner of the fallback policy, from
the field notes (`shared/seed/vram-and-model-selection.md`):

* `load(model, quant)` plans first (NVML headroom vs the estimate). A model that is not `stable`
  is replaced by the configured fallback (default Qwen2.5-1.5B-Instruct in 4-bit NF4) unless the
  user forces it. A model the plan splits across several GPUs (`steering/devices.py`) loads with
  the plan's accelerate device map; one that fits only with layers in CPU RAM (`offload`) does
  so only when the user asks (`allow_offload`).
* Out of memory while loading or generating: leave the `except` block (its traceback pins the
  frames that hold the big tensors), release everything, load the fallback once and retry once.
* If the fallback cannot be had either (offline, gated, out of memory), the embedded SmolLM2 is
  loaded on CPU. Every downgrade is recorded in the event log the UI and `/status` show, and the
  request that caused it gets its own event back (`Attempt.event`).

Where weights come from and how transformers loads them: `steering/weights.py`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from steering import catalog, embedded, estimate, gpu, lifecycle, limits, planning, weights
from steering.errors import InputError, ModelLockedError, ModelUnavailableError
from steering.events import EventLog
from steering.loaded import LoadedModel, decoder_layers, describe, is_oom, map_layer

logger = logging.getLogger(__name__)

QUANT_CHOICES = ("auto",) + estimate.QUANTS
# What a request that runs out of memory tries next: the same model with its rows one at a time,
# then the fallback model. Events say which (`recovery`).
ONE_ROW = "rows one at a time"
RECOVERY_PATHS = ("batched", ONE_ROW, "fallback")
T = TypeVar("T")


@dataclass
class Attempt:
    """One try at a model request: the model answering it, the layer count the request's layers
    were validated against (the first model that took it), and the downgrade event this request
    itself caused (None unless it ran out of memory and is now being retried on the fallback)."""

    loaded: LoadedModel
    validated_layers: int
    event: dict | None = None
    one_row: bool = False  # run every batch row on its own (the first out-of-memory retry)

    def layer(self, layer: int) -> int:
        """A validated layer index, moved by relative depth onto the model that answers."""
        return map_layer(layer, self.validated_layers, self.loaded.n_layers)


def _release_host_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):  # glibc only: hand freed heap pages back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _free_caches() -> None:
    """Give back what a failed request left: Python garbage, freed heap pages, CUDA's cache."""
    _release_host_memory()
    if _cuda_available():
        import torch

        torch.cuda.empty_cache()


class ModelManager:
    """Owner of the one loaded model. The app uses `get_manager()`."""

    def __init__(self) -> None:
        # A plain Lock, not an RLock: a streaming generator may be resumed on another thread and
        # must still be able to release it.
        self._lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._generation = 0
        self._online = weights.NetworkCheck()
        self.events = EventLog()
        self.fallback_model = catalog.FALLBACK_ID
        self.fallback_quant = catalog.FALLBACK_QUANT
        self.vram_limit_bytes: int | None = None
        self.margin_bytes = estimate.MARGIN_DEFAULT_BYTES
        self.context_tokens = 2048
        self.lock_model = False
        self.cuda_index = 0
        self.models_dirs: list[str] = []  # folders whose models users may load (--models-dir)

    # -- configuration -------------------------------------------------------------------------
    def configure(
        self,
        *,
        fallback_model: str | None = None,
        vram_limit_bytes: int | None = None,
        margin_bytes: int | None = None,
        context_tokens: int | None = None,
        lock_model: bool | None = None,
        models_dirs: list[str] | None = None,
    ) -> None:
        """Set the policy knobs (`--fallback-model`, `--vram-limit`, `--lock-model`, `--models-dir`, ...)."""
        if models_dirs is not None:
            self.models_dirs = list(models_dirs)
        if fallback_model is not None:
            self.fallback_model = fallback_model
        if vram_limit_bytes is not None:
            self.vram_limit_bytes = vram_limit_bytes
            if _cuda_available():
                import torch

                for index in range(torch.cuda.device_count()):  # every card a split model may use
                    gpu.apply_vram_limit(vram_limit_bytes, index)
        if margin_bytes is not None:
            self.margin_bytes = margin_bytes
        if context_tokens is not None:
            self.context_tokens = context_tokens
        if lock_model is not None:
            self.lock_model = lock_model

    # -- reading state -------------------------------------------------------------------------
    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def probe(self) -> gpu.DeviceReading:
        return gpu.probe(self.cuda_index, vram_limit_bytes=self.vram_limit_bytes)

    def probe_gpus(self, reading: gpu.DeviceReading | None = None) -> list[gpu.DeviceReading]:
        """Every visible GPU (the first one `reading`, when given); `[reading]` without a GPU."""
        return _with_other_gpus(reading or self.probe())

    def plan(self, context_tokens: int | None = None) -> dict:
        """The memory plan of this machine under this manager's policy (margin, fallback)."""
        reading = self.probe()
        return planning.plan(
            reading,
            gpus=self.probe_gpus(reading),
            context_tokens=context_tokens or self.context_tokens,
            margin_bytes=self.margin_bytes,
            fallback=(self.fallback_model, self.fallback_quant),
        )

    def status(self) -> dict:
        """The JSON-ready status the UI's status line and the `/status` endpoint show."""
        # No lock: status must answer while a load holds it. `_status` takes one reference to the
        # model, so a concurrent release cannot pull it away half-way.
        return {
            **_status(self._current, self.probe(), self.cuda_index),
            "locked": self.lock_model,
            "fallback_model": self.fallback_model,
            "events": self.events.all(),
            "event_count": self.events.count,
        }

    # -- the lock ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[LoadedModel]:
        """Hold the model lock and yield the loaded model (loading the default one if none is)."""
        lifecycle.check_running()
        with self._lock:
            lifecycle.check_running()  # it may have begun while this request waited
            if self._current is None:
                self._load_default_locked()
            yield self._current

    def run(self, fn: Callable[[Attempt], T], *, what: str = "request") -> T:
        """`stream` for a call that returns once: `fn(attempt)` under the lock, with the same
        recovery (rows one at a time, then the fallback model)."""
        stream = self.stream(lambda attempt: iter((fn(attempt),)), what=what)
        try:
            return next(stream)
        finally:
            stream.close()  # releases the lock

    def stream(self, fn: Callable[[Attempt], Iterator[T]], *, what: str = "request") -> Iterator[T]:
        """Yield from `fn(attempt)` under the model lock. On out-of-memory: free the caches and
        start again on the same model with rows one at a time; if that runs out too, downgrade
        to the fallback model and retry once (the one recovery path of every request)."""
        with self.exclusive() as loaded:
            attempt = Attempt(loaded, loaded.n_layers)
            for path in RECOVERY_PATHS:
                try:
                    yield from fn(attempt)
                    return
                except Exception as exc:
                    if not is_oom(exc) or path == RECOVERY_PATHS[-1]:
                        raise
                    failure = describe(exc)
                attempt = self._next_attempt_locked(attempt, failure, what, path)

    def _next_attempt_locked(self, attempt: Attempt, failure: str, what: str, path: str) -> Attempt:
        """After `path` ran out of memory: the same model with rows one at a time, else the fallback."""
        if path == "batched":
            _free_caches()
            event = _record_one_row_retry(self.events, attempt.loaded, failure, what)
            return Attempt(attempt.loaded, attempt.validated_layers, event, one_row=True)
        event = self._recover_locked(failure, stage=what)
        return Attempt(self._current, attempt.validated_layers, event)

    # -- loading -------------------------------------------------------------------------------
    def load(
        self, model: str, quant: str = "auto", force: bool = False, *, user: bool = True, allow_offload: bool = False
    ) -> dict:
        """Load `model` (catalog id, hub id in the local cache, or local folder) and return the status.

        Args:
            model: what to load; `SmolLM2-135M-Instruct` is the embedded offline model.
            quant: auto, 4bit, 8bit, bf16, fp16 or fp32.
            force: load even when the plan says the model is not `stable`.
            user: False for the start-up load, which may not be refused by `--lock-model`.
            allow_offload: a model the plan gives `offload` is loaded with part of its layers in
                CPU RAM (slower); without it such a model is replaced by the fallback.
        """
        if user and self.lock_model:
            raise ModelLockedError("Model switching is disabled on this server (--lock-model).")
        model = (model or "").strip()
        if not model:
            raise InputError("model", "give a model id from the list, a Hugging Face id or a local folder")
        if quant not in QUANT_CHOICES:
            raise InputError("quant", f"must be one of {', '.join(QUANT_CHOICES)}; got {limits.shorten(quant)}")
        if user:
            weights.check_user_source(model, self.models_dirs)
        with self._lock:
            self._load_locked(model, quant, force, startup=not user, allow_offload=allow_offload)
        return self.status()

    def load_default(self) -> dict:
        """Start-up choice: on a GPU the plan's choice (largest stable model), elsewhere the embedded."""
        with self._lock:
            if self._current is None:  # a load that finished while we waited is not replaced
                self._load_default_locked()
        return self.status()

    def release(self) -> None:
        """Free the model and its steering state (used on shutdown and by tests)."""
        with self._lock:
            self._release_locked()

    def _load_default_locked(self) -> None:
        if self.probe().mode == "cuda":
            choice = self.plan()["choice"]
            self._load_locked(choice["id"], choice["quant"], False, startup=True)
        else:
            self._load_locked(catalog.EMBEDDED_ID, "auto", False, startup=True)

    def _load_locked(self, model: str, quant: str, force: bool, *, startup: bool, allow_offload: bool = False) -> None:
        reading = self.probe()
        spec = catalog.get_spec(model)  # unknown ids raise here, before anything changes
        quant = _resolve_quant(spec, quant, reading, self.context_tokens, self.margin_bytes)
        # Plan first: a model that will not fit is replaced without needing its weights at all.
        est = planning.estimate_for(spec, quant, reading, self.context_tokens)
        gpus = self.probe_gpus(reading)
        placed = planning.placement(spec, quant, est, gpus, gpu.system_ram, self.margin_bytes)
        verdict, need_bytes = placed.verdict, est.need_bytes
        split = placed if len(placed.bytes) > 1 and (verdict == "stable" or allow_offload) and not force else None
        if verdict != "stable" and split is None and not force and not spec.embedded:
            reason = (
                f"{spec.id} in {quant} needs about {gpu.format_bytes(need_bytes)} but "
                f"{gpu.format_bytes(reading.headroom_bytes)} is free; verdict '{verdict}' "
                f"(a {gpu.format_bytes(self.margin_bytes)} safety margin is kept). "
                + (_offload_hint(placed) if verdict == "offload" else "Use force to try anyway.")
            )
            if not startup and self._current is not None:
                # Keep what is loaded unless the replacement can really be had.
                try:
                    weights.find_weights(catalog.get_spec(self.fallback_model), self.fallback_model, self._online)
                except ModelUnavailableError as exc:
                    raise ModelUnavailableError(
                        f"{reason} The fallback cannot be loaded either ({exc}); {self._current.model_id} stays loaded."
                    ) from None
            self._fallback_chain_locked(asked=(model, quant), reason=reason, stage="plan", reading=reading)
            return
        try:
            source = weights.find_weights(spec, model, self._online)  # offline / gated: nothing changed
            if Path(source).is_dir():
                weights.check_folder(source)  # a folder that cannot load is refused before the old model goes
        except ModelUnavailableError as exc:
            if not startup:
                raise
            reason, stage = str(exc), "start-up"
        else:
            self._release_locked()
            try:
                self._materialize(spec, source, quant, split=split, gpus=gpus)
                return
            except Exception as exc:  # the old model is gone already: never end with none loaded
                reason = ("out of memory while loading: " if is_oom(exc) else "could not load it: ") + describe(exc)
                stage = "load"
        self._fallback_chain_locked(asked=(model, quant), reason=reason, stage=stage, reading=reading)

    def _recover_locked(self, failure: str, *, stage: str) -> dict:
        asked = (self._current.model_id, self._current.quant) if self._current else ("?", "?")
        fallback = (catalog.get_spec(self.fallback_model).id, self.fallback_quant)
        on_last_resort = self._current is not None and (self._current.spec.embedded or asked == fallback)
        reading = self.probe()
        self._release_locked()
        if on_last_resort:
            # Already on the fallback: the next step down is the embedded model on CPU.
            reason = (
                f"out of memory during {stage} on {asked[0]}, already the last step down: {failure}; "
                "the embedded model now runs on CPU"
            )
            return self._load_embedded_cpu(asked, reason, reading, stage=stage)
        return self._fallback_chain_locked(
            asked=asked, reason=f"out of memory during {stage}: {failure}", stage=stage, reading=reading
        )

    def _fallback_chain_locked(
        self, *, asked: tuple[str, str], reason: str, stage: str, reading: gpu.DeviceReading
    ) -> dict:
        """Load the fallback once; if it cannot be had, the embedded model on CPU. Never loops."""
        self._release_locked()
        try:
            spec = catalog.get_spec(self.fallback_model)
            self._materialize(spec, weights.find_weights(spec, self.fallback_model, self._online), self.fallback_quant)
            return self._record(asked, reason, stage, reading)
        except Exception as exc:  # OOM, unavailable, a broken cache, a bitsandbytes error...
            logger.warning("fallback %s failed: %s", self.fallback_model, describe(exc))
            failure = describe(exc)
        self._release_locked()
        reason = f"{reason}; the fallback {self.fallback_model} could not be loaded either ({failure})"
        return self._load_embedded_cpu(asked, reason, reading, stage=stage)

    def _load_embedded_cpu(self, asked: tuple[str, str], reason: str, reading: gpu.DeviceReading, stage: str) -> dict:
        spec = catalog.get_spec(catalog.EMBEDDED_ID)
        self._materialize(spec, str(embedded.ensure_converted()), "fp32", device="cpu")
        return self._record(asked, reason, stage, reading)

    def _record(self, asked: tuple[str, str], reason: str, stage: str, before: gpu.DeviceReading) -> dict:
        return _record_downgrade(self.events, self._current, asked, reason, stage, before, self.probe())

    # -- helpers -------------------------------------------------------------------------------
    def _materialize(
        self, spec: catalog.ModelSpec, source: str, quant: str, device: str | None = None, **place
    ) -> None:
        """Load `source` in `quant` and make it the current model (the caller released the old one);
        `place` may carry the plan's `split` (see `_load_weights`) and the `gpus` it was made on."""
        on_cuda = device != "cpu" and _cuda_available()
        self._generation += 1
        self._current = _load_weights(
            spec,
            source,
            quant,
            cuda_index=self.cuda_index if on_cuda else None,
            supports_bf16=self.probe().supports_bf16,
            local_files_only=not spec.embedded and not self._online(),
            split=place.get("split"),
            generation=self._generation,
        )
        self._current.fit = _fit(self.probe(), spec, quant, self.margin_bytes, **place)
        seconds, n_layers = self._current.load_seconds, self._current.n_layers
        logger.info(
            "loaded %s (%s) on %s in %.1f s, %d layers", spec.id, quant, self._current.device, seconds, n_layers
        )

    def _release_locked(self) -> None:
        loaded, self._current = self._current, None
        if loaded is not None:
            _free(loaded)


def _load_weights(
    spec: catalog.ModelSpec,
    source: str,
    quant: str,
    *,
    cuda_index: int | None,
    supports_bf16: bool,
    local_files_only: bool,
    split,
    generation: int,
) -> LoadedModel:
    """The model loaded on CUDA device `cuda_index` (None: the CPU). `split` (a
    `steering.devices.Placement` of several devices) loads it with the plan's accelerate device
    map on CUDA; on a simulated card the model runs whole on the CPU and the split is what the
    status reports."""
    device = f"cuda:{cuda_index}" if cuda_index is not None else "cpu"
    kwargs = weights.pretrained_kwargs(
        quant,
        cuda_index=cuda_index,
        supports_bf16=supports_bf16,
        local_files_only=local_files_only,
        device_map=split.device_map if split is not None and cuda_index is not None else None,
    )
    started = time.perf_counter()
    where = ", ".join(f"{d['device']} {d['layers']} layers" for d in split.devices()) if split else device
    logger.info("loading %s (%s) on %s", spec.id, quant, where)
    model, tokenizer = weights.load_pretrained(source, kwargs)
    if cuda_index is None:
        from steering import cpu

        switched = cpu.use_onednn(model)
        logger.info("CPU linear layers: %d of them computed by oneDNN (steering/cpu.py)", switched)
    loaded = LoadedModel(
        model_id=spec.id,
        quant=quant,
        device=device,
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        load_seconds=time.perf_counter() - started,
        generation=generation,
        placement={"devices": split.devices(), "offload": split.offload()} if split is not None else None,
    )
    if cuda_index is not None:
        from steering import log_expandable_segments_status

        log_expandable_segments_status()
    return loaded


def _resolve_quant(
    spec: catalog.ModelSpec, quant: str, reading: gpu.DeviceReading, context_tokens: int, margin_bytes: int
) -> str:
    if quant == "auto" and spec.embedded:
        # fp32 wherever it really runs on the CPU (a simulated card plans, but runs on CPU too).
        if not _cuda_available():
            return "fp32"
        return "bf16" if reading.supports_bf16 else "fp16"
    return planning.resolve_quant(spec, quant, reading, context_tokens=context_tokens, margin_bytes=margin_bytes)


def _record_downgrade(
    events: EventLog,
    loaded: LoadedModel,
    asked: tuple[str, str],
    reason: str,
    stage: str,
    before: gpu.DeviceReading,
    after: gpu.DeviceReading,
) -> dict:
    logger.warning(
        "downgraded: asked %s %s, loaded %s %s on %s: %s", *asked, loaded.model_id, loaded.quant, loaded.device, reason
    )
    return events.record(
        stage=stage,
        asked=asked,
        loaded={"model": loaded.model_id, "quant": loaded.quant, "device": loaded.device},
        reason=reason,
        free_before_bytes=before.headroom_bytes,
        free_after_bytes=after.headroom_bytes,
        recovery="fallback",
    )


def _record_one_row_retry(events: EventLog, loaded: LoadedModel, failure: str, what: str) -> dict:
    logger.warning("out of memory during %s on %s: retrying with rows one at a time", what, loaded.model_id)
    return events.record(
        stage=what,
        asked=(loaded.model_id, loaded.quant),
        loaded={"model": loaded.model_id, "quant": loaded.quant, "device": loaded.device},
        reason=f"out of memory during {what}: {failure}; retried on the same model with rows one at a time",
        recovery=ONE_ROW,
    )


def _fit(
    reading: gpu.DeviceReading, spec: catalog.ModelSpec, quant: str, margin_bytes: int, *, split=None, gpus=None
) -> dict:
    """Fitted limits of a model just loaded: live free VRAM on CUDA (which already holds it), the
    simulated card with `--simulate-gpu` (which does not), available RAM on the CPU. A split model
    is limited by whichever of its GPUs fills first."""
    loaded = reading.mode != "simulated"
    if split is not None and reading.is_gpu:
        from steering import devices

        readings = _with_other_gpus(reading) if loaded else gpus
        limits = devices.split_fit(spec, quant, split, readings, margin_bytes=margin_bytes, loaded=loaded)
    else:
        limits = estimate.fit_limits(spec, quant, reading, margin_bytes=margin_bytes, loaded=loaded)
    return {**limits, "max_positions": spec.max_positions, "basis": reading.mode}


def _with_other_gpus(reading: gpu.DeviceReading) -> list[gpu.DeviceReading]:
    """`reading` first, then every other visible GPU (same --vram-limit); `[reading]` without a GPU."""
    if not reading.is_gpu:
        return [reading]
    others = gpu.probe_all(vram_limit_bytes=reading.vram_limit_bytes)
    return [reading] + [r for r in others if r.is_gpu and r.cuda_index != reading.cuda_index]


def _offload_hint(placed) -> str:
    """What loading an `offload` model would mean, and how to ask for it."""
    split = placed.offload()
    return (
        f"It would run with {split['cpu_layers']} of its {split['cpu_layers'] + split['gpu_layers']} layers in CPU "
        f"RAM at about {split['expected_tokens_per_s']} tokens/s (an estimate); tick 'allow offload' "
        "(allow_offload=True) to load it that way."
    )


def _status(loaded: LoadedModel | None, reading: gpu.DeviceReading, cuda_index: int) -> dict:
    """Model and memory part of the status; a model released meanwhile reads as none loaded."""
    import psutil

    model = loaded.model if loaded is not None else None
    if model is None:
        loaded = None
    memory = {
        "device": reading.to_dict(),
        "process_rss_bytes": psutil.Process().memory_info().rss,
        "model_bytes": estimate.measured_weights_bytes(model) if model is not None else 0,
    }
    if loaded and loaded.device.startswith("cuda"):
        import torch

        # a model split across GPUs: what it holds on every one of them
        on = [int(d["device"][5:]) for d in (loaded.placement or {}).get("devices", []) if d["device"][:5] == "cuda:"]
        memory["cuda_allocated_bytes"] = sum(torch.cuda.memory_allocated(i) for i in on or [cuda_index])
        memory["cuda_reserved_bytes"] = sum(torch.cuda.memory_reserved(i) for i in on or [cuda_index])
    n_layers = len(decoder_layers(model)) if loaded else None
    return {
        "model": loaded.model_id if loaded else None,
        "quant": loaded.quant if loaded else None,
        "device": loaded.device if loaded else None,
        "n_layers": n_layers,
        "default_layer": n_layers // 2 if loaded else None,
        "fit": dict(loaded.fit) if loaded else None,
        "placement": loaded.placement if loaded else None,
        "memory": memory,
    }


def _free(loaded: LoadedModel) -> None:
    """Close what hangs off a model (the steering engine), drop it, and give the memory back."""
    for extra in loaded.extras.values():
        close = getattr(extra, "close", None)
        if close is not None:
            close()
    loaded.extras.clear()
    loaded.model = None
    loaded.tokenizer = None
    del loaded
    _free_caches()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


_manager: ModelManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> ModelManager:
    """The process's model manager (created on first use)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = ModelManager()
        return _manager


@contextlib.contextmanager
def use_manager(manager: ModelManager) -> Iterator[ModelManager]:
    """Make `manager` the process's manager for the block (tests), then release it and restore."""
    global _manager
    with _manager_lock:
        previous, _manager = _manager, manager
    try:
        yield manager
    finally:
        with _manager_lock:
            _manager = previous
        manager.release()
