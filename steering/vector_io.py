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
Plain numpy + `gguf` + `safetensors`; the engine supplies directions and RMS.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from steering import files, limits
from steering.engine import SteeringEngine, VectorSpec, parse_vector
from steering.errors import InputError

FORMATS = ("gguf", "safetensors")
ARCH = "controlvector"
OURS = "steeringlab"
FORMAT_VERSION = 2  # 2: vectors record their positions; version 1 files were made with "all"
MAX_FILE_BYTES = 64 * 2**20  # 64 MiB: a control vector of a 70B model (80 x 8192 floats) is 2.5 MiB
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
        raise InputError("format", f"must be one of {', '.join(FORMATS)}; got {fmt!r}")
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
    """(tensors, string metadata) of a GGUF or safetensors file; `InputError` naming `file` if neither."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise InputError("file", f"cannot be read ({exc.strerror})") from None
    if size > MAX_FILE_BYTES:
        raise InputError("file", f"is {size} bytes; the limit is {MAX_FILE_BYTES} (64 MiB)")
    try:
        return _read_gguf(path) if magic == b"GGUF" else _read_safetensors(path)
    except InputError:
        raise
    except Exception as exc:  # a corrupt file fails in many ways inside the readers
        kind = "GGUF" if magic == b"GGUF" else "safetensors"
        raise InputError("file", f"is not a readable {kind} control vector ({type(exc).__name__})") from None


def _read_gguf(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        metadata[name] = value if isinstance(value, str) else json.dumps(value)
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    return tensors, metadata


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {name: handle.get_tensor(name).astype(np.float32).reshape(-1) for name in handle.keys()}  # noqa: SIM118
    return tensors, metadata


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
        try:
            raw = json.loads(metadata[f"{OURS}.vectors"])
        except ValueError:
            raise InputError("file", f"has a damaged {OURS}.vectors entry") from None
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
