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


# A real value for each parameter without a default, shown in the API page's snippets in place of
# Gradio's "..." (its gr.Api inputs have no example of their own). Layer 15: the embedded model's middle.
_VECTOR = {"text": "the ocean", "coeff": 1.0, "layer": 15}
_PROMPT = "Tell me about your weekend."
_FILE = "steering-vectors.gguf"  # shown as handle_file('steering-vectors.gguf')
EXAMPLES: dict[str, dict[str, object]] = {
    "steer": {"prompt": _PROMPT, "vectors": [_VECTOR]},
    "chat": {"message": _PROMPT, "history_steered": [], "history_baseline": [], "vectors": [_VECTOR]},
    "sweep": {"prompt": _PROMPT, "text": "the ocean", "layer": 15, "coeffs": [0.0, 0.5, 1.0, 1.5]},
    "similarity": {"texts": ["the ocean", "the sea", {"positive": "happy", "negative": "sad"}], "layer": 15},
    "autotune": {"prompt": _PROMPT, "text": "the ocean"},
    "train_vector": {"positive": "happy", "negative": "sad"},
    "read": {
        "texts": ["I love sunny days.", "This is awful."],
        "vector": {"positive": "happy", "negative": "sad", "coeff": 1.0, "layer": 15},
    },
    "export_vectors": {"vectors": [_VECTOR]},
    "import_vectors": {"file": {"path": _FILE, "url": _FILE, "meta": {"_type": "gradio.FileData"}}},
    "load_model": {"model": "SmolLM2-135M-Instruct"},
}
_SECTIONS = ("Args:", "Parameters:", "Arguments:", "Returns:")


def public_doc(fn) -> tuple[str, dict[str, str], str]:
    """(description, {parameter: its whole description}, what it returns) of an endpoint's docstring,
    as a client reads them. Gradio's own parser keeps only the first line of each parameter and
    drops what follows "Returns:" from the API page; here a parameter's continuation lines join its
    first, and a description paragraph that names a keyword-only parameter (`stop`: for in-process
    callers, not offered to clients) is left out."""
    signature = inspect.signature(fn)
    hidden = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    lines = (inspect.getdoc(fn) or "").splitlines()
    section, current = "description", None
    paragraphs: list[list[str]] = [[]]
    parameters: dict[str, str] = {}
    returns: list[str] = []
    for raw in lines:
        line = raw.strip()
        if line in _SECTIONS:
            section, current = ("returns" if line == "Returns:" else "args"), None
            continue
        if section == "description":
            if not line:
                paragraphs.append([])
            else:
                paragraphs[-1].append(line)
        elif section == "args":
            name, _, text = line.partition(":")
            if raw.startswith("    ") and not raw.startswith("        ") and name in signature.parameters:
                current = name
                parameters[name] = text.strip()
            elif line and current is not None:
                parameters[current] += " " + line
        elif line:
            returns.append(line)
    kept = [" ".join(p) for p in paragraphs if p and not any(f"`{name}`" in " ".join(p) for name in hidden)]
    return " ".join(kept), parameters, " ".join(returns)


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
    served.__doc__ = _gradio_docstring(fn, [p.name for p in public])
    served.__annotations__ = {**{p.name: p.annotation for p in public}, "request": gr.Request}
    served.__annotations__["return"] = signature.return_annotation
    return served


def _gradio_docstring(fn, parameters: list[str]) -> str:
    """The endpoint's docstring as Gradio's parser reads it in full (MCP's tool descriptions, the
    client's view_api): one line per parameter, the returns on one line, no internals."""
    description, described, returns = public_doc(fn)
    args = [f"    {p}: {described[p]}" for p in parameters if described.get(p)]
    return "\n".join([description, "", "Args:", *args, "", "Returns:", f"    {returns}"])


def _example(component, value) -> None:
    """The snippet's value of a parameter (Gradio shows the default, else the example)."""
    component.example_payload = component.example_value = lambda: value


def _document(demo: gr.Blocks, name: str, fn) -> None:
    """Name each parameter of a `gr.api` endpoint, describe it in full and give it a real example
    on the API page ("Use via API": Gradio labels them '1st', '2nd', ..., cuts descriptions at
    their first line and shows "..." as the value); the answer is labelled "answer" and what it
    holds is said in the endpoint's description."""
    _, described, _ = get_function_description(fn)  # the served function's docstring: whole lines
    block_fn = next(f for f in demo.fns.values() if f.api_name == name)
    examples = EXAMPLES.get(name, {})
    for component, parameter in zip(block_fn.inputs, inspect.signature(fn).parameters):
        component.label = parameter
        if described.get(parameter):
            component._api_info = {**component._api_info, "additional_description": described[parameter]}
        if parameter in examples:
            _example(component, examples[parameter])
    for component in block_fn.outputs:
        component.label = "answer"


def register(demo: gr.Blocks) -> None:
    """Every client endpoint, typed, with its docstring on the API page (call inside the Blocks)."""
    for fn, name, group in ENDPOINTS:
        served = _endpoint(fn, name)
        description, _, returns = public_doc(fn)
        gr.api(served, api_name=name, api_description=f"{description} Returns: {returns}", **group)
        _document(demo, name, served)
