"""The client endpoints: the api functions themselves, registered with `gr.api` under their
names, so their typed signatures and docstrings make the "Use via API" page, the gradio_client
API and the MCP tools. This is the edge where the core's `SteeringError`s become `gr.Error`s
and where each request logs one line (steering/ui/common.py, `user_errors`). Two endpoints
need Gradio's own file type and live here: `export_vectors` and `import_vectors`.
"""

from __future__ import annotations

import functools
import inspect

import gradio as gr
from gradio import FileData
from gradio.utils import get_function_description, get_upload_folder, is_in_or_equal

from steering import api, chat, training, vocab
from steering.errors import InputError
from steering.ui import serving
from steering.ui.common import INFO, MODEL, user_errors


def export_vectors(
    vectors: list[dict], format: str = "gguf", capture_mode: str = vocab.DEFAULT_CAPTURE_MODE
) -> FileData:
    """Export steering vectors as a llama.cpp control vector (GGUF) or a safetensors file.

    Args:
        vectors: the same vector objects as /steer takes (text, pair or direction; coeff; layer).
            Layers 2 and up: llama.cpp adds direction.N after block N, which is the input of our
            layer N+1, so our layer L is written as direction.{L-1}.
        format: "gguf" (llama.cpp --control-vector) or "safetensors" (the same tensors and metadata).
        capture_mode: how text vectors are captured (contexts, bos-neutral, bos or stock), as in the UI.

    Returns:
        the file. Text and pair vectors become absolute vectors: coefficient x direction x the
        layer's typical hidden-state RMS on neutral text (recorded in the file's metadata), so
        llama.cpp applies them at scale 1; our own /import_vectors restores the exact vectors.
    """
    result = api.export_vectors(vectors, format, capture_mode)
    return FileData(path=result["path"], orig_name=f"steering-vectors.{result['format']}")


def import_vectors(file: FileData) -> dict:
    """Read a control vector file (GGUF or safetensors) into vectors for /steer.

    Args:
        file: the file (with gradio_client: handle_file("vectors.gguf")).

    Returns:
        {"vectors": [...], "metadata": {...}, "model", "fallback"}. A file from /export_vectors
        gives back its original vectors (the same steering, token for token); a foreign control
        vector (llama.cpp, repeng) gives {"direction": [...], "coeff": 1.0, "layer": N+1} per
        direction.N tensor. A wrong hidden size or a layer beyond the model is refused.
    """
    path = file.get("path") if isinstance(file, dict) else getattr(file, "path", None)
    if not isinstance(path, str) or not is_in_or_equal(path, get_upload_folder()):
        raise InputError("file", "must be a file uploaded with the request (gradio_client: handle_file(path))")
    return api.import_vectors(path)


def read(
    texts: list[str],
    vector: dict,
    pooling: str = training.DEFAULT_POOLING,
    capture_mode: str = vocab.DEFAULT_CAPTURE_MODE,
) -> dict:
    return training.read_texts(texts, vector, pooling, capture_mode)


read.__doc__ = training.read_texts.__doc__  # the endpoint is /read; its function is named so for MCP


# The client endpoints: function, name, concurrency group.
ENDPOINTS = (
    (api.steer, "steer", MODEL),
    (chat.chat, "chat", MODEL),
    (api.sweep, "sweep", MODEL),
    (api.similarity, "similarity", MODEL),
    (api.autotune, "autotune", MODEL),
    (training.train_vector, "train_vector", MODEL),
    (read, "read", MODEL),
    (export_vectors, "export_vectors", MODEL),
    (import_vectors, "import_vectors", MODEL),
    (api.load_model, "load_model", MODEL),
    (api.status, "status", INFO),
    (api.plan, "plan", INFO),
)


def _endpoint(fn, name: str):
    """An api function as a client endpoint: errors translated, a run stopped when its client
    goes away (steering/ui/serving.py), and its string annotations evaluated so `gr.api` sees
    real types (api.py uses `from __future__ import annotations`) and the API page shows `dict`
    instead of `Any`."""
    call = user_errors(fn)
    signature = inspect.signature(fn, eval_str=True)
    # Keyword-only parameters (e.g. autotune's `stop` flag) are for in-process callers such as the
    # UI's handlers, not for clients: the endpoint does not offer them.
    public = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]

    # Gradio hands the request to a trailing gr.Request parameter (by position) and leaves it off the API.
    request = inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=gr.Request)
    served_signature = signature.replace(parameters=[*public, request])

    @functools.wraps(fn)
    def served(*args, **kwargs):
        arguments = served_signature.bind(*args, **kwargs).arguments
        with serving.stop_when_client_leaves(arguments.pop("request", None), name):
            return call(**arguments)

    served.__signature__ = served_signature
    served.__annotations__ = {**{p.name: p.annotation for p in public}, "request": gr.Request}
    served.__annotations__["return"] = signature.return_annotation
    return served


def _document_parameters(demo: gr.Blocks, name: str, fn) -> None:
    """Give each parameter of a `gr.api` endpoint its name and its docstring line on the API page
    ("Use via API"); Gradio labels them '1st', '2nd', ... and leaves the description empty."""
    _, described, _ = get_function_description(fn)
    block_fn = next(f for f in demo.fns.values() if f.api_name == name)
    for component, parameter in zip(block_fn.inputs, inspect.signature(fn).parameters):
        component.label = parameter
        if described.get(parameter):
            component._api_info = {**component._api_info, "additional_description": described[parameter]}


def register(demo: gr.Blocks) -> None:
    """Every client endpoint, typed, with its docstring on the API page (call inside the Blocks)."""
    for fn, name, group in ENDPOINTS:
        gr.api(_endpoint(fn, name), api_name=name, **group)
        _document_parameters(demo, name, fn)
