"""Beyond one card: a model dispatched by accelerate steers like the whole model; offload is asked for.

The disk-offload test is the real thing on a CPU: transformers/accelerate load part of a tiny
random Llama onto "disk" (an offload folder; those layers' weights are read back at every forward
pass) and the rest onto the CPU, and the steered tokens, scores and vectors must equal those of the
same model loaded whole. The manager test plans on a simulated card (the GPU is the only thing
simulated) on which the model only fits with layers in CPU RAM.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steering import api, catalog, devices, generate, gpu, planning
from steering.engine import SteeringEngine, VectorSpec
from steering.errors import InputError

PROMPT = "Tell me about your weekend."


@pytest.fixture(scope="module")
def whole_and_offloaded(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama (6 layers) loaded whole, and loaded with layers 2-4 on disk, the rest on the CPU."""
    whole = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if 2 <= i <= 4 else "cpu" for i in range(6)})
    folder = tmp_path_factory.mktemp("offload")
    offloaded = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32, device_map=device_map, offload_folder=str(folder)
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    return SteeringEngine(whole, tokenizer, "whole"), SteeringEngine(offloaded, tokenizer, "offloaded"), folder


def test_disk_offloaded_layers_really_live_on_disk(whole_and_offloaded, tiny_llama_dir):
    _, offloaded, _ = whole_and_offloaded
    layers = offloaded.model.model.layers
    assert all(p.device.type == "meta" for i in (2, 3, 4) for p in layers[i].parameters())  # not in memory
    assert all(p.device.type == "cpu" for p in layers[0].parameters())
    hook = layers[3].self_attn.q_proj._hf_hook  # accelerate reads the weight from disk at every forward pass
    assert hook.offload and hook.execution_device == "cpu"
    source = hook.weights_map.dataset.index["model.layers.3.self_attn.q_proj.weight"]["safetensors_file"]
    assert source == str(tiny_llama_dir / "model.safetensors")
    assert offloaded.device.type == "cpu"  # where the inputs go, although the first parameters may be "meta"


def test_a_disk_offloaded_model_steers_token_identically_to_the_whole_one(whole_and_offloaded):
    whole, offloaded, _ = whole_and_offloaded
    vectors = [
        VectorSpec(layer=3, coeff=4.0, text="dogs and cats"),  # a layer on disk
        VectorSpec(layer=1, coeff=2.0, positive="happy", negative="sad"),  # a layer in RAM
    ]
    sampling = generate.Sampling(max_new_tokens=12)
    compare = [generate.run_rows(e, PROMPT, generate.compare_rows(vectors, True), sampling) for e in (whole, offloaded)]
    assert compare[0].token_ids == compare[1].token_ids
    assert compare[0].token_ids[0] != compare[0].token_ids[1]  # the steering changed the output
    sweep = generate.sweep_rows("the Golden Gate Bridge", 4, [0.0, 2.0, 6.0, 12.0])
    rows = [generate.run_rows(e, PROMPT, sweep, sampling).token_ids for e in (whole, offloaded)]
    assert rows[0] == rows[1] and len({tuple(r) for r in rows[0]}) > 1
    scores = [
        generate.context_perplexities(e, generate.prompt_ids(e.tokenizer, PROMPT), rows[0]) for e in (whole, offloaded)
    ]
    assert scores[0] == pytest.approx(scores[1], rel=1e-5)
    effects = [generate.effect_scores(e, [[(vectors[0], 4.0)]], "dogs and cats") for e in (whole, offloaded)]
    assert effects[0] == pytest.approx(effects[1], rel=1e-5, abs=1e-6)
    texts = ["dogs", "the Golden Gate Bridge", "happy"]
    matrices = [sum(e.similarity(texts, 3), []) for e in (whole, offloaded)]  # the vectors, captured on disk
    assert matrices[0] == pytest.approx(matrices[1], abs=1e-5)
    assert whole.is_clean() and offloaded.is_clean()  # accelerate's hooks stay, our steering is gone


