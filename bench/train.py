"""Issue 22's measurement: vectors trained from examples, on the embedded SmolLM2-135M (CPU, fp32).

    python bench/train.py                  # detection + speed (+ steering with --stage all)
    python bench/train.py --stage detect   # concept detection only (~2 minutes on 2 cores)
    python bench/train.py --stage speed    # 200-text training and a 256-text read
    python bench/train.py --stage steer    # on-topic-and-fluent rate of trained vs text vectors

Detection (bench/train_concepts.json: 8 concepts x 12 positive and 12 negative sentences): every
text's pooled hidden states at every layer come from one set of batched passes
(`training.pooled_states`, all three poolings); then 3 folds per concept (fold k holds out
examples 4k..4k+3 of each side). On each fold's 8+8 training examples `training.layer_aurocs` and
`training.choose_layer` choose the layer exactly as `train_vector(layer=None)` does (its own
inner split), the direction is refitted on the 8+8 and scored on the fold's 4+4 test examples.
Reported: mean test AUROC per method x pooling at the chosen layer and at the middle layer, with
neutral built-in negatives instead of the concept's, and for the plain text vector of the
concept's name (the engine's capture, `SteeringEngine.direction`, mode "contexts"), whose
projection is pooled the same way.

Prints one JSON object; writes bench/results/train.json (each stage updates its own key).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "train.json"
CONCEPTS = HERE / "train_concepts.json"
FOLDS = 3


def load_engine():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steering import cpu, embedded
    from steering.engine import SteeringEngine

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    folder = embedded.ensure_converted()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
    cpu.use_onednn(model)  # as the loader does for a CPU model
    return SteeringEngine(model, AutoTokenizer.from_pretrained(folder), "bench-train")


def fold(n: int, k: int) -> tuple[list[int], list[int]]:
    test = list(range(4 * k, 4 * k + 4))
    return [i for i in range(n) if i not in test], test


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4)


def pca_uncentred(pos, neg):
    """For comparison only (not a method of the app): the first right-singular vector of the
    paired differences *without* centring them, i.e. PCA that keeps the mean difference."""
    import numpy as np

    from steering import training

    diffs = np.stack([pos[i] - neg[j] for i, j in training.pairs(len(pos), len(neg))])
    direction = np.linalg.svd(diffs, full_matrices=False)[2][0]
    return direction if (pos @ direction).mean() >= (neg @ direction).mean() else -direction


def detection(engine, concepts: list[dict]) -> dict:
    import numpy as np

    from steering import training
    from steering.engine import VectorSpec

    texts = [t for c in concepts for t in c["positives"] + c["negatives"]] + list(training.NEUTRAL_TEXTS)
    started = time.perf_counter()
    states = training.pooled_states(engine.model, engine.tokenizer, texts, training.POOLINGS)
    states = {k: v.double().numpy() for k, v in states.items()}  # (N, L, H)
    forward_s = time.perf_counter() - started
    n_layers, middle = states["mean"].shape[1], states["mean"].shape[1] // 2
    neutral = slice(len(texts) - len(training.NEUTRAL_TEXTS), len(texts))
    cells: dict[str, list[float]] = {}  # "method|pooling|where" -> test AUROC per (concept, fold)
    curves: dict[str, list[list[float]]] = {}  # "method|pooling" -> per (concept, fold) test AUROC by layer
    chosen_layers: dict[str, list[int]] = {}
    offset = 0
    for concept in concepts:
        n = len(concept["positives"])
        for pooling, data in states.items():
            pos_all, neg_all = data[offset : offset + n], data[offset + n : offset + 2 * n]
            for k in range(FOLDS):
                fit, test = fold(n, k)
                pos, neg = pos_all[fit], neg_all[fit]
                for method in training.METHODS:
                    for negs, tag in ((neg, ""), (data[neutral], "+neutral")):
                        if tag and method != "mean_diff":
                            continue
                        rows, _ = training.layer_aurocs(method, pos, negs)
                        layer = training.choose_layer(rows, n_layers)
                        chosen_layers.setdefault(f"{method}{tag}|{pooling}", []).append(layer)
                        for where, at in (("chosen", layer), ("middle", middle)):
                            d = training.fit_direction(method, pos[:, at], negs[:, at])
                            score = training.auroc(pos_all[test, at] @ d, neg_all[test, at] @ d)
                            cells.setdefault(f"{method}{tag}|{pooling}|{where}", []).append(score)
                        if method == "pca" and not tag:  # the uncentred variant, at the same layers
                            for where, at in (("chosen", layer), ("middle", middle)):
                                d = pca_uncentred(pos[:, at], neg[:, at])
                                score = training.auroc(pos_all[test, at] @ d, neg_all[test, at] @ d)
                                cells.setdefault(f"pca_uncentred|{pooling}|{where}", []).append(score)
                        if not tag:
                            curve = []
                            for at in range(n_layers):
                                d = training.fit_direction(method, pos[:, at], negs[:, at])
                                curve.append(training.auroc(pos_all[test, at] @ d, neg_all[test, at] @ d))
                            curves.setdefault(f"{method}|{pooling}", []).append(curve)
                # The text vector of the concept's name at the layer mean_diff chose, and the middle.
                for where, at in (("chosen", chosen_layers[f"mean_diff|{pooling}"][-1]), ("middle", middle)):
                    spec = VectorSpec(layer=at, coeff=1.0, text=concept["text"])
                    d = engine.direction(spec, "contexts").view(-1).double().numpy()
                    score = training.auroc(pos_all[fold(n, k)[1], at] @ d, neg_all[fold(n, k)[1], at] @ d)
                    cells.setdefault(f"text|{pooling}|{where}", []).append(score)
        offset += 2 * n
    table = {key: _mean(values) for key, values in sorted(cells.items())}
    by_pooling = {p: _mean(v for k, v in table.items() if k.split("|")[1] == p and k.endswith("chosen")
                           and k.split("|")[0] in training.METHODS) for p in training.POOLINGS}  # fmt: skip
    winner = max(by_pooling, key=by_pooling.get)
    runner_up = max((p for p in by_pooling if p != winner), key=by_pooling.get)
    per_layer = {key: [round(float(v), 3) for v in np.mean(curve, axis=0)] for key, curve in curves.items()}
    return {
        "set": CONCEPTS.name,
        "concepts": [c["name"] for c in concepts],
        "protocol": f"{FOLDS} folds per concept; fold k tests examples 4k..4k+3 of each side, trains on the other 8+8",
        "auroc": table,
        "auroc_by_pooling_at_chosen": by_pooling,
        "pooling_winner": {
            "pooling": winner,
            "margin_over_next": round(by_pooling[winner] - by_pooling[runner_up], 4),
            "next": runner_up,
        },  # fmt: skip
        "chosen_layers": {k: sorted(v) for k, v in chosen_layers.items()},
        "test_auroc_by_layer": per_layer,
        "middle_layer": middle,
        "forward_s": round(forward_s, 2),
        "texts": len(texts),
    }


def long_texts(concepts: list[dict], n: int, side: str, tokens: int, tokenizer) -> list[str]:
    """n texts of about `tokens` tokens, each a run of the concept set's sentences of one side."""
    pool = [t for c in concepts for t in c[side]]
    out, i = [], 0
    while len(out) < n:
        parts = []
        while len(tokenizer.encode(" ".join(parts), add_special_tokens=False)) < tokens:
            parts.append(pool[i % len(pool)])
            i += 1
        out.append(" ".join(parts))
    return out


