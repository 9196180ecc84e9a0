"""VRAM headroom probe through NVML (nvidia-ml-py), the `--vram-limit` cap, and simulated cards.

Why NVML and not `torch.cuda.mem_get_info`: the latter creates a CUDA context (~300-500 MiB) that
is never released, so probing would eat the memory it measures. NVML also sees the other
processes on the card (Xorg, gnome-shell, a browser), which is where the reference 8 GB card's
0.5-0.8 GB go before anything loads.

The probe talks to an NVML *backend*: the real `pynvml` module, or `SimulatedNvml`, an object with
the same function names (`use_nvml()` swaps it in). Everything above the backend runs unchanged
for a simulated card, which is how `--simulate-gpu 8GiB --gui-overhead 0.7GiB` and the tests work.
A probe never raises: no library, no driver, no GPU or an NVML error mid-read gives a "cpu" reading
with the reason. No torch import here (only `apply_vram_limit` imports it, lazily).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import PurePath

__all__ = [
    "GiB",
    "MiB",
    "DeviceReading",
    "GpuProcess",
    "SimulatedGpu",
    "SimulatedNvml",
    "apply_vram_limit",
    "format_bytes",
    "parse_size",
    "parse_sizes",
    "probe",
    "probe_all",
    "simulate_gpu",
    "system_ram",
    "use_nvml",
]

logger = logging.getLogger(__name__)

KiB = 1024
MiB = 1024**2
GiB = 1024**3

# Process names (lower-case basenames) that belong to the desktop rather than to compute work.
DESKTOP_PROCESS_NAMES = frozenset(
    {
        "xorg", "x", "xwayland", "gnome-shell", "kwin", "kwin_wayland", "kwin_x11", "plasmashell",
        "mutter", "sway", "hyprland", "weston", "cinnamon", "xfwm4", "compiz", "gnome-remote-desktop",
        "firefox", "firefox-bin", "firefox-esr", "chrome", "google-chrome", "chromium",
        "chromium-browser", "brave", "brave-browser", "msedge", "microsoft-edge", "opera", "vivaldi",
        "vivaldi-bin", "code", "electron", "antigravity", "slack", "discord", "spotify", "zoom",
    }
)  # fmt: skip

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024**4,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "k": KiB, "m": MiB, "g": GiB, "t": 1024**4,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from "8GiB", "512MiB", "8GB", "500MB", "1.5GiB" or plain bytes; ValueError otherwise.

    GiB/MiB are powers of 1024, GB/MB powers of 1000; a bare K/M/G means the binary unit.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 8GiB, 512MiB, 8GB, 500MB or a number of bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_sizes(text: str) -> list[int]:
    """Bytes of each card in "8GiB" or "8GiB,8GiB" (several simulated cards); ValueError otherwise."""
    parts = [part for part in str(text).split(",")]
    if not parts or any(not part.strip() for part in parts):
        raise ValueError(f"not a size: {text!r} (use e.g. 8GiB, or 8GiB,8GiB for two cards)")
    return [parse_size(part) for part in parts]


def format_bytes(n: int | None) -> str:
    """'7.30 GiB', '112.00 MiB', '512 B'; 'unknown' for None."""
    if n is None:
        return "unknown"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass
class GpuProcess:
    """A process NVML lists on the card; `used_bytes` None means NVML does not say."""

    pid: int
    name: str
    used_bytes: int | None
    kind: str  # "graphics" or "compute"
    desktop: bool


@dataclass
class DeviceReading:
    """One probe of one device. Mode "cpu" means no usable NVIDIA GPU; `reason` says why.

    In "cpu" mode the memory fields describe system RAM (total and available), which is what the
    plan compares a CPU run against.
    """

    mode: str  # "cuda" | "cpu" | "simulated"
    reason: str = ""
    cuda_index: int | None = None
    name: str = ""
    total_bytes: int = 0
    used_bytes: int = 0
    free_bytes: int = 0
    reserved_bytes: int = 0  # held by the driver (NVML memory info v2); not usable
    compute_capability: tuple[int, int] | None = None
    processes: list[GpuProcess] = field(default_factory=list)
    desktop_overhead_bytes: int = 0
    uuid: str = ""
    pci_bus_id: str = ""
    vram_limit_bytes: int | None = None

    @property
    def is_gpu(self) -> bool:
        return self.mode in ("cuda", "simulated")

    @property
    def supports_bf16(self) -> bool:
        """Native bf16 needs compute capability 8.0 (Ampere); a CPU run handles bf16 itself."""
        if not self.is_gpu:
            return True
        return self.compute_capability is not None and tuple(self.compute_capability) >= (8, 0)

    @property
    def headroom_bytes(self) -> int:
        """Memory the app may use: NVML free VRAM, within --vram-limit (RAM available on CPU)."""
        if self.is_gpu and self.vram_limit_bytes is not None:
            return max(0, min(self.free_bytes, self.vram_limit_bytes))
        return self.free_bytes

    def to_dict(self) -> dict:
        out = asdict(self)
        out["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        out["headroom_bytes"] = self.headroom_bytes
        out["supports_bf16"] = self.supports_bf16
        return out


# --- the NVML backend seam ------------------------------------------------------------------

_backend_override: object | None = None


class use_nvml:  # noqa: N801 - used like a function: use_nvml(sim) or `with use_nvml(sim):`
    """Route the probe to `backend` (None: the real pynvml). Applies at once; as a context
    manager it restores the previous backend on exit."""

    def __init__(self, backend: object | None):
        global _backend_override
        self._previous = _backend_override
        _backend_override = backend

    def __enter__(self) -> object | None:
        return _backend_override

    def __exit__(self, *exc_info: object) -> None:
        global _backend_override
        _backend_override = self._previous


def _load_backend() -> tuple[object | None, str]:
    """The NVML backend in use, or None with the reason it is missing."""
    if _backend_override is not None:
        return _backend_override, ""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py (pynvml) is not installed"
    return pynvml, ""


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


_logged_reasons: set[str] = set()


def _cpu_reading(
    reason: str, cuda_index: int | None, vram_limit_bytes: int | None, *, quiet: bool = False
) -> DeviceReading:
    total_bytes = free_bytes = 0
    try:
        import psutil

        memory = psutil.virtual_memory()
        total_bytes, free_bytes = int(memory.total), int(memory.available)
    except Exception as exc:  # psutil missing or /proc unreadable: report zeros, keep going
        logger.warning("cannot read system memory: %s", exc)
    if not quiet and reason not in _logged_reasons:  # the probe runs on every status refresh: say it once
        _logged_reasons.add(reason)
        logger.info("CPU mode: %s", reason)
    return DeviceReading(
        mode="cpu",
        reason=reason,
        cuda_index=cuda_index,
        name="CPU (system RAM)",
        total_bytes=total_bytes,
        used_bytes=total_bytes - free_bytes,
        free_bytes=free_bytes,
        vram_limit_bytes=vram_limit_bytes,
    )


def probe(cuda_index: int = 0, *, vram_limit_bytes: int | None = None) -> DeviceReading:
    """Read CUDA device `cuda_index` through NVML; a "cpu" reading with the reason if impossible."""
    readings = _probe(cuda_index, vram_limit_bytes)
    return readings[0]


def probe_all(*, vram_limit_bytes: int | None = None) -> list[DeviceReading]:
    """Every visible CUDA device, in CUDA's order (CUDA_VISIBLE_DEVICES honoured); one "cpu"
    reading with the reason when there is none. `vram_limit_bytes` caps each card."""
    return _probe(None, vram_limit_bytes)


def _probe(cuda_index: int | None, vram_limit_bytes: int | None) -> list[DeviceReading]:
    """The reading of device `cuda_index` (None: of every visible device), NVML started once."""
    where = 0 if cuda_index is None else cuda_index
    nvml, missing = _load_backend()
    if nvml is None:
        return [_cpu_reading(missing, where, vram_limit_bytes)]
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return [_cpu_reading(f"NVML could not start: {exc} (no NVIDIA driver?)", where, vram_limit_bytes)]
    try:
        handles, reason = _visible_handles(nvml)
        if cuda_index is not None and not reason and not 0 <= cuda_index < len(handles):
            reason = f"CUDA device {cuda_index} does not exist ({len(handles)} visible)"
        if reason:
            return [_cpu_reading(reason, where, vram_limit_bytes)]
        indices = range(len(handles)) if cuda_index is None else [cuda_index]
        readings = [_read_device(nvml, handles[index], index) for index in indices]
    except Exception as exc:  # an NVML error mid-read must not take the app down
        logger.debug("NVML read failed", exc_info=True)
        return [_cpu_reading(f"NVML failed while reading the GPU: {exc}", where, vram_limit_bytes)]
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # shutting down is best effort; the reading is what matters
            logger.debug("nvmlShutdown failed", exc_info=True)
    for reading in readings:
        reading.vram_limit_bytes = vram_limit_bytes
        if getattr(nvml, "simulated", False):
            reading.mode = "simulated"
            reading.reason = "simulated card (--simulate-gpu): plans use it, the process itself runs on CPU"
    return readings


def _visible_handles(nvml: object) -> tuple[list, str]:
    """NVML handles of the devices CUDA numbers 0, 1, ... (CUDA_VISIBLE_DEVICES honoured), or
    an empty list and the reason."""
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        return [], "NVML sees no NVIDIA GPU"
    devices = []
    for nvml_index in range(count):
        handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
        bus_id = _text(nvml.nvmlDeviceGetPciInfo(handle).busId).lower()
        devices.append((bus_id, _text(nvml.nvmlDeviceGetUUID(handle)), handle))
    order = os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    if order != "PCI_BUS_ID" and count > 1:
        logger.warning("CUDA_DEVICE_ORDER=%s: CUDA indices may not match NVML's (PCI bus) order", order)
    devices.sort(key=lambda d: d[0])  # CUDA_DEVICE_ORDER=PCI_BUS_ID: CUDA index i = i-th bus id
    visible = _visible_devices(devices, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if not visible:
        return [], f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} hides every GPU"
    return [device[2] for device in visible], ""


def system_ram(available_bytes: int | None = None) -> DeviceReading:
    """System RAM as a "cpu" reading (total and available, through psutil): where offloaded layers
    live. `available_bytes` plans as if that much were available (`--simulate-ram`)."""
    reading = _cpu_reading("system RAM", None, None, quiet=True)
    if available_bytes is not None:
        reading.reason = "simulated RAM (--simulate-ram)"
        reading.total_bytes = max(reading.total_bytes, available_bytes)
        reading.free_bytes = available_bytes
        reading.used_bytes = reading.total_bytes - available_bytes
    return reading


def _visible_devices(devices: list[tuple[str, str, object]], spec: str | None) -> list:
    """CUDA's reading of CUDA_VISIBLE_DEVICES: indices or UUID prefixes, up to the first bad entry."""
    if spec is None:
        return list(devices)
    visible: list = []
    for entry in (e.strip() for e in spec.split(",")):
        if entry.lstrip("-").isdigit():
            index = int(entry)
            chosen = devices[index] if 0 <= index < len(devices) else None
        else:
            prefix = entry.lower().removeprefix("gpu-")
            matches = [d for d in devices if d[1].lower().removeprefix("gpu-").startswith(prefix)] if prefix else []
            chosen = matches[0] if len(matches) == 1 else None
        if chosen is None or chosen in visible:
            break  # CUDA stops at the first invalid entry and ignores the rest
        visible.append(chosen)
    return visible


