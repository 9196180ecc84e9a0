"""Reading vector files safely (issue 26, item 1): real hostile files on disk, refused before they
cost time or memory, with a sentence that names the format and no exception class names.

`vector_io.read_file` is the one parse step; `api.import_vectors` runs it before it waits for the
model lock. Files are written with `gguf.GGUFWriter` (what llama.cpp and repeng write) or by hand
where a writer would refuse to make them.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import tracemalloc

import gguf
import numpy as np
import pytest

from steering import limits, vector_io
from steering.errors import InputError

# The issue's file: one key-value of type ARRAY[UINT8] claiming 2**40 values, in 1,051 bytes.
EVIL = (
    b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"abc" + struct.pack("<I", 9)
    + struct.pack("<IQ", 0, 2**40) + b"\0" * 1000
)  # fmt: skip


def _refused(path, *words: str, seconds: float = 0.5) -> str:
    start = time.perf_counter()
    with pytest.raises(InputError) as caught:
        vector_io.read_file(path)
    elapsed = time.perf_counter() - start
    message = str(caught.value)
    assert elapsed < seconds, (elapsed, message)
    assert message.startswith("file: ")
    for word in words:
        assert word in message, message
    assert "Error" not in message, message  # no exception class names
    return message


def _gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _hand_gguf(tensors: list[tuple[bytes, int, int]], data: bytes) -> bytes:
    """A GGUF v3 file with no metadata and the given (name, elements, offset) F32 tensors."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 0)
    for name, elements, offset in tensors:
        head += _gguf_string(name) + struct.pack("<I", 1) + struct.pack("<Q", elements) + struct.pack("<IQ", 0, offset)
    head += b"\0" * (-len(head) % 32)
    return head + data


def _written(path, tensors: dict[str, np.ndarray], strings: dict[str, str] = {}) -> str:  # noqa: B006
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_uint32("controlvector.layer_count", len(tensors))
    for key, value in strings.items():
        writer.add_string(key, value)
    for name, vector in tensors.items():
        writer.add_tensor(name, vector.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_the_issues_1kb_gguf_claiming_2_40_values_is_refused_at_once(tmp_path):
    path = tmp_path / "evil.gguf"
    path.write_bytes(EVIL)
    assert path.stat().st_size == 1051
    _refused(path, "1099511627776", "65536", seconds=0.1)


def test_a_real_1_mb_metadata_array_is_refused_without_walking_it(tmp_path):
    body = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gguf_string(b"big") + struct.pack("<I", 9)
    path = tmp_path / "array.gguf"
    path.write_bytes(body + struct.pack("<IQ", 0, 2**20) + b"\1" * 2**20)
    _refused(path, "1048576 metadata array values", seconds=0.1)


def test_counts_beyond_the_file_are_refused(tmp_path):
    path = tmp_path / "keys.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1000) + b"\0" * 100)  # 1000 keys in 100 bytes
    _refused(path, "1000 metadata entries", "remaining")
    text = tmp_path / "text.gguf"
    text.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**30) + b"k" * 50)
    _refused(text, "bytes in a metadata key")
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gguf_string(b"k") + struct.pack("<I", 4))
    _refused(short, "GGUF", "cut short")


def test_overlapping_tensors_are_refused_before_any_is_copied(tmp_path):
    """The issue's 32 tensors over one 16 MiB region cost +880 MiB in gguf's reader."""
    elements = 4 * 2**20  # 16 MiB of F32
    path = tmp_path / "overlap.gguf"
    path.write_bytes(_hand_gguf([(f"direction.{i}".encode(), elements, 0) for i in range(1, 33)], b"\0" * 4 * elements))
    tracemalloc.start()
    try:
        _refused(path, "over the same bytes")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * path.stat().st_size, peak  # the file's bytes once, no tensor copies