def speed(engine, concepts: list[dict]) -> dict:
    from steering import training
    from steering.engine import parse_vector

    pos = long_texts(concepts, 100, "positives", 100, engine.tokenizer)
    neg = long_texts(concepts[::-1], 100, "negatives", 100, engine.tokenizer)
    tokens = [len(r) for r in training.token_rows(engine.tokenizer, pos + neg)]
    engine.layer_rms(engine.n_layers // 2)  # the RMS capture is a separate small pass: warm it
    out: dict = {"train_texts": len(tokens), "mean_tokens": round(sum(tokens) / len(tokens), 1), "train": {}}
    for method in training.METHODS:
        started = time.perf_counter()
        result = training.train(engine, pos, neg, method, None)
        out["train"][method] = {**result["seconds"], "total": round(time.perf_counter() - started, 2),
                                "layer": result["layer"]}  # fmt: skip
    spec = parse_vector(result["vector"], 0, engine.n_layers)
    texts = (pos + neg + pos)[:256]
    started = time.perf_counter()
    training.read(engine, texts, spec)
    out["read_256"] = {"seconds": round(time.perf_counter() - started, 2), "mean_tokens": out["mean_tokens"]}
    chars = long_texts(concepts, 256, "positives", 240, engine.tokenizer)
    chars = [t[:1000] for t in chars]
    started = time.perf_counter()
    training.read(engine, chars, spec)
    out["read_256_1000_chars"] = {
        "seconds": round(time.perf_counter() - started, 2),
        "mean_tokens": round(sum(len(r) for r in training.token_rows(engine.tokenizer, chars)) / 256, 1),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("detect", "speed", "steer", "default", "all"), default="default")
    args = parser.parse_args()
    concepts = json.loads(CONCEPTS.read_text())["concepts"]
    engine = load_engine()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stages = {"default": ("detect", "speed"), "all": ("detect", "speed", "steer")}.get(args.stage, (args.stage,))
    if "detect" in stages:
        results["detection"] = detection(engine, concepts)
    if "speed" in stages:
        results["speed"] = speed(engine, concepts)
    if "steer" in stages:
        from steer_trained import steering  # bench/steer_trained.py: generation-heavy, kept apart

        def save(report: dict) -> None:
            RESULTS.write_text(json.dumps({**results, "steering": report}, indent=1) + "\n")

        results["steering"] = steering(engine, save)
    results["machine"] = {"threads": min(2, os.cpu_count() or 1), "model": "SmolLM2-135M-Instruct fp32 CPU"}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