def _read_device(nvml: object, handle: object, cuda_index: int) -> DeviceReading:
    try:  # memory info v2 separates the driver's reservation from `used`
        memory = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
        reserved_bytes = int(getattr(memory, "reserved", 0))
    except Exception as exc:  # old driver or backend without v2
        logger.debug("memory info v2 unavailable (%s); using v1", exc)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        reserved_bytes = 0
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    processes = _processes(nvml, handle)
    return DeviceReading(
        mode="cuda",
        cuda_index=cuda_index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        total_bytes=int(memory.total),
        used_bytes=int(memory.used),
        free_bytes=int(memory.free),
        reserved_bytes=reserved_bytes,
        compute_capability=(int(major), int(minor)),
        processes=processes,
        desktop_overhead_bytes=sum(p.used_bytes or 0 for p in processes if p.desktop),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        pci_bus_id=_text(nvml.nvmlDeviceGetPciInfo(handle).busId),
    )


def _processes(nvml: object, handle: object) -> list[GpuProcess]:
    """Graphics then compute processes; a pid listed twice is kept once."""
    found: dict[int, GpuProcess] = {}
    for kind, getter in (
        ("graphics", nvml.nvmlDeviceGetGraphicsRunningProcesses),
        ("compute", nvml.nvmlDeviceGetComputeRunningProcesses),
    ):
        for info in getter(handle):
            pid = int(info.pid)
            used = getattr(info, "usedGpuMemory", None)
            used_bytes = int(used) if used is not None else None
            if pid in found:
                if found[pid].used_bytes is None:
                    found[pid].used_bytes = used_bytes
                continue
            name = _process_name(nvml, pid)
            found[pid] = GpuProcess(pid, name, used_bytes, kind, _is_desktop(name))
    return list(found.values())


