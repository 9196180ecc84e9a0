"""Real peers (issue 24), the fast part: what `make interop` (bench/interop.py) proves with repeng
and a llama.cpp build, checked here without the C++ build.

* the raw scale: a raw direction is added to a layer's input bit for bit as repeng's
  `ControlModel` adds it to the output of the block below (h + v at every position), and greedy
  generation is token-identical to a plain transformers forward hook doing that;
* the import mapping: `direction.N` lands at layer N+1 with its raw magnitude, and the answer
  says so;
* repeng itself (`ControlVector.train`, `export_gguf`, `ControlModel`), when `.interop/repeng`
  exists (`make interop` installs it); set STEERING_REQUIRE_INTEROP=1 to fail instead of skip;
* llama.cpp steered by our exported file, when `.interop/llama-build` holds the binary.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from steering import generate as G
from steering import vector_io
from steering.engine import VectorSpec, parse_vector

ROOT = Path(__file__).resolve().parent.parent
REPENG_DIR = ROOT / ".interop" / "repeng"
LLAMA_BIN = ROOT / ".interop" / "llama-build" / "bin" / "llama-completion"
# CI installs the repeng half (`make interop ARGS="--part repeng"`) and requires it; the llama.cpp
# build (3-20 minutes on 2 cores) is required only with STEERING_REQUIRE_LLAMA_CPP=1.
REQUIRE = os.environ.get("STEERING_REQUIRE_INTEROP") == "1"
REQUIRE_LLAMA_CPP = os.environ.get("STEERING_REQUIRE_LLAMA_CPP") == "1"
PROMPT = "Tell me about your weekend."
TOKENS = 16
LAYER = 12  # ours: the input of layer 12 = the output of block 11 = repeng's / llama.cpp's 11


def _need(path: Path, what: str, required: bool = REQUIRE) -> None:
    if not path.exists():
        if required:
            pytest.fail(f"{what} is missing at {path} (required here): run `make interop`")
        pytest.skip(f"{what} is not installed here (`make interop` installs it)")


def _raw(hidden: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) * scale


def _add_after_block(model, block: int, vector: torch.Tensor):
    """repeng's ControlModule in four lines: add `vector` to block `block`'s output, every position."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + vector.to(output[0].dtype),) + output[1:]
        return output + vector.to(output.dtype)

    return model.model.layers[block].register_forward_hook(hook)


def _new_ids(model, tokenizer, out: torch.Tensor, ids) -> list[int]:
    """The generated tokens before the first end-of-sequence token (what the lab's rows hold)."""
    eos = G._eos_ids(model, tokenizer)
    new = out[0, len(ids[0]) :].tolist()
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


def _layer_input(model, layer: int, run) -> torch.Tensor:
    seen = []
    norm = model.model.layers[layer].input_layernorm
    hook = norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        run()
    finally:
        hook.remove()
    return seen[0]


def test_a_raw_direction_is_added_bit_for_bit_as_repeng_adds_it(smol, smol_engine):
    model, tokenizer = smol
    raw = _raw(model.config.hidden_size)
    spec = VectorSpec(layer=LAYER, coeff=1.5, direction=tuple(raw.tolist()), positions="all")
    ids = torch.tensor([G.prompt_ids(tokenizer, PROMPT)])
    applied = 1.5 * torch.tensor(spec.direction, dtype=torch.float32)  # what repeng's set_control(v, 1.5) adds

    def ours():
        with smol_engine.installed([[(spec, 1.5)]], "contexts"), torch.inference_mode():
            model(input_ids=ids)

    def theirs():
        hook = _add_after_block(model, LAYER - 1, applied)
        try:
            with torch.inference_mode():
                model(input_ids=ids)
        finally:
            hook.remove()

    got, expected = _layer_input(model, LAYER, ours), _layer_input(model, LAYER, theirs)
    assert torch.equal(got, expected)  # bit for bit, at every position
    assert smol_engine.is_clean()

    # Greedy generation, prompt and every new token: token-identical.
    hook = _add_after_block(model, LAYER - 1, applied)
    try:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    final = G.run_rows(smol_engine, PROMPT, [[(spec, 1.5)], []], G.Sampling(max_new_tokens=TOKENS))
    assert final.token_ids[0] == _new_ids(model, tokenizer, out, ids) and final.token_ids[0] != final.token_ids[1]


