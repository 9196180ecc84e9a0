"""Vectors travel (issue 13): llama.cpp control vectors (GGUF) and safetensors, out and in,
through the real `gradio_client` against a launched server on the embedded SmolLM2.

A foreign control vector is made here with `gguf.GGUFWriter` the way repeng and llama.cpp's
cvector-generator write one (architecture "controlvector", one F32 `direction.N` per layer).
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
from _server import TOKENS, client, launched
from gradio_client import handle_file
from gradio_client.exceptions import AppError

PROMPT = "Tell me about your weekend."
HIDDEN = 576  # SmolLM2-135M
VECTORS = [
    {"text": "dogs", "coeff": 0.6, "layer": 15},
    {"positive": "I am so happy and joyful", "negative": "I am so sad and miserable", "coeff": 0.5, "layer": 10},
]


@pytest.fixture(scope="module")
def api(embedded_dir, tmp_path_factory):
    with launched() as url:
        yield client(url, download_files=str(tmp_path_factory.mktemp("downloads")))  # files arrive as paths


def steer(api, vectors):
    return api.predict(PROMPT, vectors, TOKENS, api_name="/steer")


def _foreign(path, tensors: dict[str, np.ndarray]) -> str:
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(tensors))
    for name, vector in tensors.items():
        writer.add_tensor(name, vector.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_gguf_export_is_a_llama_cpp_control_vector_and_round_trips(api):
    path = api.predict(VECTORS, "gguf", api_name="/export_vectors")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    # Our layer L is the input of block L, which llama.cpp reaches as the output of block L-1.
    shapes = {t.name: (t.tensor_type.name, list(t.shape)) for t in reader.tensors}
    assert shapes == {"direction.14": ("F32", [HIDDEN]), "direction.9": ("F32", [HIDDEN])}
    imported = api.predict(handle_file(path), api_name="/import_vectors")
    assert imported["metadata"]["ours"] and imported["metadata"]["model_id"] == "SmolLM2-135M-Instruct"
    assert [{k: v[k] for k in original} for v, original in zip(imported["vectors"], VECTORS)] == VECTORS
    assert steer(api, imported["vectors"])["steered"] == steer(api, VECTORS)["steered"]  # token for token


def test_safetensors_export_holds_the_same_tensors(api):
    from safetensors import safe_open

    gguf_path = api.predict(VECTORS, "gguf", api_name="/export_vectors")
    st_path = api.predict(VECTORS, "safetensors", api_name="/export_vectors")
    with safe_open(st_path, framework="numpy") as handle:
        meta = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    assert meta["general.architecture"] == "controlvector" and "steeringlab.vectors" in meta
    for t in gguf.GGUFReader(gguf_path).tensors:
        assert np.array_equal(np.asarray(t.data), tensors[t.name])
    imported = api.predict(handle_file(st_path), api_name="/import_vectors")
    assert steer(api, imported["vectors"])["steered"] == steer(api, VECTORS)["steered"]


def test_a_foreign_control_vector_imports_and_steers(api, tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.standard_normal(HIDDEN).astype(np.float32) * 4.0
    path = _foreign(tmp_path / "repeng.gguf", {"direction.10": raw})
    result = api.predict(handle_file(path), api_name="/import_vectors")
    assert not result["metadata"]["ours"] and result["metadata"]["model_hint"] == "llama"
    (vector,) = result["vectors"]
    assert (vector["layer"], vector["coeff"]) == (11, 1.0)  # direction.10 = after block 10 = input of layer 11
    assert vector["positions"] == "all"  # llama.cpp adds a control vector at every position
    assert np.allclose(vector["direction"], raw)
    steered = steer(api, result["vectors"])
    assert steered["layers"] == [11] and steered["steered"] != steered["baseline"]
    direct = steer(api, [{"direction": raw.tolist(), "coeff": 1.0, "layer": 11, "positions": "all"}])
    assert direct["steered"] == steered["steered"]
    prompt_only = steer(api, [{"direction": raw.tolist(), "coeff": 1.0, "layer": 11}])  # the default, "prompt"
    assert prompt_only["steered"] != steered["steered"]


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ({"direction.10": np.ones(100)}, r"^file\.direction\.10: has 100 numbers; .*hidden size is 576"),
        ({"direction.29": np.ones(HIDDEN)}, r"^file\.direction\.29: .*input of layer 30; .*layers are 0 to 29"),
        ({"direction.0": np.ones(HIDDEN)}, r"^file: holds a tensor named 'direction\.0'"),
        ({"token_embd.weight": np.ones(HIDDEN)}, r"^file: holds a tensor named 'token_embd\.weight'"),
    ],
    ids=["wrong-size", "beyond-the-model", "direction-0", "not-a-direction"],
)
def test_bad_control_vectors_are_refused_and_change_nothing(api, tmp_path, tensors, expected):
    before = api.predict(api_name="/status")
    with pytest.raises(AppError) as caught:
        api.predict(handle_file(_foreign(tmp_path / "bad.gguf", tensors)), api_name="/import_vectors")
    assert re.search(expected, str(caught.value)), str(caught.value)
    after = api.predict(api_name="/status")
    assert (after["model"], after["event_count"]) == (before["model"], before["event_count"])


def test_corrupt_files_and_bad_exports_are_refused(api, tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(AppError, match=r"^file: is not a readable GGUF control vector: "):
        api.predict(handle_file(str(corrupt)), api_name="/import_vectors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(AppError, match=r"^file: is not a readable safetensors control vector"):
        api.predict(handle_file(str(junk)), api_name="/import_vectors")
    with pytest.raises(AppError, match=r"^vectors\[0\]\.layer: is 1; a control vector can hold layers 2 and up"):
        api.predict([{"text": "dogs", "coeff": 0.5, "layer": 1}], "gguf", api_name="/export_vectors")
    with pytest.raises(AppError, match=r"^format: must be one of gguf, safetensors"):
        api.predict(VECTORS, "onnx", api_name="/export_vectors")
    with pytest.raises(AppError, match=r"^vectors\[0\]\.direction: has 3 numbers; .*hidden size, 576"):
        steer(api, [{"direction": [1.0, 2.0, 3.0], "coeff": 1.0, "layer": 5}])


def test_only_uploaded_files_are_read():
    """Gradio itself refuses a FileData path that was not uploaded; the endpoint checks again,
    so a path on the server is never opened for a client."""
    from steering.errors import InputError
    from steering.ui import endpoints as ui_endpoints

    with pytest.raises(InputError, match=r"^file: must be a file uploaded with the request"):
        ui_endpoints.import_vectors({"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}})


def test_the_table_exports_and_imports_editable_rows(api, tmp_path):
    """The vectors panel: Export writes the table's vectors; Import appends editable rows, a
    foreign direction as a labelled row whose numbers live in the session's store."""
    from steering.ui import steer as ui_steer

    rows = [["dogs", "", "", 0.6, 15, True, "prompt"]]
    path = ui_steer.export_table(rows, 15, "gguf", "bos-neutral", {})
    assert {t.name for t in gguf.GGUFReader(path).tensors} == {"direction.14"}
    raw = np.linspace(-1, 1, HIDDEN).astype(np.float32)
    foreign = _foreign(tmp_path / "foreign.gguf", {"direction.5": raw})
    table, directions, note = ui_steer.import_into_table(foreign, rows, {}, 15)
    assert table[0] == rows[0] and table[1][1:] == ["", "", 1.0, 6, True, "all"]  # llama.cpp's positions
    assert directions == {table[1][0]: pytest.approx(raw.tolist())} and "foreign control vector" in note
    ours, _, note = ui_steer.import_into_table(path, [], {}, 15)
    assert ours == rows and "Steering Lab file" in note
