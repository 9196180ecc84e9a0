"""The NVML headroom probe on simulated cards, CUDA index mapping, sizes, and CPU-mode readings."""

from __future__ import annotations

import json
import sys

import pytest

from steering import gpu
from steering.gpu import GiB, MiB, SimulatedGpu, SimulatedNvml, parse_size, probe, simulate_gpu, use_nvml

RESERVED = gpu.SIMULATED_DRIVER_RESERVED_BYTES


@pytest.fixture(autouse=True)
def _real_backend_after_each_test(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # a CI that hides GPUs would hide the simulated ones
    with use_nvml(None):
        yield


def reference_card() -> SimulatedNvml:
    return simulate_gpu(8 * GiB, parse_size("0.7GiB"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * GiB),
        ("512MiB", 512 * MiB),
        ("8GB", 8 * 10**9),
        ("500MB", 500 * 10**6),
        ("1.5GiB", 3 * GiB // 2),
        ("0.7 GiB", int(0.7 * GiB)),
        ("4096", 4096),
        ("8g", 8 * GiB),
        (1234, 1234),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "8XB", "-1GiB", "eight", "8 GiB extra", "1.2.3GiB"])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_bytes():
    assert gpu.format_bytes(int(7.3 * GiB)) == "7.30 GiB"
    assert gpu.format_bytes(112 * MiB) == "112.00 MiB"
    assert gpu.format_bytes(512) == "512 B"
    assert gpu.format_bytes(None) == "unknown"


def test_reference_card_reading():
    with use_nvml(reference_card()):
        reading = probe(0)
    overhead = parse_size("0.7GiB")
    assert reading.mode == "simulated" and reading.is_gpu
    assert reading.name == "Simulated NVIDIA GeForce RTX 2070 SUPER"
    assert reading.total_bytes == 8 * GiB
    assert reading.compute_capability == (7, 5) and not reading.supports_bf16
    names = [p.name.rsplit("/", 1)[-1] for p in reading.processes]
    assert names == ["Xorg", "gnome-shell", "firefox"]
    assert all(p.desktop and p.kind == "graphics" for p in reading.processes)
    assert reading.desktop_overhead_bytes == overhead == sum(p.used_bytes for p in reading.processes)
    assert reading.used_bytes == overhead
    assert reading.reserved_bytes == RESERVED
    assert reading.free_bytes == 8 * GiB - RESERVED - overhead
    assert reading.headroom_bytes == reading.free_bytes
    assert 7.0 * GiB < reading.headroom_bytes < 7.1 * GiB


def test_reading_is_json_ready():
    with use_nvml(reference_card()):
        data = probe(0, vram_limit_bytes=6 * GiB).to_dict()
    round_trip = json.loads(json.dumps(data))
    assert round_trip["compute_capability"] == [7, 5]
    assert round_trip["headroom_bytes"] == 6 * GiB
    assert round_trip["processes"][0]["desktop"] is True


def test_vram_limit_caps_headroom_but_not_above_free():
    with use_nvml(reference_card()):
        capped = probe(0, vram_limit_bytes=4 * GiB)
        loose = probe(0, vram_limit_bytes=20 * GiB)
    assert capped.headroom_bytes == 4 * GiB
    assert loose.headroom_bytes == loose.free_bytes


def test_24gb_card_has_bf16_and_more_headroom():
    card = simulate_gpu(24 * GiB, 1 * GiB, compute_capability=(8, 6), name="Simulated RTX 3090")
    with use_nvml(card):
        reading = probe(0)
    assert reading.supports_bf16
    assert reading.headroom_bytes == 24 * GiB - RESERVED - 1 * GiB


def test_4gb_card():
    with use_nvml(simulate_gpu(4 * GiB, 512 * MiB, name="Simulated GTX 1650")):
        reading = probe(0)
    assert reading.headroom_bytes == 4 * GiB - RESERVED - 512 * MiB
    assert reading.desktop_overhead_bytes == 512 * MiB


def test_gui_overhead_larger_than_the_card_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        simulate_gpu(1 * GiB, 2 * GiB)


def test_nvml_missing_gives_cpu_mode(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` now raises ImportError
    reading = probe(0)
    assert reading.mode == "cpu" and not reading.is_gpu
    assert "nvidia-ml-py" in reading.reason
    assert reading.total_bytes > 0 and reading.headroom_bytes == reading.free_bytes  # system RAM


def test_real_nvml_without_a_driver_gives_cpu_mode_not_a_crash():
    # This machine has nvidia-ml-py but no NVIDIA driver: nvmlInit fails inside the real library.
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("a real NVIDIA driver is present")
    except Exception:
        pass
    reading = probe(0)
    assert reading.mode == "cpu"
    assert "NVML" in reading.reason


@pytest.mark.parametrize(
    "failing",
    ["nvmlInit", "nvmlDeviceGetCount", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetComputeRunningProcesses"],
)
def test_nvml_failing_mid_read_gives_cpu_mode(failing):
    backend = reference_card()
    backend.fail_on = failing
    with use_nvml(backend):
        reading = probe(0)
    assert reading.mode == "cpu"
    assert "GPU is lost" in reading.reason
    assert backend.initialised == 0  # nvmlShutdown ran (or nvmlInit never succeeded)


def test_failing_shutdown_does_not_lose_the_reading():
    backend = reference_card()
    backend.fail_on = "nvmlShutdown"
    with use_nvml(backend):
        reading = probe(0)
    assert reading.mode == "simulated"


def test_process_details_unknown_size_duplicates_and_compute_processes():
    card = SimulatedGpu(
        name="Simulated card",
        total_bytes=8 * GiB,
        processes=[
            (10, "/usr/bin/Xwayland", 100 * MiB, "graphics"),
            (11, "kwin_wayland", None, "graphics"),  # NVML does not say
            (12, "python3", 900 * MiB, "compute"),
            (10, "/usr/bin/Xwayland", 100 * MiB, "compute"),  # listed twice by NVML
        ],
    )
    with use_nvml(SimulatedNvml([card])):
        reading = probe(0)
    by_pid = {p.pid: p for p in reading.processes}
    assert sorted(by_pid) == [10, 11, 12]
    assert by_pid[11].used_bytes is None and by_pid[11].desktop
    assert by_pid[12].kind == "compute" and not by_pid[12].desktop
    assert reading.desktop_overhead_bytes == 100 * MiB  # unknown sizes and compute work excluded
    assert reading.used_bytes == 1100 * MiB


def two_cards() -> SimulatedNvml:
    # NVML enumerates the 4090 first, but it sits on the higher PCI bus: CUDA (PCI_BUS_ID) calls it 1.
    big = SimulatedGpu("Simulated RTX 4090", 24 * GiB, uuid="GPU-bbbb2222-0000", pci_bus_id="00000000:41:00.0")
    small = SimulatedGpu("Simulated RTX 2070 SUPER", 8 * GiB, uuid="GPU-aaaa1111-0000", pci_bus_id="00000000:01:00.0")
    return SimulatedNvml([big, small])


@pytest.mark.parametrize(
    ("visible", "cuda_index", "expected"),
    [
        (None, 0, "Simulated RTX 2070 SUPER"),
        (None, 1, "Simulated RTX 4090"),
        ("1", 0, "Simulated RTX 4090"),
        ("1,0", 1, "Simulated RTX 2070 SUPER"),
        ("GPU-bbbb", 0, "Simulated RTX 4090"),
        ("gpu-aaaa1111", 0, "Simulated RTX 2070 SUPER"),
    ],
)
def test_cuda_visible_devices_maps_cuda_index_to_nvml_device(monkeypatch, visible, cuda_index, expected):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with use_nvml(two_cards()):
        reading = probe(cuda_index)
    assert reading.name == expected
    assert reading.cuda_index == cuda_index


@pytest.mark.parametrize(("visible", "cuda_index"), [("", 0), ("-1", 0), ("0,7,1", 1), ("GPU-ffff", 0), ("1", 1)])
def test_hidden_or_missing_devices_give_cpu_mode(monkeypatch, visible, cuda_index):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with use_nvml(two_cards()):
        reading = probe(cuda_index)
    assert reading.mode == "cpu"
    assert "CUDA_VISIBLE_DEVICES" in reading.reason or "does not exist" in reading.reason


def test_use_nvml_restores_the_previous_backend():
    outer, inner = reference_card(), simulate_gpu(24 * GiB, 0)
    with use_nvml(outer):
        with use_nvml(inner):
            assert probe(0).total_bytes == 24 * GiB
        assert probe(0).total_bytes == 8 * GiB


def test_apply_vram_limit_without_cuda_is_a_logged_no_op(caplog):
    caplog.set_level("INFO", logger="steering.gpu")
    assert gpu.apply_vram_limit(None) is None
    assert gpu.apply_vram_limit(4 * GiB, 0) is None
    assert "no CUDA device" in caplog.text


def test_parse_sizes_reads_one_card_or_several():
    assert gpu.parse_sizes("8GiB") == [8 * GiB]
    assert gpu.parse_sizes("8GiB,24GiB") == [8 * GiB, 24 * GiB]
    for bad in ("", "8GiB,", ",8GiB", "8GiB,,8GiB", "8GiB,lots"):
        with pytest.raises(ValueError, match="not a size"):
            gpu.parse_sizes(bad)


def test_several_simulated_cards_are_all_probed_with_the_desktop_on_the_first(monkeypatch):
    overhead = parse_size("0.7GiB")
    with use_nvml(simulate_gpu([8 * GiB, 8 * GiB, 12 * GiB], overhead)):
        readings = gpu.probe_all()
        second = probe(1)
    assert [r.cuda_index for r in readings] == [0, 1, 2]
    assert [r.total_bytes for r in readings] == [8 * GiB, 8 * GiB, 12 * GiB]
    assert readings[0].desktop_overhead_bytes == overhead and readings[1].processes == []
    assert readings[1].headroom_bytes == 8 * GiB - RESERVED == second.headroom_bytes
    assert len({r.uuid for r in readings}) == 3 and all(r.mode == "simulated" for r in readings)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    with use_nvml(simulate_gpu([8 * GiB, 8 * GiB, 12 * GiB], overhead)):
        visible = gpu.probe_all(vram_limit_bytes=6 * GiB)
    assert [r.total_bytes for r in visible] == [12 * GiB, 8 * GiB]  # CUDA's numbering: 0 is the third card
    assert [r.headroom_bytes for r in visible] == [6 * GiB, 6 * GiB]  # --vram-limit caps each card


def test_probe_all_without_a_gpu_is_one_cpu_reading(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    readings = gpu.probe_all()
    assert len(readings) == 1 and readings[0].mode == "cpu"
    ram = gpu.system_ram(32 * GiB)
    assert ram.mode == "cpu" and ram.headroom_bytes == 32 * GiB and "simulated RAM" in ram.reason