def _offload_card(spec: catalog.ModelSpec, quant: str) -> gpu.SimulatedNvml:
    """A simulated card whose headroom misses `spec`'s need by one and a half decoder layers'
    weights. (An offloaded layer's KV cache stays on the GPU, which runs it, and accelerate keeps
    room there for the largest offloaded module: here the tied embedding, so the layers go to RAM.)"""
    with gpu.use_nvml(gpu.simulate_gpu(80 * gpu.GiB)):
        big = gpu.probe(0)
    need = planning.estimate_for(spec, quant, big, 2048).need_bytes
    layer = devices.module_bytes(spec, quant)["model.layers.0"]
    return gpu.simulate_gpu(need - 3 * layer // 2 + gpu.SIMULATED_DRIVER_RESERVED_BYTES)


def test_an_offload_model_loads_only_when_asked(fresh_manager, tiny_qwen_dir, tiny_llama_dir, tmp_path_factory):
    fresh_manager.configure(
        margin_bytes=0, fallback_model=str(tiny_llama_dir), models_dirs=[str(tmp_path_factory.getbasetemp())]
    )
    spec = catalog.get_spec(str(tiny_qwen_dir))
    with gpu.use_nvml(_offload_card(spec, "fp32")):
        gpus = fresh_manager.probe_gpus()  # the loader's own estimate: a 2-row compare at 2048 tokens
        placed = planning.placement(
            spec, "fp32", planning.estimate_for(spec, "fp32", gpus[0]), gpus, gpu.system_ram(), 0
        )
        assert placed.verdict == "offload", placed
        split, row = placed.offload(), {"devices": placed.devices()}
        assert split["cpu_layers"] >= 1 and split["cpu_bytes"] > 0
        assert split["gpu_layers"] + split["cpu_layers"] == spec.n_layers
        assert split["expected_tokens_per_s"] > 0 and "estimate" in split["basis"]
        assert [d["device"] for d in row["devices"]] == ["cuda:0", "cpu"]

        refused = api.load_model(str(tiny_qwen_dir), "fp32")  # not asked: the fallback, and why
        assert refused["model"] == catalog.get_spec(str(tiny_llama_dir)).id
        assert "allow_offload=True" in refused["events"][-1]["reason"] and "tokens/s" in refused["events"][-1]["reason"]
        with pytest.raises(InputError, match="allow_offload"):
            api.load_model(str(tiny_qwen_dir), "fp32", allow_offload="yes")

        loaded = api.load_model(str(tiny_qwen_dir), "fp32", allow_offload=True)
    assert loaded["model"] == spec.id and loaded["event_count"] == 1  # no downgrade this time
    assert loaded["placement"]["offload"]["cpu_layers"] == split["cpu_layers"]
    assert loaded["placement"]["devices"] == row["devices"]
    assert loaded["device"] == "cpu"  # a simulated card: the process itself runs on the CPU


def test_the_memory_tab_shows_the_split(monkeypatch):
    """The Memory tab's table and picture (steering/views.py) on two simulated 8 GiB cards."""
    from steering.ui import views

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with gpu.use_nvml(gpu.simulate_gpu([8 * gpu.GiB, 8 * gpu.GiB], int(0.7 * gpu.GiB))):
        gpus = gpu.probe_all()
    plan = planning.plan(gpus[0], gpus=gpus, ram=gpu.system_ram(32 * gpu.GiB))
    table = {(r[0], r[1]): dict(zip(views.PLAN_COLUMNS, r)) for r in views.plan_rows(plan, plan["margin_bytes"])}
    split = table[("Qwen/Qwen2.5-7B-Instruct", "8bit")]
    assert split["verdict"] == "stable" and split["runs on"].startswith("cuda:0 ") and " + cuda:1 " in split["runs on"]
    assert split["spare / short by"].startswith("spare ") and split["spare / short by"].endswith(("cuda:0", "cuda:1"))
    offload = table[("Qwen/Qwen2.5-7B-Instruct", "fp16")]
    assert offload["verdict"] == "offload" and " + cpu " in offload["runs on"] and "tokens/s" in offload["runs on"]
    assert table[("Qwen/Qwen2.5-1.5B-Instruct", "4bit")]["runs on"] == "cuda:0"
    rows = {(r["id"], r["quant"]): r for r in plan["models"]}
    bars = views.memory_bars_html(
        [("split", rows[("Qwen/Qwen2.5-7B-Instruct", "8bit")]), ("one card", rows[(catalog.FALLBACK_ID, "4bit")])],
        plan["headroom_bytes"],
        plan["margin_bytes"],
    )
    assert bars.count('class="device-strip"') == 1 and "cuda:1: " in bars and "thin strip" in bars
    advice = views.load_advice(rows[("Qwen/Qwen2.5-7B-Instruct", "fp16")])  # the picker's sentence
    speed = rows[("Qwen/Qwen2.5-7B-Instruct", "fp16")]["offload"]["expected_tokens_per_s"]
    assert f"about {speed} tokens/s" in advice and "Allow offload" in advice
    assert "split across 2 GPUs" in views.load_advice(rows[("Qwen/Qwen2.5-7B-Instruct", "8bit")])
    assert views.load_advice(rows[(catalog.FALLBACK_ID, "4bit")]) == ""