def test_a_raw_prompt_only_direction_is_added_in_the_prefill_only(smol, smol_engine):
    model, tokenizer = smol
    raw = _raw(model.config.hidden_size)
    prompt_only = VectorSpec(layer=LAYER, coeff=1.0, direction=tuple(raw.tolist()), positions="prompt")
    every = VectorSpec(layer=LAYER, coeff=1.0, direction=tuple(raw.tolist()), positions="all")
    rows = [[(prompt_only, 1.0)], [(every, 1.0)], []]
    final = G.run_rows(smol_engine, PROMPT, rows, G.Sampling(max_new_tokens=TOKENS))
    assert len({tuple(ids) for ids in final.token_ids}) == 3
    ids = torch.tensor([G.prompt_ids(tokenizer, PROMPT)])

    def in_prefill(module, args, output):
        if output.shape[1] > 1:
            return output + raw
        return output

    hook = model.model.layers[LAYER - 1].register_forward_hook(in_prefill)
    try:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
    finally:
        hook.remove()
    assert _new_ids(model, tokenizer, out, ids) == final.token_ids[0]


def test_the_export_scale_is_the_rms_llm_steer_multiplies_by_while_the_model_writes(smol, smol_engine):
    """`layer_rms` (a coefficient's absolute size in an exported file) is the RMS of the layer's
    input at the newest token of a reply, where llm-steer reads it at every decoding step: within
    5% of what a greedy reply really has (the bare-neutral-text rule before issue 24 was 9% off at
    layer 15 and 19% at layer 5, and llama.cpp looped more often than we did)."""
    from llm_steer import Steer

    model, _ = smol
    for layer in (5, 15):
        seen = []

        def hook(module, args, kwargs, seen=seen):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if hidden.shape[1] == 1:  # a decoding step
                seen.append(float(Steer._rms(hidden[:, -1:, :]).view(-1)[0]))

        handle = model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for prompt in ("Tell me about your day.", "What is a good way to spend an evening?"):
                G.run_rows(smol_engine, prompt, [[]], G.Sampling(max_new_tokens=24))
        finally:
            handle.remove()
        decoding = sum(seen) / len(seen)
        assert abs(smol_engine.layer_rms(layer) / decoding - 1) < 0.05, (layer, smol_engine.layer_rms(layer), decoding)


def _foreign_tensors(hidden: int) -> dict[str, np.ndarray]:
    return {f"direction.{n}": _raw(hidden, 1.0, n).numpy() for n in (11, 5)}


def test_a_foreign_file_maps_direction_n_to_layer_n_plus_1_at_raw_magnitude():
    tensors = _foreign_tensors(576)
    metadata = {"general.architecture": "controlvector", "controlvector.model_hint": "llama"}
    vectors, info = vector_io.vectors_from_file(tensors, metadata, n_layers=30, hidden_size=576)
    assert [(v["layer"], v["coeff"], v["positions"]) for v in vectors] == [(6, 1.0, "all"), (12, 1.0, "all")]
    assert [m["tensor"] for m in info["mapping"]] == ["direction.5", "direction.11"]
    for m, v in zip(info["mapping"], vectors):
        assert (m["layer"], m["block_output"], m["magnitude"], m["coeff"]) == (v["layer"], v["layer"] - 1, "raw", 1.0)
        assert m["norm"] == pytest.approx(float(np.linalg.norm(tensors[m["tensor"]])), rel=1e-6)
        assert np.array_equal(np.asarray(v["direction"], dtype=np.float32), tensors[m["tensor"]])
    note = info["mapping_note"]
    assert "output of block N" in note and "repeng" in note and "llama.cpp" in note and "layer N + 1" in note
    # A request built from it parses back to the same raw vectors.
    assert [parse_vector(v, i, 30).direction for i, v in enumerate(vectors)] == [tuple(v["direction"]) for v in vectors]