def _process_name(nvml: object, pid: int) -> str:
    try:
        name = _text(nvml.nvmlSystemGetProcessName(pid))
        if name:
            return name
    except Exception:  # NVML may refuse (no permission); psutil is the second source
        logger.debug("nvmlSystemGetProcessName(%d) failed", pid, exc_info=True)
    try:
        import psutil

        return psutil.Process(pid).name()
    except Exception:  # gone, in another pid namespace, or psutil missing
        return f"pid {pid}"


def _is_desktop(name: str) -> bool:
    base = PurePath(name.split()[0] if name.strip() else name).name.lower()
    return base in DESKTOP_PROCESS_NAMES


def apply_vram_limit(limit_bytes: int | None, cuda_index: int = 0) -> float | None:
    """Cap this process's CUDA allocations at `limit_bytes`; returns the fraction set, or None.

    On CUDA this calls `torch.cuda.set_per_process_memory_fraction(limit / total)`; without CUDA
    it only logs (the plan still honours the limit through `DeviceReading.vram_limit_bytes`).
    """
    if limit_bytes is None:
        return None
    import torch  # lazy: plan and probe must work without importing torch

    if not torch.cuda.is_available():
        logger.info("--vram-limit %s: no CUDA device, nothing to cap", format_bytes(limit_bytes))
        return None
    total_bytes = torch.cuda.get_device_properties(cuda_index).total_memory
    fraction = min(1.0, limit_bytes / total_bytes)
    torch.cuda.set_per_process_memory_fraction(fraction, cuda_index)
    logger.info("VRAM capped at %s (%.3f of cuda:%d)", format_bytes(limit_bytes), fraction, cuda_index)
    return fraction


