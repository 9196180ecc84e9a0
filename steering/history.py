"""Every result of a browser session, kept so it can be looked at again, downloaded and re-run.

One bounded history per browser session (Gradio's session hash), held in this process: the
newest `MAX_ENTRIES` results of the newest `MAX_SESSIONS` sessions. An entry is plain JSON: what
was asked (`request`: the arguments of the api function that answered, so it can be re-run),
what came back (`result`), and what shaped it (model, quantization, capture mode, seed, vectors,
package versions). Nothing here imports gradio or torch.

Other parts of the app add their results with `record(session, kind, request, result)` (the
Chat tab can call it for each turn with kind "chat").
"""

from __future__ import annotations

import collections
import json
import threading
import time
from importlib import metadata

from steering.vocab import DEFAULT_CAPTURE_MODE

MAX_ENTRIES = 50  # per session: a morning's work; the oldest go first
MAX_SESSIONS = 64  # sessions kept in this process; the least recently used go first
MAX_TEXT_CHARS = 20_000  # any longer text in an entry is cut (a 512-token output is ~3,000)
MAX_LIST_ITEMS = 1024  # a longer list (a raw direction) is replaced by a note: re-running it is refused
KINDS = ("steer", "sweep", "autotune", "chat")
PACKAGES = ("steering-lab", "llm-steer", "torch", "transformers", "gradio")
HISTORY_COLUMNS = ("#", "time", "kind", "model", "quant", "capture", "seed", "vectors", "prompt", "summary")

_lock = threading.Lock()
_sessions: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
_versions: dict[str, str] | None = None


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape a result (read once)."""
    global _versions
    if _versions is None:
        found = {}
        for name in PACKAGES:
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                found[name] = "not installed" if name != "steering-lab" else "source tree"
        _versions = found
    return dict(_versions)


def _cut(value):
    """`value` with long texts shortened, so an entry stays small whatever a client sends."""
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT_CHARS else value[:MAX_TEXT_CHARS] + "…"
    if isinstance(value, dict):
        return {str(k): _cut(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # a raw direction of a large model is not kept whole
        return [_cut(v) for v in value] if len(value) <= MAX_LIST_ITEMS else f"<{len(value)} numbers, not kept>"
    return value


def record(session: str | None, kind: str, request: dict, result: dict, *, context: dict | None = None) -> dict:
    """Add one result to `session`'s history and return the entry.

    Args:
        session: the browser session (gr.Request.session_hash); None for a caller without one.
        kind: "steer", "sweep", "autotune" or "chat".
        request: the keyword arguments of the api function that produced the result (so that
            `rerun_request` can repeat it): prompt, vectors, seed, capture_mode, ...
        result: the api function's answer (model, quant, texts, rows, ...).
        context: anything else worth keeping (e.g. "stopped": True; "quant" when the result
            does not say it).
    """
    context = dict(context or {})
    if kind not in KINDS:
        raise ValueError(f"history kind must be one of {KINDS}; got {kind!r}")
    entry = _cut(
        {
            "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "kind": kind,
            "model": result.get("model"),
            "quant": result.get("quant") or context.pop("quant", None),
            # sweeps and auto-tunes capture texts the default way (their endpoints take no mode)
            "capture_mode": request.get("capture_mode") or DEFAULT_CAPTURE_MODE,
            "seed": request.get("seed"),
            "vectors": request.get("vectors") or _sweep_vectors(kind, request),
            "versions": versions(),
            "request": request,
            "result": {k: v for k, v in result.items() if k != "done"},
            **context,
        }
    )
    key = session or "-"
    with _lock:
        entries = _sessions.pop(key, None) or collections.deque(maxlen=MAX_ENTRIES)
        _sessions[key] = entries  # now the most recently used
        while len(_sessions) > MAX_SESSIONS:
            _sessions.popitem(last=False)
        entries.append(entry)
    return entry


def _sweep_vectors(kind: str, request: dict) -> list[dict]:
    """A sweep's or an auto-tune's steering text, in the vectors' shape (without a coefficient)."""
    if kind not in ("sweep", "autotune"):
        return []
    vector = {k: request[k] for k in ("text", "positive", "negative") if request.get(k)}
    if "layer" in request:
        vector["layer"] = request["layer"]
    return [vector] if vector else []


def entries(session: str | None) -> list[dict]:
    """`session`'s entries, oldest first (copies)."""
    with _lock:
        return json.loads(json.dumps(list(_sessions.get(session or "-", ()))))


def clear(session: str | None) -> None:
    with _lock:
        _sessions.pop(session or "-", None)


def clear_all() -> None:
    """Forget every session's entries (tests start each case from an empty store)."""
    with _lock:
        _sessions.clear()


def to_jsonl(session: str | None) -> str:
    """The session's history as JSON Lines: one entry per line, oldest first."""
    return "".join(json.dumps(entry, allow_nan=False, ensure_ascii=False) + "\n" for entry in entries(session))


def _summary(entry: dict) -> str:
    result = entry.get("result") or {}
    if entry["kind"] == "steer":
        text = result.get("steered") or ""
    elif entry["kind"] == "sweep":
        text = f"{len(result.get('rows') or [])} rows, recommended {result.get('recommended')}"
    elif entry["kind"] == "autotune":
        text = f"layer {result.get('layer')}, coeff {result.get('coeff')}: {result.get('reason', '')}"
    else:
        text = result.get("steered") or result.get("reply") or ""
    if entry.get("stopped"):
        text = "(stopped) " + text
    return _shortened(text)


def _shortened(text: str, at: int = 80) -> str:
    return text if len(text) <= at else text[: at - 1] + "…"


def _vector_label(vector: dict) -> str:
    if vector.get("positive") or vector.get("negative"):
        name = f"{vector.get('positive', '')} − {vector.get('negative', '')}"
    elif "direction" in vector:
        name = "direction"
    else:
        name = str(vector.get("text", ""))
    coeff = f" ×{vector['coeff']:g}" if isinstance(vector.get("coeff"), (int, float)) else ""
    layer = f" @{vector['layer']}" if vector.get("layer") is not None else ""
    return f"{name}{coeff}{layer}"


def table_rows(session: str | None) -> list[list]:
    """The history as table rows in `HISTORY_COLUMNS` order, newest first, numbered from 1 (oldest)."""
    rows = []
    for number, entry in enumerate(entries(session), start=1):
        vectors = "; ".join(_vector_label(v) for v in entry.get("vectors") or [] if isinstance(v, dict))
        rows.append(
            [
                number,
                entry["time"],
                entry["kind"],
                entry.get("model") or "",
                entry.get("quant") or "",
                entry.get("capture_mode") or "",
                entry.get("seed"),
                vectors,
                _shortened(str((entry.get("request") or {}).get("prompt") or "")),
                _summary(entry),
            ]
        )
    return rows[::-1]


def entry(session: str | None, number) -> dict:
    """Entry `number` (1-based, as the table shows it); raises ValueError when there is none."""
    found = entries(session)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not float(number).is_integer():
        raise ValueError(f"give an entry number from 1 to {len(found)}")
    if not 1 <= int(number) <= len(found):
        raise ValueError(f"give an entry number from 1 to {len(found)}" if found else "the history is empty")
    return found[int(number) - 1]