def _repeng():
    _need(REPENG_DIR / "repeng" / "__init__.py", "repeng 0.4.0")
    if str(REPENG_DIR) not in sys.path:
        sys.path.append(str(REPENG_DIR))
    if not hasattr(np, "float_"):  # repeng 0.4.0's type hints name numpy 1's alias (bench/interop.py)
        np.float_ = np.float64
    import repeng

    return repeng


def test_a_repeng_vector_steers_here_token_for_token_as_in_repeng(smol, smol_engine, embedded_dir, tmp_path):
    repeng = _repeng()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, tokenizer = smol
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()  # repeng wraps it
    their_tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    their_tokenizer.pad_token = their_tokenizer.pad_token or their_tokenizer.eos_token

    def chat(persona):
        messages = [{"role": "user", "content": f"Act as if you are {persona}."}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    dataset = [
        repeng.DatasetEntry(positive=chat("extremely happy") + s, negative=chat("extremely sad") + s)
        for s in ("I", "Today I", "The weather", "My friends", "Life is", "I feel")
    ]
    layers = list(range(8, 16))
    vector = repeng.ControlVector.train(model, their_tokenizer, dataset, hidden_layers=layers)
    path = tmp_path / "repeng.gguf"
    vector.export_gguf(str(path))

    tensors, metadata = vector_io.read_file(path)
    vectors, info = vector_io.vectors_from_file(tensors, metadata, n_layers=30, hidden_size=576)
    assert [m["tensor"] for m in info["mapping"]] == [f"direction.{n}" for n in layers]
    assert [v["layer"] for v in vectors] == [n + 1 for n in layers]
    coeff = 8.0
    specs = [parse_vector(dict(v, coeff=coeff), i, 30) for i, v in enumerate(vectors)]

    control = repeng.ControlModel(model, layers)
    control.set_control(vector, coeff)
    ids = G.prompt_ids(tokenizer, PROMPT)
    eos = G._eos_ids(model, tokenizer)
    with torch.inference_mode():
        out = control.generate(
            torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
        )
    theirs = _new_ids(model, tokenizer, out, [ids])
    final = G.run_rows(smol_engine, PROMPT, G.compare_rows(specs, True), G.Sampling(max_new_tokens=TOKENS))
    assert final.token_ids[0] == theirs
    assert final.token_ids[0] != final.token_ids[1]  # and it steers
    control.unwrap()


def test_llama_cpp_is_steered_by_our_exported_file(smol_engine, tmp_path):
    _need(LLAMA_BIN, "the llama.cpp build (llama-completion)", REQUIRE_LLAMA_CPP)
    sys.path.insert(0, str(ROOT / "bench"))
    import interop

    from steering import embedded

    spec = VectorSpec(layer=15, coeff=0.45, text="the ocean", positions="all")
    path = vector_io.export_file(smol_engine, [spec], "gguf", mode="contexts", model_id="smol-test")
    model = str(embedded.gguf_path())
    no_repack = interop.needs_no_repack(str(LLAMA_BIN), model)
    prompt = smol_engine.tokenizer.decode(G.prompt_ids(smol_engine.tokenizer, "What should I do this weekend?"))
    plain = interop.run_llama(interop.llama_command(str(LLAMA_BIN), model, prompt, 24, None, None, no_repack))
    steered = interop.run_llama(interop.llama_command(str(LLAMA_BIN), model, prompt, 24, str(path), 15, no_repack))
    assert plain.strip() and steered.strip() and steered != plain
    # A range that leaves out direction.14 leaves llama.cpp's output alone: the file's only tensor is there.
    command = interop.llama_command(str(LLAMA_BIN), model, prompt, 24, str(path), None, no_repack)
    command += ["--control-vector-layer-range", "1", "13"]
    assert interop.run_llama(command) == plain
    assert subprocess.run([str(LLAMA_BIN), "--version"], capture_output=True).returncode == 0