def test_tensors_outside_the_file_are_refused(tmp_path):
    path = tmp_path / "outside.gguf"
    path.write_bytes(_hand_gguf([(b"direction.1", 576, 2**20)], b"\0" * 4 * 576))
    _refused(path, "outside the file")
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(_hand_gguf([(b"direction.1", 2**62, 0)], b"\0" * 64))
    _refused(huge, "larger than the file")


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path):
    path = tmp_path / "big.gguf"
    with open(path, "wb") as handle:
        handle.write(b"GGUF")
        handle.truncate(limits.VECTOR_FILE_BYTES + 1)  # sparse: nothing is written
    _refused(path, str(limits.VECTOR_FILE_BYTES + 1), "64 MiB")


def test_garbage_named_gguf_is_called_a_gguf_problem(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"not a control vector at all" * 10)
    message = _refused(path, "GGUF")
    assert "safetensors control vector" not in message and "SafetensorError" not in message


def test_a_written_control_vector_reads_as_gguf_reads_it(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"direction.{i}": rng.standard_normal(576).astype(np.float32) for i in (3, 9, 14)}
    path = _written(tmp_path / "cv.gguf", tensors, {"controlvector.model_hint": "llama"})
    got, metadata = vector_io.read_file(path)
    reference = gguf.GGUFReader(path)
    assert {t.name: np.asarray(t.data).tolist() for t in reference.tensors} == {k: v.tolist() for k, v in got.items()}
    assert metadata["general.architecture"] == "controlvector"
    assert metadata["controlvector.model_hint"] == "llama" and metadata["controlvector.layer_count"] == "3"


def test_deeply_nested_json_in_metadata_is_a_sentence(tmp_path):
    path = _written(
        tmp_path / "nested.gguf",
        {"direction.3": np.zeros(576)},
        {"steeringlab.vectors": "[" * 100_000 + "]" * 100_000},
    )
    tensors, metadata = vector_io.read_file(path)
    with pytest.raises(InputError, match="nested too deeply"):
        vector_io.vectors_from_file(tensors, metadata, n_layers=30, hidden_size=576)


def _hand_safetensors(header: dict | str, data: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + data


def test_safetensors_headers_are_checked_before_reading(tmp_path):
    overlap = tmp_path / "overlap.safetensors"
    entry = {"dtype": "F32", "shape": [576], "data_offsets": [0, 2304]}
    overlap.write_bytes(_hand_safetensors({"direction.1": entry, "direction.2": entry}, b"\0" * 2304))
    _refused(overlap, "over the same bytes")
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(_hand_safetensors({"direction.1": {**entry, "data_offsets": [0, 2**40]}}, b"\0" * 64))
    _refused(outside, "outside the file")
    nested = tmp_path / "nested.safetensors"
    nested.write_bytes(_hand_safetensors('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", b""))
    _refused(nested, "nested too deeply")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 20) + b"{" + b"x" * 40)
    message = _refused(garbage, "safetensors")
    assert "SafetensorError" not in message


def test_safetensors_round_trip(tmp_path):
    from safetensors.numpy import save_file

    vector = np.arange(576, dtype=np.float32)
    path = tmp_path / "cv.safetensors"
    save_file({"direction.3": vector}, str(path), metadata={"general.architecture": "controlvector"})
    tensors, metadata = vector_io.read_file(path)
    assert tensors["direction.3"].tolist() == vector.tolist() and metadata == {"general.architecture": "controlvector"}


def test_import_parses_before_it_waits_for_the_model(tmp_path, fresh_manager):
    """With the model lock held by another request, a bad file is refused at once."""
    from steering import api

    path = tmp_path / "evil.gguf"
    path.write_bytes(EVIL)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with fresh_manager._lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(5)
    try:
        start = time.perf_counter()
        with pytest.raises(InputError, match="claims 1099511627776"):
            api.import_vectors(str(path))
        assert time.perf_counter() - start < 0.5
    finally:
        release.set()
        thread.join()
