"""The CPU numeric path of decoding: few-row linear layers computed weight-major.

A decoding step multiplies every weight matrix W (out x in) by one hidden state per batch row.
`torch.nn.functional.linear` computes that as x @ W.T with x (rows x in); MKL's fp32 GEMM picks a
poor kernel for 2-8 rows on the AMD EPYC CI machine: all the linear layers of SmolLM2-135M cost
32 ms for 1 row, 51-73 ms for 2 and 55-83 ms for 8 (every weight read from memory, 2 threads,
`bench/README.md`). The same product taken the other way round, W @ x.T (a GEMM whose small side
is N), costs 23-33 ms for 2 or 4 rows (as much as 1 row: the step is bound by reading the weights)
and 55-65 ms for 8 (there MKL's kernel is compute bound, ~70 GFLOP/s on 2 cores).

`small_batch_linears(model)` swaps that product in for the plain `nn.Linear` layers of a CPU fp32
model while a generation runs, for 2 to `MAX_ROWS` rows: the decoding steps of a compare or a
sweep. One row keeps `F.linear` (MKL's GEMV is the fastest there: padding one row into this GEMM
made single-row decoding ~10 % slower), and so does the prompt's prefill (many rows, compute
bound), so a single-row generation is bit for bit what plain transformers computes.

Batched rows are not bit-identical to separate runs, on this path or on plain `F.linear`: MKL
takes a different kernel for 1, 2-3, 4-11, ... rows (and, within a product, for a tail column),
so the last bits of a row depend on how many rows share its step. Greedy tokens stay identical in
practice (argmax is robust to last-bit differences): `bench/run.py` checks it on every run for
the compare and the sweep, `tests/test_engine.py` for compares, sweeps and mixed rows. (Padding every step to a
multiple of 4 columns makes 1-8 rows bit-identical with this MKL on this machine, but costs the
10 % above on single rows.)
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F

MIN_ROWS = 2  # one row: MKL's GEMV (F.linear) is faster
MAX_ROWS = 8  # a decoding step of the largest sweep (steering.limits: 8 coefficients)


def _weight_major_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` as (W @ x.T).T for a few rows; `F.linear` otherwise."""
    width = x.shape[-1] if x.dim() else 0
    rows = x.numel() // width if width else 0
    if not MIN_ROWS <= rows <= MAX_ROWS or x.dtype != torch.float32 or x.device.type != "cpu":
        return F.linear(x, self.weight, self.bias)
    out = torch.mm(self.weight, x.reshape(rows, width).t()).t()  # (rows, out), a transposed view
    out = out + self.bias if self.bias is not None else out.contiguous()
    return out.reshape(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def small_batch_linears(model) -> Iterator[int]:
    """Compute the model's few-row fp32 CPU linear layers weight-major for the block.

    Only exact `torch.nn.Linear` modules whose weight is fp32 on the CPU are touched (quantized
    and GPU layers are left alone); each gets an instance `forward`, removed again on exit.
    Yields how many layers were switched. The caller must hold the model for the whole block
    (the model manager's lock): other users of the model would see the switched layers too.
    """
    switched = [
        module
        for module in model.modules()
        if type(module) is torch.nn.Linear
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.float32
        and "forward" not in module.__dict__
    ]
    for module in switched:
        module.forward = types.MethodType(_weight_major_linear, module)
    try:
        yield len(switched)
    finally:
        for module in switched:
            module.__dict__.pop("forward", None)
