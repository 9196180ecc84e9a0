"""Do the vectors mean their text, and which coefficients steer without wrecking fluency?

    python research/vectors.py            # about 2 minutes on 2 CPU cores

On the embedded SmolLM2-135M (CPU, fp32, greedy) it prints
1. the mean pairwise cosine of four unrelated texts' vectors at layers n/4, n/2, 3n/4 for each
   capture mode (llm-steer's stock capture vs ours), and
2. coefficient sweeps (one batch per sweep) with `effect` (nats/token: how much more likely the
   steering text became) and `perplexity` of the output under the unsteered model, plus the start
   of each output, which is where the README's coefficient range comes from.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from steering import embedded  # noqa: E402
from steering import generate as G  # noqa: E402
from steering.engine import CAPTURE_MODES, SteeringEngine  # noqa: E402

TEXTS = ["logical", "Taylor Swift", "worm", "the Golden Gate Bridge"]
COEFFS = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0]
PROMPT = "Tell me about your weekend."


def main() -> None:
    torch.set_num_threads(2)
    folder = embedded.ensure_converted()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    engine = SteeringEngine(model, AutoTokenizer.from_pretrained(folder), "bench")
    n = engine.n_layers
    layers = (n // 4, n // 2, 3 * n // 4)
    print("mean pairwise cosine of", TEXTS)
    for mode in CAPTURE_MODES:
        cells = []
        for layer in layers:
            matrix = engine.similarity(TEXTS, layer, mode)
            pairs = [matrix[i][j] for i, j in itertools.combinations(range(len(TEXTS)), 2)]
            cells.append(f"L{layer} {sum(pairs) / len(pairs):.3f} [{min(pairs):.2f}, {max(pairs):.2f}]")
        print(f"  {mode:12s}", " | ".join(cells))
    for text, layer in itertools.product(("dogs", "Taylor Swift"), layers):
        rows = G.sweep_rows(text, layer, COEFFS)
        final = G.run_rows(engine, PROMPT, rows, G.Sampling(max_new_tokens=32))
        effects = G.effect_scores(engine, rows, text)
        ppl = G.perplexities(engine, PROMPT, final.token_ids)
        print(f"\n{text!r} at layer {layer}: coeff effect perplexity output")
        for coeff, eff, p, out in zip(COEFFS, effects, ppl, final.texts):
            print(f"  {coeff:5.2f} {eff:+6.2f} {p:8.1f}  {out[:70]!r}")


if __name__ == "__main__":
    main()
