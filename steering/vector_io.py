"""Steering vectors out of and into files: llama.cpp control vectors (GGUF) and safetensors.

A control vector file holds one absolute float32 vector per layer, named `direction.N`, with
`general.architecture = "controlvector"`, `controlvector.model_hint` and
`controlvector.layer_count` (the layout llama.cpp's `--control-vector`, repeng and EasySteer use).
llama.cpp adds `direction.N` to the *output* of block N, which is the *input* of transformers'
`model.model.layers[N + 1]` — where llm-steer (and so Steering Lab) adds. So our layer L is
written as `direction.{L-1}`, and `direction.N` imports as layer N+1; layers 0 and 1 cannot be
written (llama.cpp rejects `direction.0`). Reading of the sources: docs/llama-cpp-control-vectors.md.

Our coefficients are relative (units of the hidden state's RMS at the last token, measured at
every step), a control vector is absolute: text and pair vectors are converted with the layer's
typical RMS on neutral text (`SteeringEngine.layer_rms`), recorded in `steeringlab.layer_rms`.
Our own metadata (`steeringlab.*`: the request's vectors, capture mode, model id) lets our import
restore the exact relative vectors, so a round trip steers token for token as before. A file
without it (a foreign control vector) imports as raw `direction` vectors.

safetensors files hold the same tensors and the same metadata (as string header entries).
Plain numpy + `gguf` (writing) + `safetensors`; the engine supplies directions and RMS. Reading
GGUF is our own bounded walk (`_read_gguf`): `gguf.GGUFReader` walks whatever count a header claims.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from steering import files, limits
from steering.engine import SteeringEngine, VectorSpec, parse_vector
from steering.errors import InputError

FORMATS = ("gguf", "safetensors")
ARCH = "controlvector"
OURS = "steeringlab"
FORMAT_VERSION = 2  # 2: vectors record their positions; version 1 files were made with "all"
NOTE = (
    "direction.N is an absolute vector added to the output of block N (llama.cpp), i.e. the input "
    "of transformers layer N+1 (Steering Lab). Text and pair vectors were converted from units of "
    "the hidden state's RMS with the typical RMS per layer in steeringlab.layer_rms; a decay "
    "schedule is not represented in the tensors. llama.cpp adds a control vector at every position "
    '(Steering Lab\'s positions "all"), also for vectors that were added to the prompt only here.'
)
_DIRECTION = re.compile(r"^direction\.(\d+)$")


# -- export -------------------------------------------------------------------------------------
def absolute_vectors(engine: SteeringEngine, specs: list[VectorSpec], mode: str) -> dict[int, np.ndarray]:
    """Per layer, the sum of the enabled vectors as one absolute float32 vector (H,)."""
    sums: dict[int, np.ndarray] = {}
    for spec in specs:
        if not spec.enabled:
            continue
        direction = engine.direction(spec, mode).view(-1).cpu().numpy().astype(np.float64)
        scale = spec.coeff if spec.direction else spec.coeff * engine.layer_rms(spec.layer)
        sums[spec.layer] = sums.get(spec.layer, 0.0) + scale * direction
    return {layer: vector.astype(np.float32) for layer, vector in sorted(sums.items())}


def export_file(engine: SteeringEngine, specs: list[VectorSpec], fmt: str, *, mode: str, model_id: str) -> Path:
    """Write `specs` as a control vector file in `fmt` and return its path (in the app's folder)."""
    if fmt not in FORMATS:
        raise InputError("format", f"must be one of {', '.join(FORMATS)}; got {limits.shorten(fmt)}")
    for i, spec in enumerate(specs):
        if spec.enabled and spec.layer < 2:
            raise InputError(
                f"vectors[{i}].layer",
                f"is {spec.layer}; a control vector can hold layers 2 and up (llama.cpp adds direction.N "
                "after block N, so the input of layer 0 or 1 has no direction.N)",
            )
    if not any(spec.enabled for spec in specs):
        raise InputError("vectors", "give at least one enabled vector to export")
    tensors = {f"direction.{layer - 1}": v for layer, v in absolute_vectors(engine, specs, mode).items()}
    metadata = {
        f"{ARCH}.model_hint": str(getattr(engine.model.config, "model_type", "") or "unknown"),
        f"{OURS}.format_version": str(FORMAT_VERSION),
        f"{OURS}.model_id": model_id,
        f"{OURS}.capture_mode": mode,
        f"{OURS}.vectors": json.dumps([spec.to_dict() for spec in specs]),
        f"{OURS}.layer_rms": json.dumps(
            {str(s.layer): engine.layer_rms(s.layer) for s in specs if s.enabled and not s.direction}
        ),
        f"{OURS}.note": NOTE,
    }
    path = files.app_file("vectors", f".{fmt}")
    if fmt == "gguf":
        _write_gguf(path, tensors, metadata)
    else:
        _write_safetensors(path, tensors, metadata)
    return path


def _write_gguf(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), ARCH)  # writes general.architecture itself
    for key, value in metadata.items():
        writer.add_string(key, value)
    writer.add_uint32(f"{ARCH}.layer_count", len(tensors))
    for name, vector in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(vector, dtype=np.float32))  # llama.cpp wants F32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    header = {"general.architecture": ARCH, f"{ARCH}.layer_count": str(len(tensors)), **metadata}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=header)


