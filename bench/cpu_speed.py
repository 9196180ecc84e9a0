"""How fast a 7B model would decode on this CPU, by quantization: where the Memory tab's rough
*runs on* speeds come from (steering/ui/views.py, CPU_SECONDS_PER_WEIGHT_GB).

One decoding step reads every weight once, so the time of one token through Mistral-7B's layer
shapes (q and o 4096x4096, k and v 4096x1024, gate and up 4096x14336, down 14336x4096; 32 layers)
gives tokens per second. Timed side by side in one run: `torch.nn.Linear` in fp32 and bf16 and
bitsandbytes' NF4 `Linear4bit` (which runs on the CPU, dequantizing each weight every step).
Matmuls only (no attention, norms or sampling), so the numbers are upper bounds; the ratios to
fp32 are what carries over between machines. Random weights: no model is downloaded.

    python bench/cpu_speed.py [--threads 2] [--repeats 5]   # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# Mistral-7B-Instruct-v0.3, one decoder layer: (in, out, how many)
LAYER = ((4096, 4096, 2), (4096, 1024, 2), (4096, 14336, 2), (14336, 4096, 1))
N_LAYERS = 32
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "4bit": 0.5}


def linear(inp: int, out: int, quant: str) -> tuple[torch.nn.Module, torch.Tensor]:
    if quant == "4bit":
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(
            inp, out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True
        )
        layer.weight = bnb.nn.Params4bit(
            torch.randn(out, inp, dtype=torch.bfloat16) * 0.02,
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=True,
        )
        return layer.to("cpu"), torch.randn(1, 1, inp, dtype=torch.bfloat16)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[quant]
    return torch.nn.Linear(inp, out, bias=False).to(dtype), torch.randn(1, 1, inp, dtype=dtype)


def seconds_per_layer(quant: str, repeats: int) -> float:
    total = 0.0
    for inp, out, count in LAYER:
        layer, x = linear(inp, out, quant)
        with torch.no_grad():
            layer(x)  # warm-up (and, for NF4, the first quantization)
            start = time.perf_counter()
            for _ in range(repeats):
                layer(x)
        total += count * (time.perf_counter() - start) / repeats
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights_gb = N_LAYERS * sum(i * o * n for i, o, n in LAYER) / 1e9  # billions of weights in these layers
    rows = {}
    for quant in ("fp32", "bf16", "4bit"):
        token_s = N_LAYERS * seconds_per_layer(quant, args.repeats)
        rows[quant] = {
            "tokens_per_s": round(1 / token_s, 4),
            "seconds_per_weight_gb": round(token_s / (weights_gb * WEIGHT_BYTES[quant]), 3),
        }
    for row in rows.values():
        row["time_vs_fp32"] = round(rows["fp32"]["tokens_per_s"] / row["tokens_per_s"], 2)
    print(json.dumps({"threads": args.threads, "model_shapes": "Mistral-7B", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