# --- simulated cards (an NVML backend with pynvml's function names) --------------------------

# Memory the driver keeps for itself on the reference card: NVML says 8 GiB, torch's OOM message
# says "total capacity of 7.77 GiB" (seed notes), so about 236 MiB is never available.
SIMULATED_DRIVER_RESERVED_BYTES = 236 * MiB


@dataclass
class SimulatedGpu:
    """One simulated card; `processes` are (pid, name, used_bytes or None, "graphics"|"compute")."""

    name: str
    total_bytes: int
    processes: list[tuple[int, str, int | None, str]] = field(default_factory=list)
    compute_capability: tuple[int, int] = (7, 5)
    reserved_bytes: int = SIMULATED_DRIVER_RESERVED_BYTES
    uuid: str = "GPU-00000000-0000-4000-8000-000000000000"
    pci_bus_id: str = "00000000:01:00.0"


class _Record:
    """A plain attribute bag, like the structs pynvml returns."""

    def __init__(self, **fields: object):
        self.__dict__.update(fields)


class SimulatedNvml:
    """Stands in for `pynvml`: same function names, answers from `SimulatedGpu`s.

    `fail_on` names one function that raises `NVMLError` when called, to simulate a driver that
    fails in the middle of a reading.
    """

    simulated = True
    nvmlMemory_v2 = 0x02000028  # the version constant pynvml passes for memory info v2

    class NVMLError(Exception):
        """Raised like pynvml.NVMLError."""

    def __init__(self, gpus: list[SimulatedGpu], *, fail_on: str | None = None):
        self.gpus = list(gpus)
        self.fail_on = fail_on
        self.initialised = 0

    def _call(self, name: str) -> None:
        if name == self.fail_on:
            raise self.NVMLError(f"simulated NVML failure in {name}: GPU is lost")

    def nvmlInit(self) -> None:
        self._call("nvmlInit")
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimulatedGpu:
        self._call("nvmlDeviceGetHandleByIndex")
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: SimulatedGpu) -> str:
        self._call("nvmlDeviceGetName")
        return gpu.name

    def nvmlDeviceGetUUID(self, gpu: SimulatedGpu) -> str:
        self._call("nvmlDeviceGetUUID")
        return gpu.uuid

    def nvmlDeviceGetPciInfo(self, gpu: SimulatedGpu) -> _Record:
        self._call("nvmlDeviceGetPciInfo")
        return _Record(busId=gpu.pci_bus_id.encode())

    def nvmlDeviceGetMemoryInfo(self, gpu: SimulatedGpu, version: int | None = None) -> _Record:
        self._call("nvmlDeviceGetMemoryInfo")
        used = sum(p[2] or 0 for p in gpu.processes)
        free = max(0, gpu.total_bytes - gpu.reserved_bytes - used)
        if version:  # v2: the driver's reservation is reported apart from `used`
            return _Record(total=gpu.total_bytes, reserved=gpu.reserved_bytes, used=used, free=free)
        return _Record(total=gpu.total_bytes, used=gpu.total_bytes - free, free=free)

    def nvmlDeviceGetCudaComputeCapability(self, gpu: SimulatedGpu) -> tuple[int, int]:
        self._call("nvmlDeviceGetCudaComputeCapability")
        return gpu.compute_capability

    def _procs(self, gpu: SimulatedGpu, kind: str) -> list[_Record]:
        return [_Record(pid=pid, usedGpuMemory=used) for pid, _, used, k in gpu.processes if k == kind]

    def nvmlDeviceGetGraphicsRunningProcesses(self, gpu: SimulatedGpu) -> list[_Record]:
        self._call("nvmlDeviceGetGraphicsRunningProcesses")
        return self._procs(gpu, "graphics")

    def nvmlDeviceGetComputeRunningProcesses(self, gpu: SimulatedGpu) -> list[_Record]:
        self._call("nvmlDeviceGetComputeRunningProcesses")
        return self._procs(gpu, "compute")

    def nvmlSystemGetProcessName(self, pid: int) -> bytes:
        self._call("nvmlSystemGetProcessName")
        for gpu in self.gpus:
            for p_pid, name, _, _ in gpu.processes:
                if p_pid == pid:
                    return name.encode()
        raise self.NVMLError("Not Found")


