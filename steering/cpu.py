"""The CPU numeric path: a CPU fp32 model's linear layers computed by oneDNN instead of MKL.

Every token of every row goes through the model's linear layers (7 per block and the output
head; 211 in SmolLM2-135M), and on the CPU those are nearly all of the time. `F.linear` takes
MKL's fp32 GEMM; on the AMD EPYC CI machine (2 threads) MKL picks poor kernels here: the output
head (49152 x 576) costs 6.7 ms for 1 row, 13.7 ms for 2 and 11.1 ms for 8, and the blocks'
prefill runs at half the speed oneDNN reaches. oneDNN's inner product (the kernel PyTorch ships
for `torch.ops.mkldnn._linear_pointwise`, which its own compiler emits for CPU linears) on the
same products: 2.3 ms, 3.0 ms and 4.9 ms for the head, and about 2x faster block prefill.

Measured on the embedded SmolLM2 with plain transformers `generate` (48-token prompt, 16 new
tokens, greedy, 3 interleaved rounds): 1 row 0.73-0.80 s -> 0.62-0.64 s; the same prompt as
8 rows 1.69-1.82 s -> 1.02-1.09 s; an 8-row prefill 532-549 ms -> 288-319 ms. `bench/run.py`
measures it on every run (`details.linear_path`): the same generations with either path,
interleaved, in one process.

`use_onednn(model)` swaps the kernel in for the model's plain `nn.Linear` layers whose weight is
fp32 on the CPU (quantized layers, subclasses and layers with accelerate's hooks are left alone)
and keeps it for the model's life; the loader does it for every model it loads on the CPU.
Outside `torch.no_grad`/`inference_mode` a layer falls back to `F.linear` (the oneDNN op has no
backward). `use_mkl(model)` takes it away again (the benchmark compares the two).

Numerics: the two kernels sum in different orders, so logits differ in the last bits (~1e-4 on
SmolLM2's output head). Within one model every path (ours, stock llm-steer, plain `generate`)
uses the same kernel. Batched rows are not bit-identical to separate runs on either kernel (both
pick their blocking by the number of rows); greedy tokens stay identical in practice, and
`bench/run.py` and `tests/test_engine.py` check that.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

_MARK = "_steering_onednn"


def onednn_available() -> bool:
    """Whether this torch build has oneDNN (x86-64 and aarch64 wheels do) and its linear op."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` by oneDNN's inner product; `F.linear` where that op does not apply."""
    weight = self.weight
    if (
        x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return F.linear(x, weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")


def _eligible(module) -> bool:
    return (
        type(module) is torch.nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
        and "forward" not in module.__dict__  # accelerate's hooks (offload) or someone else's
    )


def use_onednn(model) -> int:
    """Compute the model's fp32 CPU `nn.Linear` layers with oneDNN from now on; returns how many
    layers that is (0 where this torch has no oneDNN). Idempotent."""
    if not onednn_available():
        return 0
    switched = 0
    for module in model.modules():
        if getattr(module, _MARK, False):
            switched += 1
        elif _eligible(module):
            module.forward = types.MethodType(_onednn_linear, module)
            setattr(module, _MARK, True)
            switched += 1
    return switched


def use_mkl(model) -> int:
    """Undo `use_onednn`: the layers go back to `F.linear` (MKL). Returns how many were switched."""
    switched = 0
    for module in model.modules():
        if getattr(module, _MARK, False):
            module.__dict__.pop("forward", None)
            delattr(module, _MARK)
            switched += 1
    return switched


def kernel(model) -> str:
    """The kernel of the model's CPU linear layers: "onednn" after `use_onednn`, else "mkl"."""
    return "onednn" if any(getattr(m, _MARK, False) for m in model.modules()) else "mkl"