# -- import -------------------------------------------------------------------------------------
def read_file(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, string metadata) of a GGUF or safetensors control vector file: plain float32
    arrays and texts, nothing that needs the model, so a caller parses before it waits for the
    model lock. `InputError` naming `file` for anything else. Every count and size a header
    claims is held against the file's size and the limits of `steering/limits.py` before it is
    read, so parse time and memory stay within a small multiple of the file's size."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            if size > limits.VECTOR_FILE_BYTES:
                raise InputError("file", f"is {size} bytes; the limit is {limits.VECTOR_FILE_BYTES} (64 MiB)")
            data = handle.read()
    except OSError as exc:
        raise InputError("file", f"cannot be read ({exc.strerror or 'no such file'})") from None
    suffix = path.suffix.lower().lstrip(".")
    kind = "GGUF" if data[:4] == b"GGUF" or suffix == "gguf" else "safetensors"
    try:
        if data[:4] == b"GGUF":
            return _read_gguf(data)
        if _looks_like_safetensors(data):
            return _read_safetensors(data)
        start = "the GGUF magic bytes" if kind == "GGUF" else "a safetensors header (8 bytes of length, then JSON)"
        raise _Bad(f"it does not start with {start}")
    except _Bad as exc:
        raise InputError("file", f"is not a readable {kind} control vector: {exc}") from None


class _Truncated(Exception):
    pass


class _Bad(Exception):
    """Why a file is not a readable control vector (read_file names the format)."""


class _GGUFView:
    """A bounded walk over a GGUF file's bytes: every read checks that the bytes exist."""

    def __init__(self, data: bytes):
        self.data = data
        self.at = 0
        self.array_values = 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.at + count > len(self.data):
            raise _Truncated
        out = self.data[self.at : self.at + count]
        self.at += count
        return out

    def number(self, fmt: str) -> int | float:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str, limit: int, least_bytes: int) -> int:
        """A count of items that take at least `least_bytes` each: refused when over `limit` or
        when the bytes left in the file cannot hold that many."""
        claimed = self.number("Q")
        if claimed > limit:
            raise _Bad(f"it claims {claimed} {what}; a control vector file may hold {limit} at most")
        if claimed * least_bytes > len(self.data) - self.at:
            raise _Bad(f"it claims {claimed} {what}, more than its remaining {len(self.data) - self.at} bytes can hold")
        return claimed

    def text(self, what: str) -> str:
        length = self.count(f"bytes in a {what}", limits.VECTOR_FILE_BYTES, 1)
        return self.take(length).decode("utf-8", errors="replace")

    def value(self, kind: int, depth: int = 0):
        if kind in _GGUF_SCALARS:
            return self.number(_GGUF_SCALARS[kind])
        if kind == 7:  # BOOL
            return bool(self.number("B"))
        if kind == 8:  # STRING
            return self.text("metadata text")
        if kind != 9:  # ARRAY
            raise _Bad(f"it has a metadata value of unknown type {kind}")
        if depth >= limits.VECTOR_FILE_NESTING:
            raise _Bad(f"it nests metadata arrays deeper than {limits.VECTOR_FILE_NESTING} levels")
        item = self.number("I")
        least = struct.calcsize(_GGUF_SCALARS[item]) if item in _GGUF_SCALARS else (1 if item == 7 else 8)
        left = limits.VECTOR_FILE_ARRAY_VALUES - self.array_values
        n = self.count("metadata array values", left, least)
        self.array_values += n
        if item in _GGUF_SCALARS:  # one numpy read, not a Python loop over the values
            fmt = _GGUF_SCALARS[item]
            return np.frombuffer(self.take(n * least), dtype="<" + fmt).tolist()
        return [self.value(item, depth + 1) for _ in range(n)]


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 10: "Q", 11: "q", 12: "d"}
_GGUF_TENSOR_TYPES = {0: ("F32", "<f4"), 1: ("F16", "<f2"), 30: ("BF16", "<u2")}
_GGUF_ALIGNMENT = 32