def desktop_processes(gui_overhead_bytes: int, first_pid: int = 1201) -> list[tuple[int, str, int, str]]:
    """The reference desktop: Xorg 40 %, gnome-shell 30 %, firefox the rest of `gui_overhead_bytes`."""
    xorg = gui_overhead_bytes * 4 // 10
    shell = gui_overhead_bytes * 3 // 10
    firefox = gui_overhead_bytes - xorg - shell
    return [
        (first_pid, "/usr/lib/xorg/Xorg", xorg, "graphics"),
        (first_pid + 1, "/usr/bin/gnome-shell", shell, "graphics"),
        (first_pid + 2, "/usr/lib/firefox/firefox", firefox, "graphics"),
    ]


def simulate_gpu(
    total_bytes: int | Sequence[int],
    gui_overhead_bytes: int = 0,
    *,
    compute_capability: tuple[int, int] = (7, 5),
    name: str = "Simulated NVIDIA GeForce RTX 2070 SUPER",
    reserved_bytes: int = SIMULATED_DRIVER_RESERVED_BYTES,
) -> SimulatedNvml:
    """An NVML backend of one card of `total_bytes` of VRAM (or one card per size in a list, on
    consecutive PCI buses); the desktop holds `gui_overhead_bytes` on the first (the display's) card."""
    sizes = [total_bytes] if isinstance(total_bytes, int) else list(total_bytes)
    if not sizes:
        raise ValueError("give the size of at least one simulated card")
    if gui_overhead_bytes + reserved_bytes > sizes[0]:
        raise ValueError(
            f"GUI overhead {format_bytes(gui_overhead_bytes)} does not fit a {format_bytes(sizes[0])} card"
        )
    gpus = []
    for index, size in enumerate(sizes):
        if reserved_bytes > size:
            raise ValueError(f"a {format_bytes(size)} card is smaller than the driver's reservation")
        gpus.append(
            SimulatedGpu(
                name=name,
                total_bytes=size,
                processes=desktop_processes(gui_overhead_bytes) if gui_overhead_bytes and index == 0 else [],
                compute_capability=tuple(compute_capability),
                reserved_bytes=reserved_bytes,
                uuid=f"GPU-00000000-0000-4000-8000-{index:012d}",
                pci_bus_id=f"00000000:{index + 1:02x}:00.0",
            )
        )
    return SimulatedNvml(gpus)