def _read_gguf(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Our own bounded reader of GGUF versions 2 and 3 (metadata, then F32/F16/BF16 tensors).
    `gguf.GGUFReader` walks any count a header claims in Python (2**40 array values: an OOM kill)."""
    view = _GGUFView(data)
    try:
        view.take(4)
        version = view.number("I")
        if version not in (2, 3):
            raise _Bad(f"it is GGUF version {version}; versions 2 and 3 can be read")
        n_tensors = view.count("tensors", limits.VECTOR_FILE_TENSORS, 8 + 4 + 4 + 8)
        n_keys = view.count("metadata entries", limits.VECTOR_FILE_KEYS, 8 + 4 + 1)
        metadata: dict[str, str] = {}
        for _ in range(n_keys):
            key = _gguf_name(view, "metadata key")
            value = view.value(view.number("I"))
            metadata[key] = value if isinstance(value, str) else json.dumps(value)
        infos = [_gguf_tensor_info(view) for _ in range(n_tensors)]
    except _Truncated:
        raise _Bad("it is cut short: its header claims more bytes than the file has") from None
    alignment = _gguf_alignment(metadata)
    start = -(-view.at // alignment) * alignment
    return _gguf_tensors(data, infos, start, alignment), metadata


def _gguf_name(view: _GGUFView, what: str) -> str:
    length = view.count(f"bytes in a {what}", limits.VECTOR_FILE_NAME_BYTES, 1)
    return view.take(length).decode("utf-8", errors="replace")


def _gguf_tensor_info(view: _GGUFView) -> tuple[str, int, int, int]:
    """(name, element count, type, offset) of one tensor, its dimensions checked."""
    name = _gguf_name(view, "tensor name")
    n_dims = view.number("I")
    if not 1 <= n_dims <= limits.VECTOR_FILE_DIMS:
        raise _Bad(f"it has a tensor {name[:60]!r} of {n_dims} dimensions; a direction has 1")
    elements = 1
    for _ in range(n_dims):
        elements *= view.number("Q")
        if elements > len(view.data):  # no tensor has more elements than its file has bytes
            raise _Bad(f"it has a tensor {name[:60]!r} larger than the file")
    kind = view.number("I")
    if kind not in _GGUF_TENSOR_TYPES:
        raise _Bad(f"it has a tensor {name[:60]!r} of type {kind}; F32, F16 and BF16 can be read")
    return name, elements, kind, view.number("Q")


def _gguf_alignment(metadata: dict[str, str]) -> int:
    raw = metadata.get("general.alignment", str(_GGUF_ALIGNMENT))
    if not raw.isdigit() or not 1 <= int(raw) <= 2**16 or int(raw) & (int(raw) - 1):
        raise _Bad(f"it has general.alignment {raw[:20]}; it must be a power of two up to 65536")
    return int(raw)


def _gguf_tensors(data: bytes, infos, start: int, alignment: int) -> dict[str, np.ndarray]:
    """Each tensor's bytes, checked to lie inside the file and apart from every other tensor
    before any is read (32 tensors over one region would each cost a copy of it)."""
    spans = []
    for name, elements, kind, offset in infos:
        begin = start + offset
        end = begin + elements * np.dtype(_GGUF_TENSOR_TYPES[kind][1]).itemsize
        if offset % alignment or end > len(data):
            raise _Bad(f"it has a tensor {name[:60]!r} whose data lies outside the file or off its alignment")
        spans.append((begin, end, name))
    _check_apart(spans)
    tensors: dict[str, np.ndarray] = {}
    for (name, elements, kind, _), (begin, _, _) in zip(infos, spans):
        type_name, dtype = _GGUF_TENSOR_TYPES[kind]
        raw = np.frombuffer(data, dtype=dtype, count=elements, offset=begin)
        if type_name == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = raw.astype(np.float32)
    return tensors


def _check_apart(spans: list[tuple[int, int, str]]) -> None:
    """No two (begin, end, name) byte spans overlap and no name is used twice."""
    names = [name for _, _, name in spans]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise _Bad(f"it holds two tensors named {twice[:60]!r}")
    ordered = sorted(spans)
    for (_, end, first), (begin, _, second) in zip(ordered, ordered[1:]):
        if begin < end:
            raise _Bad(f"it has tensors {first[:60]!r} and {second[:60]!r} over the same bytes")


def _looks_like_safetensors(data: bytes) -> bool:
    """8 bytes of header length, then a JSON object: the safetensors layout."""
    return len(data) >= 10 and data[8:9] == b"{" and 2 <= struct.unpack("<Q", data[:8])[0] <= len(data) - 8


def _read_safetensors(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The header is checked here (JSON nesting, count, dtypes, spans inside the file and apart)
    before the safetensors library reads the tensors."""
    length = struct.unpack("<Q", data[:8])[0]
    header = limits.loads_json(data[8 : 8 + length].decode("utf-8", errors="replace"), "file", "a safetensors header")
    if not isinstance(header, dict):
        raise _Bad("it has a safetensors header that is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Bad("it has safetensors metadata that is not a map of texts")
    if len(header) > limits.VECTOR_FILE_TENSORS or len(metadata) > limits.VECTOR_FILE_KEYS:
        raise _Bad(f"it holds {len(header)} tensors and {len(metadata)} metadata entries; the limits are "
            f"{limits.VECTOR_FILE_TENSORS} and {limits.VECTOR_FILE_KEYS}",
        )  # fmt: skip
    spans = []
    for name, info in header.items():
        info = info if isinstance(info, dict) else {}
        offsets = info.get("data_offsets")
        if info.get("dtype") not in _SAFETENSORS_TYPES:
            raise _Bad(f"it has a tensor {name[:60]!r} that is not F32, F16, BF16 or F64")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _Bad(f"it has a tensor {name[:60]!r} without valid data offsets")
        if not 0 <= offsets[0] <= offsets[1] <= len(data) - 8 - length:
            raise _Bad(f"it has a tensor {name[:60]!r} whose data lies outside the file")
        spans.append((offsets[0], offsets[1], name))
    _check_apart(spans)
    return _safetensors_tensors(data), metadata


_SAFETENSORS_TYPES = ("F32", "F16", "BF16", "F64")


def _safetensors_tensors(data: bytes) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:  # torch reads BF16, numpy does not; the header was checked above
        return {name: t.float().reshape(-1).numpy() for name, t in load(data).items()}
    except SafetensorError:  # e.g. a shape that does not match its data's length
        raise _Bad("its tensors do not match their shapes and data offsets") from None


def vectors_from_file(
    tensors: dict[str, np.ndarray], metadata: dict[str, str], *, n_layers: int, hidden_size: int
) -> tuple[list[dict], dict]:
    """The request vectors a file holds, checked against the loaded model, and what it says of itself.

    A file of ours gives back its exact relative vectors; a foreign one gives one raw `direction`
    vector (coeff 1) per tensor, at layer N+1 for `direction.N`. `info["mapping"]` says, per
    tensor, where it lands and at what magnitude (`mapping_of`).
    """
    info = {
        "architecture": metadata.get("general.architecture"),
        "model_hint": metadata.get(f"{ARCH}.model_hint"),
        "model_id": metadata.get(f"{OURS}.model_id"),
        "capture_mode": metadata.get(f"{OURS}.capture_mode"),
        "ours": f"{OURS}.vectors" in metadata,
        "tensors": {name: int(v.size) for name, v in tensors.items()},
    }
    if info["ours"]:
        raw = limits.loads_json(metadata[f"{OURS}.vectors"], "file", f"a {OURS}.vectors entry")
        limits.check_count("vectors", raw, "file.vectors")
        if metadata.get(f"{OURS}.format_version") == "1" and isinstance(raw, list):
            raw = [{"positions": "all", **v} if isinstance(v, dict) else v for v in raw]
        specs = [parse_vector(v, i, n_layers) for i, v in enumerate(raw)]
        for i, spec in enumerate(specs):
            if spec.direction and len(spec.direction) != hidden_size:
                raise InputError(f"file.vectors[{i}].direction", _size_text(len(spec.direction), hidden_size))
        info["mapping"] = [
            {"layer": s.layer, "from": f"{OURS}.vectors", "magnitude": "relative (units of the hidden state's RMS)"}
            for s in specs
        ]
        return [spec.to_dict() for spec in specs], info
    vectors = []
    for name, vector in sorted(tensors.items(), key=lambda kv: _direction_index(kv[0])):
        index = _direction_index(name)
        if vector.size != hidden_size:
            raise InputError(f"file.{name}", _size_text(vector.size, hidden_size))
        if not np.isfinite(vector).all():
            raise InputError(f"file.{name}", "holds NaN or infinite numbers")
        if index + 1 > n_layers - 1:
            raise InputError(
                f"file.{name}",
                f"is added after block {index}, the input of layer {index + 1}; this model's layers are "
                f"0 to {n_layers - 1}",
            )
        # Made to be added at every position, as llama.cpp does: positions "all".
        vectors.append(
            {"direction": vector.tolist(), "coeff": 1.0, "layer": index + 1, "enabled": True, "positions": "all"}
        )
    limits.check_count("vectors", vectors, "file")
    if not vectors:
        raise InputError("file", "holds no direction.N tensors")
    info["mapping"] = [mapping_of(v["layer"] - 1, np.asarray(v["direction"])) for v in vectors]
    info["mapping_note"] = MAPPING_NOTE
    return vectors, info


MAPPING_NOTE = (
    "direction.N is added to the output of block N: transformers' model.model.layers[N], repeng's "
    "ControlModel layer_id N (its hidden_states[N + 1]), llama.cpp's il = N. That is the input of "
    "layer N + 1 here. The tensor is imported as it is, a raw vector (coeff 1 = the file's magnitude, "
    'not RMS units) added at every position (positions "all"), as repeng and llama.cpp add it: '
    "coeff c here = repeng's set_control(vector, c) = llama.cpp's --control-vector-scaled FILE:c."
)


def mapping_of(index: int, vector: np.ndarray) -> dict:
    """How a foreign `direction.{index}` was mapped: its layer here and its magnitude."""
    return {
        "tensor": f"direction.{index}",
        "layer": index + 1,
        "block_output": index,
        "norm": round(float(np.linalg.norm(vector)), 6),
        "coeff": 1.0,
        "magnitude": "raw",
        "positions": "all",
    }


def _direction_index(name: str) -> int:
    match = _DIRECTION.match(name)
    if not match or int(match.group(1)) < 1:
        raise InputError(
            "file", f"holds a tensor named {name[:60]!r}; a control vector holds direction.1, direction.2, …"
        )
    return int(match.group(1))


def _size_text(size: int, hidden_size: int) -> str:
    return f"has {size} numbers; the loaded model's hidden size is {hidden_size}"
